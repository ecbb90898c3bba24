"""The trivial baseline that quality floors are stated against: Otsu's threshold + connected components."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from embedseg_service.core.metrics import average_precision

BINS = 256


def otsu_threshold(image: np.ndarray) -> float:
    """Otsu's threshold of ``image`` (any dtype; 256 bins between its minimum and maximum)."""
    values = np.asarray(image, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low
    hist, edges = np.histogram(values, bins=BINS, range=(low, high))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    return float(edges[int(np.nanargmax(between)) + 1])


def otsu_labels(image: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Connected components (faces only) of the pixels above Otsu's threshold with more than
    ``min_size`` pixels, int32 (0 = background)."""
    labels, count = ndimage.label(np.asarray(image) > otsu_threshold(image))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes > min_size
    keep[0] = False
    ids = np.zeros(count + 1, dtype=np.int32)
    ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return ids[labels]


def smallest_object(labels: np.ndarray) -> int:
    """Pixel count of the smallest object of ``labels`` (the baseline's size filter: learnt from training labels)."""
    sizes = np.bincount(np.asarray(labels).ravel())[1:]
    return int(sizes[sizes > 0].min())


def baseline_ap(
    image: np.ndarray, truth: np.ndarray, thresholds: tuple[float, ...] = (0.5,), min_size: int = 0
) -> list[float]:
    """AP of :func:`otsu_labels` (components of more than ``min_size`` pixels) against ``truth`` per IoU threshold."""
    return [float(a) for a in average_precision(truth, otsu_labels(image, min_size), thresholds).ap]
