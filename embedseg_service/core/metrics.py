"""Instance segmentation metrics: IoU matching, AP_dsb, dataset aggregation, per-object table (docs/method.md §10).

AP_dsb(tau) = TP / (TP + FP + FN), 0 when TP = 0, with a one-to-one matching of ground-truth (GT) and
predicted objects that maximises the number of pairs with IoU >= tau (ties: the largest summed IoU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

THRESHOLDS_2D: tuple[float, ...] = tuple(round(0.5 + 0.05 * k, 2) for k in range(9))
"""Default IoU thresholds for 2D images: 0.50, 0.55 ... 0.90."""
THRESHOLDS_3D: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 10))
"""Default IoU thresholds for 3D volumes: 0.1, 0.2 ... 0.9."""


def default_thresholds(spatial_dims: int) -> tuple[float, ...]:
    """IoU thresholds used when none are given: :data:`THRESHOLDS_2D` or :data:`THRESHOLDS_3D`."""
    if spatial_dims == 2:
        return THRESHOLDS_2D
    if spatial_dims == 3:
        return THRESHOLDS_3D
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


@dataclass
class IoUTable:
    """Overlap of the objects of two label images.

    ``gt_ids`` (G,), ``pred_ids`` (P,): labels present (> 0); ``iou`` (G, P) float64;
    ``gt_sizes`` (G,), ``pred_sizes`` (P,): pixel counts.
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    iou: np.ndarray
    gt_sizes: np.ndarray
    pred_sizes: np.ndarray


@dataclass
class ThresholdResult:
    """Counts at one IoU threshold."""

    threshold: float
    ap: float
    tp: int
    fp: int
    fn: int
    mean_matched_iou: float
    """Mean IoU of the TP pairs; 0.0 when there are none."""
    matched_iou_sum: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImageResult:
    """AP of one image at every threshold."""

    n_gt: int
    n_pred: int
    results: list[ThresholdResult]
    name: str | None = None

    @property
    def empty(self) -> bool:
        """True when the image has neither GT nor predicted objects (excluded from dataset means)."""
        return self.n_gt == 0 and self.n_pred == 0

    @property
    def thresholds(self) -> list[float]:
        return [r.threshold for r in self.results]

    @property
    def ap(self) -> list[float]:
        return [r.ap for r in self.results]

    def at(self, threshold: float) -> ThresholdResult:
        """The result at ``threshold`` (matched to within 1e-9)."""
        for r in self.results:
            if abs(r.threshold - threshold) < 1e-9:
                return r
        raise KeyError(f"threshold {threshold} was not evaluated; evaluated: {self.thresholds}")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "n_gt": self.n_gt,
            "n_pred": self.n_pred,
            "thresholds": self.thresholds,
            "ap": self.ap,
            "results": [r.to_dict() for r in self.results],
        }


@dataclass
class DatasetResult:
    """AP over a set of images: ``ap`` is the mean over non-empty images, ``pooled`` uses summed counts."""

    thresholds: list[float]
    ap: list[float]
    pooled: list[ThresholdResult]
    n_images: int
    n_empty: int
    images: list[ImageResult] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "thresholds": self.thresholds,
            "ap": self.ap,
            "pooled": [r.to_dict() for r in self.pooled],
            "n_images": self.n_images,
            "n_empty": self.n_empty,
            "images": [im.to_dict() for im in self.images],
        }


