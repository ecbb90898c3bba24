"""AP_dsb and object matching of label volumes too large to hold whole, from overlap counts added region by region.

:class:`OverlapCounts` keeps the voxel count of every (ground truth, prediction) label pair that occurs,
background included: a sparse form of :class:`embedseg_service.core.metrics.IoUTable`. Matching at a
threshold splits the pairs with IoU at or above it into connected groups (objects linked by such a pair)
and matches each group as :func:`embedseg_service.core.metrics.match` matches a whole table: the most pairs,
ties by summed IoU. Both objectives add up over the groups, so the counts and IoU sums equal those of
:func:`embedseg_service.core.metrics.average_precision` on the whole volumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from embedseg_service.core.metrics import ImageResult, match, threshold_list, threshold_result

LABEL_LIMIT = 1 << 32
"""Labels must be below this (uint32), so that a pair packs into one 64-bit key."""


@dataclass
class Pairs:
    """Overlapping object pairs: indices into ``gt_ids`` / ``pred_ids`` and their IoU (all > 0)."""

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_index: np.ndarray
    pred_index: np.ndarray
    iou: np.ndarray


class OverlapCounts:
    """Voxel counts of (GT label, predicted label) pairs over the regions given to :meth:`add`."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, dtype=np.uint64)
        self._counts = np.zeros(0, dtype=np.int64)
        self._pairs: Pairs | None = None

    def add(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Count the voxel pairs of one region of both volumes (integer labels, same shape, 0 = background)."""
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape:
            raise ValueError(f"gt and pred regions must have the same shape, got {gt.shape} and {pred.shape}")
        for name, values in (("gt", gt), ("pred", pred)):
            if not np.issubdtype(values.dtype, np.integer):
                raise ValueError(f"{name} must hold integer labels, got dtype {values.dtype}")
            if values.size and (int(values.min()) < 0 or int(values.max()) >= LABEL_LIMIT):
                raise ValueError(f"{name} labels must lie in [0, 2**32)")
        keys = (gt.astype(np.uint64).ravel() << np.uint64(32)) | pred.astype(np.uint64).ravel()
        found, counts = np.unique(keys, return_counts=True)
        merged, inverse = np.unique(np.concatenate([self._keys, found]), return_inverse=True)
        self._counts = np.bincount(inverse, weights=np.concatenate([self._counts, counts]), minlength=merged.size)
        self._counts = self._counts.astype(np.int64)
        self._keys, self._pairs = merged, None

    def pairs(self) -> Pairs:
        """The objects present and the IoU of every overlapping (GT, predicted) pair (computed once per count)."""
        if self._pairs is None:
            self._pairs = self._compute_pairs()
        return self._pairs

    def _compute_pairs(self) -> Pairs:
        gt = (self._keys >> np.uint64(32)).astype(np.int64)
        pred = (self._keys & np.uint64(LABEL_LIMIT - 1)).astype(np.int64)
        gt_ids, gt_at = np.unique(gt, return_inverse=True)
        pred_ids, pred_at = np.unique(pred, return_inverse=True)
        gt_sizes = np.bincount(gt_at, weights=self._counts, minlength=gt_ids.size)
        pred_sizes = np.bincount(pred_at, weights=self._counts, minlength=pred_ids.size)
        both = (gt > 0) & (pred > 0)
        inter = self._counts[both].astype(np.float64)
        union = gt_sizes[gt_at[both]] + pred_sizes[pred_at[both]] - inter
        g_shift, p_shift = int(gt_ids.size > 0 and gt_ids[0] == 0), int(pred_ids.size > 0 and pred_ids[0] == 0)
        return Pairs(gt_ids[g_shift:], pred_ids[p_shift:], gt_at[both] - g_shift, pred_at[both] - p_shift,
                     inter / union)  # fmt: skip


def match_pairs(pairs: Pairs, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matching of ``pairs`` at ``threshold`` as :func:`embedseg_service.core.metrics.match` does on the
    dense table; returns (GT index, predicted index, IoU) of the matched pairs."""
    ok = pairs.iou >= threshold
    g, p, iou = pairs.gt_index[ok], pairs.pred_index[ok], pairs.iou[ok]
    if threshold > 0.5 or g.size == 0:  # IoU > 0.5 pairs never share an object
        return g, p, iou
    n_g = pairs.gt_ids.size
    graph = coo_matrix((np.ones(g.size), (g, n_g + p)), shape=(n_g + pairs.pred_ids.size,) * 2)
    _, component = connected_components(graph, directed=False)
    group = component[g]
    order = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(group[order]) != 0])
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for edges in np.split(order, starts[1:]):
        rows, row_at = np.unique(g[edges], return_inverse=True)
        cols, col_at = np.unique(p[edges], return_inverse=True)
        if rows.size == 1 or cols.size == 1:  # a star: its best pair
            best = edges[np.argmax(iou[edges])]
            found.append((g[best : best + 1], p[best : best + 1], iou[best : best + 1]))
            continue
        dense = np.zeros((rows.size, cols.size))
        dense[row_at, col_at] = iou[edges]
        r, c = match(dense, threshold)
        found.append((rows[r], cols[c], dense[r, c]))
    return tuple(np.concatenate(parts) for parts in zip(*found))  # type: ignore[return-value]


def average_precision_of_counts(
    counts: OverlapCounts, thresholds: Sequence[float] | None = None, *, ndim: int, name: str | None = None
) -> ImageResult:
    """:func:`embedseg_service.core.metrics.average_precision` of the volumes whose regions ``counts`` holds
    (``ndim``: their dimensionality, for the default thresholds)."""
    pairs = counts.pairs()
    n_gt, n_pred = pairs.gt_ids.size, pairs.pred_ids.size
    results = []
    for t in threshold_list(thresholds, ndim):
        _, _, iou = match_pairs(pairs, t)
        results.append(threshold_result(t, iou.size, n_pred - iou.size, n_gt - iou.size, float(iou.sum())))
    return ImageResult(n_gt=n_gt, n_pred=n_pred, results=results, name=name)


def object_matches(counts: OverlapCounts, threshold: float) -> dict[int, tuple[int | None, float]]:
    """Per predicted label: the GT label matched at ``threshold`` (``None`` when unmatched) and the IoU with it,
    or for an unmatched object its largest IoU with any GT object (0.0 without overlap); as
    :func:`embedseg_service.core.metrics.object_table` gives them."""
    pairs = counts.pairs()
    best = np.zeros(pairs.pred_ids.size)
    np.maximum.at(best, pairs.pred_index, pairs.iou)
    found: dict[int, tuple[int | None, float]] = {
        int(label): (None, float(b)) for label, b in zip(pairs.pred_ids, best)
    }
    for g, p, iou in zip(*match_pairs(pairs, threshold)):
        found[int(pairs.pred_ids[p])] = (int(pairs.gt_ids[g]), float(iou))
    return found
