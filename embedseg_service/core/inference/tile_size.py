"""Tile shapes of a tiled prediction: chosen from the device's free memory, or checked when given."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from embedseg_service.core.device import resolve_device
from embedseg_service.core.inference.padding import SIZE_MULTIPLE, round_up

BYTES_PER_VOXEL = {2: 400, 3: 256}
"""Measured inference memory of the network per input voxel and batch item (float32), with margin."""
MIN_AUTO_TILE = 32
MAX_AUTO_VOXELS = 1 << 24


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


def checked_tile_shape(
    spatial: Sequence[int], tile: Sequence[int] | str | None, batch: int, device: torch.device
) -> list[int]:
    """The block shape for ``tile`` (sizes, ``"auto"`` for :func:`auto_tile_shape`, or ``None``: the whole image),
    rounded up to multiples of 8 and at most the image; ``ValueError`` for a bad ``tile``."""
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
