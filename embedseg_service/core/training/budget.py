"""Time of a training run, read from an injectable clock (``time.monotonic`` unless the caller gives another).

Under a time budget the learning-rate decay follows the larger of the epoch fraction and the elapsed
fraction of the budget, validation waits for :data:`VAL_TIME_FACTOR` times its own duration of training,
and training stops while one more step, a final validation and the final saves still fit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]
"""Seconds from an arbitrary origin that never go back (``time.monotonic``, ``time.process_time``)."""

VAL_TIME_FACTOR = 4.0
"""Under a wall-clock budget, validation waits for this many times its own duration of training
(so it takes at most about a fifth of the time)."""


def lr_factor(epoch: int, epochs: int, time_fraction: float) -> float:
    """(1 − f)^0.9 with f the larger of the epoch fraction and the elapsed budget fraction."""
    f = max(epoch / epochs, time_fraction)
    return max(0.0, 1.0 - min(f, 1.0)) ** 0.9


def out_of_time(
    elapsed_s: float, budget_s: float, val_seconds: float | None, step_seconds: float, save_seconds: float
) -> bool:
    """True when one more step, a final validation and the final saves no longer fit in the budget."""
    reserve = (val_seconds if val_seconds is not None else 0.02 * budget_s) + step_seconds + 2.0 * save_seconds
    return elapsed_s + reserve >= budget_s


def validation_due(
    epochs_done: int,
    epochs: int,
    val_every: int,
    budget_s: float | None,
    since_validation_s: float,
    val_seconds: float | None,
) -> bool:
    """Every ``val_every`` epochs (and after the last); under a budget, also not before the training
    since the previous validation (``since_validation_s``) has lasted :data:`VAL_TIME_FACTOR` times that
    validation (``val_seconds``)."""
    if epochs_done >= epochs:
        return True
    if epochs_done % val_every:
        return False
    if budget_s is None or val_seconds is None:
        return True
    return since_validation_s >= VAL_TIME_FACTOR * val_seconds


@dataclass
class Budget:
    """The clock of a run and what it has measured: start, longest checkpoint write, last validation."""

    clock: Clock
    t_start: float
    budget_s: float | None
    epochs: int
    save_seconds: float = 0.0  # longest checkpoint write
    val_seconds: float | None = None  # duration of the last full validation
    last_val_time: float = 0.0

    def now(self) -> float:
        """The clock's reading."""
        return self.clock()

    def elapsed(self) -> float:
        """Seconds since the run started."""
        return self.clock() - self.t_start

    def lr_factor(self, epoch: int) -> float:
        """:func:`lr_factor` of ``epoch`` with the elapsed fraction of the budget (0 without one)."""
        return lr_factor(epoch, self.epochs, self.elapsed() / self.budget_s if self.budget_s else 0.0)

    def fraction_done(self, epoch_float: float) -> float:
        """Part of the run done (0–1): of the epochs, or of the budget when that is larger."""
        f = epoch_float / self.epochs
        if self.budget_s:
            f = max(f, self.elapsed() / self.budget_s)
        return float(min(1.0, max(0.0, f)))

    def eta(self, epoch_float: float, start_epoch: int) -> float | None:
        """Estimated seconds left, from the pace since ``start_epoch`` (capped by the budget)."""
        budget_s = self.budget_s
        done = epoch_float - start_epoch
        if done <= 0:
            return budget_s - self.elapsed() if budget_s else None
        remaining = (self.epochs - epoch_float) * self.elapsed() / done
        if budget_s:
            remaining = min(remaining, max(0.0, budget_s - self.elapsed()))
        return float(remaining)

    def out_of_time(self, epoch_t0: float | None = None, steps: int = 0) -> bool:
        """Under a budget: whether one more step (timed as the ``steps`` since ``epoch_t0``; none before an
        epoch), a final validation and the final saves no longer fit (:func:`out_of_time`)."""
        if self.budget_s is None:
            return False
        elapsed_s = self.elapsed()
        step_seconds = (self.clock() - epoch_t0) / steps if epoch_t0 is not None else 0.0
        return out_of_time(elapsed_s, self.budget_s, self.val_seconds, step_seconds, self.save_seconds)

    def validation_due(self, epochs_done: int, val_every: int) -> bool:
        """:func:`validation_due` with the time since the last validation."""
        since = self.clock() - self.last_val_time
        return validation_due(epochs_done, self.epochs, val_every, self.budget_s, since, self.val_seconds)

    def saved(self, t0: float) -> None:
        """Record a checkpoint write that started at ``t0`` (the longest is reserved at the end of a budget)."""
        self.save_seconds = max(self.save_seconds, self.clock() - t0)

    def validated(self, t0: float, with_images: bool) -> None:
        """Record a validation that started at ``t0``; a full one (``with_images``) sets the cadence."""
        self.last_val_time = self.clock()
        if with_images:
            self.val_seconds = self.last_val_time - t0
