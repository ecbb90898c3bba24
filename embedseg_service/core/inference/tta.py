"""Test-time augmentation: 8 transforms in 2D, 16 in 3D (docs/method.md §7).

A transform rotates by ``k`` quarter turns in the (Y, X) plane (``torch.rot90`` over the last
two axes, the same as ``numpy.rot90``), then optionally flips Y, then (3D) optionally flips Z;
Z never moves into the YX plane. The network runs on the transformed image; its raw output is
moved back, the offset channels are re-oriented and re-signed (channels x, y[, z]), the sigma
channels are permuted (never negated) and the seed logit is left as it is.

The passes are combined on raw outputs. By default (:attr:`TTACombine.median`) every channel is
the per-pixel median over the passes (offsets and sigma before ``tanh`` and ``exp``): a pass
that places an object's centre or bandwidth far off on some pixels cannot drag the result. Inside
the median's foreground the seed map is then rescaled so that its local maxima (5 pixels per axis)
are as high as the median of the passes' own local maxima there: seed peaks that the passes place
on neighbouring pixels keep their height instead of falling under the seed threshold (the
reference's plain mean, :attr:`TTACombine.mean`, loses such objects), one confident pass alone does
not make a seed, and passes that agree exactly give their common map unchanged (docs/method.md §7;
measured effects in ``benchmarks/RESULTS.md``). :attr:`TTACombine.rescaled_mean` and
:attr:`TTACombine.max_in_foreground` average offsets and sigma and differ in the seed rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from embedseg_service.core.options import Option

DEFAULT_BATCH = 8
"""Transformed images run through the network at once."""
CPU_BATCH_VOXELS = 1 << 20
"""On the CPU a batch holds at most this many voxels (at least one image): large volumes run one at a
time, which is faster there than several per call (``benchmarks/RESULTS.md``)."""
LOCAL_MAX_WINDOW = 5
"""Side of the neighbourhood (pixels per axis) over which seed peaks are compared."""
_PROBABILITY_EPS = 1e-6

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""Maps ``(B, C_in, *S)`` to raw outputs ``(B, 2*D + 1, *S)`` on the same device."""


class TTACombine(Option):
    """How the raw outputs of the passes are combined."""

    median = "median"
    """Median of every channel; seed peaks inside the foreground raised to the median of the passes' peaks."""
    rescaled_mean = "rescaled_mean"
    """Mean offsets and sigma; mean seed probability, its local peaks inside the foreground raised to the
    mean of the passes' peaks."""
    mean = "mean"
    """Mean of every channel, seed logits included (what the reference does)."""
    max_in_foreground = "max_in_foreground"
    """Mean offsets and sigma; mean seed logit outside the foreground of the mean, largest logit inside it."""

    @classmethod
    def option_name(cls) -> str:
        return "combine"


def combine_bytes_per_voxel(spatial_dims: int, combine: TTACombine | str = TTACombine.median) -> int:
    """Memory (bytes per voxel of a window) that combining the passes holds beside the network's batch."""
    channels = 2 * spatial_dims + 1
    if TTACombine.parse(combine) is TTACombine.median:  # every pass kept, plus the median's own work arrays
        return len(transforms(spatial_dims)) * (channels + 1) * 4 * 2
    return (channels + 2) * 4


def _quarter_turn() -> np.ndarray:
    # torch.rot90(k=1, dims=(Y, X)) sends pixel (y, x) to (W - 1 - x, y): (dy, dx) -> (-dx, dy).
    return np.array([[0, -1], [1, 0]], dtype=np.int64)


