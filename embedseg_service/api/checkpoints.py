"""Validation of uploaded model files in the API, in two passes.

A checkpoint written by :func:`embedseg_service.core.model.checkpoint.save_checkpoint` is a
``torch.save`` zip archive whose pickle member holds a plain dict (the layout:
:mod:`embedseg_service.core.model.checkpoint_format`).

1. Without torch, the dict is read with a restricted unpickler: tensors become
   :class:`TensorStub` placeholders (shape only, no data read), only a fixed set of harmless
   globals is accepted, nothing from the file is executed. This checks the format mark, the
   version and the description.
2. Then the file is loaded with ``torch.load(weights_only=True)`` (memory-mapped) and its
   weights are checked against the network: the spatial dimensions and input channels are read
   from the first convolution's weight, the network for them is built on the ``meta`` device
   (no memory, never run), and every key, shape and kind of number of its ``state_dict`` must
   match. The dimensions and channels the file declares must be those of its weights.

torch is imported by the second pass only, when a model file is uploaded.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedseg_service.core.model.checkpoint_format import (
    DESCRIPTION_KEYS,
    FORMAT_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    PICKLE_MEMBER,
    PROVENANCE_KEYS,
    REQUIRED_KEYS,
    VERSION_KEY,
)

MAX_PICKLE_BYTES = 64 * 1024 * 1024


class CheckpointInvalid(ValueError):
    """The file is not a model file this service can use; the message says why."""


@dataclass
class TensorStub:
    """Stands for a tensor of the checkpoint: its shape only."""

    shape: tuple[int, ...] = ()


def _rebuild_tensor(_storage: Any, _offset: int = 0, size: Any = (), *_args: Any) -> TensorStub:
    return TensorStub(tuple(int(n) for n in size) if isinstance(size, (tuple, list)) else ())


def _rebuild_parameter(data: Any, *_args: Any) -> Any:
    return data


class _Opaque:
    """Any other torch/numpy global (storage types, dtypes, scalars): accepted, never called for real."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == "torch" or module.startswith(("torch.", "numpy")):
            return _Opaque
        raise CheckpointInvalid(f"it refers to {module}.{name}, which a model file never contains")

    def persistent_load(self, _pid: Any) -> Any:
        return None


@dataclass
class CheckpointSummary:
    """What the API records about an uploaded model file."""

    spatial_dims: int
    in_channels: int
    step: list[float]
    config: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    n_tensors: int = 0
    recorded: dict[str, Any] = field(default_factory=dict)
    """What the file says about how it was made (the :data:`PROVENANCE_KEYS` it has)."""


