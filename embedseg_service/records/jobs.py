"""Job state machine on the ``jobs`` table (no web code; used by the API and by the workers).

Transitions::

    queued  -> running (claim_job) | cancelled (request_cancel) | failed (finish_job)
    running -> succeeded | failed | cancelled (finish_job) | queued (requeue_job)

Terminal states (succeeded, failed, cancelled) never change. Every state change is a
compare-and-set ``UPDATE ... WHERE status IN (...)``, so two workers racing for one job (a
message delivered twice) cannot both win, and a finished job is never run again.
Every function here commits its own transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from enum import Enum
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    Connection,
    CursorResult,
    Dialect,
    Result,
    Text,
    bindparam,
    cast,
    select,
    type_coerce,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.types import NullType

from embedseg_service.records.orm import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    Job,
    JobKind,
    JobStatus,
    JobVolume,
    Model,
    Volume,
    utcnow,
)

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    JobStatus.running: frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled, JobStatus.queued}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}


class JobNotFound(LookupError):
    """No job has the given id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"Job {job_id} not found")
        self.job_id = job_id


class InvalidTransition(ValueError):
    """The job's current status does not allow the requested change."""

    def __init__(self, job_id: str, current: str, target: str) -> None:
        super().__init__(f"Job {job_id} is {current}; it cannot become {target}")
        self.job_id = job_id
        self.current = current
        self.target = target


E = TypeVar("E", bound=Enum)


def rows_matched(result: Result[Any]) -> int:
    """Rows an ``UPDATE`` executed through a session matched (its result is a ``CursorResult``)."""
    if not isinstance(result, CursorResult):
        raise TypeError(f"rows_matched needs the result of an UPDATE statement, got {type(result).__name__}")
    return result.rowcount


def _sources(target: JobStatus) -> list[str]:
    return [source.value for source, targets in TRANSITIONS.items() if target in targets]


def _get(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(job_id)
    return job


def _cas(session: Session, job_id: str, target: JobStatus, values: Mapping[str, Any]) -> bool:
    """Set ``status = target`` plus ``values`` if the job is in a status that may become ``target``."""
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_(_sources(target)))
        .values(status=target.value, **values)
        .execution_options(synchronize_session=False)
    )
    return rows_matched(session.execute(statement)) == 1


def get_job(session: Session, job_id: str) -> Job:
    """The job row, freshly read; raises :class:`JobNotFound`."""
    return _get(session, job_id)


class StoredJobReader:
    """Reads the named columns of one job row: as the database driver returns them, or also as the ORM loads them.

    :meth:`stored` is one primary-key select through the driver, with JSON columns as their text
    and nothing decoded: its values are cheap to compare, so a caller can tell an unchanged row
    from a changed one at little cost. :meth:`load` also gives the decoded values (timestamps,
    JSON), from the same select so that both describe one version of the row. ``dialect`` is the
    engine's. Raises ValueError for a name that is not a column of ``jobs``.
    """

    def __init__(self, names: Sequence[str], dialect: Dialect) -> None:
        table = Job.__table__
        unknown = [name for name in names if name not in table.c]
        if unknown:
            raise ValueError(f"not columns of the jobs table: {', '.join(unknown)}")
        self.names = tuple(names)
        columns = [table.c[name] for name in self.names]
        stored = [
            (cast(column, Text) if isinstance(column.type, JSON) else type_coerce(column, NullType())).label(
                f"stored_{column.name}"
            )
            for column in columns
        ]
        where = table.c.id == bindparam("job_id")
        self._load = select(*stored, *columns).where(where)
        compiled = select(*stored).where(where).compile(dialect=dialect)
        self._sql = str(compiled)
        self._positional = compiled.positional

    def stored(self, dbapi_connection: Any, job_id: str) -> tuple[Any, ...] | None:
        """The row's values in the order of ``names``, as the driver returns them; None when no job has the id.

        ``dbapi_connection``: a pooled driver connection (``Engine.raw_connection()``).
        """
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(self._sql, (job_id,) if self._positional else {"job_id": job_id})
            row = cursor.fetchone()
        finally:
            cursor.close()
        return None if row is None else tuple(row)

    def load(self, connection: Connection, job_id: str) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """(:meth:`stored` values, ``name -> value`` as the ORM loads it), or None when no job has the id."""
        row = connection.execute(self._load, {"job_id": job_id}).first()
        if row is None:
            return None
        count = len(self.names)
        return tuple(row[:count]), dict(zip(self.names, row[count:]))


