"""Training of a Branched ERF-Net with the EmbedSeg loss (method.md §9).

:func:`train` takes images and label masks (numpy arrays), derives the data properties
(:class:`embedseg_service.core.training.hyperparams.DataProperties`), trains with Adam and the paper's polynomial decay,
validates on fixed validation crops (loss and oracle IoU) and on the whole validation images
(AP_dsb after clustering, at IoU 0.5 and averaged over the IoU thresholds), and keeps two files:
the best model (by the selection metric) at ``out_path`` and the last state next to it
(``<name>.last<suffix>``) for resuming.
The best model's batch-norm statistics are re-estimated as an equal mixture of the training crops'
and the whole training images' (:func:`embedseg_service.core.training.calibration.calibrate_batch_norm`), and
validation on whole images uses that network, so that what is validated is what is saved and used.

Robustness: the best model is chosen by the real validation AP of clustered predictions averaged
over the IoU thresholds (AP at 0.5 alone saturates on a good model, so that a high-learning-rate
state that happens to match a few more objects of a small validation set wins), never among
degenerate models (no predicted object, collapsed seed map); epochs of a small training
set repeat crops so that each epoch has enough optimiser steps; under a wall-clock budget the
learning-rate decay follows the elapsed fraction of the budget, validation follows a time-based
cadence, and training stops in time to validate and save the final state.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from embedseg_service.core.data.centers import CenterMode
from embedseg_service.core.device import resolve_device
from embedseg_service.core.model.checkpoint import load_checkpoint, save_checkpoint
from embedseg_service.core.options import Option
from embedseg_service.core.training.calibration import calibrate_batch_norm

if TYPE_CHECKING:
    from embedseg_service.core.data.datasets import CropDataset
    from embedseg_service.core.training.hyperparams import DataProperties

logger = logging.getLogger(__name__)

EFFECTIVE_BATCH = 16
"""batch × virtual multiplier m (method.md §9): one forward pass of 16 crops where they fit
:data:`MAX_BATCH_VOXELS`, else a smaller batch accumulated over m passes."""

MIN_CONTEXT_BATCH = 2
"""Fewest crops per step when crops are enlarged for context (batch-norm statistics need more than one)."""

MAX_BATCH_VOXELS = {2: 16 * 256 * 256, 3: 2 * 32 * 136 * 136}
"""Largest number of crop voxels in one forward pass: 16 × 256² in 2D; 2 × 32 × 136² in 3D, which
gives the paper's 2 × 8 for its 3D crops and 16 × 1 for small ones (24 × 48² crops: 4.6× faster
optimiser steps than 2 × 8 on a GPU, benchmarks/bench_gpu.py ``train3d``)."""

CPU_STEP_VOXELS_3D = 4 * 8 * 136 * 136
"""Crop voxels of a 3D optimiser step on the CPU, where a step's time grows with its voxels: the
reference's 3D batch of 4 crops of 8 × 136². More, smaller steps reach a useful model sooner in a
CPU budget than few steps of 16 large crops."""

CPU_CROPS_3D = (4, 16)
"""Fewest and most crops of a 3D optimiser step on the CPU."""

DEFAULT_RANDOM_CROPS = 0.25
"""Randomly placed training crops per object-centred crop (see
:class:`embedseg_service.core.data.datasets.CropDataset`)."""

MIN_STEPS_PER_EPOCH = 10
"""A small training set repeats its crops so that an epoch has at least this many optimiser steps."""

MAX_VAL_CROPS = 48
"""Validation crops kept (a seeded subset when there are more)."""

VAL_TIME_FACTOR = 4.0
"""Under a wall-clock budget, validation waits for this many times its own duration of training
(so it takes at most about a fifth of the time)."""

MAX_AP_TOLERANCE = 0.1
"""Largest validation-AP difference treated as noise when choosing the best state (see :func:`ap_tolerance`)."""

SEED_THRESHOLD = 0.9
FG_THRESHOLD = 0.5


class SelectionMetric(Option):
    """How the best checkpoint is chosen on the validation set.

    ``mean_ap`` (default): AP_dsb averaged over the IoU thresholds of
    :func:`embedseg_service.core.metrics.default_thresholds` (0.50–0.90 in 2D, 0.1–0.9 in 3D) on whole images;
    ``ap_dsb``: AP_dsb at IoU 0.5 alone; ``oracle_iou``: the paper's oracle IoU on crops.
    """

    mean_ap = "mean_ap"
    ap_dsb = "ap_dsb"
    oracle_iou = "oracle_iou"

    @classmethod
    def option_name(cls) -> str:
        return "selection metric"


class StopTraining(Exception):  # noqa: N818 - reads as a request, not an error
    """Raised by a progress callback to stop training cleanly (the state is saved first)."""


def _parse_shape(value: Any, spatial_dims: int, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        values = (int(value),) * spatial_dims
    else:
        values = tuple(int(v) for v in value)
    if len(values) != spatial_dims:
        raise ValueError(f"{name} needs {spatial_dims} values (array order), got {values}")
    return values


@dataclass
class TrainConfig:
    """Options of :func:`train`; every field is validated on construction.

    ``batch_size``/``virtual_batch`` ``None`` choose batch × m (:func:`choose_batch`: 16 × 1; fewer
    crops for crops enlarged for context; for large crops a smaller batch and a larger m). ``crop_size``
    is ``"auto"`` (data-derived), one int (every axis) or a tuple in array order, each a multiple of 8.
    ``max_time_minutes`` bounds the wall-clock time. ``samples_per_epoch`` ``None`` uses every training
    crop once, repeated so that an epoch has at least 10 optimiser steps. ``voxel_size`` (array order)
    overrides the files' metadata and sets the anisotropy. ``random_crops`` adds that many randomly
    placed crops per object-centred crop (redrawn every epoch), so the network also learns wide empty
    background.
    ``amp`` trains with float16 autocast on CUDA (ignored on the CPU); off by default, as on GPUs
    with TF32 tensor cores this small network trains faster in float32 than with autocast's casts.
    ``min_object_size`` and ``foreground_weight`` override the data-derived values
    (:class:`embedseg_service.core.training.hyperparams.DataProperties`); ``None`` keeps the data's.
    """

    spatial_dims: int
    epochs: int = 200
    max_time_minutes: float | None = None
    batch_size: int | None = None
    virtual_batch: int | None = None
    crop_size: str | int | tuple[int, ...] = "auto"
    lr: float = 5e-4
    weight_decay: float = 1e-4
    center: CenterMode = CenterMode.medoid
    val_fraction: float = 0.15
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    selection_metric: SelectionMetric = SelectionMetric.mean_ap
    val_every: int = 1
    voxel_size: tuple[float, ...] | None = None
    in_channels: int = 1
    deterministic: bool = False
    num_workers: int = 0
    samples_per_epoch: int | None = None
    random_crops: float = DEFAULT_RANDOM_CROPS
    min_object_size: int | None = None
    foreground_weight: float | None = None

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        self.center = CenterMode.parse(self.center)
        self.selection_metric = SelectionMetric.parse(self.selection_metric)
        if int(self.epochs) < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        self.epochs = int(self.epochs)
        if self.max_time_minutes is not None and not float(self.max_time_minutes) > 0:
            raise ValueError(f"max_time_minutes must be positive, got {self.max_time_minutes}")
        for name in ("batch_size", "virtual_batch", "samples_per_epoch"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if isinstance(self.crop_size, str):
            if self.crop_size != "auto":
                try:
                    self.crop_size = int(self.crop_size)
                except ValueError:
                    raise ValueError(f"crop_size must be 'auto', an int or a tuple, got {self.crop_size!r}") from None
        if not isinstance(self.crop_size, str):
            shape = _parse_shape(self.crop_size, self.spatial_dims, "crop_size")
            assert shape is not None
            if any(s < 8 or s % 8 for s in shape):
                raise ValueError(f"crop_size values must be positive multiples of 8, got {shape}")
            self.crop_size = shape
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction}")
        if int(self.val_every) < 1:
            raise ValueError(f"val_every must be at least 1, got {self.val_every}")
        if int(self.in_channels) < 1:
            raise ValueError(f"in_channels must be at least 1, got {self.in_channels}")
        if not 0.0 <= float(self.random_crops) <= 10.0:
            raise ValueError(f"random_crops must be between 0 and 10 (crops per object crop), got {self.random_crops}")
        self.random_crops = float(self.random_crops)
        if int(self.num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.voxel_size is not None:
            vs = tuple(float(v) for v in self.voxel_size)
            if len(vs) != self.spatial_dims or any(not v > 0 for v in vs):
                raise ValueError(f"voxel_size needs {self.spatial_dims} positive values (array order), got {vs}")
            self.voxel_size = vs
        if self.min_object_size is not None:
            if int(self.min_object_size) < 0 or int(self.min_object_size) != self.min_object_size:
                raise ValueError(f"min_object_size must be a whole number >= 0, got {self.min_object_size}")
            self.min_object_size = int(self.min_object_size)
        if self.foreground_weight is not None:
            if not (math.isfinite(float(self.foreground_weight)) and float(self.foreground_weight) > 0):
                raise ValueError(f"foreground_weight must be a positive number, got {self.foreground_weight}")
            self.foreground_weight = float(self.foreground_weight)
        resolve_device(self.device)  # refuses unknown names and CUDA without a GPU

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (enums as their values), as stored in checkpoints."""
        data = asdict(self)
        data["center"] = self.center.value
        data["selection_metric"] = self.selection_metric.value
        for key in ("crop_size", "voxel_size"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values.get("crop_size"), list):
            values["crop_size"] = tuple(values["crop_size"])
        if isinstance(values.get("voxel_size"), list):
            values["voxel_size"] = tuple(values["voxel_size"])
        return cls(**values)


