"""PNG previews of stored volumes: one plane (a Z slice, a max projection, or an XZ/YZ section of a 3D
volume), labels in colour.

A zipped OME-Zarr volume is read by its chunks: a plane reads the chunks that hold its (kept) pixels, a max
projection the slices of :func:`_slices` a chunk depth at a time, a section the chunks along its line.

Memory and time stay bounded whatever the volume's size: a preview reads the pages it shows
(a max projection at most :data:`PREVIEW_READ_BYTES` of them, every k-th slice beyond) and, within a
page, only the rows it keeps. An XZ or YZ section reads one line (a row or a column, every
``stride``-th pixel) of each Z page it shows: at most as many pages as it has rows, and no more than
fit :data:`PREVIEW_READ_BYTES` of decoded strips or tiles (every k-th slice beyond, drawn nearest).
"""

from __future__ import annotations

import colorsys
import enum
import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from embedseg_service.core.data.axes import channel_count, has_channel_axis
from embedseg_service.core.data.io import open_tiff, read_tiff
from embedseg_service.core.data.ome_zarr import OmeZarrTooLarge, OmeZarrVolume
from embedseg_service.core.data.tiff_errors import TiffTooLarge
from embedseg_service.core.data.tiff_pixels import plane_page, read_plane, read_window, window_bytes
from embedseg_service.core.data.zip_checks import is_zip

OVERLAY_ALPHA = 0.45
PREVIEW_READ_BYTES = 128 * 1024**2
"""Most decoded bytes of pages a max projection reads; larger volumes are projected over every k-th slice."""
PREVIEW_WHOLE_BYTES = 64 * 1024**2
"""Largest volume read whole for a preview when its pages are not Y-X planes."""


class Projection(str, enum.Enum):
    """Which plane of a 3D volume a preview shows: the ``middle`` Z slice (or ``z``) or the ``max`` projection."""

    middle = "middle"
    max = "max"


class Plane(str, enum.Enum):
    """Which plane a preview shows: ``xy`` (a Z slice or projection), or through a 3D volume ``xz`` (rows
    along Z, columns along X, at one y) or ``yz`` (rows along Z, columns along Y, at one x)."""

    xy = "xy"
    xz = "xz"
    yz = "yz"


