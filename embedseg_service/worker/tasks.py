"""The one Celery task: ``embedseg.run_job(job_id)`` -> :func:`embedseg_service.worker.runner.run_job`.

The task is thin: the job row holds the spec, status and results. It retries only when the
infrastructure (database, broker) is unreachable before the job could be claimed; errors of
the job itself are written to the row by the runner and do not make Celery retry. A job
interrupted by the worker's shutdown is back in ``queued``; the task sends it again (to the job's
queue) and ends.
"""

from __future__ import annotations

import logging

from celery import Celery, Task
from sqlalchemy.exc import DBAPIError, OperationalError

from embedseg_service.records.broker import job_queues
from embedseg_service.records.db import get_sessionmaker
from embedseg_service.records.settings import Settings

log = logging.getLogger(__name__)

INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (OperationalError, DBAPIError, ConnectionError, TimeoutError)
MAX_RETRIES = 10
DEFER_S = 15
"""Seconds before a job whose owner already runs ``quota_running_jobs`` jobs is offered again."""


def queue_of(settings: Settings, job_id: str) -> str:
    """The broker queue of the job (``settings.gpu_queue`` when its row names none or is gone)."""
    with get_sessionmaker(settings)() as session:
        return job_queues(session, [job_id], settings).get(job_id, settings.gpu_queue)


def register_tasks(app: Celery, settings: Settings) -> Task:
    """Register the job task on ``app`` under ``settings.task_name``; returns it."""

    @app.task(
        name=settings.task_name,
        shared=False,  # each app runs its jobs with its own settings
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        autoretry_for=INFRASTRUCTURE_ERRORS,
        retry_backoff=2,
        retry_backoff_max=120,
        retry_jitter=True,
        max_retries=MAX_RETRIES,
    )
    def run_job(self: Task, job_id: str) -> str:
        from embedseg_service.worker.runner import WorkerShutdown
        from embedseg_service.worker.runner import run_job as run

        try:
            outcome = run(job_id, settings=settings)
        except WorkerShutdown:
            outcome = "requeued"
            try:
                app.send_task(settings.task_name, args=[job_id], queue=queue_of(settings, job_id))
            except Exception as error:  # the broker is down too: the reconciler sends it later
                log.warning("job %s requeued but not sent again (%s: %s)", job_id, type(error).__name__, error)
        if outcome == "deferred":  # its owner runs its quota of jobs: look again later
            app.send_task(settings.task_name, args=[job_id], queue=queue_of(settings, job_id), countdown=DEFER_S)
        log.info("job %s: %s (delivery %s)", job_id, outcome, self.request.id)
        return outcome

    return run_job
