"""The embedded local worker: jobs run in separate processes that poll the database (no broker).

:class:`LocalWorker` starts ``settings.local_workers`` processes (spawn context, so the API
process never imports torch and a job's memory goes when it ends). Each process removes what
dead processes left behind, then loops: reconcile (recover abandoned jobs, remove the files
finished jobs did not register), claim the oldest queued job by compare-and-set, run it, and
otherwise wait for a wake-up (``submit``) or the poll interval. There is no broker here, so a job's
``queue`` does not matter: the local worker runs the queued jobs of every queue, oldest first.
Queued jobs left by an earlier run of the service are therefore picked up at start-up. Stopping
the service asks idle processes to exit and sends SIGTERM to busy ones: their jobs stop at the
next step and go back to the queue for the next start (a train job resumes from its last checkpoint).

``embedseg serve`` imports this module only when it starts the embedded worker; it imports no torch itself.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
import time
from typing import Any

from sqlalchemy import select

from embedseg_service.records import jobs
from embedseg_service.records.db import get_sessionmaker
from embedseg_service.records.orm import Job, JobStatus
from embedseg_service.records.settings import Settings, set_settings
from embedseg_service.records.storage import process_alive

log = logging.getLogger(__name__)

POLL_S = 2.0
STOP_GRACE_S = 5.0


def requeue_orphans(settings: Settings) -> list[str]:
    """Requeue running jobs of dead local processes on this host (a previous run that was killed).

    Jobs of other hosts are left to the heartbeat rule (:func:`embedseg_service.worker.runner.recover_stale_jobs`).
    """
    from embedseg_service.worker.runner import MAX_ATTEMPTS, fail_lost

    host = socket.gethostname()
    requeued = []
    sessions = get_sessionmaker(settings)
    with sessions() as session:
        running = session.execute(
            select(Job.id, Job.worker, Job.attempts, Job.lost_workers).where(Job.status == JobStatus.running.value)
        ).all()
        for job_id, worker, attempts, lost in running:
            name, _, pid = (worker or "").rpartition(":")
            if name != host or not pid.isdigit() or process_alive(int(pid)):
                continue
            if lost + 1 >= MAX_ATTEMPTS:
                fail_lost(session, job_id, attempts, lost + 1)
            elif jobs.requeue_job(session, job_id, attempt=attempts, lost=True):
                requeued.append(job_id)
    return requeued


def next_queued(settings: Settings, limit: int = 20) -> list[str]:
    """Ids of the oldest queued jobs."""
    with get_sessionmaker(settings)() as session:
        return list(
            session.scalars(
                select(Job.id).where(Job.status == JobStatus.queued.value).order_by(Job.created_at, Job.id).limit(limit)
            ).all()
        )


def serve_jobs(settings: Settings, wake: Any, stop: Any, poll_s: float = POLL_S) -> None:
    """Body of one local worker process: run queued jobs until ``stop`` is set."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [worker %(process)d] %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which stops us
    from embedseg_service.worker.cleanup import clean_at_start
    from embedseg_service.worker.presence import Presence
    from embedseg_service.worker.reconcile import Reconciler
    from embedseg_service.worker.runner import run_job
    from embedseg_service.worker.shutdown import WorkerShutdown, install_stop_handler, stop_requested

    set_settings(settings)
    install_stop_handler()
    reconciler = Reconciler(settings, None)
    presence = Presence(settings, queues="local").start()
    try:
        requeue_orphans(settings)
        clean_at_start(reconciler.storage, reconciler.sessions)
        reconciled_at = 0.0
        while not stop.is_set() and not stop_requested():
            wake.clear()
            ran = False
            try:
                if time.monotonic() - reconciled_at >= settings.heartbeat_s:
                    reconciler.run_once()
                    reconciled_at = time.monotonic()
                for job_id in next_queued(settings):
                    if stop.is_set() or stop_requested():
                        break
                    if run_job(job_id, settings=settings) not in ("skipped", "deferred"):
                        ran = True
                        break  # look again from the oldest queued job
            except WorkerShutdown:
                raise
            except Exception as error:  # database briefly unreachable: wait and poll again
                log.warning("local worker: %s: %s", type(error).__name__, error)
            if not ran:
                wake.wait(poll_s)
    except WorkerShutdown:
        pass
    finally:
        presence.stop()
    log.info("local worker stopped")


class LocalWorker:
    """Runs jobs of the embedded default in ``settings.local_workers`` spawned processes."""

    def __init__(self, settings: Settings, *, processes: int | None = None, poll_s: float = POLL_S) -> None:
        self.settings = settings
        self.processes = processes or settings.local_workers
        self.poll_s = poll_s
        self._context = multiprocessing.get_context("spawn")
        self._wake = self._context.Event()
        self._stop = self._context.Event()
        self._procs: list[Any] = []

    @property
    def alive(self) -> bool:
        return any(proc.is_alive() for proc in self._procs)

    def start(self) -> LocalWorker:
        if self._procs:
            return self
        self._stop.clear()
        for index in range(self.processes):
            proc = self._context.Process(
                target=serve_jobs,
                args=(self.settings, self._wake, self._stop, self.poll_s),
                name=f"embedseg-local-worker-{index}",
                daemon=True,
            )
            proc.start()
            self._procs.append(proc)
        log.info("embedded local worker: %d process(es) started", self.processes)
        return self

    def submit(self, job_id: str, queue: str | None = None) -> None:  # noqa: ARG002 - the Dispatcher interface
        """Wake the worker processes: the committed job ``job_id`` is waiting in the database (whatever its queue:
        the local worker runs the jobs of every queue)."""
        self._wake.set()

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop the processes; a job still running after ``grace_s`` is interrupted and requeued."""
        self._stop.set()
        self._wake.set()
        for proc in self._procs:
            proc.join(grace_s)
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: the job stops at its next step and is requeued
        for proc in self._procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self._procs = []
