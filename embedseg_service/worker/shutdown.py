"""The worker process's stop request: SIGTERM asks the running job to stop at its next step.

``docker compose stop`` (or a scale-down) sends SIGTERM to the worker's main process. The handler
installed here only sets a flag; the job's reporter sees it at the next training step or
prediction tile and raises :class:`WorkerShutdown`, and the runner puts the job back to the queue
(a train job resumes from its last stored checkpoint). A second SIGTERM exits at once.

In a Celery prefork worker the jobs run in pool processes, where billiard turns SIGTERM into an
immediate exit; the main process therefore forwards the stop as :data:`POOL_STOP_SIGNAL`
(:func:`forward_to_children`), which a pool process turns into the same stop request once it
runs a task.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)

_stopping = threading.Event()

POOL_STOP_SIGNAL = signal.SIGUSR2
"""What a Celery worker's main process sends its pool processes to stop their jobs at the next step."""


class JobInterrupted(BaseException):  # a BaseException, like SystemExit: handlers' ``except Exception`` pass it on
    """The running job must stop now without an outcome of its own."""


class WorkerShutdown(JobInterrupted):
    """The worker process is stopping while a job runs: the job goes back to the queue."""


class LostClaim(JobInterrupted):
    """The job is no longer this worker's (another worker took it over, or it finished): stop, register nothing."""


def request_stop() -> None:
    """Ask the job running in this process to stop at its next step (and the process to exit)."""
    _stopping.set()


def stop_requested() -> bool:
    """Whether this process was asked to stop."""
    return _stopping.is_set()


def install_stop_handler(signum: int = signal.SIGTERM) -> None:
    """Make ``signum`` request a stop (:func:`request_stop`); the same signal again ends the process at once.

    Call it from the main thread of a process that runs jobs.
    """

    def _on_signal(received: int, _frame: Any) -> None:
        if _stopping.is_set():
            signal.signal(received, signal.SIG_DFL)
            os.kill(os.getpid(), received)
            return
        log.warning("signal %d: the running job stops at its next step and goes back to the queue", received)
        _stopping.set()

    signal.signal(signum, _on_signal)


def forward_to_children(signum: int = POOL_STOP_SIGNAL) -> list[int]:
    """Send ``signum`` to this process's pool processes (billiard's, Celery prefork); returns their pids."""
    from billiard.process import active_children

    pids = []
    for child in active_children():
        if child.pid is None:
            continue
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            continue
        pids.append(child.pid)
    return pids
