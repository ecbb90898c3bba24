"""Sliding-window prediction of raw network outputs (method.md §11.3).

A volume is cut into overlapping tiles (25 % overlap by default) that start at multiples of 8 (the
network's sampling grid); every tile is padded to a multiple of 8, predicted on the device
(optionally with test-time augmentation), weighted over its overlaps with neighbouring tiles (0 next
to its own border, a ``sin²`` ramp in the middle of the overlap) and added into one float32 output
array on the CPU. The weights are separable and normalised per axis, so they sum to one at every
pixel and no volume-sized weight array is needed: peak memory grows with the tile, not
with the volume (apart from the input and the output).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from itertools import product

import numpy as np
import torch

from core.device import resolve_device

SIZE_MULTIPLE = 8
BYTES_PER_VOXEL = {2: 400, 3: 256}
"""Measured inference memory of the network per input voxel and batch item (float32), with margin."""
MIN_AUTO_TILE = 32
MAX_AUTO_VOXELS = 1 << 24

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""Maps ``(B, C_in, *T)`` (every size a multiple of 8) to ``(B, C_out, *T)`` on the same device."""
Progress = Callable[[int, int], "bool | None"]
"""Called as ``progress(tiles_done, tiles_total)`` after each tile; returning ``False`` cancels."""


class PredictionCancelled(RuntimeError):
    """Raised when a progress callback asks to stop."""


def round_up(n: int, multiple: int = SIZE_MULTIPLE) -> int:
    """Smallest multiple of ``multiple`` that is ``>= n``."""
    return -(-int(n) // multiple) * multiple


def reflect_pad_end(x: torch.Tensor, target: Sequence[int]) -> torch.Tensor:
    """Pad the spatial axes of ``x`` ``(B, C, *S)`` at their end up to ``target`` by mirroring.

    Pads longer than an axis mirror repeatedly (like ``numpy.pad(mode="reflect")``); a size-1 axis
    is repeated.
    """
    spatial = x.dim() - 2
    if len(target) != spatial:
        raise ValueError(f"target needs {spatial} sizes, got {tuple(target)}")
    for axis in range(spatial):
        dim = 2 + axis
        while x.shape[dim] < target[axis]:
            size = x.shape[dim]
            if size == 1:
                x = torch.cat([x] * int(target[axis]), dim=dim)
                break
            step = min(target[axis] - size, size - 1)
            mirrored = torch.flip(x.narrow(dim, size - 1 - step, step), dims=(dim,))
            x = torch.cat([x, mirrored], dim=dim)
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int = SIZE_MULTIPLE) -> torch.Tensor:
    """Reflect-pad the spatial axes of ``(B, C, *S)`` at their end to multiples of ``multiple``."""
    return reflect_pad_end(x, [round_up(s, multiple) for s in x.shape[2:]])