def create_job(
    session: Session,
    kind: JobKind | str,
    spec: Mapping[str, Any],
    owner: str | None = None,
    *,
    volumes: Iterable[tuple[str, str]] = (),
) -> Job:
    """Insert a ``queued`` job and its (volume_id, role) links, and commit.

    Dispatch the job only after this returns (the row must exist before a worker looks for it).
    Raises ValueError for an unknown ``kind``.
    """
    job_kind = _enum(JobKind, kind, "kind")
    job = Job(kind=job_kind.value, status=JobStatus.queued.value, spec=dict(spec), owner=owner, progress=0.0)
    session.add(job)
    session.flush()
    links = {(volume_id, role) for volume_id, role in volumes}
    for volume_id, role in sorted(links):
        session.add(JobVolume(job_id=job.id, volume_id=volume_id, role=role))
    session.commit()
    return job


def claim_job(session: Session, job_id: str, worker: str) -> bool:
    """Move the job from ``queued`` to ``running`` for ``worker``; False if someone else got it first.

    A redelivered message whose job is already running or finished loses the claim and should
    exit quietly. Raises :class:`JobNotFound` for an unknown id.
    """
    now = utcnow()
    won = _cas(
        session,
        job_id,
        JobStatus.running,
        {
            "worker": worker,
            "started_at": now,
            "heartbeat_at": now,
            "attempts": Job.attempts + 1,
            "stage": "starting",
            "error": None,
        },
    )
    session.commit()
    if not won:
        _get(session, job_id)
    return won


def update_progress(
    session: Session,
    job_id: str,
    *,
    progress: float | None = None,
    stage: str | None = None,
    eta_s: float | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> bool:
    """Write progress (0..1), stage, ETA and metrics of a running job and beat its heartbeat.

    The caller throttles (see ``Settings.progress_throttle_s``). ``metrics`` replaces the stored
    metrics. Returns True when cancellation was requested (the worker should stop at the next
    step); False otherwise, including when the job is no longer running.
    """
    if progress is not None and not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be within [0, 1], got {progress}")
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = float(progress)
    if stage is not None:
        values["stage"] = stage
    if eta_s is not None:
        values["eta_s"] = max(0.0, float(eta_s))
    if metrics is not None:
        values["metrics"] = dict(metrics)
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running.value)
        .values(**values)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    )
    flag = session.execute(statement).scalar_one_or_none()
    session.commit()
    return bool(flag)


def heartbeat(session: Session, job_id: str) -> None:
    """Record that the worker running the job is alive."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running.value)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()


def request_cancel(session: Session, job_id: str) -> Job:
    """Cancel a job: a queued job becomes ``cancelled`` at once, a running one gets its cancel flag set.

    Returns the updated row. Raises :class:`JobNotFound`, or :class:`InvalidTransition` when the
    job has already finished.
    """
    now = utcnow()
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued.value)
        .values(status=JobStatus.cancelled.value, cancel_requested=True, finished_at=now, stage="cancelled",
                eta_s=None)
        .execution_options(synchronize_session=False)
    )
    if rows_matched(session.execute(statement)) != 1:
        statement = (
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.running.value)
            .values(cancel_requested=True)
            .execution_options(synchronize_session=False)
        )
        if rows_matched(session.execute(statement)) != 1:
            session.rollback()
            job = _get(session, job_id)
            raise InvalidTransition(job_id, job.status, JobStatus.cancelled.value)
    session.commit()
    return _get(session, job_id)


def is_cancel_requested(session: Session, job_id: str) -> bool:
    """True when the job's cancel flag is set (or the job no longer exists)."""
    flag = session.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar_one_or_none()
    session.commit()
    return True if flag is None else bool(flag)


