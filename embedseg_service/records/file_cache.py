"""A bounded folder of local copies of stored objects, for readers that need a file name.

An object store hands out bytes, while TIFF readers and ``torch.load`` want a path; this cache keeps
a copy of each object asked for, as ``<root>/data/<key>``, with a record ``<root>/meta/<key>.json``
holding the object's version tag (its ETag), its size and the SHA-256 of the copy.

Checks: a copy is hashed while it is written, and hashed again before it is handed out whenever its
file changed since its last check (size, inode, modification or status-change time differ from the
record: any write through the file system moves the status-change time, which no program can set
back). A copy whose bytes no longer match, or whose object has another version tag or size now, is
fetched again.

Several processes on one host may share the folder: a copy is written to a temporary file under
``<root>/.tmp`` (named like the store's temporary files, so that those of dead processes can be
told apart) and renamed into place, under an exclusive ``flock`` of one of :data:`LOCK_STRIPES` lock
files (the stripe of its key), so that one process fetches an object while the others wait for it.
Reading needs no lock.

Eviction: after each new copy, least recently used copies (the modification time of their record,
touched on each use) go until the copies take at most ``max_bytes``. A copy used within the last
``keep_recent_s`` seconds stays (a reader may hold its path without having opened it yet), and so
does one whose stripe is locked (being written), so the folder can exceed ``max_bytes`` for a while.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedseg_service.records.storage import StorageError, check_key, remove_abandoned, writer_tag

log = logging.getLogger(__name__)

LOCK_STRIPES = 64
"""Lock files a cache folder has: the keys share them by hash."""
KEEP_RECENT_S = 60.0
"""Eviction leaves copies used within this many seconds."""
CHUNK = 1024 * 1024

Writer = Callable[[bytes], object]
"""What a fetch function is given: call it with each chunk of the object's bytes, in order."""


@dataclass(frozen=True)
class Version:
    """The version of an object a copy must match: its version tag (ETag, quotes stripped) and size."""

    tag: str
    size: int