def _plain(value: Any) -> Any:
    """JSON-friendly copy (stubs and opaque objects become None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    return None


def read_checkpoint_summary(path: str | Path) -> CheckpointSummary:
    """Describe the model file at ``path`` and check its weights against the network (both passes of the
    module docstring); raises :class:`CheckpointInvalid` saying what is wrong."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise CheckpointInvalid("it is not a model file written by this service (not a torch zip archive)") from None
    with archive:
        names = [name for name in archive.namelist() if name.rpartition("/")[2] == PICKLE_MEMBER]
        if len(names) != 1:
            raise CheckpointInvalid(
                f"it is not a model file written by this service (no {PICKLE_MEMBER} in the archive)"
            )
        info = archive.getinfo(names[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointInvalid("its description is implausibly large for a model file")
        try:
            raw = archive.read(info)
        except (zipfile.BadZipFile, OSError, RuntimeError) as error:
            raise CheckpointInvalid(f"the archive is damaged ({error})") from None
    try:
        data = _Unpickler(io.BytesIO(raw)).load()
    except CheckpointInvalid:
        raise
    except Exception as error:
        raise CheckpointInvalid(f"its contents cannot be read ({type(error).__name__})") from None
    if not isinstance(data, dict) or data.get(FORMAT_KEY) != FORMAT_NAME:
        raise CheckpointInvalid(f"it is not a model file written by this service (no {FORMAT_NAME!r} format mark)")
    if data.get(VERSION_KEY) != FORMAT_VERSION:
        raise CheckpointInvalid(
            f"it has format version {data.get(VERSION_KEY)!r}; this service reads version {FORMAT_VERSION}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise CheckpointInvalid(f"it is incomplete (missing {', '.join(missing)})")
    state = data["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, TensorStub) for v in state.values()):
        raise CheckpointInvalid("its state_dict holds no network weights")
    dims, channels = data["spatial_dims"], data["in_channels"]
    if dims not in (2, 3) or not isinstance(channels, int) or channels < 1:
        raise CheckpointInvalid(f"it describes an invalid network (spatial_dims={dims!r}, in_channels={channels!r})")
    step = data["step"]
    if not isinstance(step, (list, tuple)) or len(step) != dims or not all(isinstance(h, (int, float)) for h in step):
        raise CheckpointInvalid(f"its embedding step {_plain(step)!r} does not have {dims} numbers")
    weight_dims, weight_channels = check_weights(path)
    if (weight_dims, weight_channels) != (dims, channels):
        raise CheckpointInvalid(
            f"it declares spatial_dims={dims}, in_channels={channels} but its weights are those of a "
            f"{weight_dims}D network with {weight_channels} input channel(s)"
        )
    description = {key: _plain(data.get(key) or {}) for key in DESCRIPTION_KEYS}
    return CheckpointSummary(
        spatial_dims=int(dims),
        in_channels=int(channels),
        step=[float(h) for h in step],
        n_tensors=len(state),
        recorded={key: _plain(data[key]) for key in PROVENANCE_KEYS if key in data},
        **description,
    )


def _load_weights(path: str | Path) -> dict[str, Any]:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for a foreign or corrupt file
        lines = str(error).strip().splitlines()
        raise CheckpointInvalid(
            f"it cannot be loaded as weights only ({lines[0][:200] if lines else type(error).__name__})"
        ) from None
    state = data.get("state_dict") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointInvalid("its state_dict holds no network weights")
    return state


def _network_tensors(spatial_dims: int, in_channels: int) -> dict[str, tuple[tuple[int, ...], bool]]:
    """(shape, is floating point) of every tensor of the network's ``state_dict``, built on the meta device."""
    import torch

    from embedseg_service.core.model.checkpoint import build_network

    with torch.device("meta"):
        state = build_network(spatial_dims, in_channels).state_dict()
    return {key: (tuple(value.shape), value.is_floating_point()) for key, value in state.items()}


def check_weights(path: str | Path) -> tuple[int, int]:
    """(spatial_dims, in_channels) of the weights in the model file at ``path``, after checking every key,
    shape and kind of number against the network built for them; :class:`CheckpointInvalid` otherwise."""
    state = _load_weights(path)
    first = next(iter(_network_tensors(2, 1)))
    weight = state.get(first)
    if weight is None or weight.ndim not in (4, 5):
        raise CheckpointInvalid(
            f"its weights are not those of this service's network (no 2D or 3D convolution weight {first!r})"
        )
    dims, channels = weight.ndim - 2, int(weight.shape[1])
    try:
        expected = _network_tensors(dims, channels)
    except Exception as error:  # no network has that many input channels
        raise CheckpointInvalid(f"its first convolution takes {channels} input channels ({error})") from None
    found = {key: (tuple(value.shape), value.is_floating_point()) for key, value in state.items()}
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    different = [key for key in expected if key in found and found[key] != expected[key]]
    if missing or unexpected or different:
        kinds = ((missing, "missing"), (unexpected, "unexpected"), (different, "of another shape or type"))
        problems = [f"{len(keys)} {what} (e.g. {keys[0]!r})" for keys, what in kinds if keys]
        raise CheckpointInvalid(
            f"its weights do not fit this service's {dims}D network with {channels} input channel(s): "
            f"{len(found)} tensors, {'; '.join(problems)}"
        )
    return dims, channels
