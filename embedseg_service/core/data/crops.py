"""Object-centred crop windows (docs/method.md §5).

A :class:`CropWindow` is a position, not a copy: one window per object, centred on the object's
centroid and shifted to lie inside the image. Along an axis where the image is shorter than the
crop (a thin 3D stack with Z = 5 under a crop depth of 8, a small 2D image) the window is
centred on the image and :func:`extract_crop` fills the missing part by reflection, marking it
as *ignore* (label 0 there), so such data still yields training crops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CropWindow:
    """A crop of ``shape`` whose first pixel is at ``start`` (array order, may be negative).

    ``object_id`` is the object the window is centred on.
    """

    image_index: int
    start: tuple[int, ...]
    shape: tuple[int, ...]
    object_id: int = 0


def object_centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids (K,) int64 ascending and mean positions (K, D) float64 of the objects of ``labels``.

    One pass over the foreground pixels (memory ∝ foreground).
    """
    labels = np.asarray(labels)
    flat = np.flatnonzero(labels)
    dims = labels.ndim
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, dims), dtype=np.float64)
    values = labels.ravel()[flat]
    ids, compact = np.unique(values, return_inverse=True)
    counts = np.bincount(compact, minlength=len(ids)).astype(np.float64)
    coords = np.unravel_index(flat, labels.shape)
    means = np.stack([np.bincount(compact, weights=c, minlength=len(ids)) / counts for c in coords], axis=1)
    return ids.astype(np.int64), means


def window_start(center: Sequence[float], image_shape: Sequence[int], crop_shape: Sequence[int]) -> tuple[int, ...]:
    """First pixel of a crop centred on ``center`` and shifted inside the image (centred where it cannot fit)."""
    start = []
    for c, size, crop in zip(center, image_shape, crop_shape):
        if size >= crop:
            s = int(np.floor(c + 0.5)) - crop // 2
            start.append(min(max(s, 0), size - crop))
        else:
            start.append(-((crop - size) // 2))
    return tuple(start)


def object_windows(
    labels: np.ndarray,
    crop_shape: Sequence[int],
    *,
    image_index: int = 0,
    fraction: float = 1.0,
    rng: np.random.Generator | None = None,
) -> list[CropWindow]:
    """One window per object of ``labels`` (*S) (a seeded ``fraction`` of them when < 1).

    Raises ``ValueError`` when ``crop_shape`` does not match the labels' dimensions.
    """
    labels = np.asarray(labels)
    crop_shape = tuple(int(s) for s in crop_shape)
    if len(crop_shape) != labels.ndim:
        raise ValueError(f"crop shape {crop_shape} does not fit labels of shape {labels.shape}")
    if any(s < 1 for s in crop_shape):
        raise ValueError(f"crop shape values must be positive, got {crop_shape}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    ids, centroids = object_centroids(labels)
    order = np.arange(len(ids))
    if fraction < 1.0 and len(ids):
        rng = rng if rng is not None else np.random.default_rng(0)
        keep = max(1, int(round(fraction * len(ids))))
        order = np.sort(rng.choice(len(ids), size=keep, replace=False))
    return [
        CropWindow(image_index, window_start(centroids[i], labels.shape, crop_shape), crop_shape, int(ids[i]))
        for i in order
    ]


def _pads_and_slices(
    start: Sequence[int], crop_shape: Sequence[int], image_shape: Sequence[int]
) -> tuple[tuple[slice, ...], list[tuple[int, int]]]:
    slices, pads = [], []
    for s, crop, size in zip(start, crop_shape, image_shape):
        lo, hi = max(s, 0), min(s + crop, size)
        if hi <= lo:
            raise ValueError(
                f"crop at {tuple(start)} of shape {tuple(crop_shape)} lies outside the image {tuple(image_shape)}"
            )
        slices.append(slice(lo, hi))
        pads.append((lo - s, s + crop - hi))
    return tuple(slices), pads


def extract_crop(
    image: np.ndarray,
    labels: np.ndarray,
    window: CropWindow,
    ignore: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut ``window`` out of ``image`` (C, *S), ``labels`` (*S) and optional ``ignore`` (*S) bool.

    Returns new arrays ``image`` (C, *crop), ``labels`` (*crop) and ``ignore`` (*crop) bool.
    Outside the image the image is reflected, labels are 0 and ignore is True.
    """
    spatial = labels.shape
    if image.shape[1:] != spatial:
        raise ValueError(f"image of shape {image.shape} does not match labels of shape {spatial}")
    slices, pads = _pads_and_slices(window.start, window.shape, spatial)
    img = image[(slice(None),) + slices]
    lab = labels[slices]
    ign = ignore[slices] if ignore is not None else np.zeros(lab.shape, dtype=bool)
    if any(p != (0, 0) for p in pads):
        img = np.pad(img, [(0, 0)] + pads, mode="reflect")
        lab = np.pad(lab, pads, mode="constant", constant_values=0)
        ign = np.pad(ign, pads, mode="constant", constant_values=True)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab), np.ascontiguousarray(ign, dtype=bool)
