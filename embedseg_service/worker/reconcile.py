"""The reconciler: makes the broker queue, the job rows and the stored files agree again.

Every Celery worker runs one in a thread of its main process, every ``heartbeat_s`` seconds
(:mod:`embedseg_service.worker.celery_app`); the embedded local worker runs it in its poll loop,
without a broker. One pass:

- running jobs whose heartbeat is stale (their worker was killed or lost) go back to ``queued``
  and their task is sent again (a job lost :data:`~embedseg_service.worker.runner.MAX_ATTEMPTS`
  times is failed instead);
- queued jobs older than ``requeue_after_s`` whose message is not waiting in their broker queue
  (lost by a broker restart, or by a crash between the row's commit and the send) are sent again;
- the files of jobs that finished since the last pass and that they did not register are removed;
- the rows of worker processes gone for a day are removed (:mod:`embedseg_service.records.workers`);
- webhook deliveries left pending by a process that stopped (their lease ran out) are taken over
  (:func:`embedseg_service.records.webhooks.resume_pending`).

Sending a job twice is harmless: the claim is a compare-and-set, so a second delivery does nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from embedseg_service.records import jobs, webhooks
from embedseg_service.records.broker import job_queues, unsent_jobs
from embedseg_service.records.db import get_sessionmaker
from embedseg_service.records.orm import utcnow
from embedseg_service.records.settings import Settings
from embedseg_service.records.storage import Storage
from embedseg_service.records.stores import get_storage
from embedseg_service.records.workers import prune_workers
from embedseg_service.worker.cleanup import purge_job_files
from embedseg_service.worker.runner import recover_stale_jobs

log = logging.getLogger(__name__)

LOOKBACK = timedelta(days=1)
"""The first pass of a reconciler purges the files of jobs that finished this long before it started."""
CLOCK_SLACK = timedelta(minutes=2)
"""Each pass looks this much before the previous one (the workers' clocks stamp ``finished_at``)."""

Send = Callable[[str, str], None]
"""``send(job_id, queue)``: send the job's task to the broker queue ``queue``."""


@dataclass
class Reconciled:
    """What one pass did: jobs requeued after a lost worker, queued jobs sent again, files removed,
    jobs whose webhook delivery was taken over."""

    requeued: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    files_removed: int = 0
    callbacks: list[str] = field(default_factory=list)


class Reconciler:
    """Runs the passes described in the module docstring; ``send(job_id, queue)`` sends a job's task to its
    queue (None: no broker, the local worker polls the database)."""

    def __init__(
        self,
        settings: Settings,
        send: Send | None,
        *,
        storage: Storage | None = None,
        sessions: sessionmaker[Session] | None = None,
    ) -> None:
        self.settings = settings
        self.send = send
        self.storage = storage or get_storage(settings)
        self.sessions = sessions or get_sessionmaker(settings)
        self.since: datetime = utcnow() - LOOKBACK

    def run_once(self) -> Reconciled:
        """One pass; database and broker errors propagate (the caller tries again next period)."""
        done = Reconciled()
        done.requeued = recover_stale_jobs(self.settings, sessions=self.sessions)
        if self.send is not None:
            with self.sessions() as session:
                unsent = unsent_jobs(session, self.settings)
                done.resent = [job_id for job_id in unsent if job_id not in done.requeued]
                queues = job_queues(session, done.requeued + done.resent, self.settings)
            for job_id in done.requeued + done.resent:
                self.send(job_id, queues.get(job_id, self.settings.gpu_queue))
            if done.resent:
                log.warning(
                    "%d queued job(s) had no message in their broker queue; sent again: %s",
                    len(done.resent),
                    ", ".join(f"{job_id} ({queues.get(job_id, self.settings.gpu_queue)})" for job_id in done.resent),
                )
        started = utcnow()
        with self.sessions() as session:
            finished = [job_id for job_id, _, _ in jobs.finished_since(session, self.since - CLOCK_SLACK)]
        done.files_removed = purge_job_files(self.storage, self.sessions, finished)
        with self.sessions() as session:
            prune_workers(session)
        done.callbacks = webhooks.resume_pending(self.settings, self.sessions)
        self.since = started
        return done
