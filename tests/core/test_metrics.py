"""AP_dsb, matching, aggregation and the per-object table on hand-built masks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from embedseg_service.core.metrics import (
    THRESHOLDS_2D,
    THRESHOLDS_3D,
    aggregate,
    average_precision,
    evaluate_dataset,
    iou_table,
    match,
    object_table,
)


def row(*segments: tuple[int, int, int], length: int = 50) -> np.ndarray:
    """A (1, length) label image with label ``v`` on ``[a, b)`` for each ``(a, b, v)``."""
    out = np.zeros((1, length), dtype=np.int32)
    for a, b, v in segments:
        out[0, a:b] = v
    return out


# GT: 1 = [0, 10), 2 = [10, 20), 3 = [20, 30)
# pred: 7 = [0, 10) exact, 8 = [10, 16) IoU 0.6 with GT 2, 9 = [40, 45) false positive; GT 3 missed
GT = row((0, 10, 1), (10, 20, 2), (20, 30, 3))
PRED = row((0, 10, 7), (10, 16, 8), (40, 45, 9))


def test_iou_table_values():
    table = iou_table(GT, PRED)
    assert table.gt_ids.tolist() == [1, 2, 3]
    assert table.pred_ids.tolist() == [7, 8, 9]
    assert table.gt_sizes.tolist() == [10, 10, 10]
    assert table.pred_sizes.tolist() == [10, 6, 5]
    expected = np.array([[1.0, 0, 0], [0, 0.6, 0], [0, 0, 0]])
    np.testing.assert_allclose(table.iou, expected)


@pytest.mark.parametrize(
    "threshold, tp, fp, fn, ap, mean_iou",
    [
        (0.5, 2, 1, 1, 0.5, 0.8),
        (0.55, 2, 1, 1, 0.5, 0.8),
        (0.65, 1, 2, 2, 0.2, 1.0),
        (0.9, 1, 2, 2, 0.2, 1.0),
    ],
)
def test_known_counts(threshold, tp, fp, fn, ap, mean_iou):
    result = average_precision(GT, PRED, thresholds=[threshold]).at(threshold)
    assert (result.tp, result.fp, result.fn) == (tp, fp, fn)
    assert result.ap == pytest.approx(ap)
    assert result.mean_matched_iou == pytest.approx(mean_iou)


def test_no_match_gives_zero():
    result = average_precision(row((0, 10, 1)), row((20, 30, 1)), thresholds=[0.5]).at(0.5)
    assert (result.tp, result.fp, result.fn, result.ap, result.mean_matched_iou) == (0, 1, 1, 0.0, 0.0)


def test_optimal_matching_beats_greedy_below_half():
    # GT A = [0, 10), B = [10, 20); pred X = [2, 14), Y = [0, 2)
    # IoU(A, X) = 8/14, IoU(B, X) = 4/18, IoU(A, Y) = 2/10. Greedy by IoU takes A-X and leaves B and Y
    # unmatched; the maximum matching at 0.15 is A-Y and B-X.
    gt = row((0, 10, 1), (10, 20, 2))
    pred = row((0, 2, 2), (2, 14, 1))
    res = average_precision(gt, pred, thresholds=[0.15, 0.5])
    low = res.at(0.15)
    assert (low.tp, low.fp, low.fn, low.ap) == (2, 0, 0, 1.0)
    assert low.mean_matched_iou == pytest.approx((4 / 18 + 2 / 10) / 2)
    high = res.at(0.5)
    assert (high.tp, high.fp, high.fn) == (1, 1, 1)
    assert high.ap == pytest.approx(1 / 3)


def test_match_ties_broken_by_summed_iou():
    iou = np.array([[0.4, 0.3], [0.35, 0.1]])
    gi, pi = match(iou, 0.05)
    assert sorted(zip(gi.tolist(), pi.tolist())) == [(0, 1), (1, 0)]  # 0.65 beats 0.4 + 0.1


def test_match_above_half_takes_all_pairs():
    iou = np.array([[0.7, 0.0, 0.2], [0.0, 0.51, 0.0]])
    gi, pi = match(iou, 0.5)
    assert sorted(zip(gi.tolist(), pi.tolist())) == [(0, 0), (1, 1)]


def test_default_thresholds_follow_dimension():
    assert THRESHOLDS_2D == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
    assert THRESHOLDS_3D == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    assert average_precision(GT, PRED).thresholds == list(THRESHOLDS_2D)
    vol = np.zeros((2, 4, 4), dtype=np.int32)
    vol[0, :2, :2] = 1
    res = average_precision(vol, vol)
    assert res.thresholds == list(THRESHOLDS_3D)
    assert res.ap == [1.0] * 9


def test_ignore_mask_drops_pixels_and_predictions():
    gt = row((0, 10, 1), (30, 35, 2))
    pred = row((0, 10, 1), (20, 28, 2))
    ignore = np.zeros_like(gt, dtype=bool)
    ignore[0, 18:40] = True  # holds all of GT 2 and all of pred 2
    plain = average_precision(gt, pred, thresholds=[0.5]).at(0.5)
    assert (plain.tp, plain.fp, plain.fn) == (1, 1, 1)
    masked = average_precision(gt, pred, thresholds=[0.5], ignore=ignore).at(0.5)
    assert (masked.tp, masked.fp, masked.fn, masked.ap) == (1, 0, 0, 1.0)


def test_ignore_keeps_predictions_mostly_outside():
    gt = row((0, 10, 1))
    pred = row((0, 10, 1), (20, 30, 2))
    ignore = np.zeros_like(gt, dtype=bool)
    ignore[0, 25:30] = True  # exactly half of pred 2: kept, so a false positive
    res = average_precision(gt, pred, thresholds=[0.5], ignore=ignore).at(0.5)
    assert (res.tp, res.fp, res.fn) == (1, 1, 0)
    ignore[0, 24] = True  # now 6 of 10 pixels inside: discarded
    res = average_precision(gt, pred, thresholds=[0.5], ignore=ignore).at(0.5)
    assert (res.tp, res.fp, res.fn) == (1, 0, 0)


def test_ignore_changes_iou_of_partly_ignored_objects():
    gt = row((0, 10, 1))
    pred = row((0, 6, 1))  # IoU 0.6; without pixels 6..9 it is 1.0
    ignore = np.zeros_like(gt, dtype=bool)
    ignore[0, 6:10] = True
    assert average_precision(gt, pred, thresholds=[0.9]).at(0.9).tp == 0
    assert average_precision(gt, pred, thresholds=[0.9], ignore=ignore).at(0.9).tp == 1


def test_dataset_mean_pooled_and_empty_images():
    empty = np.zeros((1, 50), dtype=np.int32)
    perfect = average_precision(GT, GT, thresholds=[0.5, 0.9], name="perfect")
    half = average_precision(GT, PRED, thresholds=[0.5, 0.9], name="half")
    nothing = average_precision(empty, empty, thresholds=[0.5, 0.9], name="empty")
    assert nothing.empty and not half.empty
    ds = aggregate([perfect, half, nothing])
    assert ds.n_images == 3 and ds.n_empty == 1
    assert ds.ap == pytest.approx([(1.0 + 0.5) / 2, (1.0 + 0.2) / 2])
    pooled = ds.pooled[0]
    assert (pooled.tp, pooled.fp, pooled.fn) == (5, 1, 1)
    assert pooled.ap == pytest.approx(5 / 7)
    assert pooled.mean_matched_iou == pytest.approx((3 * 1.0 + 1.0 + 0.6) / 5)
    same = evaluate_dataset([(GT, GT), (GT, PRED), (empty, empty)], thresholds=[0.5, 0.9])
    assert same.ap == ds.ap
    text = json.dumps(ds.to_dict())
    back = json.loads(text)
    assert back["n_empty"] == 1 and back["thresholds"] == [0.5, 0.9]
    assert back["images"][1]["name"] == "half" and back["images"][1]["ap"] == [0.5, 0.2]


def test_empty_prediction_counts_false_negatives():
    empty = np.zeros_like(GT)
    res = average_precision(GT, empty, thresholds=[0.5]).at(0.5)
    assert (res.tp, res.fp, res.fn, res.ap) == (0, 0, 3, 0.0)
    ds = aggregate([average_precision(GT, empty, thresholds=[0.5])])
    assert ds.n_empty == 0 and ds.ap == [0.0]


def test_aggregate_refuses_mixed_thresholds():
    a = average_precision(GT, GT, thresholds=[0.5])
    b = average_precision(GT, GT, thresholds=[0.6])
    with pytest.raises(ValueError, match="same thresholds"):
        aggregate([a, b])


@pytest.mark.parametrize(
    "gt, pred, thresholds, message",
    [
        (np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32), None, "same shape"),
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int32), None, "integer label image"),
        (np.zeros((4, 4), np.int32), -np.ones((4, 4), np.int32), None, ">= 0"),
        (np.zeros((4, 4), np.int32), np.zeros((4, 4), np.int32), [0.0], r"in \(0, 1\]"),
        (np.zeros((4, 4), np.int32), np.zeros((4, 4), np.int32), [], "must not be empty"),
    ],
)
def test_bad_inputs_raise(gt, pred, thresholds, message):
    with pytest.raises(ValueError, match=message):
        average_precision(gt, pred, thresholds=thresholds)


def test_object_table_rows():
    labels = np.zeros((4, 6), dtype=np.int32)
    labels[0:2, 0:3] = 5  # 6 pixels, centroid (0.5, 1.0)
    labels[3, 4:6] = 2  # 2 pixels, centroid (3, 4.5)
    rows = object_table(labels)
    assert rows == [
        {"label": 2, "voxel_count": 2, "centroid": [3.0, 4.5], "bbox_min": [3, 4], "bbox_max": [3, 5]},
        {"label": 5, "voxel_count": 6, "centroid": [0.5, 1.0], "bbox_min": [0, 0], "bbox_max": [1, 2]},
    ]
    assert object_table(np.zeros((3, 3, 3), dtype=np.uint16)) == []
    vol = np.zeros((3, 4, 5), dtype=np.uint16)
    vol[1:3, 2, 1:4] = 1
    (only,) = object_table(vol)
    assert only["voxel_count"] == 6 and only["centroid"] == [1.5, 2.0, 2.0]
    assert only["bbox_min"] == [1, 2, 1] and only["bbox_max"] == [2, 2, 3]
    json.dumps(rows)


def test_object_table_matches_ground_truth_as_ap_does_and_scales_centroids():
    pred = np.zeros((6, 8), dtype=np.uint16)
    pred[0:2, 0:4] = 1  # 8 px
    pred[3:6, 5:8] = 2  # 9 px
    pred[5, 0] = 4  # 1 px
    gt = np.zeros((6, 8), dtype=np.uint16)
    gt[0:2, 0:3] = 7  # inside object 1: IoU 6 / 8
    gt[0:2, 3] = 8  # the rest of object 1: IoU 2 / 8 with it
    gt[4:6, 4:8] = 9  # overlaps object 2 by 6 px: IoU 6 / (9 + 8 - 6) = 6 / 11, matched
    gt[5, 0:2] = 3  # object 4 and one more pixel: IoU exactly 0.5, matched (>= threshold)
    rows = object_table(pred, gt, voxel_size=(2.0, 0.5))
    assert [(r["label"], r["gt_label"], r["iou"]) for r in rows] == [(1, 7, 6 / 8), (2, 9, 6 / 11), (4, 3, 0.5)]
    assert [r["centroid_physical"] for r in rows] == [[1.0, 0.75], [8.0, 3.0], [10.0, 0.0]]
    # unmatched at a stricter threshold: gt_label None, iou the best overlap
    strict = object_table(pred, gt, threshold=0.7)
    assert [(r["gt_label"], r["iou"]) for r in strict] == [(7, 6 / 8), (None, 6 / 11), (None, 0.5)]
    assert "centroid_physical" not in strict[0]
    # the pairs are those match() pairs for AP: one GT object at most per prediction
    assert average_precision(gt, pred, [0.5]).at(0.5).tp == 3
    assert [r["iou"] for r in object_table(pred, np.zeros_like(gt))] == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="voxel_size needs 2 values"):
        object_table(pred, voxel_size=(1.0, 1.0, 1.0))
