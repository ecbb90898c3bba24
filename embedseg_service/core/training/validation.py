"""Validation of a training run and the choice of the best state.

A state is validated on fixed validation crops (loss, oracle IoU, seed peak) and on the whole validation
images (AP_dsb after clustering, at IoU 0.5 and averaged over the IoU thresholds). The best state is chosen
by the selection metric (:class:`embedseg_service.core.training.config.SelectionMetric`), never among
degenerate states (no predicted object, collapsed seed map), and a later state within
:func:`ap_tolerance` of the best AP seen replaces the saved one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from embedseg_service.core.training.config import SelectionMetric

MAX_AP_TOLERANCE = 0.1
"""Largest validation-AP difference treated as noise when choosing the best state (see :func:`ap_tolerance`)."""

SEED_THRESHOLD = 0.9
FG_THRESHOLD = 0.5


@dataclass
class Validation:
    """Figures of one validated state (``None`` where not measured)."""

    loss: float | None = None
    oracle_iou: float | None = None
    seed_max: float | None = None
    ap: float | None = None
    mean_ap: float | None = None
    n_pred: int | None = None
    n_gt: int | None = None

    def degenerate(self) -> bool:
        """True for a model that cannot produce objects (collapsed seed map, no prediction)."""
        if self.n_pred is not None and self.n_gt:
            return self.n_pred == 0
        if self.seed_max is not None:
            return self.seed_max < SEED_THRESHOLD
        return False


class Validator:
    """Fixed validation crops (loss, oracle IoU, seed peak) and whole images (AP_dsb@0.5)."""

    def __init__(
        self,
        crops: list[dict[str, Any]],
        images: list[np.ndarray],
        masks: list[np.ndarray],
        *,
        step: tuple[float, ...],
        min_size: int,
        max_radius: Sequence[float] | None,
        tile: Sequence[int] | str | None,
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.crops = crops
        self.images = images
        self.masks = masks
        self.step = step
        self.min_size = min_size
        self.max_radius = max_radius
        self.tile = tile
        self.batch_size = batch_size
        self.device = device

    @torch.no_grad()
    def on_crops(self, net: torch.nn.Module, loss_fn: torch.nn.Module, amp: bool) -> Validation:
        """Loss (weighted by the crops' objects), mean oracle IoU per object and the seed peak on objects."""
        from embedseg_service.core.data.datasets import collate_crops
        from embedseg_service.core.training.oracle import oracle_ious

        result = Validation()
        if not self.crops:
            return result
        net.eval()
        losses: list[float] = []
        weights: list[float] = []
        ious: list[float] = []
        iou_weights: list[float] = []
        seed_max = -math.inf
        for start in range(0, len(self.crops), self.batch_size):
            batch = collate_crops(self.crops[start : start + self.batch_size])
            image = batch["image"].to(self.device)
            labels = batch["labels"].to(self.device)
            ignore = batch["ignore"].to(self.device)
            centers = [c.to(self.device) for c in batch["centers"]]
            ids = [i.to(self.device) for i in batch["center_ids"]]
            with torch.autocast(device_type=self.device.type, enabled=amp):
                raw = net(image)
            raw = raw.float()
            loss = loss_fn(raw, labels, centers, ids, ignore)
            losses.append(float(loss))
            weights.append(len(centers))
            per_object = oracle_ious(raw, labels, centers, ids, self.step, ignore=ignore)
            if per_object.numel():
                ious.append(float(per_object.sum()))
                iou_weights.append(int(per_object.numel()))
            fg = labels > 0
            if bool(fg.any()):
                seed = torch.sigmoid(raw[:, -1])
                seed_max = max(seed_max, float(seed[fg].max()))
        result.loss = float(np.average(losses, weights=weights))
        result.oracle_iou = float(sum(ious) / sum(iou_weights)) if iou_weights else 0.0
        result.seed_max = seed_max if seed_max > -math.inf else None
        return result

    @torch.no_grad()
    def on_images(self, net: torch.nn.Module, result: Validation) -> None:
        """Fill ``result`` with AP_dsb at IoU 0.5 and averaged over the default thresholds, and object counts."""
        from embedseg_service.core.inference.predict import segment
        from embedseg_service.core.metrics import average_precision, default_thresholds

        net.eval()
        thresholds = default_thresholds(len(self.step))
        at_half = thresholds.index(0.5)
        aps: list[float] = []
        means: list[float] = []
        n_pred = 0
        n_gt = 0
        for image, mask in zip(self.images, self.masks):
            labels = segment(
                net,
                image,
                step=self.step,
                tta=False,
                tile=self.tile,  # as a saved model segments: whole images where memory allows
                fg_thresh=FG_THRESHOLD,
                seed_thresh=SEED_THRESHOLD,
                min_size=self.min_size,
                max_radius=self.max_radius,
                device=self.device,
                progress=None,
            )
            score = average_precision(mask, labels, thresholds)
            if not score.empty:
                aps.append(float(score.ap[at_half]))
                means.append(float(np.mean(score.ap)))
            n_pred += int(score.n_pred)
            n_gt += int(score.n_gt)
        result.ap = float(np.mean(aps)) if aps else 0.0
        result.mean_ap = float(np.mean(means)) if means else 0.0
        result.n_pred = n_pred
        result.n_gt = n_gt


# --------------------------------------------------------------------------------------------- the best state


def selection_key(metric: SelectionMetric, val: Validation) -> tuple[float, ...] | None:
    """Ordering key of a validated state; ``None`` when it cannot be a best model."""
    if val.degenerate():
        return None
    iou = val.oracle_iou if val.oracle_iou is not None else 0.0
    if metric == SelectionMetric.mean_ap:
        if val.mean_ap is None or val.ap is None:
            return None
        return (val.mean_ap, val.ap, iou)
    if metric == SelectionMetric.ap_dsb:
        if val.ap is None:
            return None
        return (val.ap, iou)
    if val.oracle_iou is None:
        return None
    return (val.oracle_iou, val.ap if val.ap is not None else 0.0)


def ap_tolerance(n_gt: int | None) -> float:
    """AP difference treated as noise on a validation set of ``n_gt`` objects: 1.5 / n_gt, at most 0.1.

    (One object switching between matched and missed moves AP_dsb by about 1.3–2 / n_gt.)
    """
    if not n_gt:
        return 0.0
    return min(MAX_AP_TOLERANCE, 1.5 / n_gt)


def replaces_best(
    metric: SelectionMetric,
    key: tuple[float, ...],
    best_key: tuple[float, ...] | None,
    best_seen: tuple[float, ...] | None,
    n_gt: int | None,
) -> bool:
    """Whether a validated, non-degenerate state becomes the saved best.

    ``oracle_iou``: a larger key. ``mean_ap``/``ap_dsb``: an AP within :func:`ap_tolerance` of the best AP seen
    so far — the latest such state is kept, because on a small validation set one object's worth of
    AP is noise while later states have trained longer at a lower learning rate.
    """
    if best_key is None:
        return True
    if metric == SelectionMetric.oracle_iou:
        return key > best_key
    reference = best_seen[0] if best_seen is not None else best_key[0]
    return key[0] >= reference - ap_tolerance(n_gt) - 1e-12