@dataclass(frozen=True)
class Transform:
    """One axis-aligned transform: ``k`` quarter turns in YX, then Y flip, then Z flip (3D only)."""

    spatial_dims: int
    k: int = 0
    flip_y: bool = False
    flip_z: bool = False

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        if self.k not in (0, 1, 2, 3):
            raise ValueError(f"k must be 0, 1, 2 or 3, got {self.k!r}")
        if self.flip_z and self.spatial_dims != 3:
            raise ValueError("flip_z needs spatial_dims = 3")

    @property
    def swaps_yx(self) -> bool:
        """Whether the transform exchanges the Y and X sizes (odd ``k``)."""
        return self.k % 2 == 1

    @cached_property
    def matrix(self) -> np.ndarray:
        """Signed permutation ``M`` (D×D, array axis order) acting on displacement vectors."""
        d = self.spatial_dims
        m = np.eye(d, dtype=np.int64)
        m[-2:, -2:] = np.linalg.matrix_power(_quarter_turn(), self.k)
        if self.flip_y:
            m = np.diag([1] * (d - 2) + [-1, 1]) @ m
        if self.flip_z:
            m = np.diag([-1, 1, 1]) @ m
        return m

    def transformed_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape after the transform."""
        shape = tuple(shape)
        if self.swaps_yx:
            return shape[:-2] + (shape[-1], shape[-2])
        return shape

    def apply_image(self, x: torch.Tensor) -> torch.Tensor:
        """Transform a tensor ``(B, C, *S)`` spatially (channels untouched)."""
        self._check(x)
        x = torch.rot90(x, self.k, dims=(-2, -1)) if self.k else x
        if self.flip_y:
            x = torch.flip(x, dims=(-2,))
        if self.flip_z:
            x = torch.flip(x, dims=(-3,))
        return x

    def apply_array(self, x: np.ndarray) -> np.ndarray:
        """:meth:`apply_image` on a numpy array whose last ``spatial_dims`` axes are spatial (a contiguous copy)."""
        x = np.rot90(x, self.k, axes=(-2, -1)) if self.k else x
        if self.flip_y:
            x = np.flip(x, axis=-2)
        if self.flip_z:
            x = np.flip(x, axis=-3)
        return np.ascontiguousarray(x)

    def map_box(self, box: Sequence[slice], shape: Sequence[int], *, inverse: bool = False) -> tuple[slice, ...]:
        """Where :meth:`apply_image` moves the box ``box`` (slices with step 1) of an image of spatial ``shape``;
        ``inverse``: the box of such an image that it moves onto ``box`` (a box of the transformed image)."""
        spans = [(int(b.start), int(b.stop)) for b in box]
        size = list(self.transformed_shape(shape) if inverse else shape)

        def flip(axis: int) -> None:
            a, b = spans[axis]
            spans[axis] = (size[axis] - b, size[axis] - a)

        if inverse:
            for axis, flipped in ((-3, self.flip_z), (-2, self.flip_y)):
                if flipped:
                    flip(axis)
        for _ in range((4 - self.k) % 4 if inverse else self.k):  # a quarter turn: (y, x) -> (W - 1 - x, y)
            (ya, yb), (xa, xb) = spans[-2:]
            spans[-2:] = [(size[-1] - xb, size[-1] - xa), (ya, yb)]
            size[-2:] = size[-1], size[-2]
        if not inverse:
            for axis, flipped in ((-2, self.flip_y), (-3, self.flip_z)):
                if flipped:
                    flip(axis)
        return tuple(slice(a, b) for a, b in spans)

    def undo_spatial(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`apply_image` on a tensor ``(B, C, *S')``."""
        self._check(y)
        if self.flip_z:
            y = torch.flip(y, dims=(-3,))
        if self.flip_y:
            y = torch.flip(y, dims=(-2,))
        return torch.rot90(y, -self.k, dims=(-2, -1)) if self.k else y

    def apply_output(self, y: torch.Tensor) -> torch.Tensor:
        """Transform a raw-output field ``(B, 2D+1, *S)`` as the image moves: spatially, and ``o' = M o``."""
        return self._reorient(self.apply_image(y), self.matrix)

    def undo_output(self, y: torch.Tensor) -> torch.Tensor:
        """Bring the raw output ``(B, 2D+1, *S')`` of a transformed image back: inverse of :meth:`apply_output`."""
        return self._reorient(self.undo_spatial(y), self.matrix.T)

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"expected a tensor (B, C, *spatial) with {self.spatial_dims} spatial axes, got {tuple(x.shape)}"
            )

    def _reorient(self, y: torch.Tensor, m: np.ndarray) -> torch.Tensor:
        d = self.spatial_dims
        if y.shape[1] != 2 * d + 1:
            raise ValueError(f"raw output needs {2 * d + 1} channels, got {y.shape[1]}")
        # Channel c holds array axis d - 1 - c (x, y[, z] order).
        src = [0] * (2 * d + 1)
        sign = [1.0] * (2 * d + 1)
        for i in range(d):
            j = int(np.flatnonzero(m[i])[0])
            c_out, c_in = d - 1 - i, d - 1 - j
            src[c_out], sign[c_out] = c_in, float(m[i, j])
            src[d + c_out] = d + c_in
        src[2 * d] = 2 * d
        out = y[:, src]
        signs = torch.tensor(sign, dtype=out.dtype, device=out.device).view(1, -1, *([1] * d))
        return out * signs


