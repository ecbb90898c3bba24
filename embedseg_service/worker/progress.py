"""Throttled progress, heartbeat and cancel flag of a running job, all on its database row.

The writes are fenced by the claim's attempt number: once the row is no longer running under it
(another worker took the job over, or it finished), the job stops at its next step with
:class:`embedseg_service.worker.shutdown.LostClaim`; it stops with
:class:`embedseg_service.worker.shutdown.WorkerShutdown` once the process is asked to stop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from embedseg_service.records import jobs
from embedseg_service.worker.shutdown import LostClaim, WorkerShutdown, stop_requested

log = logging.getLogger(__name__)


class JobCancelled(Exception):  # names the outcome, like StopIteration
    """The job's cancel flag was seen; the handler stops at the next step."""


class JobReporter:
    """Writes a job's progress to its row at most every ``throttle_s`` seconds and watches the cancel flag.

    :meth:`update` records the latest progress, stage, ETA and metrics and writes them when
    ``throttle_s`` has passed since the last write (or when ``force``); every write also reads the
    cancel flag. A background thread (:meth:`start`/:meth:`stop`) beats the heartbeat every
    ``heartbeat_s`` seconds and reads the flag too, so a job in a long step stays visibly alive.
    With ``attempt`` (the claim's number) every write is fenced, and :meth:`update` raises
    :class:`LostClaim` once a write found the job no longer running under it; it raises
    :class:`WorkerShutdown` once the process was asked to stop. Other database errors while
    reporting are logged, not raised: progress is best effort, the final status is not.
    """

    def __init__(
        self,
        job_id: str,
        session_factory: sessionmaker[Session],
        *,
        throttle_s: float = 1.0,
        heartbeat_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        attempt: int | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self._sessions = session_factory
        self.throttle_s = float(throttle_s)
        self.heartbeat_s = float(heartbeat_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._last_write: float | None = None
        self._cancel = threading.Event()
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.writes = 0

    # ------------------------------------------------------------------ progress

    def update(
        self,
        *,
        progress: float | None = None,
        stage: str | None = None,
        eta_s: float | None = None,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Record progress (0..1), stage, ETA (s) and the job's full metrics; write when due.

        Returns True while the job should go on, False once cancellation was requested; raises
        :class:`LostClaim` or :class:`WorkerShutdown` when the job must stop without an outcome.
        """
        self.raise_if_interrupted()
        with self._lock:
            if progress is not None:
                self._pending["progress"] = min(1.0, max(0.0, float(progress)))
            if stage is not None:
                self._pending["stage"] = stage
            if eta_s is not None:
                self._pending["eta_s"] = float(eta_s)
            if metrics is not None:
                self._pending["metrics"] = dict(metrics)
            now = self._clock()
            due = force or self._last_write is None or now - self._last_write >= self.throttle_s
            if due and self._pending:
                self._write(now)
        self.raise_if_interrupted()
        return not self._cancel.is_set()

    def flush(self) -> bool:
        """Write whatever is pending now; returns :meth:`update`'s answer."""
        return self.update(force=True)

    def _write(self, now: float) -> None:
        values, self._pending = self._pending, {}
        self._last_write = now
        try:
            with self._sessions() as session:
                if jobs.update_progress(session, self.job_id, attempt=self.attempt, **values):
                    self._cancel.set()
            self.writes += 1
        except jobs.ClaimLost:
            self._lost.set()
        except Exception as error:  # a progress write must never kill the job
            log.warning("job %s: progress not written (%s: %s)", self.job_id, type(error).__name__, error)

    # ------------------------------------------------------------------ cancel

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def should_continue(self) -> bool:
        """False once cancellation was seen (by a write, the heartbeat or :meth:`poll_cancel`)."""
        return not self._cancel.is_set()

    def poll_cancel(self) -> bool:
        """Read the cancel flag from the row now; True when cancellation was requested."""
        try:
            with self._sessions() as session:
                if jobs.is_cancel_requested(session, self.job_id):
                    self._cancel.set()
        except Exception as error:
            log.warning("job %s: cancel flag not read (%s: %s)", self.job_id, type(error).__name__, error)
        return self._cancel.is_set()

    def raise_if_cancelled(self, poll: bool = False) -> None:
        """Raise :class:`JobCancelled` when cancellation was requested (``poll`` reads the row first),
        and what :meth:`raise_if_interrupted` raises."""
        self.raise_if_interrupted()
        if (poll and self.poll_cancel()) or self._cancel.is_set():
            raise JobCancelled(self.job_id)

    def raise_if_interrupted(self) -> None:
        """Raise :class:`LostClaim` when the job is no longer ours, :class:`WorkerShutdown` when the process
        was asked to stop."""
        if self._lost.is_set():
            raise LostClaim(f"job {self.job_id} is no longer running under attempt {self.attempt}")
        if stop_requested():
            raise WorkerShutdown(f"job {self.job_id} interrupted: the worker is stopping")

    def check_claim(self) -> None:
        """Read the row now and raise :class:`LostClaim` unless the job runs under this reporter's attempt
        (before writing an output file); no-op without an attempt."""
        if self.attempt is None:
            return
        if not self._lost.is_set():
            with self._sessions() as session:
                if not jobs.holds_claim(session, self.job_id, self.attempt):
                    self._lost.set()
        if self._lost.is_set():
            raise LostClaim(f"job {self.job_id} is no longer running under attempt {self.attempt}")

    # ------------------------------------------------------------------ heartbeat

    def start(self) -> JobReporter:
        """Start the heartbeat thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.job_id[:8]}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the heartbeat thread (pending progress is dropped: the final status follows)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                with self._sessions() as session:
                    if jobs.heartbeat(session, self.job_id, attempt=self.attempt):
                        self._cancel.set()
            except jobs.ClaimLost:
                self._lost.set()
                return
            except Exception as error:
                log.warning("job %s: heartbeat failed (%s: %s)", self.job_id, type(error).__name__, error)

    def __enter__(self) -> JobReporter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
