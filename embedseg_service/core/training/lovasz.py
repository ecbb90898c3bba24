"""Lovász hinge, for one binary mask and segmented over many masks at once (docs/method.md §4).

For logits ``m`` and binary labels ``y`` the errors are ``ε_i = 1 − m_i (2y_i − 1)``. With the
errors sorted in descending order, ``G`` the number of positives, and ``c⁺_j`` / ``c⁻_j`` the
numbers of positives / negatives among the first ``j`` sorted elements, the Jaccard loss of the
first ``j`` elements is

    J_j = 1 − (G − c⁺_j) / (G + c⁻_j) = j / (G + c⁻_j)

and the Lovász hinge is ``L = Σ_j relu(ε_(j)) · g_j`` with ``g_j = J_j − J_{j−1}`` (``J_0 = 0``).
The weights have closed forms that avoid differences of nearly equal numbers:

* a positive at rank ``j``: ``g_j = 1 / (G + c⁻_j)``;
* a negative at rank ``j``: ``g_j = (G − c⁺_j) / ((G + c⁻_j)(G + c⁻_j − 1))`` (``1`` when ``G = 0``
  and it is the first element).

``L`` is piecewise linear in the errors: its gradient with respect to ``ε_i`` is ``g`` at ``i``'s
rank where ``ε_i > 0`` and 0 elsewhere. Two kinds of elements add nothing to the value or the
gradient and are dropped before sorting (positives still count in ``G``):

* elements with ``ε ≤ 0``: they sort last;
* when ``G ≥ 1``, negatives with an error below the smallest error of the positives: they rank after
  every positive, where ``c⁺ = G`` and so ``g = 0``.
"""

from __future__ import annotations

import torch

_FLOAT32_KEY_MAX = 0x7FFFFFFF