def transforms(spatial_dims: int) -> list[Transform]:
    """The 8 (2D) or 16 (3D) transforms; the identity comes first."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    z_flips = (False, True) if spatial_dims == 3 else (False,)
    return [Transform(spatial_dims, k, fy, fz) for fz in z_flips for fy in (False, True) for k in range(4)]


def pass_settings(
    combine: TTACombine | str, fg_thresh: float, batch_size: int, x: torch.Tensor
) -> tuple[TTACombine, int]:
    """The checked combination rule and the passes run together on ``x`` ``(B, C, *S)``: at most
    ``batch_size``, on the CPU also at most :data:`CPU_BATCH_VOXELS` voxels (one image at least)."""
    rule = TTACombine.parse(combine)
    if not 0.0 < fg_thresh < 1.0:
        raise ValueError(f"fg_thresh must lie strictly between 0 and 1, got {fg_thresh}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if x.device.type == "cpu":
        batch_size = max(1, min(batch_size, CPU_BATCH_VOXELS // max(1, math.prod(x.shape[2:]))))
    return rule, batch_size


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def predict_tta(
    predictor: Predictor,
    x: torch.Tensor,
    *,
    combine: TTACombine | str = TTACombine.median,
    fg_thresh: float = 0.5,
    batch_size: int = DEFAULT_BATCH,
    transform_set: Sequence[Transform] | None = None,
) -> torch.Tensor:
    """Raw outputs ``(B, 2*D + 1, *S)`` float32 of ``predictor`` combined over all TTA transforms.

    ``x`` is ``(B, C_in, *S)`` on the predictor's device. Transformed images of the same shape
    (even / odd ``k``) run together, at most ``batch_size`` images per call (on the CPU also at most
    :data:`CPU_BATCH_VOXELS` voxels, one image at least). ``combine`` is the
    rule (:class:`TTACombine`); ``fg_thresh`` is the foreground threshold on the seed probability
    inside which seed peaks are rescaled. ``transform_set`` defaults to :func:`transforms`.
    """
    rule, batch_size = pass_settings(combine, fg_thresh, batch_size, x)
    d = x.dim() - 2
    chosen = list(transform_set) if transform_set is not None else transforms(d)
    if not chosen:
        raise ValueError("transform_set is empty")
    if any(t.spatial_dims != d for t in chosen):
        raise ValueError(f"every transform must have spatial_dims = {d} for an input of shape {tuple(x.shape)}")
    n, n_batch, channels = len(chosen), x.shape[0], 2 * d + 1
    combiner: PassCombiner | None = None
    for odd in (False, True):
        jobs = [(j, t, b) for j, t in enumerate(chosen) if t.swaps_yx == odd for b in range(n_batch)]
        for chunk in _chunks(jobs, batch_size):
            batch = torch.cat([t.apply_image(x[b : b + 1]) for _, t, b in chunk], dim=0)
            raw = predictor(batch).float()
            if raw.shape[1] != channels:
                raise ValueError(f"predictor returned {raw.shape[1]} channels, expected {channels}")
            if combiner is None:
                combiner = PassCombiner(rule, n, (n_batch, channels, *x.shape[2:]), raw.device)
            for i, (j, t, b) in enumerate(chunk):
                combiner.add(j, b, t.undo_output(raw[i : i + 1]))
    assert combiner is not None
    return combiner.result(fg_thresh)


class PassCombiner:
    """Accumulates the back-transformed passes ``(k, C, *S)`` of a batch and combines them by ``rule``.

    ``add(j, b, back)`` stores pass ``j`` of batch items ``b`` to ``b + k``; ``result(fg_thresh)`` returns ``shape``.
    """

    def __init__(self, rule: TTACombine, n: int, shape: tuple[int, ...], device: torch.device) -> None:
        self.rule, self.n = rule, n
        seed_shape = (shape[0], 1, *shape[2:])
        if rule is TTACombine.median:
            self.passes = torch.empty((n, *shape), dtype=torch.float32, device=device)
            return
        self.total = torch.zeros(shape, dtype=torch.float32, device=device)
        if rule is TTACombine.max_in_foreground:  # per pixel: the largest seed logit
            self.extra = torch.full(seed_shape, -math.inf, dtype=torch.float32, device=device)
        elif rule is TTACombine.rescaled_mean:  # per pixel: sums of the local maxima and of the probabilities
            self.extra = torch.zeros(seed_shape, dtype=torch.float32, device=device)
            self.prob_total = torch.zeros(seed_shape, dtype=torch.float32, device=device)

    def add(self, j: int, b: int, back: torch.Tensor) -> None:
        items = slice(b, b + back.shape[0])
        if self.rule is TTACombine.median:
            self.passes[j, items] = back
            return
        self.total[items] += back
        seed = back[:, -1:]
        if self.rule is TTACombine.max_in_foreground:
            self.extra[items] = torch.maximum(self.extra[items], seed)
        elif self.rule is TTACombine.rescaled_mean:
            probability = torch.sigmoid(seed)
            self.prob_total[items] += probability
            self.extra[items] += _local_max(probability)

    def result(self, fg_thresh: float) -> torch.Tensor:
        if self.rule is TTACombine.median:
            out = _median(self.passes)
            seeds = self.passes[:, :, -1:]
            pass_peaks = _median(torch.stack([_local_max(torch.sigmoid(s)) for s in seeds]))
            del self.passes
            out[:, -1:] = _rescaled_peaks(torch.sigmoid(out[:, -1:]), pass_peaks, fg_thresh)
            return out
        mean = self.total / self.n
        if self.rule is TTACombine.max_in_foreground:
            seed_mean = mean[:, -1:]
            mean[:, -1:] = torch.where(seed_mean > math.log(fg_thresh / (1.0 - fg_thresh)), self.extra, seed_mean)
        elif self.rule is TTACombine.rescaled_mean:
            mean[:, -1:] = _rescaled_peaks(self.prob_total / self.n, self.extra / self.n, fg_thresh)
        return mean


MEDIAN_BLOCK = 1 << 22
"""Values sorted at once by :func:`_median` (passes × pixels): bounds the transposed copy and sort's indices."""