def _check_labels(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred must have the same shape, got {gt.shape} and {pred.shape}")
    for name, arr in (("gt", gt), ("pred", pred)):
        if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
            raise ValueError(f"{name} must be an integer label image, got dtype {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise ValueError(f"{name} labels must be >= 0")
    return gt, pred


def _apply_ignore(gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Drop ignored pixels from both images; drop predictions more than half inside ``ignore``."""
    if ignore is None:
        return gt, pred
    ignore = np.asarray(ignore, dtype=bool)
    if ignore.shape != gt.shape:
        raise ValueError(f"ignore must have the labels' shape {gt.shape}, got {ignore.shape}")
    pred = pred.astype(np.int64, copy=True)
    ids, inverse = np.unique(pred, return_inverse=True)
    inverse = inverse.reshape(pred.shape)
    total = np.bincount(inverse.ravel(), minlength=ids.size)
    inside = np.bincount(inverse.ravel(), weights=ignore.ravel(), minlength=ids.size)
    drop = (ids > 0) & (2 * inside > total)
    pred[drop[inverse]] = 0
    pred[ignore] = 0
    gt = np.where(ignore, 0, gt)
    return gt, pred


def iou_table(gt: np.ndarray, pred: np.ndarray, ignore: np.ndarray | None = None) -> IoUTable:
    """IoU of every (GT, predicted) object pair from one bincount over the pixel pairs.

    ``gt``, ``pred``: integer label images of one shape (0 = background); ``ignore``: optional bool mask
    of pixels to leave out (predictions more than half inside it are dropped).
    """
    gt, pred = _check_labels(gt, pred)
    gt, pred = _apply_ignore(gt, pred, ignore)
    gt_ids, gt_inv = np.unique(gt, return_inverse=True)
    pred_ids, pred_inv = np.unique(pred, return_inverse=True)
    # index 0 is background when present; shift so background always has index 0
    g_off = 0 if (gt_ids.size and gt_ids[0] == 0) else 1
    p_off = 0 if (pred_ids.size and pred_ids[0] == 0) else 1
    n_g = gt_ids.size + g_off
    n_p = pred_ids.size + p_off
    pair = (gt_inv.ravel().astype(np.int64) + g_off) * n_p + (pred_inv.ravel().astype(np.int64) + p_off)
    overlap = np.bincount(pair, minlength=n_g * n_p).reshape(n_g, n_p)
    gt_sizes = overlap.sum(axis=1)[1:]
    pred_sizes = overlap.sum(axis=0)[1:]
    inter = overlap[1:, 1:].astype(np.float64)
    union = gt_sizes[:, None] + pred_sizes[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return IoUTable(
        gt_ids=gt_ids[gt_ids > 0],
        pred_ids=pred_ids[pred_ids > 0],
        iou=iou,
        gt_sizes=gt_sizes,
        pred_sizes=pred_sizes,
    )


def match(iou: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching maximising the number of pairs with IoU >= ``threshold``, ties by summed IoU.

    ``iou``: (G, P). Returns (gt_index, pred_index) int arrays of the matched pairs.
    """
    ok = iou >= threshold
    rows = np.flatnonzero(ok.any(axis=1))
    cols = np.flatnonzero(ok.any(axis=0))
    if rows.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    sub_ok = ok[np.ix_(rows, cols)]
    if threshold > 0.5:
        # IoU > 0.5 pairs never share an object: every such pair is matched
        r, c = np.nonzero(sub_ok)
        return rows[r], cols[c]
    sub = iou[np.ix_(rows, cols)]
    bonus = float(min(rows.size, cols.size) + 1)  # one more pair outweighs any IoU sum
    weight = np.where(sub_ok, bonus + sub, 0.0)
    r, c = linear_sum_assignment(weight, maximize=True)
    keep = sub_ok[r, c]
    return rows[r[keep]], cols[c[keep]]


def threshold_list(thresholds: Sequence[float] | None, ndim: int) -> list[float]:
    """``thresholds`` checked to lie in (0, 1], or the defaults of ``ndim`` dimensions when ``None``."""
    values = list(default_thresholds(ndim) if thresholds is None else thresholds)
    if not values:
        raise ValueError("thresholds must not be empty")
    for t in values:
        if not 0.0 < float(t) <= 1.0:
            raise ValueError(f"IoU thresholds must be in (0, 1], got {t}")
    return [float(t) for t in values]


def threshold_result(threshold: float, tp: int, fp: int, fn: int, iou_sum: float) -> ThresholdResult:
    """The :class:`ThresholdResult` of these counts (AP_dsb = TP / (TP + FP + FN))."""
    ap = tp / (tp + fp + fn) if tp > 0 else 0.0
    return ThresholdResult(
        threshold=threshold,
        ap=float(ap),
        tp=int(tp),
        fp=int(fp),
        fn=int(fn),
        mean_matched_iou=float(iou_sum / tp) if tp > 0 else 0.0,
        matched_iou_sum=float(iou_sum),
    )


def average_precision(
    gt: np.ndarray,
    pred: np.ndarray,
    thresholds: Sequence[float] | None = None,
    *,
    ignore: np.ndarray | None = None,
    name: str | None = None,
) -> ImageResult:
    """AP_dsb of ``pred`` against ``gt`` (integer label images of one shape, 2D or 3D) at each threshold.

    Default thresholds: 0.50..0.90 step 0.05 in 2D, 0.1..0.9 step 0.1 in 3D. ``ignore``: optional bool
    mask (see :func:`iou_table`).
    """
    gt_arr = np.asarray(gt)
    values = threshold_list(thresholds, gt_arr.ndim)
    table = iou_table(gt_arr, pred, ignore)
    n_gt, n_pred = table.gt_ids.size, table.pred_ids.size
    results = []
    for t in values:
        gi, pi = match(table.iou, t)
        tp = gi.size
        results.append(threshold_result(t, tp, n_pred - tp, n_gt - tp, float(table.iou[gi, pi].sum())))
    return ImageResult(n_gt=n_gt, n_pred=n_pred, results=results, name=name)


def aggregate(images: Sequence[ImageResult]) -> DatasetResult:
    """Dataset AP: mean of per-image AP over images with GT or predictions; pooled counts over all.

    All images must have been evaluated at the same thresholds.
    """
    images = list(images)
    if not images:
        raise ValueError("aggregate needs at least one image result")
    thresholds = images[0].thresholds
    for im in images:
        if len(im.thresholds) != len(thresholds) or any(abs(a - b) > 1e-9 for a, b in zip(im.thresholds, thresholds)):
            raise ValueError("all images must be evaluated at the same thresholds")
    counted = [im for im in images if not im.empty]
    ap = [float(np.mean([im.results[k].ap for im in counted])) if counted else 0.0 for k in range(len(thresholds))]
    pooled = []
    for k, t in enumerate(thresholds):
        tp = sum(im.results[k].tp for im in images)
        fp = sum(im.results[k].fp for im in images)
        fn = sum(im.results[k].fn for im in images)
        pooled.append(threshold_result(t, tp, fp, fn, sum(im.results[k].matched_iou_sum for im in images)))
    return DatasetResult(
        thresholds=list(thresholds),
        ap=ap,
        pooled=pooled,
        n_images=len(images),
        n_empty=len(images) - len(counted),
        images=images,
    )


def evaluate_dataset(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    thresholds: Sequence[float] | None = None,
    *,
    ignores: Sequence[np.ndarray | None] | None = None,
    names: Sequence[str] | None = None,
) -> DatasetResult:
    """:func:`average_precision` of every ``(gt, pred)`` pair, then :func:`aggregate`."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("evaluate_dataset needs at least one (gt, pred) pair")
    if thresholds is None:
        thresholds = default_thresholds(np.asarray(pairs[0][0]).ndim)
    results = [
        average_precision(
            g,
            p,
            thresholds,
            ignore=None if ignores is None else ignores[i],
            name=None if names is None else names[i],
        )
        for i, (g, p) in enumerate(pairs)
    ]
    return aggregate(results)


OBJECT_MATCH_THRESHOLD = 0.5
"""IoU at which :func:`object_table` pairs predicted and ground-truth objects (as AP_dsb at 0.5 does)."""


def object_table(
    labels: np.ndarray,
    gt: np.ndarray | None = None,
    *,
    voxel_size: Sequence[float] | None = None,
    threshold: float = OBJECT_MATCH_THRESHOLD,
) -> list[dict]:
    """One row per object of ``labels`` (integer, any dimension), sorted by label.

    Each row: ``label`` (int), ``voxel_count`` (int), ``centroid`` (mean pixel index per array axis,
    floats), ``bbox_min`` and ``bbox_max`` (inclusive pixel indices per array axis). With
    ``voxel_size`` (one size per array axis): ``centroid_physical`` = centroid × voxel size. With
    ``gt`` (an integer label image of the same shape): ``gt_label``, the ground-truth object :func:`match`
    pairs it with at IoU >= ``threshold`` (``None`` when unmatched), and ``iou``: the IoU with that
    object, or for an unmatched object the largest IoU with any ground-truth object (0.0 without overlap).
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer label image, got dtype {labels.dtype}")
    if voxel_size is not None and len(voxel_size) != labels.ndim:
        raise ValueError(f"voxel_size needs {labels.ndim} values (one per axis), got {len(voxel_size)}")
    rows = _object_geometry(labels)
    if voxel_size is not None:
        for row in rows:
            row["centroid_physical"] = [c * float(v) for c, v in zip(row["centroid"], voxel_size)]
    if gt is not None:
        table = iou_table(gt, labels)
        gi, pi = match(table.iou, threshold)
        matched = dict(zip(pi.tolist(), gi.tolist()))
        for k, row in enumerate(rows):  # table.pred_ids are the sorted labels, as the rows are
            g = matched.get(k)
            row["gt_label"] = None if g is None else int(table.gt_ids[g])
            best = float(table.iou[:, k].max()) if table.gt_ids.size else 0.0
            row["iou"] = best if g is None else float(table.iou[g, k])
    return rows


def _object_geometry(labels: np.ndarray) -> list[dict]:
    """Label, voxel count, centroid and bounding box of each object of ``labels`` (see :func:`object_table`)."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if ids.size == 0:
        return []
    index = np.where(labels > 0, np.searchsorted(ids, labels) + 1, 0).ravel()
    n = ids.size + 1
    counts = np.bincount(index, minlength=n)
    centroid_sums = []
    for a, size in enumerate(labels.shape):
        shape = [1] * labels.ndim
        shape[a] = size
        coord = np.broadcast_to(np.arange(size).reshape(shape), labels.shape).ravel()
        centroid_sums.append(np.bincount(index, weights=coord, minlength=n))
    boxes = ndimage.find_objects(index.reshape(labels.shape), max_label=ids.size)
    rows = []
    for k, label in enumerate(ids):
        j = k + 1
        rows.append(
            {
                "label": int(label),
                "voxel_count": int(counts[j]),
                "centroid": [float(cs[j] / counts[j]) for cs in centroid_sums],
                "bbox_min": [int(sl.start) for sl in boxes[k]],
                "bbox_max": [int(sl.stop - 1) for sl in boxes[k]],
            }
        )
    return rows
