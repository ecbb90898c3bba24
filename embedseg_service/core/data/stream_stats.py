"""Normalisation of a volume read a region at a time, with the statistics of the whole volume
(docs/method.md §8, §11.5).

:func:`channel_scalings` scans the volume slab by slab and returns, per channel, the ``(offset, spread)``
that :func:`embedseg_service.core.data.normalization.normalize` computes on the whole array:

* ``percentile``: the order statistics around each percentile are found exactly, from histograms: one
  pass over the values for 8- and 16-bit integers, two for other types (the value's top 16 bits, then its
  low 16 bits within the buckets that hold the wanted ranks, on float32 keys that sort as the values do),
  then interpolated as ``numpy.percentile`` interpolates (its ``linear`` method);
* ``meanstd``: two passes (the mean, then the mean squared deviation) in float64;
* ``none``: nothing to compute.

Other integer types than 8 and 16 bits are ranked as float32 values (exact up to 2²⁴). Memory: one slab
and 2¹⁶ counts per channel and pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np

from embedseg_service.core.data.normalization import NormalizationMode, NormalizationSettings
from embedseg_service.core.data.volume_source import VolumeSource, slabs

SLAB_VOXELS = 1 << 22
"""Voxels of one slab read at a time."""
PIECE = 1 << 20
"""Values counted at once (the counting makes an 8-byte index per value)."""
Scaling = tuple[float, float] | None
"""``(offset, spread)`` of one channel, or ``None`` for no scaling (mode ``none``)."""


def _channel_values(source: VolumeSource, channel: int, slab_voxels: int) -> Callable[[], Iterator[np.ndarray]]:
    def values() -> Iterator[np.ndarray]:
        for region in slabs(source.shape[1:], slab_voxels):
            slab = np.ascontiguousarray(source.read(region)[channel]).ravel()
            for start in range(0, slab.size, PIECE):
                yield slab[start : start + PIECE]

    return values


def _sortable_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys of float32 ``values`` whose order is the values' order."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(bits & np.uint32(0x80000000), ~bits, bits | np.uint32(0x80000000))


def _key_value(key: int) -> float:
    bits = key ^ 0x80000000 if key & 0x80000000 else ~key & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _locate(counts: np.ndarray, rank: int) -> tuple[int, int]:
    """(bin, rank within the bin) of the ``rank``-th smallest (from 0) value of a histogram."""
    cumulative = np.cumsum(counts)
    where = int(np.searchsorted(cumulative, rank, side="right"))
    return where, rank - (int(cumulative[where - 1]) if where else 0)


def order_statistics(values: Callable[[], Iterator[np.ndarray]], dtype: np.dtype, ranks: list[int]) -> list[float]:
    """The ``ranks``-th smallest (from 0) of the values ``values()`` yields (called once or twice)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui" and dtype.itemsize <= 2:
        low = int(np.iinfo(dtype).min)
        size = 1 << (8 * dtype.itemsize)
        counts = np.zeros(size, np.int64)
        for block in values():
            counts += np.bincount((block.astype(np.int64) - low), minlength=size)
        return [float(_locate(counts, r)[0] + low) for r in ranks]
    high = np.zeros(1 << 16, np.int64)
    for block in values():
        high += np.bincount(_sortable_keys(block) >> np.uint32(16), minlength=1 << 16)
    wanted = [_locate(high, r) for r in ranks]
    buckets = sorted({b for b, _ in wanted})
    lows = {b: np.zeros(1 << 16, np.int64) for b in buckets}
    for block in values():
        keys = _sortable_keys(block)
        top = keys >> np.uint32(16)
        for b in buckets:
            lows[b] += np.bincount(keys[top == b] & np.uint32(0xFFFF), minlength=1 << 16)
    return [_key_value((b << 16) | _locate(lows[b], r)[0]) for b, r in wanted]


def _percentile_positions(n: int, q: float) -> tuple[int, int, float]:
    """(previous rank, next rank, fraction) of ``numpy.percentile``'s linear method at ``q`` percent of ``n``."""
    quantile = np.float64(q) / 100
    virtual = n * quantile + (1 + quantile * (1 - 1 - 1)) - 1
    previous = min(max(int(math.floor(virtual)), 0), n - 1)
    return previous, min(previous + 1, n - 1), float(virtual - math.floor(virtual))


def _lerp(a: float, b: float, t: float, dtype: np.dtype) -> float:
    """``numpy.percentile``'s interpolation between neighbours ``a <= b`` of an array of ``dtype``."""
    low, high = np.asarray(a, dtype=dtype), np.asarray(b, dtype=dtype)
    gamma = np.asarray(t, dtype=np.float64)
    diff = np.subtract(high, low)
    if t >= 0.5:
        return float(np.subtract(high, diff * (1 - gamma)))
    return float(np.add(low, diff * gamma))


def percentile_scaling(values: Callable[[], Iterator[np.ndarray]], dtype: np.dtype, n: int,
                       p_low: float, p_high: float) -> tuple[float, float]:  # fmt: skip
    """``(P_low, P_high - P_low)`` of ``n`` values, as :func:`numpy.percentile` gives them on the whole array."""
    positions = [_percentile_positions(n, p) for p in (p_low, p_high)]
    ranks = sorted({r for prev, nxt, _ in positions for r in (prev, nxt)})
    found = dict(zip(ranks, order_statistics(values, dtype, ranks)))
    stored = np.dtype(dtype) if np.dtype(dtype).kind in "uif" else np.dtype(np.float32)
    lo, hi = (_lerp(found[prev], found[nxt], t, stored) for prev, nxt, t in positions)
    return lo, hi - lo


def meanstd_scaling(values: Callable[[], Iterator[np.ndarray]], n: int) -> tuple[float, float]:
    """``(mean, standard deviation)`` of ``n`` values in float64 (two passes)."""
    total = sum(float(np.sum(block, dtype=np.float64)) for block in values())
    mean = total / n
    squares = sum(float(np.sum(np.square(block.astype(np.float64) - mean))) for block in values())
    return mean, math.sqrt(squares / n)


def channel_scalings(source: VolumeSource, settings: NormalizationSettings,
                     slab_voxels: int = SLAB_VOXELS) -> list[Scaling]:  # fmt: skip
    """Per channel of ``source``, the scaling ``settings`` gives the whole volume (module docstring)."""
    n = math.prod(source.shape[1:])
    scalings: list[Scaling] = []
    for channel in range(source.shape[0]):
        values = _channel_values(source, channel, slab_voxels)
        if settings.mode is NormalizationMode.none:
            scalings.append(None)
        elif settings.mode is NormalizationMode.percentile:
            scalings.append(percentile_scaling(values, source.dtype, n, settings.p_low, settings.p_high))
        else:
            scalings.append(meanstd_scaling(values, n))
    return scalings
