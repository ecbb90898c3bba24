"""Run one job: claim its row, call its handler, write the outcome to the row.

The row is the truth. :func:`run_job` claims the job by compare-and-set (``queued`` ->
``running``); a duplicate or redelivered message that loses the claim, or finds the job
finished, returns ``"skipped"`` without touching anything, so a job runs once. The claim's
attempt number fences every later write: the handler writes its files under the attempt's
storage folder (temp file + rename) and returns the rows to register; they are inserted in the
same transaction that marks the job ``succeeded``, and only while the job still runs under that
attempt. A worker that lost its claim (its heartbeat went stale and another worker took over)
stops at its next step and removes its files. Cancellation is cooperative (checked between
epochs, steps and tiles) and ends ``cancelled``; any other error ends ``failed`` with a sentence
saying what went wrong. Once the job has finished, the files it did not register are removed, and
its webhook (``callback_url``) is handed to this process's delivery threads
(:func:`embedseg_service.records.webhooks.deliver_soon`): the job never waits for it.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from embedseg_service.records import jobs, webhooks
from embedseg_service.records.db import get_sessionmaker
from embedseg_service.records.orm import Job, JobKind, JobStatus, utcnow
from embedseg_service.records.settings import Settings, get_settings
from embedseg_service.records.storage import Storage, attempt_prefix
from embedseg_service.records.stores import get_storage
from embedseg_service.worker.cleanup import purge_job_files, scratch_prefix
from embedseg_service.worker.context import Handler, JobContext
from embedseg_service.worker.devices import job_device
from embedseg_service.worker.handlers import HANDLERS
from embedseg_service.worker.progress import JobCancelled, JobReporter
from embedseg_service.worker.shutdown import LostClaim, WorkerShutdown
from embedseg_service.worker.shutdown import install_stop_handler as install_shutdown_handler

__all__ = ["MAX_ATTEMPTS", "WorkerShutdown", "install_shutdown_handler", "recover_stale_jobs", "run_job"]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
"""A job whose worker vanished this many times is failed (a crash loop); graceful stops do not count."""
"""A job whose worker was lost this many times is failed instead of run again (crash loop)."""

STALE_HEARTBEATS = 4
"""A running job whose heartbeat is older than this many heartbeat periods has lost its worker."""


def worker_name() -> str:
    """``hostname:pid`` of this process, recorded on the jobs it runs."""
    return f"{socket.gethostname()}:{os.getpid()}"


def stale_after_s(settings: Settings) -> float:
    """Seconds without a heartbeat after which a running job counts as abandoned."""
    return STALE_HEARTBEATS * settings.heartbeat_s


def requeue_if_stale(session: Session, job_id: str, older_than_s: float) -> bool:
    """Compare-and-set ``running`` -> ``queued`` only while the heartbeat is older than ``older_than_s``.

    Two workers racing to take over the same abandoned job cannot both requeue it after one of
    them has claimed it again (the fresh heartbeat fails the condition).
    """
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running.value, Job.heartbeat_at < cutoff)
        .values(
            status=JobStatus.queued.value,
            worker=None,
            stage="requeued",
            heartbeat_at=None,
            lost_workers=Job.lost_workers + 1,
        )
        .execution_options(synchronize_session=False)
    )
    won = jobs.rows_matched(session.execute(statement)) == 1
    session.commit()
    return won


def fail_lost(session: Session, job_id: str, attempt: int, lost: int) -> bool:
    """Fail a job whose worker was lost ``lost`` (:data:`MAX_ATTEMPTS` or more) times; False if it is no
    longer running under the claim ``attempt``."""
    return jobs.finish_job(
        session,
        job_id,
        JobStatus.failed,
        error=f"the worker running this job was lost {lost} times (killed or out of memory); "
        "resubmit it with smaller inputs, a smaller tile or batch size",
        attempt=attempt,
    )


def recover_stale_jobs(
    settings: Settings | None = None, *, older_than_s: float | None = None, sessions: sessionmaker | None = None
) -> list[str]:
    """Put running jobs whose worker stopped beating back to ``queued``; returns their ids.

    A job whose worker was lost :data:`MAX_ATTEMPTS` times is failed instead. The caller re-dispatches
    the returned ids (Celery) or simply lets its poll loop find them (embedded worker).
    """
    settings = settings or get_settings()
    sessions = sessions or get_sessionmaker(settings)
    older = stale_after_s(settings) if older_than_s is None else older_than_s
    requeued = []
    with sessions() as session:
        for job in jobs.stale_jobs(session, older):
            if job.lost_workers + 1 >= MAX_ATTEMPTS:
                if fail_lost(session, job.id, job.attempts, job.lost_workers + 1):
                    log.error("job %s failed: worker lost %d times", job.id, job.lost_workers + 1)
                    webhooks.deliver_soon(job.id, settings, sessions, job.spec or {})
            elif requeue_if_stale(session, job.id, older):
                log.warning("job %s: worker %s stopped beating; job requeued", job.id, job.worker)
                requeued.append(job.id)
    return requeued


def _claim(session: Session, job_id: str, me: str, settings: Settings) -> int | None:
    """The attempt number of this worker's claim of the job (recording this process's device on the row), or
    None when it is not ours to run."""
    device = job_device()
    attempt = jobs.claim(session, job_id, me, max_running=settings.quota_running_jobs, device=device)
    if attempt is not None:
        return attempt
    job = jobs.get_job(session, job_id)
    if job.status == JobStatus.running.value and job.heartbeat_at is not None:
        # a redelivery after the previous worker died: take over once its heartbeat is stale
        if job.lost_workers + 1 < MAX_ATTEMPTS and requeue_if_stale(session, job_id, stale_after_s(settings)):
            log.warning("job %s: taking over from lost worker %s", job_id, job.worker)
            return jobs.claim(session, job_id, me, max_running=settings.quota_running_jobs, device=device)
    return None


def free_accelerator_memory() -> None:
    """Release cached GPU memory after a job (no-op on CPU, and when torch was never imported)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def describe_error(error: BaseException) -> str:
    """A one-line error text for the job row: what failed and why."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, (ValueError, FileNotFoundError, LookupError)):
        return text
    if isinstance(error, MemoryError) or "out of memory" in text.lower():
        return f"out of memory: {text}; use a smaller tile, batch or crop size"
    return f"{type(error).__name__}: {text}"


def run_job(
    job_id: str,
    *,
    settings: Settings | None = None,
    storage: Storage | None = None,
    handlers: dict[JobKind, Handler] | None = None,
    name: str | None = None,
) -> str:
    """Claim and run the job ``job_id``; returns its final status, ``"skipped"``/``"missing"`` (not
    run), ``"deferred"`` (still queued: its owner runs ``quota_running_jobs`` jobs already), or
    ``"lost"`` (another worker took the job over meanwhile; nothing of this run is kept).

    Database errors before the claim propagate (the Celery task retries them); everything after
    the claim ends in a final status on the row, except a stop of the worker process: the job
    goes back to ``queued`` and :class:`WorkerShutdown` propagates.
    """
    settings = settings or get_settings()
    sessions = get_sessionmaker(settings)
    me = name or worker_name()
    with sessions() as session:
        try:
            attempt = _claim(session, job_id, me, settings)
            if attempt is None:
                job = jobs.get_job(session, job_id)
                if job.status == JobStatus.queued.value:
                    log.info("job %s waits: its owner runs %d jobs already", job_id, settings.quota_running_jobs)
                    return "deferred"
                log.info("job %s is %s (worker %s); this delivery does nothing", job_id, job.status, job.worker)
                return "skipped"
        except jobs.JobNotFound:
            log.warning("job %s does not exist; message dropped", job_id)
            return "missing"
        job = jobs.get_job(session, job_id)
        kind = JobKind(job.kind)
        spec = dict(job.spec or {})
        cancel_early = bool(job.cancel_requested)

    reporter = JobReporter(
        job_id, sessions, throttle_s=settings.progress_throttle_s, heartbeat_s=settings.heartbeat_s, attempt=attempt
    ).start()
    scratch = Path(tempfile.mkdtemp(prefix=scratch_prefix()))
    context = JobContext(job_id, kind, spec, settings, storage or get_storage(settings), sessions, reporter, scratch,
                         attempt)  # fmt: skip
    try:
        return _run_claimed(context, (handlers or HANDLERS)[kind], cancel_early)
    finally:
        reporter.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        free_accelerator_memory()


def _run_claimed(context: JobContext, handler: Handler, cancel_early: bool) -> str:
    job_id = context.job_id
    try:
        if cancel_early:
            raise JobCancelled(job_id)
        outcome = handler(context)
    except JobCancelled as cancelled:
        log.info("job %s cancelled", job_id)
        return _finish(
            context, JobStatus.cancelled, metrics=getattr(cancelled, "metrics", None), error="cancelled on request"
        )
    except LostClaim:
        context.reporter.stop()
        _discard_attempt(context)
        log.warning("job %s: attempt %s lost its claim (another worker runs the job); stopped", job_id, context.attempt)
        return "lost"
    except (WorkerShutdown, KeyboardInterrupt, SystemExit):
        context.reporter.stop()
        with context.sessions() as session:
            requeued = jobs.requeue_job(session, job_id, attempt=context.attempt)
        if requeued:
            log.warning("job %s interrupted by a worker shutdown; requeued", job_id)
        else:
            _discard_attempt(context)
        raise
    except Exception as error:
        log.error("job %s failed:\n%s", job_id, traceback.format_exc())
        return _finish(context, JobStatus.failed, error=describe_error(error))
    return _finish(
        context, JobStatus.succeeded, result=outcome.result, metrics=outcome.metrics, outputs=outcome.outputs
    )


def _finish(context: JobContext, status: JobStatus, **values: Any) -> str:
    """End the job as ``status`` if the claim is still ours, then drop its files it does not keep."""
    context.reporter.stop()
    with context.sessions() as session:
        won = jobs.finish_job(session, context.job_id, status, attempt=context.attempt, **values)
    if not won:
        _discard_attempt(context)
        log.warning(
            "job %s ended %s but was no longer ours to finish (now %s)",
            context.job_id,
            status.value,
            _status_of(context.sessions, context.job_id),
        )
        return "lost"
    webhooks.deliver_soon(context.job_id, context.settings, context.sessions, context.spec)
    purge_job_files(context.storage, context.sessions, [context.job_id])
    return status.value


def _discard_attempt(context: JobContext) -> None:
    """Remove the files this attempt wrote (it lost its claim: none of them is registered)."""
    if context.attempt is not None:
        context.storage.delete_prefix(attempt_prefix(context.job_id, context.attempt))


def _status_of(sessions: sessionmaker[Session], job_id: str) -> str:
    with sessions() as session:
        return jobs.get_job(session, job_id).status