def available_memory(device: torch.device | str | None = None) -> int:
    """Free memory in bytes of ``device``: CUDA free memory, or the RAM available on the host."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def auto_tile_shape(
    spatial_shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    batch: int = 1,
    memory_fraction: float = 0.5,
    free_bytes: int | None = None,
) -> tuple[int, ...]:
    """A tile shape (multiples of 8, or whole axes) whose inference fits the device's free memory.

    ``batch`` is the number of tile-sized images run at once (the TTA chunk size). The tile is
    as close to a cube as the volume allows and never larger than needed to cover the volume.
    """
    dims = len(spatial_shape)
    if dims not in (2, 3):
        raise ValueError(f"expected 2 or 3 spatial sizes, got {tuple(spatial_shape)}")
    free = available_memory(device) if free_bytes is None else int(free_bytes)
    max_voxels = min(MAX_AUTO_VOXELS, free * memory_fraction / (BYTES_PER_VOXEL[dims] * max(1, batch)))
    full = [round_up(n) for n in spatial_shape]
    if math.prod(full) <= max_voxels:
        return tuple(int(n) for n in spatial_shape)
    free_axes = list(range(dims))
    fixed = 1.0
    tile = [0] * dims
    while True:
        side = (max_voxels / fixed) ** (1.0 / len(free_axes))
        small = [a for a in free_axes if full[a] <= side]
        if not small:
            break
        for a in small:
            tile[a] = int(spatial_shape[a])
            fixed *= full[a]
            free_axes.remove(a)
    side_int = max(MIN_AUTO_TILE, int(side) // SIZE_MULTIPLE * SIZE_MULTIPLE)
    for a in free_axes:
        tile[a] = min(int(spatial_shape[a]), side_int)
    return tuple(tile)


def axis_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start indices of the windows along one axis, all multiples of :data:`SIZE_MULTIPLE`.

    The network downsamples by 8, so a window that starts elsewhere would see the image on another
    sampling grid than the whole image does, and its outputs would differ everywhere, not only near
    its borders. Consecutive windows overlap by at least ``overlap`` of the tile; the last window
    reaches the end of the axis and may run past it by less than 8 (that part is reflect-padded,
    as the whole image is).
    """
    if tile >= size:
        return [0]
    step = SIZE_MULTIPLE if tile % SIZE_MULTIPLE == 0 else 1
    stride = max(step, (tile - int(round(overlap * tile))) // step * step)
    starts = list(range(0, size - tile, stride))
    last = -(-(size - tile) // step) * step
    if last > starts[-1]:
        starts.append(last)
    return starts


def axis_weights(size: int, tile: int, starts: Sequence[int]) -> list[np.ndarray]:
    """Per-window 1-D weights along one axis (window ``i`` covers ``starts[i]`` to
    ``min(starts[i] + tile, size)``), normalised so that they sum to 1 at every index.

    Where two windows overlap, each one's weight is 0 on the outer quarter of the overlap (its
    outputs next to its own border, where it lacks the context the other window has), rises as
    ``sin²`` over the middle half and is 1 on the inner quarter.
    """
    ends = [min(start + tile, size) for start in starts]
    raw = []
    for i, (start, end) in enumerate(zip(starts, ends)):
        w = np.ones(end - start, dtype=np.float64)
        if i > 0 and ends[i - 1] > start:
            w[: ends[i - 1] - start] *= _ramp(ends[i - 1] - start)
        if i + 1 < len(starts) and end > starts[i + 1]:
            w[starts[i + 1] - start :] *= _ramp(end - starts[i + 1])[::-1]
        raw.append(w)
    total = np.zeros(size, dtype=np.float64)
    for start, end, w in zip(starts, ends, raw):
        total[start:end] += w
    return [w / total[start:end] for start, end, w in zip(starts, ends, raw)]


def _ramp(length: int) -> np.ndarray:
    """Rising weights over an overlap of ``length``: 0 on the first quarter, ``sin²`` on the middle
    half, 1 on the last quarter."""
    quarter = length // 4
    middle = length - 2 * quarter
    rise = np.sin(0.5 * np.pi * (np.arange(middle) + 0.5) / max(middle, 1)) ** 2
    return np.concatenate([np.zeros(quarter), rise, np.ones(quarter)])


def _tile_shape(
    spatial: Sequence[int], tile: Sequence[int] | str | None, batch: int, device: torch.device
) -> list[int]:
    dims = len(spatial)
    if tile is None:
        return list(spatial)
    if isinstance(tile, str):
        if tile != "auto":
            raise ValueError(f"tile must be 'auto', None or {dims} sizes, got {tile!r}")
        tile = auto_tile_shape(spatial, device=device, batch=batch)
    tile = [int(t) for t in tile]
    if len(tile) != dims:
        raise ValueError(f"tile needs {dims} sizes (one per spatial axis, array order), got {tuple(tile)}")
    if any(t < 1 for t in tile):
        raise ValueError(f"tile sizes must be positive, got {tuple(tile)}")
    # a tile is a multiple of 8 unless it spans the whole axis (then it is padded like a whole image)
    return [min(round_up(t), n) for t, n in zip(tile, spatial)]


def predict_tiled(
    predictor: Predictor,
    image: np.ndarray | torch.Tensor,
    *,
    tile: Sequence[int] | str | None = "auto",
    overlap: float = 0.25,
    device: torch.device | str | None = None,
    tta: bool = False,
    tta_options: dict | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """Raw outputs ``(C_out, *S)`` float32 (numpy, CPU) of ``predictor`` over ``image`` ``(C_in, *S)``.

    ``tile``: sizes in array order, ``"auto"`` (from the device's free memory) or ``None`` (one
    window over the whole image). Windows overlap by ``overlap`` of the tile, are reflect-padded
    to multiples of 8, run on ``device`` (through :func:`core.tta.predict_tta` when ``tta``, with
    ``tta_options`` passed on) and are blended with cosine weights. ``progress(done, total)`` is
    called after every tile; returning ``False`` raises :class:`PredictionCancelled`.
    """
    dev = resolve_device(device)
    if not 0.0 <= overlap < 0.5:
        raise ValueError(f"overlap must be in [0, 0.5), got {overlap}")
    if image.ndim not in (3, 4):
        raise ValueError(f"image must be (C, Y, X) or (C, Z, Y, X), got shape {tuple(image.shape)}")
    spatial = tuple(int(s) for s in image.shape[1:])
    options = dict(tta_options or {})
    batch = 1
    if tta:
        from core.tta import DEFAULT_BATCH, TTACombine, combine_bytes_per_voxel, predict_tta

        # the passes' combination holds memory of its own: count it as extra images of the batch
        extra = combine_bytes_per_voxel(len(spatial), options.get("combine", TTACombine.median))
        batch = int(options.get("batch_size", DEFAULT_BATCH)) + math.ceil(extra / BYTES_PER_VOXEL[len(spatial)])

        def run(x: torch.Tensor) -> torch.Tensor:
            return predict_tta(predictor, x, **options)
    else:
        run = predictor
    tile_shape = _tile_shape(spatial, tile, batch, dev)

    per_axis = []
    for n, t in zip(spatial, tile_shape):
        starts = axis_starts(n, t, overlap)
        per_axis.append(list(zip(starts, axis_weights(n, t, starts))))
    windows = list(product(*per_axis))
    total = len(windows)
    output: np.ndarray | None = None
    for done, window in enumerate(windows, start=1):
        region = tuple(slice(start, start + len(w)) for start, w in window)
        chunk = image[(slice(None), *region)]
        x = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(chunk))
        x = x.to(device=dev, dtype=torch.float32, non_blocking=True).unsqueeze(0)
        y = run(pad_to_multiple(x))
        y = y[(slice(None), slice(None), *(slice(0, len(w)) for _, w in window))].float()
        if total == 1:  # one window: its weights are all 1, and its output is the result
            output = np.ascontiguousarray(y[0].cpu().numpy())
        else:
            weight = None
            for axis, (_, w) in enumerate(window):
                shape = [1] * len(tile_shape)
                shape[axis] = -1
                w_t = torch.as_tensor(w, dtype=torch.float32, device=y.device).view(shape)
                weight = w_t if weight is None else weight * w_t
            y = (y[0] * weight).cpu().numpy()
            if output is None:
                output = np.zeros((y.shape[0], *spatial), dtype=np.float32)
            output[(slice(None), *region)] += y
        del x, y
        if progress is not None and progress(done, total) is False:
            raise PredictionCancelled(f"prediction cancelled after {done} of {total} tiles")
    assert output is not None
    return output