def _plane(data: np.ndarray, axes: str, projection: Projection, z: int | None, channel: int) -> np.ndarray:
    if has_channel_axis(axes):
        data = data[channel]
    if data.ndim == 3:
        if projection is Projection.max:
            return data.max(axis=0)
        return data[data.shape[0] // 2 if z is None else z]
    return data


def _stride(shape: tuple[int, ...], max_px: int) -> int:
    return max(1, math.ceil(max(shape) / max_px))


def _gray(plane: np.ndarray) -> np.ndarray:
    values = plane.astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(plane.shape, np.uint8)
    low, high = np.percentile(finite, (1.0, 99.8))
    if high <= low:
        high = low + 1.0
    scaled = np.clip((np.nan_to_num(values, nan=low) - low) / (high - low), 0.0, 1.0)
    return (scaled * 255.0 + 0.5).astype(np.uint8)


def label_colours(ids: np.ndarray) -> np.ndarray:
    """RGB colours (uint8, (K, 3)) for label ids: well-separated hues, stable per id."""
    colours = np.empty((len(ids), 3), np.uint8)
    for k, label in enumerate(ids.tolist()):
        hue = (int(label) * 0.6180339887) % 1.0
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
        colours[k] = (round(r * 255), round(g * 255), round(b * 255))
    return colours


def _colour_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, inverse = np.unique(labels, return_inverse=True)
    colours = label_colours(ids)[inverse.reshape(labels.shape)]
    return colours, labels > 0


def _slices(depth: int, plane_bytes: int, projection: Projection, z: int | None) -> range:
    """The Z slices a preview reads: one, or for a max projection every k-th slice such that at most
    :data:`PREVIEW_READ_BYTES` are read (every slice when that fits)."""
    if projection is Projection.max:
        step = max(1, math.ceil(depth * plane_bytes / PREVIEW_READ_BYTES))
        return range(0, depth, step)
    middle = depth // 2 if z is None else z
    return range(middle, middle + 1)


def is_zarr(path: Path) -> bool:
    """Whether the stored file at ``path`` is a zipped OME-Zarr store (a ZIP archive)."""
    with open(path, "rb") as handle:
        return is_zip(handle.read(4))


def _open_zarr(path: Path, max_voxels: int | None) -> OmeZarrVolume:
    try:
        return OmeZarrVolume(path, max_voxels=max_voxels)
    except OmeZarrTooLarge as error:
        raise ValueError(f"{error}; raise EMBEDSEG_MAX_VOXELS to preview it") from None


def _zarr_plane(path: Path, projection: Projection, z: int | None, channel: int, stride: int,
                max_voxels: int | None) -> np.ndarray:  # fmt: skip
    """:func:`load_plane` of an OME-Zarr volume: the slices of :func:`_slices`, a chunk depth at a time."""
    with _open_zarr(path, max_voxels) as volume:
        info = volume.info
        _check(info.shape, info.axes, z, channel)
        lead: list[int] = [channel] if "C" in info.axes else []
        rows, cols = slice(0, info.shape[-2], stride), slice(0, info.shape[-1], stride)
        if "Z" not in info.axes:
            return volume.select([*lead, rows, cols])
        plane_bytes = info.shape[-2] * info.shape[-1] * info.dtype.itemsize
        slices = _slices(info.shape[info.axes.index("Z")], plane_bytes, projection, z)
        depth = info.chunks[info.axes.index("Z")]
        plane: np.ndarray | None = None
        for start in range(0, len(slices), max(1, depth // slices.step)):
            picked = list(slices[start : start + max(1, depth // slices.step)])
            part = volume.select([*lead, picked, rows, cols]).max(axis=0)
            plane = part if plane is None else np.maximum(plane, part)
        assert plane is not None
        return plane


def _zarr_shape(path: Path, max_voxels: int | None) -> tuple[tuple[int, ...], str, tuple[int, ...], int]:
    """(canonical shape, axes, chunk shape, item size) of an OME-Zarr volume."""
    with _open_zarr(path, max_voxels) as volume:
        return volume.info.shape, volume.info.axes, volume.info.chunks, volume.info.dtype.itemsize


def load_plane(
    path: Path,
    projection: Projection,
    z: int | None,
    channel: int,
    *,
    stride: int = 1,
    max_voxels: int | None = None,
) -> np.ndarray:
    """One 2D plane (Y, X) of the volume at ``path``, every ``stride``-th row and column: its middle or
    ``z`` slice, or its max projection over the slices of :func:`_slices`.

    Reads a page at a time and, within a page, only the strips holding kept rows. Volumes whose
    pages are not Y-X planes are read whole, up to :data:`PREVIEW_WHOLE_BYTES`. Raises ValueError
    when ``z``/``channel`` are out of range, the volume is over ``max_voxels`` or cannot be read.
    """
    if is_zarr(path):
        return _zarr_plane(path, projection, z, channel, stride, max_voxels)
    with open_tiff(path, max_voxels=max_voxels) as (tif, layout):
        shape, axes = layout.canonical_shape, layout.canonical
        _check(shape, axes, z, channel)
        if plane_page(layout, channel, 0) is not None:
            depth = shape[axes.index("Z")] if "Z" in axes else 1
            plane_bytes = shape[-2] * shape[-1] * np.dtype(layout.dtype).itemsize
            slices = _slices(depth, plane_bytes, projection, z)
            plane = read_plane(tif, layout, channel, slices[0], stride)
            for k in slices[1:]:
                np.maximum(plane, read_plane(tif, layout, channel, k, stride), out=plane)
            return plane
        size = math.prod(layout.shape) * np.dtype(layout.dtype).itemsize
    if size > PREVIEW_WHOLE_BYTES:
        raise ValueError(
            f"this volume's pages are not Y-X planes, and at {size} bytes it is too large to preview whole "
            f"(at most {PREVIEW_WHOLE_BYTES} bytes)"
        )
    volume = read_tiff(path, max_voxels=max_voxels)
    return _plane(volume.data, volume.axes, projection, z, channel)[::stride, ::stride]


def _plane_stride(path: Path, max_px: int, max_voxels: int | None) -> int:
    if is_zarr(path):
        return _stride(_zarr_shape(path, max_voxels)[0][-2:], max_px)
    with open_tiff(path, max_voxels=max_voxels) as (_, layout):
        return _stride(layout.canonical_shape[-2:], max_px)


def render_preview(
    path: Path | None,
    *,
    labels_path: Path | None = None,
    projection: Projection = Projection.middle,
    z: int | None = None,
    channel: int = 0,
    max_px: int = 1024,
    max_voxels: int | None = None,
) -> bytes:
    """PNG bytes of one plane of the image at ``path`` with the labels at ``labels_path`` overlaid.

    Either may be None (a labels-only preview is drawn on black). Planes are read subsampled so the
    longest side is at most ``max_px``, a bounded number of pages at a time (:func:`load_plane`).
    Raises ValueError when ``z``/``channel`` are out of range, a volume has more than ``max_voxels``
    voxels or cannot be read.
    """
    try:
        image_plane = labels_plane = None
        first = path if path is not None else labels_path
        if first is None:
            raise ValueError("nothing to preview")
        stride = _plane_stride(first, max_px, max_voxels)
        if path is not None:
            image_plane = load_plane(path, projection, z, channel, stride=stride, max_voxels=max_voxels)
        if labels_path is not None:
            labels_plane = load_plane(labels_path, projection, z, 0, stride=stride, max_voxels=max_voxels)
            if image_plane is not None and labels_plane.shape != image_plane.shape:
                labels_plane = None
    except TiffTooLarge as error:
        raise ValueError(f"{error}; raise EMBEDSEG_MAX_VOXELS to preview it") from None
    return _png(image_plane, labels_plane)


@dataclass(frozen=True)
class Section:
    """How an XZ or YZ plane through a 3D volume is read and drawn.

    ``index``: the fixed y (``xz``) or x (``yz``); ``slices``: the Z slices read; ``line``: the positions
    kept along the plane's columns (X or Y); ``rows``/``cols``: for each output row the read slice it
    shows, for each output column the kept position (indices into ``slices`` and ``line``).
    """

    plane: Plane
    index: int
    slices: tuple[int, ...]
    line: range
    rows: np.ndarray
    cols: np.ndarray

    def window(self) -> tuple[range, range]:
        """The (rows, columns) of one Z page this section reads."""
        fixed = range(self.index, self.index + 1)
        return (fixed, self.line) if self.plane is Plane.xz else (self.line, fixed)


def _nearest(count: int, size: int) -> np.ndarray:
    """For each of ``size`` output pixels, the one of ``count`` input pixels whose centre it falls in."""
    return (np.arange(size) * 2 + 1) * count // (2 * size)


def plan_section(
    shape: Sequence[int],
    plane: Plane,
    index: int,
    voxel_size: Sequence[float] | None,
    max_px: int,
    page_bytes: Callable[[range, range], int],
) -> Section:
    """The :class:`Section` of ``plane`` at ``index`` through a volume of spatial ``shape`` (Z, Y, X).

    Columns are every ``stride``-th pixel, the stride of the XY preview (longest side of Y-X at most
    ``max_px``). Rows are scaled along Z by ``voxel_size`` (z over the columns' axis) so that both axes of
    a pixel span the same length, then the whole plane is shrunk, keeping that aspect, to fit ``max_px``.
    Slices are read only as many as rows are drawn and as fit :data:`PREVIEW_READ_BYTES` at
    ``page_bytes(rows, cols)`` bytes per page; each row shows the nearest slice read.
    """
    depth, height, width = (int(n) for n in shape[-3:])
    stride = _stride((height, width), max_px)
    line = range(0, width if plane is Plane.xz else height, stride)
    vz, vy, vx = (float(v) for v in voxel_size) if voxel_size and len(voxel_size) == 3 else (1.0, 1.0, 1.0)
    across = vx if plane is Plane.xz else vy
    tall = depth * vz / (across * stride)  # rows that make a pixel as tall as it is wide
    scale = min(1.0, max_px / max(tall, len(line)))
    n_rows = max(1, round(tall * scale))
    n_cols = max(1, round(len(line) * scale))
    fixed = range(index, index + 1)
    cost = page_bytes(*((fixed, line) if plane is Plane.xz else (line, fixed)))
    n_read = min(depth, n_rows, max(1, PREVIEW_READ_BYTES // max(1, cost)))
    slices = tuple(int(k) for k in _nearest(depth, n_read))
    return Section(plane, index, slices, line, _nearest(n_read, n_rows), _nearest(len(line), n_cols))


def load_section(path: Path, section: Section, channel: int, *, max_voxels: int | None = None) -> np.ndarray:
    """The XZ or YZ plane of :class:`Section` (rows: Z) of the volume at ``path``, one line per slice read.

    Volumes whose pages are not Y-X planes are read whole, up to :data:`PREVIEW_WHOLE_BYTES`. Raises
    ValueError when a volume is over ``max_voxels``, too large to read whole, or cannot be read.
    """
    rows, cols = section.window()
    if is_zarr(path):
        with _open_zarr(path, max_voxels) as volume:
            lead: list[int] = [channel] if "C" in volume.info.axes else []
            picked = volume.select([*lead, list(section.slices), slice(rows.start, rows.stop, rows.step),
                                    slice(cols.start, cols.stop, cols.step)])  # fmt: skip
            return picked.reshape(len(section.slices), -1)[section.rows][:, section.cols]
    with open_tiff(path, max_voxels=max_voxels) as (tif, layout):
        if plane_page(layout, channel, 0) is not None:
            lines = [read_window(tif, layout, channel, z, rows, cols).ravel() for z in section.slices]
            return np.stack(lines)[section.rows][:, section.cols]
        size = math.prod(layout.shape) * np.dtype(layout.dtype).itemsize
    if size > PREVIEW_WHOLE_BYTES:
        raise ValueError(
            f"this volume's pages are not Y-X planes, and at {size} bytes it is too large to preview whole "
            f"(at most {PREVIEW_WHOLE_BYTES} bytes)"
        )
    volume = read_tiff(path, max_voxels=max_voxels)
    data = volume.data[channel] if has_channel_axis(volume.axes) else volume.data
    picked = data[list(section.slices)][:, rows.start : rows.stop : rows.step, cols.start : cols.stop : cols.step]
    return picked.reshape(len(section.slices), -1)[section.rows][:, section.cols]


def _section_of(
    path: Path,
    plane: Plane,
    index: int | None,
    channel: int,
    voxel_size: Sequence[float] | None,
    max_px: int,
    max_voxels: int | None,
) -> tuple[Section, tuple[int, ...]]:
    """The section through the volume at ``path`` (``index`` checked, default its centre), and its spatial shape."""
    if is_zarr(path):
        shape, axes, chunks, itemsize = _zarr_shape(path, max_voxels)
        _check(shape, axes, None, channel)
        spatial = tuple(shape[-3:]) if "Z" in axes else tuple(shape[-2:])
        index = _section_index(plane, index, spatial)
        along = chunks[-1] if plane is Plane.xz else chunks[-2]
        chunk_bytes = math.prod(chunks) * itemsize // max(1, chunks[axes.index("Z")])

        def zarr_cost(rows: range, cols: range) -> int:
            """Decoded bytes per slice: the chunks along the line, a slice's share of each."""
            line = cols if plane is Plane.xz else rows
            return math.ceil((line[-1] - line[0] + 1 if len(line) else 0) / along) * chunk_bytes

        return plan_section(spatial, plane, index, voxel_size, max_px, zarr_cost), spatial
    with open_tiff(path, max_voxels=max_voxels) as (_, layout):
        shape, axes = layout.canonical_shape, layout.canonical
        _check(shape, axes, None, channel)
        spatial = tuple(shape[-3:]) if "Z" in axes else tuple(shape[-2:])
        index = _section_index(plane, index, spatial)
        paged = plane_page(layout, channel, 0) is not None
        cost = functools.partial(window_bytes, layout) if paged else (lambda _rows, _cols: 1)
        return plan_section(spatial, plane, index, voxel_size, max_px, cost), spatial


def _section_index(plane: Plane, index: int | None, spatial: tuple[int, ...]) -> int:
    """``index`` (default the centre) checked against the axis ``plane`` fixes; ValueError for a 2D volume."""
    if len(spatial) != 3:
        raise ValueError(f"plane={plane.value} needs a 3D volume; a 2D image has only the XY plane")
    axis, name, what = (1, "y", "rows") if plane is Plane.xz else (2, "x", "columns")
    size = spatial[axis]
    if index is None:
        index = size // 2
    if not 0 <= index < size:
        raise ValueError(f"{name} {index} is out of range; the volume has {size} {what} (0..{size - 1})")
    return index


def _spatial_shape(path: Path, max_voxels: int | None) -> tuple[int, ...]:
    if is_zarr(path):
        return tuple(_zarr_shape(path, max_voxels)[0][-3:])
    with open_tiff(path, max_voxels=max_voxels) as (_, layout):
        return tuple(layout.canonical_shape[-3:])


def render_section(
    path: Path | None,
    *,
    labels_path: Path | None = None,
    plane: Plane,
    index: int | None = None,
    channel: int = 0,
    voxel_size: Sequence[float] | None = None,
    max_px: int = 1024,
    max_voxels: int | None = None,
) -> bytes:
    """PNG bytes of the XZ or YZ ``plane`` through ``index`` (y or x; default the centre) of the 3D image at
    ``path`` with the labels at ``labels_path`` overlaid (either may be None; labels of another shape
    are left out). Rows run along Z, scaled by ``voxel_size`` (see :func:`plan_section`). Raises ValueError
    for a 2D volume, an index or channel out of range, or a volume that cannot be read."""
    try:
        first = path if path is not None else labels_path
        if first is None:
            raise ValueError("nothing to preview")
        section, spatial = _section_of(first, plane, index, channel if path else 0, voxel_size, max_px, max_voxels)
        image_plane = labels_plane = None
        if path is not None:
            image_plane = load_section(path, section, channel, max_voxels=max_voxels)
        if labels_path is not None and (path is None or _spatial_shape(labels_path, max_voxels) == spatial):
            labels_plane = load_section(labels_path, section, 0, max_voxels=max_voxels)
    except TiffTooLarge as error:
        raise ValueError(f"{error}; raise EMBEDSEG_MAX_VOXELS to preview it") from None
    return _png(image_plane, labels_plane)


def _png(image_plane: np.ndarray | None, labels_plane: np.ndarray | None) -> bytes:
    if image_plane is not None:
        gray = _gray(image_plane)
        rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    else:
        assert labels_plane is not None
        rgb = np.zeros((*labels_plane.shape, 3), np.float32)
    if labels_plane is not None:
        colours, mask = _colour_labels(labels_plane)
        alpha = OVERLAY_ALPHA if image_plane is not None else 1.0
        rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * colours[mask]
    out = io.BytesIO()
    Image.fromarray(np.clip(rgb + 0.5, 0, 255).astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _check(shape: tuple[int, ...], axes: str, z: int | None, channel: int) -> None:
    n_channels = channel_count(shape, axes)
    if not 0 <= channel < n_channels:
        raise ValueError(
            f"channel {channel} is out of range; the volume has {n_channels} channel(s) (0..{n_channels - 1})"
        )
    if z is not None:
        if "Z" not in axes:
            raise ValueError("z applies to 3D volumes only; leave it out for a 2D image")
        depth = shape[axes.index("Z")]
        if not 0 <= z < depth:
            raise ValueError(f"z {z} is out of range; the volume has {depth} slices (0..{depth - 1})")
