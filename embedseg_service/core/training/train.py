"""Training of a Branched ERF-Net with the EmbedSeg loss (docs/method.md §9).

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
set repeat crops so that each epoch has enough optimiser steps; under a time budget the
learning-rate decay follows the elapsed fraction of the budget, validation follows a time-based
cadence, and training stops in time to validate and save the final state.

The parts: options (:mod:`.config`), crops per step (:mod:`.batch`), inputs (:mod:`.prepare`),
validation and the best state (:mod:`.validation`), time (:mod:`.budget`) and the run (:mod:`.loop`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedseg_service.core.device import resolve_device
from embedseg_service.core.model.checkpoint import load_checkpoint
from embedseg_service.core.training.batch import choose_batch
from embedseg_service.core.training.budget import Budget, Clock
from embedseg_service.core.training.config import SelectionMetric, TrainConfig
from embedseg_service.core.training.loop import Reporter, TrainingRun, seed_everything
from embedseg_service.core.training.prepare import check_resume, data_properties, resolve_voxel_size, training_pairs
from embedseg_service.core.training.validation import ap_tolerance

__all__ = [
    "ProgressCallback",
    "SelectionMetric",
    "StopTraining",
    "TrainConfig",
    "TrainProgress",
    "TrainResult",
    "ap_tolerance",
    "choose_batch",
    "last_checkpoint_path",
    "seed_everything",
    "train",
]

logger = logging.getLogger(__name__)


class StopTraining(Exception):
    """Raised by a progress callback to stop training cleanly (the state is saved first)."""


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
    clock: Clock = time.monotonic,
) -> TrainResult:
    """Train a model and write the best one to ``out_path`` (the last state beside it).

    ``images``: arrays ``(*S)`` or ``(C, *S)`` (any numeric dtype; normalised here);
    ``masks``: integer label arrays ``(*S)`` (0 = background). Without ``val_images`` a seeded
    ``config.val_fraction`` of the images is held out (a single image is split spatially).
    ``voxel_size`` (array order) overrides ``config.voxel_size``. ``resume_from`` continues a
    run from a checkpoint (the last state of an earlier run). ``progress`` receives a
    :class:`TrainProgress`; returning ``False`` or raising :class:`StopTraining` stops training
    after the state is saved. ``clock`` measures the run and its time budget (``max_time_minutes``),
    in seconds.
    """
    t_start = clock()
    if not isinstance(config, TrainConfig):
        raise TypeError("config must be a TrainConfig")
    out_path = Path(out_path)
    last_path = last_checkpoint_path(out_path)
    device = resolve_device(config.device)
    amp = bool(config.amp and device.type == "cuda")
    budget_s = float(config.max_time_minutes) * 60.0 if config.max_time_minutes else None

    train_pairs, val_pairs = training_pairs(images, masks, val_images, val_masks, config)
    vs = resolve_voxel_size(voxel_size, config)

    resume: dict[str, Any] | None = None
    if resume_from is not None:
        resume = load_checkpoint(resume_from)
        check_resume(resume, config)

    torch.backends.cudnn.benchmark = not config.deterministic
    if config.deterministic:
        torch.backends.cudnn.deterministic = True
    seed_everything(config.seed)

    props = data_properties(resume, list(train_pairs[1]) + list(val_pairs[1]), config, vs)
    description = props.describe()
    logger.info("data-derived parameters:\n%s", description)

    run = TrainingRun.build(
        config,
        props,
        train_pairs,
        val_pairs,
        device=device,
        amp=amp,
        budget=Budget(clock, t_start, budget_s, config.resolved.epochs),
        out_path=out_path,
        last_path=last_path,
        reporter=None if progress is None else _reporter(progress),
    )
    if resume is not None:
        run.restore(resume)
    run.budget.last_val_time = clock()
    if run.start_epoch == 0:
        run.notify(0, 0, "data-derived parameters:\n" + description)
    run.train_epochs()
    run.finish()
    return TrainResult(
        model_path=run.out_path,
        last_path=run.last_path,
        best_epoch=run.best_epoch,
        best_metrics=run.best_metrics,
        epochs_completed=run.epochs_done,
        stopped=run.stopped,
        history=run.history,
        properties=run.props.to_dict(),
        elapsed_s=run.budget.elapsed(),
    )


def _reporter(progress: ProgressCallback) -> Reporter:
    """The run's reporter that hands ``progress`` a :class:`TrainProgress`; its ``False`` or
    :class:`StopTraining` asks the run to stop."""

    def report(run: TrainingRun, epoch: int, step_i: int, message: str) -> bool:
        epoch_float = epoch + step_i / run.steps_per_epoch
        last_val = run.last_val
        info = TrainProgress(
            epoch=epoch,
            epochs=run.config.resolved.epochs,
            step=step_i,
            steps_per_epoch=run.steps_per_epoch,
            loss=run.last_loss,
            val_iou=last_val.oracle_iou if last_val else None,
            val_ap=last_val.ap if last_val else None,
            val_map=last_val.mean_ap if last_val else None,
            eta_s=run.budget.eta(epoch_float, run.start_epoch),
            fraction=run.budget.fraction_done(epoch_float),
            message=message,
        )
        try:
            answer = progress(info)
        except StopTraining:
            return False
        return answer is not False

    return report
