"""TIFF reading with voxel sizes (torch-free: the HTTP front end imports it).

Writing is in :mod:`embedseg_service.core.data.tiff_write`; naming axes and reading voxel sizes from the
file's metadata in :mod:`embedseg_service.core.data.tiff_layout`.

Arrays come out in a canonical axis order: an optional channel axis ``C`` first, then
``Z`` (3D only), ``Y``, ``X``; so ``axes`` is one of ``"YX"``, ``"ZYX"``, ``"CYX"``, ``"CZYX"``.

Axis policy when reading:

* An explicit ``axes`` argument names the axes of the stored array (as tifffile presents it)
  and overrides everything else; it is honoured exactly (no axis is dropped).
* Otherwise the axes the file declares (ImageJ hyperstack or OME metadata) are used; axes of
  length 1 other than Y and X are dropped (singleton channel, time or Z); unnamed axes are
  guessed: the last two are Y, X, one more is Z, two more are C then Z.
* Colour (RGB) samples, time series with more than one frame and more than 4 dimensions
  are refused with a ``ValueError`` that says what is wrong.

Voxel sizes are in micrometres where the file states a known unit (otherwise in the file's
unit), in array order ``(z, y, x)`` or ``(y, x)``; ``None`` when the file does not state them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import tifffile

from embedseg_service.core.data import axes as axis_rules
from embedseg_service.core.data.tiff_layout import (
    canonical_order,
    check_explicit_axes,
    file_voxel_size,
    resolve_axes,
    voxel_size_for,
)

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32", "float32")
"""Pixel types accepted when reading (images: uint8/uint16/float32; labels also int16/int32/uint32)."""

CANONICAL_AXES = ("YX", "ZYX", "CYX", "CZYX")
PathOrFile = str | os.PathLike | IO[bytes]


@dataclass
class TiffInfo:
    """Layout of a TIFF's main image, read without loading its pixels.

    ``shape``/``axes`` are in the canonical order that :func:`read_tiff` returns.
    """

    shape: tuple[int, ...]
    axes: str
    dtype: np.dtype
    voxel_size: tuple[float, ...] | None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return axis_rules.spatial_shape(self.shape, self.axes)

    @property
    def spatial_dims(self) -> int:
        return axis_rules.spatial_dims(self.axes)

    @property
    def n_channels(self) -> int:
        return axis_rules.channel_count(self.shape, self.axes)


@dataclass
class TiffVolume:
    """A TIFF's pixels in canonical axis order (see module docstring)."""

    data: np.ndarray
    axes: str
    voxel_size: tuple[float, ...] | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return axis_rules.spatial_shape(self.data.shape, self.axes)

    @property
    def spatial_dims(self) -> int:
        return axis_rules.spatial_dims(self.axes)

    @property
    def channel_axis(self) -> int | None:
        """0 when there is a channel axis, else None."""
        return 0 if axis_rules.has_channel_axis(self.axes) else None


def _open(path_or_file: PathOrFile) -> tifffile.TiffFile:
    try:
        return tifffile.TiffFile(path_or_file)
    except FileNotFoundError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as exc:
        raise ValueError(f"not a readable TIFF file: {exc}") from None


def _layout(
    tif: tifffile.TiffFile, axes: str | None
) -> tuple[tifffile.TiffPageSeries, tuple[int, ...], str, list[int], list[int], np.dtype]:
    if not tif.series:
        raise ValueError("the TIFF file contains no image")
    series = tif.series[0]
    shape = tuple(int(n) for n in series.shape)
    dtype = np.dtype(series.dtype)
    if dtype.name not in SUPPORTED_DTYPES:
        raise ValueError(f"pixel type {dtype.name} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    if axes is not None:
        full = check_explicit_axes(axes, shape)
        drop: list[int] = []
    else:
        if len(shape) < 2:
            raise ValueError(f"image of shape {shape} has fewer than two dimensions")
        full, drop = resolve_axes(shape, series.axes, tif.is_imagej or tif.is_ome)
    kept = "".join(a for a in full if a != "_")
    if len(kept) > 4:
        raise ValueError(f"image of shape {shape} has more than 4 dimensions (C, Z, Y, X); this is not supported")
    canonical, order = canonical_order(kept)
    return series, shape, canonical, drop, order, dtype


def inspect_tiff(path_or_file: PathOrFile, *, axes: str | None = None) -> TiffInfo:
    """Validate a TIFF's layout, dtype and shape without loading its pixel data.

    Raises ``ValueError`` saying what is wrong (see :func:`read_tiff`).
    """
    with _open(path_or_file) as tif:
        _, shape, canonical, drop, order, dtype = _layout(tif, axes)
        kept_shape = [n for i, n in enumerate(shape) if i not in drop]
        voxel = voxel_size_for(canonical, file_voxel_size(tif))
    return TiffInfo(tuple(kept_shape[i] for i in order), canonical, dtype, voxel)


def read_tiff(path_or_file: PathOrFile, *, axes: str | None = None) -> TiffVolume:
    """Read a 2D or 3D TIFF, optionally with a channel axis, and its voxel size.

    Args:
        path_or_file: a path or a binary file object.
        axes: letters from ``CZYX`` naming the stored array's axes; overrides the file's metadata.

    Returns:
        :class:`TiffVolume` with ``data`` in canonical order (``YX``, ``ZYX``, ``CYX`` or ``CZYX``),
        dtype one of :data:`SUPPORTED_DTYPES`, and ``voxel_size`` in array order or ``None``.

    Raises:
        ValueError: not a TIFF, colour samples, a time series, more than 4 dimensions, fewer
        than 2, an unsupported pixel type, or ``axes`` that do not fit the image.
    """
    with _open(path_or_file) as tif:
        series, shape, canonical, drop, order, _ = _layout(tif, axes)
        try:
            data = series.asarray()
        except Exception as exc:  # corrupt or truncated pixel data
            raise ValueError(f"cannot read the TIFF pixel data: {exc}") from None
        voxel = voxel_size_for(canonical, file_voxel_size(tif))
    data = data.reshape(shape)
    if drop:
        data = data.reshape([n for i, n in enumerate(shape) if i not in drop])
    data = np.ascontiguousarray(np.transpose(data, order))
    return TiffVolume(data=data, axes=canonical, voxel_size=voxel)


def stem(path: str | os.PathLike) -> str:
    """File name without a ``.tif``/``.tiff``/``.ome.tif`` suffix (used to match images and masks)."""
    return re.sub(r"(\.ome)?\.tiff?$", "", Path(path).name, flags=re.IGNORECASE)
