"""AP_dsb and object matches from overlap counts added region by region equal those of the whole volumes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from embedseg_service.core.data.volume_source import blocks
from embedseg_service.core.metrics import THRESHOLDS_3D, average_precision, object_table
from embedseg_service.core.metrics_sparse import OverlapCounts, average_precision_of_counts, object_matches


def blobs(shape: tuple[int, ...], n: int, radius: float, seed: int) -> np.ndarray:
    """Labels of ``n`` overlapping balls (later ones drawn over earlier ones), some split by their neighbours."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(np.float32)
    labels = np.zeros(shape, dtype=np.uint32)
    for k in range(1, n + 1):
        centre = rng.uniform(0, np.array(shape))[:, None]
        distance = np.sqrt(((grid.reshape(len(shape), -1) - centre) ** 2).sum(axis=0)).reshape(shape)
        labels[distance < radius * rng.uniform(0.6, 1.4)] = k
    return labels


def counted(gt: np.ndarray, pred: np.ndarray, block: tuple[int, ...]) -> OverlapCounts:
    counts = OverlapCounts()
    for region in blocks(gt.shape, block):
        counts.add(gt[region], pred[region])
    return counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_by_region_give_the_whole_volume_ap_at_every_threshold(seed: int) -> None:
    gt = blobs((12, 40, 44), 40, 6.0, seed)
    # the prediction: GT objects shifted, some merged, some split, some missed, and false ones
    pred = np.roll(gt, (0, 1, -2), axis=(0, 1, 2)).astype(np.uint32)
    pred[pred % 7 == 3] = 0
    pred[(pred % 5 == 1) & (np.indices(gt.shape)[2] > 20)] += 100
    pred[(pred == 4) | (pred == 5)] = 4
    pred[blobs(gt.shape, 6, 4.0, seed + 10) > 0] = 999
    thresholds = [0.05, 0.1, 0.3, 0.5, 0.51, 0.7, 0.9]
    dense = average_precision(gt, pred, thresholds)
    sparse = average_precision_of_counts(counted(gt, pred, (5, 16, 16)), thresholds, ndim=3)
    assert (sparse.n_gt, sparse.n_pred) == (dense.n_gt, dense.n_pred)
    assert dense.n_gt >= 20 and dense.results[0].tp > 5
    for mine, theirs in zip(sparse.results, dense.results):
        assert (mine.tp, mine.fp, mine.fn) == (theirs.tp, theirs.fp, theirs.fn), mine.threshold
        assert mine.ap == pytest.approx(theirs.ap)
        assert mine.matched_iou_sum == pytest.approx(theirs.matched_iou_sum, abs=1e-9)
    assert average_precision_of_counts(counted(gt, pred, (12, 40, 44)), ndim=3).thresholds == list(THRESHOLDS_3D)


def test_a_low_threshold_takes_the_most_pairs_not_the_best_ones() -> None:
    # GT A = [0, 10), B = [10, 20); pred X = [2, 14), Y = [0, 2): the most pairs at 0.15 are A-Y and B-X
    gt = np.zeros((1, 50), np.uint16)
    gt[0, :10], gt[0, 10:20] = 1, 2
    pred = np.zeros((1, 50), np.uint16)
    pred[0, :2], pred[0, 2:14] = 2, 1
    result = average_precision_of_counts(counted(gt, pred, (1, 7)), [0.15, 0.5], ndim=2)
    assert [(r.tp, r.fp, r.fn) for r in result.results] == [(2, 0, 0), (1, 1, 1)]
    assert result.results[0].matched_iou_sum == pytest.approx(4 / 18 + 2 / 10)


def test_object_matches_equal_the_object_table_columns() -> None:
    gt, _ = ndimage.label(blobs((64, 64), 30, 5.0, 3) > 0)
    pred = np.roll(gt, 2, axis=1)
    pred[pred % 4 == 1] = 0
    pred[:, 50:][pred[:, 50:] > 0] += 500
    rows = object_table(pred, gt)
    found = object_matches(counted(gt, pred, (16, 16)), 0.5)
    assert sorted(found) == [row["label"] for row in rows]
    assert any(row["gt_label"] is None for row in rows) and any(row["gt_label"] is not None for row in rows)
    for row in rows:
        label, iou = found[row["label"]]
        assert label == row["gt_label"]
        assert iou == pytest.approx(row["iou"])


def test_empty_volumes_and_bad_regions() -> None:
    empty = OverlapCounts()
    empty.add(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
    result = average_precision_of_counts(empty, [0.5], ndim=2)
    assert (result.n_gt, result.n_pred, result.results[0].ap) == (0, 0, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        empty.add(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="integer labels"):
        empty.add(np.zeros((4, 4), np.float32), np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[0, 2\*\*32\)"):
        empty.add(np.full((4, 4), -1, np.int32), np.zeros((4, 4), np.uint8))
