"""Volumes read a region at a time: an array, a TIFF (a window of each page) or an OME-Zarr image
(its chunks), all as ``(C, *S)`` with a channel axis first (torch-free).

:func:`read_padded` reads a region of the volume as :func:`embedseg_service.core.inference.padding.pad_to_multiple`
would have padded it (mirrored, centred), so that a prediction read region by region sees the pixels a
whole-volume prediction sees (docs/method.md §11.2).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from typing import Protocol

import numpy as np

from embedseg_service.core.data.axes import has_channel_axis

Region = tuple[slice, ...]


class VolumeSource(Protocol):
    """A volume ``(C, *S)`` read a spatial region at a time."""

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C, *S)``."""
        ...

    @property
    def dtype(self) -> np.dtype: ...

    def read(self, region: Region) -> np.ndarray:
        """The pixels ``(C, *region)`` of the spatial ``region`` (slices with step 1 inside the volume)."""
        ...


class ArraySource:
    """An array ``(*S)`` or ``(C, *S)`` (``channels=True``) in memory or memory-mapped."""

    def __init__(self, array: np.ndarray, *, channels: bool = False) -> None:
        self.array = array if channels else array[np.newaxis]
        self.shape = tuple(int(n) for n in self.array.shape)
        self.dtype = self.array.dtype

    def read(self, region: Region) -> np.ndarray:
        index = (slice(None), *region)
        return np.asarray(self.array[index])


class OmeZarrSource:
    """The level-0 image of an open :class:`embedseg_service.core.data.ome_zarr.OmeZarrVolume`."""

    def __init__(self, volume: object) -> None:
        from embedseg_service.core.data.ome_zarr import OmeZarrVolume

        assert isinstance(volume, OmeZarrVolume)
        self.volume = volume
        info = volume.info
        self.channels = has_channel_axis(info.axes)
        self.shape = info.shape if self.channels else (1, *info.shape)
        self.dtype = info.dtype.newbyteorder("=")

    def read(self, region: Region) -> np.ndarray:
        data = self.volume.read(((slice(None),) if self.channels else ()) + tuple(region))
        return data if self.channels else data[np.newaxis]


class TiffSource:
    """A TIFF whose pages are Y-X planes, read a window of a page at a time
    (:func:`embedseg_service.core.data.tiff_pixels.read_window`); close it, or use it as a context manager."""

    def __init__(self, path: str | os.PathLike, *, max_voxels: int | None = None) -> None:
        from embedseg_service.core.data.io import open_tiff
        from embedseg_service.core.data.tiff_errors import TiffUnsupported
        from embedseg_service.core.data.tiff_pixels import plane_page

        self._stack = ExitStack()
        self.tif, self.layout = self._stack.enter_context(open_tiff(path, max_voxels=max_voxels))
        axes, shape = self.layout.canonical, self.layout.canonical_shape
        if plane_page(self.layout, 0, 0) is None:
            self.close()
            raise TiffUnsupported(f"the TIFF stores its image (axes {self.layout.full}) other than one Y-X plane per "
                                  "page; it cannot be read a region at a time")  # fmt: skip
        self.channels, self.depth = has_channel_axis(axes), "Z" in axes
        self.shape = tuple(shape) if self.channels else (1, *shape)
        self.dtype = np.dtype(self.layout.dtype).newbyteorder("=")

    def read(self, region: Region) -> np.ndarray:
        from embedseg_service.core.data.tiff_pixels import read_window

        *z_part, rows, cols = region
        zs = range(z_part[0].start, z_part[0].stop) if self.depth else range(0, 1)
        out = np.empty((self.shape[0], len(zs), rows.stop - rows.start, cols.stop - cols.start), dtype=self.dtype)
        for c in range(self.shape[0]):
            for k, z in enumerate(zs):
                out[c, k] = read_window(self.tif, self.layout, c, z, range(rows.start, rows.stop),
                                        range(cols.start, cols.stop))  # fmt: skip
        return out if self.depth else out[:, 0]

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> TiffSource:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """Indices of an axis of ``size`` mirrored without repeating the edge, periodically (``numpy.pad``'s
    ``reflect``): ``-1 -> 1``, ``size -> size - 2``; an axis of one pixel repeats it."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * size - 2
    folded = np.mod(index, period)
    return np.where(folded < size, folded, period - folded)


def read_padded(source: VolumeSource, region: Region, before: Sequence[int]) -> np.ndarray:
    """``(C, *region)`` of the volume padded by mirroring with ``before[a]`` pixels before each axis:
    padded index ``p`` reads the volume at ``reflect_index(p - before)``. Regions inside the volume are
    read as they are; others read the span of the volume they mirror and pick from it."""
    spatial = source.shape[1:]
    picks = [reflect_index(np.arange(r.start, r.stop) - b, n) for r, b, n in zip(region, before, spatial)]
    spans = tuple(slice(int(p.min()), int(p.max()) + 1) for p in picks)
    data = source.read(spans)
    for axis, (pick, span) in enumerate(zip(picks, spans)):
        local = pick - span.start
        if not (local.size == span.stop - span.start and np.array_equal(local, np.arange(local.size))):
            data = np.take(data, local, axis=axis + 1)
    return data


def blocks(shape: Sequence[int], block: Sequence[int]) -> Iterator[Region]:
    """Non-overlapping regions of ``block`` covering ``shape``, in raster order (the last ones shorter)."""
    counts = [math.ceil(n / b) for n, b in zip(shape, block)]
    for index in np.ndindex(*counts):
        yield tuple(slice(i * b, min((i + 1) * b, n)) for i, b, n in zip(index, block, shape))


def slabs(shape: Sequence[int], max_voxels: int) -> Iterator[Region]:
    """Regions of whole trailing axes along the first axis of ``shape`` (``(Z, Y, X)`` or ``(Y, X)``) in order,
    each of at most ``max_voxels`` voxels (one plane, or one row of a 2D image, when that alone is larger)."""
    plane = math.prod(shape[1:])
    step = max(1, max_voxels // max(1, plane))
    for start in range(0, shape[0], step):
        yield (slice(start, min(start + step, shape[0])), *(slice(0, n) for n in shape[1:]))