def _signature(path: Path) -> list[int]:
    """What changes whenever a file's bytes change: size, inode, modification and status-change times (ns)."""
    stat = path.stat()
    return [stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns]


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class FileCache:
    """Checksum-verified local copies of objects under ``root``, at most about ``max_bytes`` of them."""

    def __init__(self, root: Path | str, max_bytes: int, keep_recent_s: float = KEEP_RECENT_S) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.root = Path(root).expanduser().resolve()
        self.max_bytes = max_bytes
        self.keep_recent_s = keep_recent_s

    def __repr__(self) -> str:
        return f"FileCache({str(self.root)!r}, max_bytes={self.max_bytes})"

    # ------------------------------------------------------------------ paths

    def data_path(self, key: str) -> Path:
        """Where the copy of ``key`` lives (whether or not there is one)."""
        return self.root.joinpath("data", *check_key(key).split("/"))

    def _record_path(self, key: str) -> Path:
        parts = check_key(key).split("/")
        return self.root.joinpath("meta", *parts[:-1], parts[-1] + ".json")

    def _folder(self, name: str) -> Path:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def temp_file(self) -> Path:
        """A new temporary file name under ``<root>/.tmp`` (on the cache's file system), tagged with this process."""
        return self._folder(".tmp") / f"{writer_tag()}@{uuid.uuid4().hex}.part"

    @contextmanager
    def _locked(self, key: str, *, wait: bool = True) -> Iterator[bool]:
        """Hold the lock stripe of ``key``; yields False (holding nothing) when ``wait`` is off and it is taken."""
        stripe = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) % LOCK_STRIPES
        with open(self._folder(".locks") / f"{stripe:02d}.lock", "a+b") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # ------------------------------------------------------------------ records

    def _read_record(self, key: str) -> dict[str, Any] | None:
        try:
            record = json.loads(self._record_path(key).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _write_record(self, key: str, record: dict[str, Any]) -> None:
        path = self._record_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.temp_file()
        try:
            temp.write_text(json.dumps(record))
            os.replace(temp, path)
        finally:
            temp.unlink(missing_ok=True)

    def _install(self, key: str, source: Path, version: Version, sha256: str) -> Path:
        """Move the finished file ``source`` in as the copy of ``key`` (the caller holds the key's lock)."""
        path = self.data_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, path)
        record = {"key": key, "tag": version.tag, "size": version.size, "sha256": sha256}
        self._write_record(key, {**record, "checked": _signature(path)})
        self._touch(key)
        return path

    def _touch(self, key: str) -> None:
        """Mark ``key`` used now (its record's modification time, at the clock's full resolution: the file
        system's own timestamps are coarser and would tie entries used in quick succession)."""
        now = time.time_ns()
        os.utime(self._record_path(key), ns=(now, now))

    # ------------------------------------------------------------------ lookups

    def _lookup(self, key: str, version: Version, *, verify: bool = True) -> Path | None:
        """The copy of ``key`` if it holds ``version``; a copy changed since its last check is hashed again
        (with ``verify``; without, it counts as missing)."""
        record = self._read_record(key)
        if record is None or record.get("tag") != version.tag or record.get("size") != version.size:
            return None
        path = self.data_path(key)
        try:
            signature = _signature(path)
        except FileNotFoundError:
            return None
        if signature != record.get("checked"):
            if not verify:
                return None
            if signature[0] != version.size or file_sha256(path) != record.get("sha256"):
                log.warning("the cached copy of %r does not match its SHA-256; fetching it again", key)
                return None
            self._write_record(key, {**record, "checked": signature})
        try:
            self._touch(key)
        except FileNotFoundError:
            return None
        return path

    def get(self, key: str, version: Version, fetch: Callable[[Writer], None]) -> Path:
        """A local path holding ``version`` of ``key``: the verified copy, else one fetched now.

        ``fetch(write)`` must call ``write`` with the object's bytes in order; a copy whose size differs
        from ``version.size`` raises :class:`StorageError` and is dropped.
        """
        path = self._lookup(key, version)
        if path is not None:
            return path
        with self._locked(key):
            path = self._lookup(key, version, verify=False)  # fetched by another process meanwhile?
            if path is None:
                path = self._fetch(key, version, fetch)
        self.evict()
        return path

    def _fetch(self, key: str, version: Version, fetch: Callable[[Writer], None]) -> Path:
        temp = self.temp_file()
        digest = hashlib.sha256()
        size = 0
        try:
            with open(temp, "wb") as handle:

                def write(data: bytes) -> None:
                    nonlocal size
                    handle.write(data)
                    digest.update(data)
                    size += len(data)

                fetch(write)
            if size != version.size:
                raise StorageError(f"the copy of {key!r} has {size} bytes where the store holds {version.size}")
            return self._install(key, temp, version, digest.hexdigest())
        finally:
            temp.unlink(missing_ok=True)

    def adopt(self, key: str, source: Path, version: Version, sha256: str) -> None:
        """Take the finished file ``source`` (on the cache's file system, e.g. from :meth:`temp_file`) as the
        copy of ``key``; the file is moved, or removed when it cannot be kept."""
        try:
            with self._locked(key):
                self._install(key, source, version, sha256)
            self.evict()
        except OSError as error:  # the object is stored; only its copy is lost
            log.warning("could not keep a local copy of %r: %s", key, error)
        finally:
            source.unlink(missing_ok=True)

    # ------------------------------------------------------------------ removal

    def _remove(self, key: str) -> None:
        self.data_path(key).unlink(missing_ok=True)
        self._record_path(key).unlink(missing_ok=True)

    def discard(self, key: str) -> None:
        """Drop the copy of ``key`` (if any)."""
        with self._locked(key):
            self._remove(key)

    def _entries(self) -> Iterator[tuple[str, Path]]:
        data = self.root / "data"
        if data.is_dir():
            for path in data.rglob("*"):
                if path.is_file():
                    yield path.relative_to(data).as_posix(), path

    def discard_prefix(self, prefix: str) -> None:
        """Drop the copies of every key under the folder ``prefix``."""
        start = check_key(prefix) + "/"
        for key, _ in list(self._entries()):
            if key.startswith(start):
                self.discard(key)

    def size_bytes(self) -> int:
        """Bytes the copies take now."""
        total = 0
        for _, path in self._entries():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                continue
        return total

    def evict(self) -> int:
        """Remove least recently used copies until the copies take at most ``max_bytes`` (see the module
        docstring for those that stay); also copies without a record. Returns how many went."""
        now = time.time()
        used: list[tuple[float, int, str]] = []
        removed = 0
        for key, path in list(self._entries()):
            try:
                size = path.stat().st_size
                last_used = self._record_path(key).stat().st_mtime
            except FileNotFoundError:  # no record: a copy whose writer died between the two renames
                if self._old(path, now) and self._try_remove(key):
                    removed += 1
                continue
            used.append((last_used, size, key))
        total = sum(size for _, size, _ in used)
        for last_used, size, key in sorted(used):
            if total <= self.max_bytes or now - last_used < self.keep_recent_s:
                break
            if self._try_remove(key):
                total -= size
                removed += 1
        return removed

    def _old(self, path: Path, now: float) -> bool:
        try:
            return now - path.stat().st_mtime >= self.keep_recent_s
        except FileNotFoundError:
            return False

    def _try_remove(self, key: str) -> bool:
        with self._locked(key, wait=False) as held:
            if held:
                self._remove(key)
            return held

    # ------------------------------------------------------------------ upkeep

    def clean_temp(self, older_than_s: float = 0.0) -> int:
        """Remove the temporary files abandoned by their writers (see ``writer_gone``); returns how many went."""
        return remove_abandoned(self.root / ".tmp", older_than_s)

    def writable(self) -> str | None:
        """None when the folder can be written and read, else a sentence saying what is wrong."""
        try:
            probe = self.temp_file()
            probe.write_bytes(b"ok")
            ok = probe.read_bytes() == b"ok"
            probe.unlink()
        except OSError as error:
            return f"cache folder {self.root} is not writable: {error.strerror or error}"
        return None if ok else f"cache folder {self.root} returned different bytes than written"
