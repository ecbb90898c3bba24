"""Models kept loaded in a worker process between jobs, so that consecutive jobs on one model skip loading it.

:class:`ModelCache` holds loaded models by model id and device, least recently used first out, at most
``max_bytes`` of their weights and buffers together. Each entry remembers the signature of the file it
was loaded from (size, device and inode, modification and status-change times in nanoseconds): a file
replaced or rewritten since, which changes at least one of them, is loaded again instead of served stale.
With an object store the storage's local copy is the file: a new version of the object (another ETag)
becomes a new copy there. The signature is read before the file is loaded, so a change during the
load makes the next job load again rather than keep an older model under a newer signature.

One cache per process (:func:`process_cache`), shared by its threads: lookups, loads and evictions
hold its lock. A job reads its model's row before it asks the cache, so a deleted model fails the
job as before; :meth:`ModelCache.discard` drops a model known to be gone.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Loader = Callable[[Path, str], Any]
"""Loads the model file at a path onto a device (``auto``, ``cpu``, ``cuda``...)."""


def file_signature(path: Path) -> tuple[int, ...]:
    """What changes whenever a file's bytes change or another file takes its name: size, device, inode,
    modification and status-change times (ns)."""
    stat = os.stat(path)
    return (stat.st_size, stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)


def model_bytes(model: Any) -> int:
    """Bytes of the weights and buffers of a loaded model's network (``model.net``)."""
    net = model.net
    tensors = [*net.parameters(), *net.buffers()]
    return int(sum(t.numel() * t.element_size() for t in tensors))


def load_trained_model(path: Path, device: str) -> Any:
    """:func:`embedseg_service.core.model.checkpoint.load_model`: the loader of the worker's cache."""
    from embedseg_service.core.model.checkpoint import load_model

    return load_model(path, device=device)


@dataclass
class _Entry:
    signature: tuple[int, ...]
    model: Any
    size: int


class ModelCache:
    """Loaded models by ``(model id, device)``, least recently used first out, at most ``max_bytes`` in all.

    ``loads`` and ``hits`` count the calls of :meth:`get` that loaded a model and that found it kept. A
    model larger than ``max_bytes`` (all of them with ``max_bytes`` 0) is loaded for its job and not kept.
    """

    def __init__(self, max_bytes: int, loader: Loader = load_trained_model) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be 0 or more, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.loader = loader
        self.loads = 0
        self.hits = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, model_id: object) -> bool:
        return any(key[0] == model_id for key in list(self._entries))

    @property
    def total_bytes(self) -> int:
        """Bytes of the models kept now."""
        return sum(entry.size for entry in list(self._entries.values()))

    def get(self, model_id: str, path: Path, device: str = "auto") -> Any:
        """The model ``model_id`` loaded from ``path`` onto ``device``: the kept one when ``path`` has not
        changed since it was loaded, else loaded now (and kept, evicting the least recently used)."""
        key = (model_id, device)
        with self._lock:
            signature = file_signature(path)
            entry = self._entries.get(key)
            if entry is not None and entry.signature == signature:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry.model
            self._entries.pop(key, None)
            model = self.loader(path, device)
            self.loads += 1
            size = model_bytes(model)
            if size <= self.max_bytes:
                self._entries[key] = _Entry(signature, model, size)
                self._evict()
            return model

    def resize(self, max_bytes: int) -> None:
        """Set the bound to ``max_bytes`` and evict down to it."""
        with self._lock:
            self.max_bytes = max(0, int(max_bytes))
            self._evict()

    def discard(self, model_id: str) -> None:
        """Drop the model ``model_id`` (on every device)."""
        with self._lock:
            for key in [key for key in self._entries if key[0] == model_id]:
                del self._entries[key]

    def clear(self) -> None:
        """Drop every kept model."""
        with self._lock:
            self._entries.clear()

    def _evict(self) -> None:
        total = sum(entry.size for entry in self._entries.values())
        while self._entries and total > self.max_bytes:
            _, entry = self._entries.popitem(last=False)
            total -= entry.size


_process_cache: ModelCache | None = None
_process_lock = threading.Lock()


def process_cache(max_bytes: int) -> ModelCache:
    """This process's cache, bounded to ``max_bytes`` (the setting ``model_cache_bytes``)."""
    global _process_cache
    with _process_lock:
        if _process_cache is None:
            _process_cache = ModelCache(max_bytes)
        elif _process_cache.max_bytes != max_bytes:
            _process_cache.resize(max_bytes)
        return _process_cache
