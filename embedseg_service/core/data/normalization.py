"""Intensity normalisation (docs/method.md §8).

* ``percentile`` (default): ``(x - P_low) / (P_high - P_low)`` per image and channel, no clipping.
  Robust to a camera offset (uint16 data that never reaches 0) and to a few hot pixels.
* ``meanstd``: ``(x - mean) / std`` per image and channel.
* ``none``: values cast to float32 unchanged.

A constant image (zero spread) is shifted to 0 and not divided, so it never produces inf/nan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from embedseg_service.core.options import Option

_TINY = 1e-12


class NormalizationMode(Option):
    """How image intensities are normalised."""

    percentile = "percentile"
    meanstd = "meanstd"
    none = "none"


def _check_percentiles(p_low: float, p_high: float) -> None:
    if not (0.0 <= p_low < p_high <= 100.0):
        raise ValueError(f"percentiles must satisfy 0 <= p_low < p_high <= 100, got {p_low}, {p_high}")


def _normalize_one(x: np.ndarray, mode: NormalizationMode, p_low: float, p_high: float) -> np.ndarray:
    if x.size == 0:
        return x.astype(np.float32)
    if mode is NormalizationMode.none:
        return x.astype(np.float32)
    if mode is NormalizationMode.percentile:
        lo, hi = np.percentile(x, (p_low, p_high))
        offset, spread = float(lo), float(hi) - float(lo)
    else:
        values = x.astype(np.float64, copy=False)
        offset, spread = float(values.mean()), float(values.std())
    return scale_intensities(x, offset, spread)


def scale_intensities(x: np.ndarray, offset: float, spread: float) -> np.ndarray:
    """``(x - offset) / spread`` as float32, computed as :func:`normalize` computes it: a spread near zero
    (a constant image) does not divide. ``ValueError`` for a non-finite offset or spread."""
    if not np.isfinite(offset) or not np.isfinite(spread):
        raise ValueError("image contains non-finite values (nan or inf); they cannot be normalised")
    out = x.astype(np.float32)
    out -= np.float32(offset)
    if spread > _TINY * max(1.0, abs(offset)):
        out *= np.float32(1.0 / spread)
    return out


def normalize(
    image: np.ndarray,
    mode: NormalizationMode | str = NormalizationMode.percentile,
    p_low: float = 1.0,
    p_high: float = 99.8,
    channel_axis: int | None = None,
) -> np.ndarray:
    """Normalise ``image`` (any shape, any real dtype) to float32 of the same shape.

    Each channel along ``channel_axis`` (or the whole image when ``None``) gets its own
    statistics. No clipping.
    """
    mode = NormalizationMode.parse(mode)
    _check_percentiles(p_low, p_high)
    image = np.asarray(image)
    if not (np.issubdtype(image.dtype, np.number) or image.dtype == bool) or np.iscomplexobj(image):
        raise ValueError(f"image must be real numbers, got dtype {image.dtype}")
    if channel_axis is None:
        return _normalize_one(image, mode, p_low, p_high)
    axis = channel_axis % image.ndim if -image.ndim <= channel_axis < image.ndim else None
    if axis is None:
        raise ValueError(f"channel_axis {channel_axis} is out of range for an image of shape {image.shape}")
    out = np.empty(image.shape, dtype=np.float32)
    for c in range(image.shape[axis]):
        index = (slice(None),) * axis + (c,)
        out[index] = _normalize_one(image[index], mode, p_low, p_high)
    return out


@dataclass(frozen=True)
class NormalizationSettings:
    """Normalisation options as stored with a model."""

    mode: NormalizationMode = NormalizationMode.percentile
    p_low: float = 1.0
    p_high: float = 99.8

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", NormalizationMode.parse(self.mode))
        _check_percentiles(self.p_low, self.p_high)

    def apply(self, image: np.ndarray, channel_axis: int | None = None) -> np.ndarray:
        """:func:`normalize` with these settings."""
        return normalize(image, self.mode, self.p_low, self.p_high, channel_axis)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "p_low": float(self.p_low), "p_high": float(self.p_high)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NormalizationSettings:
        unknown = set(data) - {"mode", "p_low", "p_high"}
        if unknown:
            raise ValueError(f"unknown normalization settings: {', '.join(sorted(unknown))}")
        return cls(**data)