def _median(values: torch.Tensor) -> torch.Tensor:
    """Median over dim 0; for an even count the mean of the two middle values (``torch.median``
    returns the lower one, which would bias every channel downwards where the passes disagree).

    The even case sorts blocks of pixels with the passes on the last, contiguous axis, which gives the
    values of two ``kthvalue`` calls over dim 0 at less cost on the CPU."""
    n = values.shape[0]
    if n % 2:
        return values.median(dim=0).values
    flat = values.reshape(n, -1)
    out = torch.empty(flat.shape[1], dtype=values.dtype, device=values.device)
    step = max(1, MEDIAN_BLOCK // n)
    for start in range(0, flat.shape[1], step):
        block = flat[:, start : start + step].t().contiguous().sort(dim=1).values
        out[start : start + step] = 0.5 * (block[:, n // 2 - 1] + block[:, n // 2])
    return out.view(values.shape[1:])


def _rescaled_peaks(probability: torch.Tensor, pass_peaks: torch.Tensor, fg_thresh: float) -> torch.Tensor:
    """Seed logits of ``probability`` ``(B, 1, *S)`` with its local maxima inside the foreground raised
    (or lowered) to ``pass_peaks``, the passes' typical local maximum at each pixel."""
    peaks = _local_max(probability).clamp_min(_PROBABILITY_EPS)
    combined = torch.where(probability > fg_thresh, probability * pass_peaks / peaks, probability)
    return torch.logit(combined.clamp(_PROBABILITY_EPS, 1.0 - _PROBABILITY_EPS))


def _local_max(probability: torch.Tensor) -> torch.Tensor:
    """Largest value in the :data:`LOCAL_MAX_WINDOW` neighbourhood (per axis) of every pixel of ``(B, 1, *S)``."""
    dims = probability.dim() - 2
    pool = torch.nn.functional.max_pool2d if dims == 2 else torch.nn.functional.max_pool3d
    out = probability
    for axis in range(dims):  # a box maximum is separable: one 1-D window per axis (5 + 5 + 5 reads, not 125)
        kernel = tuple(LOCAL_MAX_WINDOW if a == axis else 1 for a in range(dims))
        padding = tuple(LOCAL_MAX_WINDOW // 2 if a == axis else 0 for a in range(dims))
        out = pool(out, kernel, stride=1, padding=padding)
    return out