def _check_flat(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 1 or labels.shape != logits.shape:
        raise ValueError(
            f"logits and labels must be 1-D of the same length, got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating point tensor, got {logits.dtype}")


def hinge_errors(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Errors ``1 − m (2y − 1)`` of logits ``m`` (any shape, float) for binary labels ``y`` (bool/int)."""
    signs = labels.to(logits.dtype) * 2 - 1
    return 1 - logits * signs


def sort_by_segment_and_error(
    errors: torch.Tensor, segments: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort by segment (ascending), then by error (descending); errors must be >= 0 (or NaN).

    Float32 errors are packed with the segment into one int64 key (non-negative floats order like their
    bit patterns), so one stable sort does it and the sorted values come out of the sorted keys; other
    dtypes take two stable sorts. Returns sorted errors, sorted segments and the order.
    """
    if errors.dtype in (torch.float16, torch.bfloat16):
        errors = errors.float()
    if errors.dtype == torch.float32 and errors.numel():
        key = _FLOAT32_KEY_MAX - errors.view(torch.int32).to(torch.int64)
        key += segments.to(torch.int64) << 31
        key, order = torch.sort(key, stable=True)
        low = _FLOAT32_KEY_MAX - (key & _FLOAT32_KEY_MAX)
        errors_sorted = low.to(torch.int32).view(torch.float32)
        return errors_sorted, key >> 31, order
    order = torch.sort(errors, descending=True, stable=True).indices
    order = order[torch.sort(segments[order], stable=True).indices]
    return errors[order], segments[order], order


def weights_of_sorted(
    positive: torch.Tensor, segment_start: torch.Tensor, fg_count: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Lovász weights ``g`` of elements already sorted by segment then descending error.

    ``positive`` (P,) bool; ``segment_start`` (P,) int64 position of each element's segment start;
    ``fg_count`` (P,) int64 number of positives ``G`` of each element's segment (all of them, dropped
    ones included). Counts are integers; only the final ratios are rounded, in ``dtype`` (float64 is
    used instead of float32 beyond ``2**24`` elements).
    """
    n = positive.numel()
    if dtype != torch.float64 and n >= (1 << 24):
        dtype = torch.float64
    cum_pos = torch.cumsum(positive, 0)
    before_start = torch.where(segment_start > 0, cum_pos[(segment_start - 1).clamp_min(0)], 0)
    c_pos = cum_pos - before_start
    c_neg = (torch.arange(1, n + 1, device=positive.device) - segment_start) - c_pos
    union = (fg_count + c_neg).to(dtype)
    w_pos = 1.0 / union
    denom = union * (union - 1)
    w_neg = torch.where(denom > 0, (fg_count - c_pos).to(dtype) / denom.clamp_min(1.0), 1.0)
    return torch.where(positive, w_pos, w_neg)


def lovasz_hinge(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Lovász hinge of flat ``logits`` (P,) float for binary ``labels`` (P,) bool/int; scalar tensor.

    Differentiable with respect to ``logits``. Empty input gives 0 (with a zero gradient).
    """
    _check_flat(logits, labels)
    return segmented_lovasz_hinge(logits, labels, torch.zeros_like(labels, dtype=torch.int64), 1)[0]


def segmented_lovasz_weights(
    errors: torch.Tensor,
    labels: torch.Tensor,
    segments: torch.Tensor,
    num_segments: int,
    fg_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lovász weights of every element of several binary problems at once.

    Args:
        errors: (P,) float hinge errors ``1 − m (2y − 1)`` (no gradient is taken through this call).
        labels: (P,) bool/int binary labels.
        segments: (P,) int64 problem index of each element, in ``[0, num_segments)``, any order.
        num_segments: number of problems.
        fg_counts: (num_segments,) int64 number of positives ``G`` of each problem; defaults to the
            positives present. Give it when positives were left out of ``errors`` (they must then
            all have ``ε ≤ 0``).

    Returns:
        (P,) float64 ``g`` at each element's rank within its problem, 0 where ``ε ≤ 0``. The hinge of
        problem ``s`` is ``Σ_{i in s} relu(ε_i) g_i`` and ``g_i`` is its derivative in ``ε_i``.
    """
    _check_flat(errors, labels)
    if segments.shape != errors.shape:
        raise ValueError(f"segments must have shape {tuple(errors.shape)}, got {tuple(segments.shape)}")
    labels = labels.bool()
    segments = segments.to(torch.int64)
    if fg_counts is None:
        fg_counts = torch.bincount(segments[labels], minlength=num_segments)
    weights = torch.zeros(errors.shape, dtype=torch.float64, device=errors.device)
    with torch.no_grad():
        fg_counts = fg_counts.to(torch.int64)
        smallest = torch.full((num_segments,), torch.inf, dtype=errors.dtype, device=errors.device)
        smallest = smallest.scatter_reduce(0, segments[labels], errors[labels], "amin")
        present = torch.bincount(segments[labels], minlength=num_segments)
        smallest = torch.where((fg_counts == 0) | (present < fg_counts), -torch.inf, smallest)
        keep = torch.nonzero((errors > 0) & (labels | (errors >= smallest[segments]))).squeeze(1)
        if keep.numel() == 0:
            return weights
        _, seg_sorted, order = sort_by_segment_and_error(errors[keep], segments[keep])
        index = keep[order]
        counts = torch.bincount(seg_sorted, minlength=num_segments)
        starts = torch.cumsum(counts, 0) - counts
        weights[index] = weights_of_sorted(labels[index], starts[seg_sorted], fg_counts[seg_sorted], errors.dtype).to(
            torch.float64
        )
    return weights


def segmented_lovasz_hinge(
    logits: torch.Tensor, labels: torch.Tensor, segments: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """Lovász hinge of several binary problems at once, without a loop over problems.

    Args:
        logits: (P,) float.
        labels: (P,) bool/int binary labels.
        segments: (P,) int64 problem index of each element, in ``[0, num_segments)``.
        num_segments: number of problems.

    Returns:
        (num_segments,) hinge of each problem (0 for an empty one), differentiable in ``logits``.
    """
    _check_flat(logits, labels)
    errors = hinge_errors(logits, labels)
    weights = segmented_lovasz_weights(errors.detach(), labels, segments, num_segments)
    terms = torch.relu(errors) * weights.to(errors.dtype)
    out = torch.zeros(num_segments, dtype=logits.dtype, device=logits.device)
    return out.index_add(0, segments.to(torch.int64), terms)
