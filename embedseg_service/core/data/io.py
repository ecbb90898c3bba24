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

Every refusal is a :class:`~embedseg_service.core.data.tiff_errors.TiffError` (a ``ValueError``);
whatever the parser raises on a malformed file becomes ``TiffUnreadable``. The page count and an
optional voxel budget are checked from the header first (:mod:`embedseg_service.core.data.tiff_limits`);
bounded-memory access to the pixels is in :mod:`embedseg_service.core.data.tiff_pixels`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import tifffile

from embedseg_service.core.data import axes as axis_rules
from embedseg_service.core.data.tiff_errors import (
    TiffDamaged,
    TiffError,
    TiffUnreadable,
    TiffUnsupported,
    reason,
)
from embedseg_service.core.data.tiff_layout import (
    canonical_order,
    check_explicit_axes,
    file_voxel_size,
    resolve_axes,
    voxel_size_for,
)
from embedseg_service.core.data.tiff_limits import check_page_count, check_voxels

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
    except Exception as exc:  # the parser raises many types on a malformed header
        raise TiffUnreadable(f"not a readable TIFF file: {reason(exc)}") from None


@contextmanager
def _parsing() -> Iterator[None]:
    """Turn anything the parser raises on a malformed file into :class:`TiffUnreadable` (ours pass through)."""
    try:
        yield
    except (TiffError, FileNotFoundError):
        raise
    except Exception as exc:  # ValueError, ZeroDivisionError, struct.error, MemoryError, OSError, ...
        raise TiffUnreadable(f"not a readable TIFF file: {reason(exc)}") from None


@dataclass
class TiffLayout:
    """Where the main image of an open TIFF is and how its axes map to the canonical order.

    ``shape`` is the stored series' shape; ``full`` names each of its axes (``_`` for a dropped
    singleton); ``drop`` lists the dropped axes; ``order`` takes the kept axes to ``canonical``.
    """

    series: tifffile.TiffPageSeries
    shape: tuple[int, ...]
    full: str
    canonical: str
    drop: list[int]
    order: list[int]
    dtype: np.dtype

    @property
    def canonical_shape(self) -> tuple[int, ...]:
        """The shape in canonical axis order."""
        kept = [n for i, n in enumerate(self.shape) if i not in self.drop]
        return tuple(kept[i] for i in self.order)


def tiff_layout(tif: tifffile.TiffFile, axes: str | None = None, *, max_voxels: int | None = None) -> TiffLayout:
    """The layout of ``tif``'s main image (see the module docstring for ``axes``).

    Checks the page count and the declared voxels against ``max_voxels`` (``None``: no limit)
    before anything else (:mod:`embedseg_service.core.data.tiff_limits`). Raises a
    :class:`~embedseg_service.core.data.tiff_errors.TiffError` saying what is wrong.
    """
    with _parsing():
        check_page_count(tif)
        if not tif.series:
            raise TiffUnsupported("the TIFF file contains no image")
        series = tif.series[0]
        shape = tuple(int(n) for n in series.shape)
        if 0 in shape:
            raise TiffUnsupported(f"the image of shape {shape} is empty (an axis of length 0)")
        check_voxels(shape, max_voxels)
        dtype = np.dtype(series.dtype)
        if dtype.name not in SUPPORTED_DTYPES:
            raise TiffUnsupported(f"pixel type {dtype.name} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
        if axes is not None:
            full = check_explicit_axes(axes, shape)
            drop: list[int] = []
        else:
            if len(shape) < 2:
                raise TiffUnsupported(f"image of shape {shape} has fewer than two dimensions")
            full, drop = resolve_axes(shape, series.axes, tif.is_imagej or tif.is_ome)
        kept = "".join(a for a in full if a != "_")
        if len(kept) > 4:
            raise TiffUnsupported(
                f"image of shape {shape} has more than 4 dimensions (C, Z, Y, X); this is not supported"
            )
        canonical, order = canonical_order(kept)
    return TiffLayout(series, shape, full, canonical, drop, order, dtype)


@contextmanager
def open_tiff(
    path_or_file: PathOrFile, *, axes: str | None = None, max_voxels: int | None = None
) -> Iterator[tuple[tifffile.TiffFile, TiffLayout]]:
    """Open a TIFF and find its main image's layout (as :func:`tiff_layout`); the file closes on exit.

    Raises a :class:`~embedseg_service.core.data.tiff_errors.TiffError` saying what is wrong.
    """
    with _open(path_or_file) as tif:
        yield tif, tiff_layout(tif, axes, max_voxels=max_voxels)


def inspect_tiff(path_or_file: PathOrFile, *, axes: str | None = None, max_voxels: int | None = None) -> TiffInfo:
    """Validate a TIFF's layout, dtype and shape without loading its pixel data.

    ``max_voxels`` bounds the declared shape (all axes, channels included; ``None``: no limit).
    Raises a :class:`~embedseg_service.core.data.tiff_errors.TiffError` (a ``ValueError``) saying
    what is wrong; anything the parser raises on a malformed file becomes ``TiffUnreadable``.
    """
    with _open(path_or_file) as tif:
        return tiff_info(tif, tiff_layout(tif, axes, max_voxels=max_voxels))


def tiff_info(tif: tifffile.TiffFile, layout: TiffLayout) -> TiffInfo:
    """The :class:`TiffInfo` of an open TIFF whose main image has ``layout`` (reads no pixel)."""
    with _parsing():
        voxel = voxel_size_for(layout.canonical, file_voxel_size(tif))
    return TiffInfo(layout.canonical_shape, layout.canonical, layout.dtype, voxel)


def read_tiff(path_or_file: PathOrFile, *, axes: str | None = None, max_voxels: int | None = None) -> TiffVolume:
    """Read a 2D or 3D TIFF, optionally with a channel axis, and its voxel size.

    Args:
        path_or_file: a path or a binary file object.
        axes: letters from ``CZYX`` naming the stored array's axes; overrides the file's metadata.
        max_voxels: most voxels the declared shape may hold (``None``: no limit), checked before reading.

    Returns:
        :class:`TiffVolume` with ``data`` in canonical order (``YX``, ``ZYX``, ``CYX`` or ``CZYX``),
        dtype one of :data:`SUPPORTED_DTYPES`, and ``voxel_size`` in array order or ``None``.

    Raises:
        ValueError: (a :class:`~embedseg_service.core.data.tiff_errors.TiffError`) not a TIFF, colour
        samples, a time series, more than 4 dimensions, fewer than 2, an unsupported pixel type,
        ``axes`` that do not fit the image, more voxels than ``max_voxels``, unreadable pixel data.
    """
    with _open(path_or_file) as tif:
        layout = tiff_layout(tif, axes, max_voxels=max_voxels)
        try:
            data = layout.series.asarray()
        except Exception as exc:  # corrupt or truncated pixel data
            raise TiffDamaged(f"cannot read the TIFF pixel data: {reason(exc)}") from None
        with _parsing():
            voxel = voxel_size_for(layout.canonical, file_voxel_size(tif))
    shape, drop = layout.shape, layout.drop
    data = data.reshape(shape)
    if drop:
        data = data.reshape([n for i, n in enumerate(shape) if i not in drop])
    data = np.ascontiguousarray(np.transpose(data, layout.order))
    return TiffVolume(data=data, axes=layout.canonical, voxel_size=voxel)


def stem(path: str | os.PathLike) -> str:
    """File name without a ``.tif``/``.tiff``/``.ome.tif`` suffix (used to match images and masks)."""
    return re.sub(r"(\.ome)?\.tiff?$", "", Path(path).name, flags=re.IGNORECASE)