@dataclass
class TrainProgress:
    """What a progress callback receives, after every optimiser step and at the end of every epoch.

    ``epoch`` counts from 0 and is the epoch in progress; ``step`` counts optimiser steps done in
    it. ``val_iou``/``val_ap``/``val_map`` are the latest validation figures — oracle IoU, AP_dsb at
    IoU 0.5 and AP_dsb averaged over the default thresholds — (``None`` before the first).
    ``fraction`` (0–1) is the part of the run done, ``eta_s`` the estimated seconds left.
    """

    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    loss: float | None
    val_iou: float | None
    val_ap: float | None
    eta_s: float | None
    fraction: float
    message: str = ""
    val_map: float | None = None


@dataclass
class TrainResult:
    """Outcome of :func:`train`.

    ``stopped`` is ``"completed"``, ``"time_budget"`` or ``"requested"`` (callback).
    """

    model_path: Path
    last_path: Path
    best_epoch: int | None
    best_metrics: dict[str, Any]
    epochs_completed: int
    stopped: str
    history: list[dict[str, Any]] = field(default_factory=list)
    properties: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0


ProgressCallback = Callable[[TrainProgress], Any]


def last_checkpoint_path(out_path: str | Path) -> Path:
    """Where the last (resumable) state is kept for a best-model path: ``model.pt`` → ``model.last.pt``."""
    out_path = Path(out_path)
    suffix = out_path.suffix or ".pt"
    return out_path.with_name(f"{out_path.stem}.last{suffix}")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def choose_batch(
    spatial_dims: int,
    crop_shape: Sequence[int],
    batch_size: int | None,
    virtual_batch: int | None,
    object_crop_shape: Sequence[int] | None = None,
    device_type: str = "cuda",
) -> tuple[int, int]:
    """Batch size and virtual multiplier m: batch × m crops per optimiser step.

    16 crops per step, or, where the crop was enlarged for context beyond ``object_crop_shape``
    (:data:`embedseg_service.core.training.hyperparams.MIN_CONTEXT_SIDE`), as many fewer as the crop is larger (16 × 48²
    becomes 4 × 96²; at least :data:`MIN_CONTEXT_BATCH`), so a step costs what it did. In 3D on the
    CPU (``device_type`` ``"cpu"``) a step holds at most :data:`CPU_STEP_VOXELS_3D` crop voxels, and
    4 to 16 crops (:data:`CPU_CROPS_3D`). The automatic batch starts there and halves (raising m)
    until one forward pass holds at most :data:`MAX_BATCH_VOXELS` voxels: 16 × 1 for small crops,
    2 × 8 for 3D crops of 32 × 136² on a GPU.
    """
    voxels = int(np.prod(crop_shape))
    effective = EFFECTIVE_BATCH
    if object_crop_shape is not None:
        ratio = float(np.prod(object_crop_shape)) / float(voxels)
        if ratio < 1.0:
            effective = max(MIN_CONTEXT_BATCH, round(EFFECTIVE_BATCH * ratio))
    if spatial_dims == 3 and device_type == "cpu":
        low, high = CPU_CROPS_3D
        effective = min(effective, max(low, min(high, CPU_STEP_VOXELS_3D // voxels)))
    if batch_size is None:
        batch = effective
        while batch > 1 and batch * voxels > MAX_BATCH_VOXELS[spatial_dims]:
            batch //= 2
    else:
        batch = int(batch_size)
    m = int(virtual_batch) if virtual_batch is not None else max(1, round(effective / batch))
    return batch, m


def _as_array_list(items: Sequence[np.ndarray] | np.ndarray, name: str) -> list[np.ndarray]:
    if isinstance(items, np.ndarray):
        items = [items]
    out = [np.asarray(a) for a in items]
    if not out:
        raise ValueError(f"{name} is empty: give at least one image")
    return out


def _check_pairs(
    images: list[np.ndarray], masks: list[np.ndarray], spatial_dims: int, in_channels: int, what: str
) -> None:
    if len(images) != len(masks):
        raise ValueError(f"{what}: {len(images)} images but {len(masks)} masks; give one mask per image")
    for i, (image, mask) in enumerate(zip(images, masks)):
        if mask.ndim != spatial_dims:
            raise ValueError(
                f"{what} mask {i} has shape {mask.shape}; a {spatial_dims}D mask needs {spatial_dims} axes"
            )
        if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == bool):
            raise ValueError(f"{what} mask {i} has dtype {mask.dtype}; label masks must be integers")
        spatial = image.shape if image.ndim == spatial_dims else image.shape[1:]
        if image.ndim not in (spatial_dims, spatial_dims + 1) or tuple(spatial) != tuple(mask.shape):
            raise ValueError(
                f"{what} image {i} has shape {image.shape} but its mask has shape {mask.shape}; "
                f"images are {'(Z, Y, X)' if spatial_dims == 3 else '(Y, X)'} with an optional channel axis first"
            )
        channels = 1 if image.ndim == spatial_dims else image.shape[0]
        if channels != in_channels:
            raise ValueError(f"{what} image {i} has {channels} channel(s); the model is built for {in_channels}")


# ---------------------------------------------------------------------------------------------
# validation


@dataclass
class _Validation:
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


class _Validator:
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
    def on_crops(self, net: torch.nn.Module, loss_fn: torch.nn.Module, amp: bool) -> _Validation:
        from embedseg_service.core.data.datasets import collate_crops
        from embedseg_service.core.training.loss import oracle_ious

        result = _Validation()
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
    def on_images(self, net: torch.nn.Module, result: _Validation) -> None:
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


# ---------------------------------------------------------------------------------------------
# training


def _lr_factor(epoch: int, epochs: int, time_fraction: float) -> float:
    """(1 − f)^0.9 with f the larger of the epoch fraction and the elapsed budget fraction."""
    f = max(epoch / epochs, time_fraction)
    return max(0.0, 1.0 - min(f, 1.0)) ** 0.9


def _selection_key(metric: SelectionMetric, val: _Validation) -> tuple[float, ...] | None:
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


def _replaces_best(
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


def _resolve_voxel_size(
    voxel_size: Sequence[float] | None, config: TrainConfig
) -> tuple[float, ...] | None:
    vs = voxel_size if voxel_size is not None else config.voxel_size
    if vs is None:
        return None
    vs = tuple(float(v) for v in vs)
    if len(vs) != config.spatial_dims or any(not v > 0 for v in vs):
        raise ValueError(f"voxel_size needs {config.spatial_dims} positive values (array order), got {vs}")
    return vs


def train(
    images: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    config: TrainConfig,
    *,
    out_path: str | Path,
    val_images: Sequence[np.ndarray] | None = None,
    val_masks: Sequence[np.ndarray] | None = None,
    voxel_size: Sequence[float] | None = None,
    resume_from: str | Path | None = None,
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train a model and write the best one to ``out_path`` (the last state beside it).

    ``images``: arrays ``(*S)`` or ``(C, *S)`` (any numeric dtype; normalised here);
    ``masks``: integer label arrays ``(*S)`` (0 = background). Without ``val_images`` a seeded
    ``config.val_fraction`` of the images is held out (a single image is split spatially).
    ``voxel_size`` (array order) overrides ``config.voxel_size``. ``resume_from`` continues a
    run from a checkpoint (the last state of an earlier run). ``progress`` receives a
    :class:`TrainProgress`; returning ``False`` or raising :class:`StopTraining` stops training
    after the state is saved.
    """
    t_start = time.monotonic()
    if not isinstance(config, TrainConfig):
        raise TypeError("config must be a TrainConfig")
    out_path = Path(out_path)
    last_path = last_checkpoint_path(out_path)
    device = resolve_device(config.device)
    amp = bool(config.amp and device.type == "cuda")
    budget_s = float(config.max_time_minutes) * 60.0 if config.max_time_minutes else None

    train_pairs, val_pairs = _training_pairs(images, masks, val_images, val_masks, config)
    vs = _resolve_voxel_size(voxel_size, config)

    resume: dict[str, Any] | None = None
    if resume_from is not None:
        resume = load_checkpoint(resume_from)
        _check_resume(resume, config)

    torch.backends.cudnn.benchmark = not config.deterministic
    if config.deterministic:
        torch.backends.cudnn.deterministic = True
    seed_everything(config.seed)

    props = _data_properties(resume, list(train_pairs[1]) + list(val_pairs[1]), config, vs)
    description = props.describe()
    logger.info("data-derived parameters:\n%s", description)

    run = _Run.build(
        config,
        props,
        train_pairs,
        val_pairs,
        device=device,
        amp=amp,
        budget_s=budget_s,
        out_path=out_path,
        last_path=last_path,
        t_start=t_start,
        progress=progress,
    )
    if resume is not None:
        run.restore(resume)
    run.last_val_time = time.monotonic()
    if run.start_epoch == 0:
        run.notify(0, 0, "data-derived parameters:\n" + description)
    run.train_epochs()
    return run.finish()


# ---------------------------------------------------------------------------------------------
# the parts of a training run

_Pairs = tuple[list[np.ndarray], list[np.ndarray]]
"""Images and their label masks."""


def _training_pairs(
    images: Sequence[np.ndarray] | np.ndarray,
    masks: Sequence[np.ndarray] | np.ndarray,
    val_images: Sequence[np.ndarray] | None,
    val_masks: Sequence[np.ndarray] | None,
    config: TrainConfig,
) -> tuple[_Pairs, _Pairs]:
    """Checked training and validation pairs: the given validation pairs, or a seeded held-out part."""
    dims = config.spatial_dims
    images_l = _as_array_list(images, "images")
    masks_l = _as_array_list(masks, "masks")
    _check_pairs(images_l, masks_l, dims, config.in_channels, "training")
    if (val_images is None) != (val_masks is None):
        raise ValueError("give both val_images and val_masks, or neither (then val_fraction is held out)")
    if val_images is not None:
        val_images_l = _as_array_list(val_images, "val_images")
        val_masks_l = _as_array_list(val_masks, "val_masks")  # type: ignore[arg-type]
        _check_pairs(val_images_l, val_masks_l, dims, config.in_channels, "validation")
        return (images_l, masks_l), (val_images_l, val_masks_l)
    from embedseg_service.core.data.datasets import split_train_val

    (train_images, train_masks), (val_images_l, val_masks_l) = split_train_val(
        images_l, masks_l, val_fraction=config.val_fraction, seed=config.seed, spatial_dims=dims
    )
    return (train_images, train_masks), (val_images_l, val_masks_l)


def _data_properties(
    resume: dict[str, Any] | None,
    masks: list[np.ndarray],
    config: TrainConfig,
    voxel_size: tuple[float, ...] | None,
) -> DataProperties:
    """Data-derived parameters of all ``masks`` (a resumed run keeps the ones it was started with)."""
    from embedseg_service.core.training.hyperparams import DataProperties

    if resume is not None and resume.get("properties"):
        return DataProperties.from_dict(resume["properties"])
    return DataProperties.from_masks(
        masks,
        spatial_dims=config.spatial_dims,
        voxel_size=voxel_size,
        crop_shape=None if config.crop_size == "auto" else config.crop_size,
        min_object_size=config.min_object_size,
        foreground_weight=config.foreground_weight,
    )


def _datasets(
    train_pairs: _Pairs,
    val_pairs: _Pairs,
    props: DataProperties,
    config: TrainConfig,
    *,
    crop_shape: tuple[int, ...],
    step: tuple[float, ...],
    batch: int,
    device: torch.device,
) -> tuple[CropDataset, _Validator]:
    """The training crops and the validator: fixed validation crops (a seeded subset) and whole images."""
    from embedseg_service.core.data.datasets import CropDataset

    train_set = CropDataset(
        train_pairs[0],
        train_pairs[1],
        crop_shape=crop_shape,
        center_mode=config.center,
        anisotropy=props.anisotropy,
        augment=True,
        seed=config.seed,
        normalization=props.normalization,
        random_fraction=config.random_crops,
    )
    if len(train_set) == 0:
        raise ValueError("the training masks hold no object: nothing to train on")
    val_images, val_masks = val_pairs
    val_set = CropDataset(
        val_images,
        val_masks,
        crop_shape=crop_shape,
        center_mode=config.center,
        anisotropy=props.anisotropy,
        augment=False,
        seed=config.seed,
        normalization=props.normalization,
        allow_empty=True,
    )
    val_index = np.arange(len(val_set))
    if len(val_index) > MAX_VAL_CROPS:
        val_index = np.sort(np.random.default_rng([config.seed, 7]).choice(val_index, MAX_VAL_CROPS, replace=False))
    val_crops = [val_set[int(i)] for i in val_index]
    val_norm = [_normalized(image, props, config.spatial_dims) for image in val_images]
    validator = _Validator(
        val_crops,
        val_norm,
        [np.asarray(mk) for mk in val_masks],
        step=step,
        min_size=int(props.min_object_size),
        max_radius=props.max_seed_radius,
        tile="auto",
        batch_size=batch,
        device=device,
    )
    return train_set, validator


@dataclass
class _Run:
    """One training run: what it trains with (fixed) and its state (history, best model, timings),
    with the steps that change that state: epochs, validation, checkpoints and progress reports."""

    config: TrainConfig
    props: DataProperties
    out_path: Path
    last_path: Path
    device: torch.device
    amp: bool
    budget_s: float | None
    t_start: float
    progress: ProgressCallback | None
    step: tuple[float, ...]
    batch: int
    m: int
    steps_per_epoch: int
    samples: int
    train_set: CropDataset
    validator: _Validator
    net: torch.nn.Module
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    history: list[dict[str, Any]] = field(default_factory=list)
    start_epoch: int = 0
    epochs_done: int = 0
    best_key: tuple[float, ...] | None = None  # selection key of the saved best state
    best_seen: tuple[float, ...] | None = None  # largest key seen so far
    best_epoch: int | None = None
    best_metrics: dict[str, Any] = field(default_factory=dict)
    save_seconds: float = 0.0  # longest checkpoint write
    val_seconds: float | None = None  # duration of the last full validation
    last_val: _Validation | None = None
    last_loss: float | None = None
    last_val_time: float = 0.0
    evaluated_state: bool = True  # the state saved as best/last has been validated
    stopped: str = "completed"
    stop_requested: bool = False

    @classmethod
    def build(
        cls,
        config: TrainConfig,
        props: DataProperties,
        train_pairs: _Pairs,
        val_pairs: _Pairs,
        *,
        device: torch.device,
        amp: bool,
        budget_s: float | None,
        out_path: Path,
        last_path: Path,
        t_start: float,
        progress: ProgressCallback | None,
    ) -> _Run:
        """Batch, datasets, validator, network, loss and optimiser of a new run (in this order: seeded)."""
        from embedseg_service.core.model.erfnet import BranchedERFNet
        from embedseg_service.core.training.loss import EmbedSegLoss

        dims = config.spatial_dims
        crop_shape = tuple(int(s) for s in props.crop_shape)
        step = tuple(float(h) for h in props.step)
        batch, m = choose_batch(
            dims, crop_shape, config.batch_size, config.virtual_batch, props.object_crop_shape, device.type
        )
        train_set, validator = _datasets(
            train_pairs, val_pairs, props, config, crop_shape=crop_shape, step=step, batch=batch, device=device
        )

        samples = config.samples_per_epoch or max(len(train_set), MIN_STEPS_PER_EPOCH * batch * m)
        steps_per_epoch = max(1, samples // (batch * m))
        samples = steps_per_epoch * batch * m

        net = BranchedERFNet(dims, in_channels=config.in_channels).to(device)
        return cls(
            config=config,
            props=props,
            out_path=out_path,
            last_path=last_path,
            device=device,
            amp=amp,
            budget_s=budget_s,
            t_start=t_start,
            progress=progress,
            step=step,
            batch=batch,
            m=m,
            steps_per_epoch=steps_per_epoch,
            samples=samples,
            train_set=train_set,
            validator=validator,
            net=net,
            loss_fn=EmbedSegLoss(dims, step, foreground_weight=float(props.foreground_weight)),
            optimizer=torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay),
            scaler=torch.amp.GradScaler("cuda", enabled=amp),
        )

    def restore(self, resume: dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, optimiser (and scaler) state, epoch, history and best model."""
        self.net.load_state_dict(resume["state_dict"])
        if resume.get("optimizer"):
            self.optimizer.load_state_dict(resume["optimizer"])
        if resume.get("scaler") and self.amp:
            self.scaler.load_state_dict(resume["scaler"])
        self.start_epoch = int(resume.get("epoch", 0))
        self.epochs_done = self.start_epoch
        self.history = list(resume.get("history") or [])
        best = resume.get("best") or {}
        if best.get("key") is not None:
            self.best_key = tuple(best["key"])
            self.best_seen = tuple(best.get("seen") or best["key"])
            self.best_epoch = best.get("epoch")
            self.best_metrics = dict(best.get("metrics") or {})

    # ------------------------------------------------------------------ checkpoints

    def payload(
        self, epoch_done: int, metrics: dict[str, Any], kind: str, model: torch.nn.Module | None = None
    ) -> dict[str, Any]:
        """Checkpoint contents: ``model`` (default: the network in training) and everything to resume."""
        config = self.config
        return {
            "kind": kind,
            "state_dict": (model or self.net).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.amp else None,
            "epoch": epoch_done,
            "config": config.to_dict(),
            "spatial_dims": config.spatial_dims,
            "in_channels": config.in_channels,
            "step": list(self.step),
            "properties": self.props.to_dict(),
            "normalization": self.props.normalization_settings.to_dict(),
            "metrics": metrics,
            "history": self.history,
            "seed": config.seed,
            "seeds": {
                "python": config.seed,
                "numpy": config.seed % (2**32),
                "torch": config.seed,
                "per_epoch": "numpy.random.SeedSequence([seed, epoch]) seeds torch, the crop order and augmentation",
            },
            "best": {
                "key": list(self.best_key) if self.best_key else None,
                "seen": list(self.best_seen) if self.best_seen else None,
                "epoch": self.best_epoch,
                "metrics": self.best_metrics,
            },
            "batch": {"batch_size": self.batch, "virtual_batch": self.m, "steps_per_epoch": self.steps_per_epoch},
        }

    def save(self, path: Path, data: dict[str, Any]) -> None:
        """Write a checkpoint, keeping the longest write time (reserved at the end of a budget)."""
        t0 = time.monotonic()
        save_checkpoint(path, data)
        self.save_seconds = max(self.save_seconds, time.monotonic() - t0)

    # ------------------------------------------------------------------ time and progress

    def elapsed(self) -> float:
        return time.monotonic() - self.t_start

    def fraction_done(self, epoch_float: float) -> float:
        f = epoch_float / self.config.epochs
        if self.budget_s:
            f = max(f, self.elapsed() / self.budget_s)
        return float(min(1.0, max(0.0, f)))

    def eta(self, epoch_float: float) -> float | None:
        budget_s = self.budget_s
        done = epoch_float - self.start_epoch
        if done <= 0:
            return budget_s - self.elapsed() if budget_s else None
        remaining = (self.config.epochs - epoch_float) * self.elapsed() / done
        if budget_s:
            remaining = min(remaining, max(0.0, budget_s - self.elapsed()))
        return float(remaining)

    def notify(self, epoch: int, step_i: int, message: str = "") -> bool:
        """Report progress; ``False`` when the callback asks to stop."""
        if self.progress is None:
            return True
        epoch_float = epoch + step_i / self.steps_per_epoch
        last_val = self.last_val
        info = TrainProgress(
            epoch=epoch,
            epochs=self.config.epochs,
            step=step_i,
            steps_per_epoch=self.steps_per_epoch,
            loss=self.last_loss,
            val_iou=last_val.oracle_iou if last_val else None,
            val_ap=last_val.ap if last_val else None,
            val_map=last_val.mean_ap if last_val else None,
            eta_s=self.eta(epoch_float),
            fraction=self.fraction_done(epoch_float),
            message=message,
        )
        try:
            answer = self.progress(info)
        except StopTraining:
            return False
        return answer is not False

    def out_of_time(self, epoch_t0: float | None = None, steps: int = 0) -> bool:
        """Under a budget: whether one more step (timed as the ``steps`` since ``epoch_t0``; none before an
        epoch), a final validation and the final saves no longer fit (:func:`_out_of_time`)."""
        if self.budget_s is None:
            return False
        elapsed_s = self.elapsed()
        step_seconds = (time.monotonic() - epoch_t0) / steps if epoch_t0 is not None else 0.0
        return _out_of_time(elapsed_s, self.budget_s, self.val_seconds, step_seconds, self.save_seconds)

    # ------------------------------------------------------------------ validation and the best model

    def calibrated(self) -> torch.nn.Module:
        """The network as it is saved and used: batch norm calibrated on the training images."""
        return calibrate_batch_norm(self.net, self.train_set.images, device=self.device, seed=self.config.seed)

    def validate(self, epoch_done: int, with_images: bool) -> _Validation:
        """Validate the current state, record it in the history and save it if it becomes the best."""
        t0 = time.monotonic()
        val = self.validator.on_crops(self.net, self.loss_fn, self.amp)
        model = None  # the network as it is saved and used: batch norm calibrated on whole images
        if with_images and self.validator.images:
            model = self.calibrated()
            self.validator.on_images(model, val)
        self.last_val = val
        self.last_val_time = time.monotonic()
        if with_images:
            self.val_seconds = self.last_val_time - t0
        record = {
            "epoch": epoch_done,
            "val_loss": val.loss,
            "val_iou": val.oracle_iou,
            "val_ap": val.ap,
            "val_map": val.mean_ap,
            "val_seed_max": val.seed_max,
            "val_objects": val.n_pred,
            "val_gt_objects": val.n_gt,
            "degenerate": val.degenerate(),
        }
        metric = self.config.selection_metric
        key = _selection_key(metric, val)
        metrics = {k: v for k, v in record.items() if k != "epoch"}
        if key is not None:
            self.best_seen = key if self.best_seen is None else max(self.best_seen, key)
        if key is not None and _replaces_best(metric, key, self.best_key, self.best_seen, val.n_gt):
            self.best_key, self.best_epoch, self.best_metrics = key, epoch_done, metrics
            self.save(self.out_path, self.payload(epoch_done, metrics, "best", model or self.calibrated()))
            record["best"] = True
        history = self.history
        if history and history[-1].get("epoch") == epoch_done:
            history[-1].update(record)
        else:
            history.append(record)
        return val

    # ------------------------------------------------------------------ epochs

    def train_epochs(self) -> None:
        """Train from ``start_epoch`` until the last epoch, the budget or a stop request."""
        config = self.config
        for epoch in range(self.start_epoch, config.epochs):
            if self.out_of_time():
                self.stopped = "time_budget"
                break
            epoch_t0 = time.monotonic()
            factor = _lr_factor(epoch, config.epochs, self.elapsed() / self.budget_s if self.budget_s else 0.0)
            for group in self.optimizer.param_groups:
                group["lr"] = config.lr * factor
            if self.train_epoch(epoch, epoch_t0):
                break
            if not self.end_epoch(epoch + 1, config.lr * factor, epoch_t0):
                break

    def epoch_loader(self, epoch: int) -> torch.utils.data.DataLoader:
        """The epoch's seeded crops (whole permutations, repeated up to ``samples``); seeds torch for the epoch."""
        from embedseg_service.core.data.datasets import collate_crops

        config = self.config
        epoch_seed = _epoch_seed(config.seed, epoch)
        torch.manual_seed(epoch_seed)
        rng = np.random.default_rng(epoch_seed)
        order = _epoch_order(len(self.train_set), self.samples, rng)
        if hasattr(self.train_set, "set_epoch"):
            self.train_set.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            torch.utils.data.Subset(self.train_set, order.tolist()),
            batch_size=self.batch,
            shuffle=False,
            collate_fn=collate_crops,
            num_workers=int(config.num_workers),
            worker_init_fn=_worker_init if config.num_workers else None,
            generator=torch.Generator().manual_seed(epoch_seed),
        )

    def train_epoch(self, epoch: int, epoch_t0: float) -> bool:
        """One epoch of optimiser steps (each over ``m`` batches); ``True`` when a stop request or the
        budget interrupted it."""
        loader = self.epoch_loader(epoch)
        device, m, net, optimizer, scaler = self.device, self.m, self.net, self.optimizer, self.scaler
        net.train()
        optimizer.zero_grad(set_to_none=True)
        running: list[float] = []
        step_i = 0
        interrupted = False
        for i, sample in enumerate(loader):
            image = sample["image"].to(device, non_blocking=True)
            labels = sample["labels"].to(device, non_blocking=True)
            ignore = sample["ignore"].to(device, non_blocking=True)
            centers = [c.to(device) for c in sample["centers"]]
            ids = [c.to(device) for c in sample["center_ids"]]
            with torch.autocast(device_type=device.type, enabled=self.amp):
                raw = net(image)
            loss = self.loss_fn(raw.float(), labels, centers, ids, ignore)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss became {float(loss)} at epoch {epoch}, batch {i}")
            scaler.scale(loss / m).backward()
            running.append(float(loss.detach()))
            if (i + 1) % m == 0:
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                step_i += 1
                self.last_loss = float(np.mean(running[-m:]))
                self.evaluated_state = False
                if not self.notify(epoch, step_i):
                    self.stop_requested = True
                    interrupted = True
                    break
                if self.out_of_time(epoch_t0, step_i):
                    self.stopped = "time_budget"
                    interrupted = True
                    break
        if running:
            self.last_loss = float(np.mean(running))
        return interrupted

    def end_epoch(self, epochs_done: int, lr: float, epoch_t0: float) -> bool:
        """Record a finished epoch, validate when due, save the last state and report; ``False`` to stop."""
        config = self.config
        self.epochs_done = epochs_done
        self.history.append(
            {
                "epoch": epochs_done,
                "loss": self.last_loss,
                "lr": lr,
                "seconds": time.monotonic() - epoch_t0,
                "elapsed_s": self.elapsed(),
            }
        )
        if _validation_due(epochs_done, config, self.budget_s, self.last_val_time, self.val_seconds):
            val = self.validate(epochs_done, with_images=True)
            self.evaluated_state = True
            message = (
                f"epoch {epochs_done}/{config.epochs}: loss {_fmt(self.last_loss, 4)}, val loss {_fmt(val.loss, 4)}, "
                f"val IoU {_fmt(val.oracle_iou, 3)}, val AP0.5 {_fmt(val.ap, 3)}, val mean AP {_fmt(val.mean_ap, 3)}"
            )
        else:
            message = f"epoch {epochs_done}/{config.epochs}: loss {_fmt(self.last_loss, 4)}"
        logger.info(message)
        self.save(self.last_path, self.payload(epochs_done, dict(self.history[-1]), "last"))
        if not self.notify(epochs_done, 0, message) and epochs_done < config.epochs:
            self.stop_requested = True
            return False
        return True

    # ------------------------------------------------------------------ wrap-up

    def finish(self) -> TrainResult:
        """Validate the final state, make sure a best model is saved, save the last state and report."""
        if self.stop_requested:
            self.stopped = "requested"
        epochs_done = self.epochs_done
        # the final state is validated (it may be the best) unless the user asked to stop
        if not self.evaluated_state and not self.stop_requested:
            self.validate(epochs_done, with_images=True)
            self.evaluated_state = True
        if self.best_key is None:
            # no usable state was seen: keep the current one and say so
            if self.last_val is None:
                self.validate(epochs_done, with_images=not self.stop_requested)
            if self.best_key is None:
                metrics = dict(self.history[-1]) if self.history else {}
                metrics["degenerate"] = True
                self.best_epoch, self.best_metrics = epochs_done, metrics
                self.save(self.out_path, self.payload(epochs_done, metrics, "best", self.calibrated()))
                logger.warning("no validated state predicted any object; the final state was saved as the model")
        self.save(self.last_path, self.payload(epochs_done, dict(self.history[-1]) if self.history else {}, "last"))
        message = f"training {self.stopped} after {epochs_done} epoch(s); best epoch {self.best_epoch}"
        self.notify(epochs_done, 0, message)
        return TrainResult(
            model_path=self.out_path,
            last_path=self.last_path,
            best_epoch=self.best_epoch,
            best_metrics=self.best_metrics,
            epochs_completed=epochs_done,
            stopped=self.stopped,
            history=self.history,
            properties=self.props.to_dict(),
            elapsed_s=self.elapsed(),
        )


def _normalized(image: np.ndarray, props: Any, dims: int) -> np.ndarray:
    """``(C, *S)`` float32 image normalised as the training crops are."""
    image = np.asarray(image)
    if image.ndim == dims:
        image = image[None]
    return props.normalization_settings.apply(image, channel_axis=0).astype(np.float32, copy=False)


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _epoch_order(n: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """``samples`` crop indices: whole seeded permutations of ``range(n)``, repeated as needed."""
    reps = -(-samples // n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:samples]


def _worker_init(worker_id: int) -> None:
    seed = torch.initial_seed() % (2**32)
    np.random.seed(seed)
    random.seed(seed)


def _out_of_time(
    elapsed_s: float, budget_s: float, val_seconds: float | None, step_seconds: float, save_seconds: float
) -> bool:
    """True when one more step, a final validation and the final saves no longer fit in the budget."""
    reserve = (val_seconds if val_seconds is not None else 0.02 * budget_s) + step_seconds + 2.0 * save_seconds
    return elapsed_s + reserve >= budget_s


def _validation_due(
    epochs_done: int, config: TrainConfig, budget_s: float | None, last_val_time: float, val_seconds: float | None
) -> bool:
    """Every ``val_every`` epochs (and after the last); under a budget, also not before the training
    since the previous validation has lasted :data:`VAL_TIME_FACTOR` times that validation."""
    if epochs_done >= config.epochs:
        return True
    if epochs_done % config.val_every:
        return False
    if budget_s is None or val_seconds is None:
        return True
    return time.monotonic() - last_val_time >= VAL_TIME_FACTOR * val_seconds


def _check_resume(data: dict[str, Any], config: TrainConfig) -> None:
    if int(data["spatial_dims"]) != config.spatial_dims:
        raise ValueError(
            f"cannot resume a {data['spatial_dims']}D checkpoint with a {config.spatial_dims}D configuration"
        )
    if int(data["in_channels"]) != config.in_channels:
        raise ValueError(
            f"cannot resume a checkpoint for {data['in_channels']} input channel(s) "
            f"with in_channels={config.in_channels}"
        )
    if not data.get("optimizer"):
        raise ValueError("this checkpoint holds no optimiser state; resume from the '.last' file of a run")
