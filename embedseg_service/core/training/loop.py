"""One training run: what it trains with (fixed) and its state (history, best model), with the steps that
change that state: epochs of optimiser steps, validation, checkpoints and progress reports."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from embedseg_service.core.model.checkpoint import save_checkpoint
from embedseg_service.core.training.batch import choose_batch, steps_and_samples
from embedseg_service.core.training.budget import Budget
from embedseg_service.core.training.calibration import calibrate_batch_norm
from embedseg_service.core.training.config import TrainConfig
from embedseg_service.core.training.prepare import Pairs, datasets
from embedseg_service.core.training.validation import Validation, Validator, replaces_best, selection_key

if TYPE_CHECKING:
    from embedseg_service.core.data.datasets import CropDataset
    from embedseg_service.core.training.hyperparams import DataProperties

logger = logging.getLogger(__name__)

Reporter = Callable[["TrainingRun", int, int, str], bool]
"""Receives the run, the epoch, the optimiser steps done in it and a message; ``False`` asks to stop."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class TrainingRun:
    """One training run: what it trains with (fixed) and its state (history, best model),
    with the steps that change that state: epochs, validation, checkpoints and progress reports."""

    config: TrainConfig
    props: DataProperties
    out_path: Path
    last_path: Path
    device: torch.device
    amp: bool
    budget: Budget
    reporter: Reporter | None
    step: tuple[float, ...]
    batch: int
    m: int
    steps_per_epoch: int
    samples: int
    train_set: CropDataset
    validator: Validator
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
    last_val: Validation | None = None
    last_loss: float | None = None
    evaluated_state: bool = True  # the state saved as best/last has been validated
    stopped: str = "completed"
    stop_requested: bool = False

    @classmethod
    def build(
        cls,
        config: TrainConfig,
        props: DataProperties,
        train_pairs: Pairs,
        val_pairs: Pairs,
        *,
        device: torch.device,
        amp: bool,
        budget: Budget,
        out_path: Path,
        last_path: Path,
        reporter: Reporter | None,
    ) -> TrainingRun:
        """Batch, datasets, validator, network, loss and optimiser of a new run (in this order: seeded)."""
        from embedseg_service.core.model.erfnet import BranchedERFNet
        from embedseg_service.core.training.loss import EmbedSegLoss

        dims = config.spatial_dims
        crop_shape = tuple(int(s) for s in props.crop_shape)
        step = tuple(float(h) for h in props.step)
        batch, m = choose_batch(
            dims, crop_shape, config.batch_size, config.virtual_batch, props.object_crop_shape, device.type
        )
        train_set, validator = datasets(
            train_pairs, val_pairs, props, config, crop_shape=crop_shape, step=step, batch=batch, device=device
        )
        steps_per_epoch, samples = steps_and_samples(config.samples_per_epoch, len(train_set), batch, m)

        net = BranchedERFNet(dims, in_channels=config.in_channels).to(device)
        return cls(
            config=config,
            props=props,
            out_path=out_path,
            last_path=last_path,
            device=device,
            amp=amp,
            budget=budget,
            reporter=reporter,
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

    # ------------------------------------------------------------------ checkpoints and progress

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
            "device": self.device.type,
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
        t0 = self.budget.now()
        save_checkpoint(path, data)
        self.budget.saved(t0)

    def notify(self, epoch: int, step_i: int, message: str = "") -> bool:
        """Report progress; ``False`` when the reporter asks to stop."""
        if self.reporter is None:
            return True
        return self.reporter(self, epoch, step_i, message)

    # ------------------------------------------------------------------ validation and the best model

    def calibrated(self) -> torch.nn.Module:
        """The network as it is saved and used: batch norm calibrated on the training images."""
        return calibrate_batch_norm(self.net, self.train_set.images, device=self.device, seed=self.config.seed)

    def validate(self, epoch_done: int, with_images: bool) -> Validation:
        """Validate the current state, record it in the history and save it if it becomes the best."""
        t0 = self.budget.now()
        val = self.validator.on_crops(self.net, self.loss_fn, self.amp)
        model = None  # the network as it is saved and used: batch norm calibrated on whole images
        if with_images and self.validator.images:
            model = self.calibrated()
            self.validator.on_images(model, val)
        self.last_val = val
        self.budget.validated(t0, with_images)
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
        metric = self.config.resolved.selection_metric
        key = selection_key(metric, val)
        metrics = {k: v for k, v in record.items() if k != "epoch"}
        if key is not None:
            self.best_seen = key if self.best_seen is None else max(self.best_seen, key)
        if key is not None and replaces_best(metric, key, self.best_key, self.best_seen, val.n_gt):
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
        lr = self.config.lr
        for epoch in range(self.start_epoch, self.config.resolved.epochs):
            if self.budget.out_of_time():
                self.stopped = "time_budget"
                break
            epoch_t0 = self.budget.now()
            factor = self.budget.lr_factor(epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * factor
            if self.train_epoch(epoch, epoch_t0):
                break
            if not self.end_epoch(epoch + 1, lr * factor, epoch_t0):
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
                if self.budget.out_of_time(epoch_t0, step_i):
                    self.stopped = "time_budget"
                    interrupted = True
                    break
        if running:
            self.last_loss = float(np.mean(running))
        return interrupted

    def end_epoch(self, epochs_done: int, lr: float, epoch_t0: float) -> bool:
        """Record a finished epoch, validate when due, save the last state and report; ``False`` to stop."""
        epochs = self.config.resolved.epochs
        self.epochs_done = epochs_done
        self.history.append(
            {
                "epoch": epochs_done,
                "loss": self.last_loss,
                "lr": lr,
                "seconds": self.budget.now() - epoch_t0,
                "elapsed_s": self.budget.elapsed(),
            }
        )
        if self.budget.validation_due(epochs_done, self.config.val_every):
            val = self.validate(epochs_done, with_images=True)
            self.evaluated_state = True
            message = (
                f"epoch {epochs_done}/{epochs}: loss {_fmt(self.last_loss, 4)}, val loss {_fmt(val.loss, 4)}, "
                f"val IoU {_fmt(val.oracle_iou, 3)}, val AP0.5 {_fmt(val.ap, 3)}, val mean AP {_fmt(val.mean_ap, 3)}"
            )
        else:
            message = f"epoch {epochs_done}/{epochs}: loss {_fmt(self.last_loss, 4)}"
        logger.info(message)
        self.save(self.last_path, self.payload(epochs_done, dict(self.history[-1]), "last"))
        if not self.notify(epochs_done, 0, message) and epochs_done < epochs:
            self.stop_requested = True
            return False
        return True

    # ------------------------------------------------------------------ wrap-up

    def finish(self) -> None:
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


def _fmt(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _epoch_order(n: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """``samples`` crop indices: whole seeded permutations of ``range(n)``, repeated as needed."""
    reps = -(-samples // n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:samples]


def _worker_init(_worker_id: int) -> None:
    """Seed numpy and python in a data-loader worker from its torch seed."""
    seed = torch.initial_seed() % (2**32)
    np.random.seed(seed)
    random.seed(seed)
