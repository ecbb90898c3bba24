"""PNG previews of stored volumes: one plane (middle slice or max projection), labels in colour.

Memory and time stay bounded whatever the volume's size: a preview reads the pages it shows
(a max projection at most :data:`PREVIEW_READ_BYTES` of them, every k-th slice beyond) and, within a
page, only the rows it keeps.
"""

from __future__ import annotations

import colorsys
import enum
import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from embedseg_service.core.data.axes import channel_count, has_channel_axis
from embedseg_service.core.data.io import open_tiff, read_tiff
from embedseg_service.core.data.tiff_errors import TiffTooLarge
from embedseg_service.core.data.tiff_pixels import plane_page, read_plane

OVERLAY_ALPHA = 0.45
PREVIEW_READ_BYTES = 128 * 1024**2
"""Most decoded bytes of pages a max projection reads; larger volumes are projected over every k-th slice."""
PREVIEW_WHOLE_BYTES = 64 * 1024**2
"""Largest volume read whole for a preview when its pages are not Y-X planes."""


class Projection(str, enum.Enum):
    """Which plane of a 3D volume a preview shows: the ``middle`` Z slice (or ``z``) or the ``max`` projection."""

    middle = "middle"
    max = "max"


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
