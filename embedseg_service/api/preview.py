"""PNG previews of stored volumes: one plane (middle slice or max projection), labels in colour."""

from __future__ import annotations

import colorsys
import enum
import io
import math
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from embedseg_service.core.data.axes import channel_count, has_channel_axis
from embedseg_service.core.data.io import inspect_tiff, read_tiff

OVERLAY_ALPHA = 0.45


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


def load_plane(path: Path, projection: Projection, z: int | None, channel: int) -> np.ndarray:
    """One 2D plane (Y, X) of the volume at ``path``: its middle/``z`` slice or its max projection.

    A 3D volume stored one page per slice is read a page at a time (never whole); other
    layouts are read whole. Raises ValueError when ``z``/``channel`` are out of range.
    """
    info = inspect_tiff(path)
    _check(info.shape, info.axes, z, channel)
    if info.axes == "ZYX":
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            if tuple(series.shape) == tuple(info.shape) and len(series.pages) == info.shape[0]:
                if projection is Projection.max:
                    plane = tif.asarray(key=0, series=0)
                    for k in range(1, info.shape[0]):
                        np.maximum(plane, tif.asarray(key=k, series=0), out=plane)
                    return plane
                return tif.asarray(key=info.shape[0] // 2 if z is None else z, series=0)
    volume = read_tiff(path)
    return _plane(volume.data, volume.axes, projection, z, channel)


def render_preview(
    path: Path | None,
    *,
    labels_path: Path | None = None,
    projection: Projection = Projection.middle,
    z: int | None = None,
    channel: int = 0,
    max_px: int = 1024,
) -> bytes:
    """PNG bytes of one plane of the image at ``path`` with the labels at ``labels_path`` overlaid.

    Either may be None (a labels-only preview is drawn on black). Planes are subsampled so the
    longest side is at most ``max_px``. Raises ValueError when ``z``/``channel`` are out of range.
    """
    image_plane = labels_plane = None
    stride = 1
    if path is not None:
        image_plane = load_plane(path, projection, z, channel)
        stride = _stride(image_plane.shape, max_px)
        image_plane = image_plane[::stride, ::stride]
    if labels_path is not None:
        labels_plane = load_plane(labels_path, projection, z, 0)
        if path is None:
            stride = _stride(labels_plane.shape, max_px)
        labels_plane = labels_plane[::stride, ::stride]
        if image_plane is not None and labels_plane.shape != image_plane.shape:
            labels_plane = None
    if image_plane is None and labels_plane is None:
        raise ValueError("nothing to preview")
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