def finish_job(
    session: Session,
    job_id: str,
    status: JobStatus | str,
    result: Mapping[str, Any] | None = None,
    error: str | None = None,
    outputs: Sequence[Volume | Model] = (),
    metrics: Mapping[str, Any] | None = None,
) -> bool:
    """End a job as ``succeeded``, ``failed`` or ``cancelled``, registering ``outputs`` atomically.

    ``outputs`` are new Volume/Model rows (their files already stored under job-scoped keys);
    they get ``source_job_id`` and the job's ``owner`` and are inserted in the same transaction
    that marks the job, so they exist exactly when the job succeeded. Returns False (inserting nothing) when the
    job was not in a status that may become ``status`` (e.g. a duplicate run finishing late).
    Raises ValueError for a non-terminal ``status``, :class:`JobNotFound` for an unknown id.
    """
    target = _enum(JobStatus, status, "status")
    if target not in TERMINAL_STATUSES:
        raise ValueError(f"finish_job needs a final status (succeeded, failed or cancelled), got {target.value!r}")
    values: dict[str, Any] = {"finished_at": utcnow(), "stage": target.value, "eta_s": None}
    if target is JobStatus.succeeded:
        values["progress"] = 1.0
    if result is not None:
        values["result"] = dict(result)
    if error is not None:
        values["error"] = error
    if metrics is not None:
        values["metrics"] = dict(metrics)
    won = _cas(session, job_id, target, values)
    if not won:
        session.rollback()
        _get(session, job_id)
        return False
    owner = session.scalar(select(Job.owner).where(Job.id == job_id))
    for row in outputs:
        row.source_job_id = job_id
        row.owner = owner
        session.add(row)
    session.commit()
    return True


def requeue_job(session: Session, job_id: str) -> bool:
    """Put a running job back to ``queued`` (its worker was lost); False if it was not running."""
    won = _cas(session, job_id, JobStatus.queued, {"worker": None, "stage": "requeued", "heartbeat_at": None})
    session.commit()
    return won


def stale_jobs(session: Session, older_than_s: float, now: datetime | None = None) -> list[Job]:
    """Running jobs whose heartbeat is older than ``older_than_s`` seconds."""
    cutoff = (now or utcnow()) - timedelta(seconds=older_than_s)
    rows = session.scalars(
        select(Job).where(Job.status == JobStatus.running.value, Job.heartbeat_at < cutoff).order_by(Job.created_at)
    ).all()
    return list(rows)


def active_jobs_using_volume(session: Session, volume_id: str) -> list[str]:
    """Ids of queued or running jobs that read the volume (oldest first)."""
    rows = session.scalars(
        select(Job.id)
        .where(
            Job.id.in_(select(JobVolume.job_id).where(JobVolume.volume_id == volume_id)),
            Job.status.in_([s.value for s in ACTIVE_STATUSES]),
        )
        .order_by(Job.created_at, Job.id)
    ).all()
    return list(rows)


def active_jobs_using_model(session: Session, model_id: str) -> list[str]:
    """Ids of queued or running jobs whose spec names ``model_id`` (oldest first)."""
    rows = session.execute(
        select(Job.id, Job.spec)
        .where(Job.status.in_([s.value for s in ACTIVE_STATUSES]))
        .order_by(Job.created_at, Job.id)
    ).all()
    return [job_id for job_id, spec in rows if isinstance(spec, dict) and spec.get("model_id") == model_id]


def _enum(enum_cls: type[E], value: Any, what: str) -> E:
    try:
        return enum_cls(value)
    except ValueError:
        valid = ", ".join(member.value for member in enum_cls)
        raise ValueError(f"unknown job {what} {value!r}; valid: {valid}") from None
