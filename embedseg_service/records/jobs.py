"""Job state machine on the ``jobs`` table (no web code; used by the API and by the workers).

Transitions::

    queued  -> running (claim_job) | cancelled (request_cancel) | failed (finish_job)
    running -> succeeded | failed | cancelled (finish_job) | queued (requeue_job)

Terminal states (succeeded, failed, cancelled) never change. Every state change is a
compare-and-set ``UPDATE ... WHERE status IN (...)``, so two workers racing for one job (a
message delivered twice) cannot both win, and a finished job is never run again. The change to a
terminal state also writes the job's pending webhook delivery record (``Job.callback``) when its
spec names a ``callback_url``, in the same transaction, whichever path ends the job
(:mod:`embedseg_service.records.callbacks`).

A claim increments ``attempts``; the worker's writes name that attempt number (``attempt=``) and
apply only while the job is still ``running`` under it, so a worker that lost its claim (its
heartbeat went stale and another worker took the job over) can neither change the row nor
register outputs. Every function here commits its own transaction.
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
    func,
    select,
    type_coerce,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased
from sqlalchemy.types import NullType

from embedseg_service.records.callbacks import new_record
from embedseg_service.records.object_tables import table_keys
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


class ClaimLost(RuntimeError):
    """A fenced write found the job no longer running under the writer's attempt: another worker owns it
    now, or it has finished. The writer must stop and register nothing."""

    def __init__(self, job_id: str, attempt: int) -> None:
        super().__init__(f"job {job_id} is no longer running under attempt {attempt}")
        self.job_id = job_id
        self.attempt = attempt


class InputsMissing(LookupError):
    """A job's input volume or model was deleted before the job was created; ``missing`` names them."""

    def __init__(self, missing: Sequence[str]) -> None:
        super().__init__(
            f"{', '.join(missing)} not found: deleted while the job was being submitted; store it again and resubmit"
        )
        self.missing = list(missing)


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


def _cas(
    session: Session, job_id: str, target: JobStatus, values: Mapping[str, Any], attempt: int | None = None
) -> bool:
    """Set ``status = target`` plus ``values`` if the job is in a status that may become ``target``
    (with ``attempt``: only while it is running under that claim)."""
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_(_sources(target)), *_fence(attempt))
        .values(status=target.value, **values)
        .execution_options(synchronize_session=False)
    )
    return rows_matched(session.execute(statement)) == 1


def _fence(attempt: int | None) -> list[Any]:
    """The extra conditions of a write fenced by ``attempt`` (none without one)."""
    if attempt is None:
        return []
    return [Job.status == JobStatus.running.value, Job.attempts == attempt]


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
    model_id: str | None = None,
    queue: str | None = None,
) -> Job:
    """Insert a ``queued`` job for the broker queue ``queue`` (None: the default) and its (volume_id, role)
    links, and commit.

    The input volumes and ``model_id`` (the model a predict job reads, also named in its spec) are
    locked against deletion and checked to exist in the same transaction, so a concurrent delete
    either waits for this job (and then refuses, the inputs being in use) or wins, and this raises
    :class:`InputsMissing`: no job is ever left without its inputs. Dispatch the job only after this
    returns (the row must exist before a worker looks for it). Raises ValueError for an unknown ``kind``.
    """
    job_kind = _enum(JobKind, kind, "kind")
    links = sorted({(volume_id, role) for volume_id, role in volumes})
    job = Job(
        kind=job_kind.value, status=JobStatus.queued.value, spec=dict(spec), owner=owner, progress=0.0, queue=queue
    )
    try:
        session.add(job)
        session.flush()  # the first write: on SQLite it takes the database's write lock
        missing = _lock_inputs(session, sorted({volume_id for volume_id, _ in links}), model_id)
        if missing:
            raise InputsMissing(missing)
        for volume_id, role in links:
            session.add(JobVolume(job_id=job.id, volume_id=volume_id, role=role))
        try:
            session.flush()
        except IntegrityError:  # a volume deleted between the check and its link (the foreign key refused)
            session.rollback()
            raise InputsMissing(_missing_inputs(session, [v for v, _ in links], model_id)) from None
    except BaseException:
        session.rollback()
        raise
    session.commit()
    return job


def _lock_inputs(session: Session, volume_ids: Sequence[str], model_id: str | None) -> list[str]:
    """Share-lock the input rows (PostgreSQL ``FOR SHARE``: a delete waits for this transaction);
    returns the ones that do not exist, as "Volume <id>" / "Model <id>"."""
    found = set(session.scalars(select(Volume.id).where(Volume.id.in_(volume_ids)).with_for_update(read=True)))
    missing = [f"Volume {volume_id}" for volume_id in volume_ids if volume_id not in found]
    if model_id is not None:
        if session.scalar(select(Model.id).where(Model.id == model_id).with_for_update(read=True)) is None:
            missing.append(f"Model {model_id}")
    return missing


def _missing_inputs(session: Session, volume_ids: Sequence[str], model_id: str | None) -> list[str]:
    found = set(session.scalars(select(Volume.id).where(Volume.id.in_(list(volume_ids)))))
    missing = [f"Volume {volume_id}" for volume_id in sorted(set(volume_ids)) if volume_id not in found]
    if model_id is not None and session.scalar(select(Model.id).where(Model.id == model_id)) is None:
        missing.append(f"Model {model_id}")
    session.commit()
    return missing or ["an input volume"]


OWNER_CLAIM_LOCKS = 0x656D6273
"""First key of the PostgreSQL advisory locks that serialise the claims of one owner's jobs."""


def _serialize_owner_claims(session: Session, job_id: str) -> None:
    """On PostgreSQL, take the transaction's advisory lock of the job's owner, so that the claim's count of
    the owner's running jobs (a statement after this one, a fresh snapshot under READ COMMITTED) sees every
    claim committed before it. SQLite needs none: its writes already run one at a time."""
    if session.get_bind().dialect.name != "postgresql":
        return
    owner = session.scalar(select(Job.owner).where(Job.id == job_id))
    session.execute(select(func.pg_advisory_xact_lock(OWNER_CLAIM_LOCKS, func.hashtext(owner or ""))))


def claim(
    session: Session, job_id: str, worker: str, *, max_running: int | None = None, device: str | None = None
) -> int | None:
    """Move the job from ``queued`` to ``running`` for ``worker`` (on ``device``, recorded when given); returns
    the claim's attempt number (the new ``attempts``, which fences the worker's later writes), or None if
    someone else got it first.

    With ``max_running``, the claim also fails while the job's owner already has that many jobs
    running (the job stays ``queued``); claims of one owner's jobs then run one at a time
    (:func:`_serialize_owner_claims`), so two at the same moment cannot both pass the count. A
    redelivered message whose job is already running or finished loses the claim and should exit
    quietly. Raises :class:`JobNotFound` for an unknown id.
    """
    now = utcnow()
    conditions = [Job.id == job_id, Job.status.in_(_sources(JobStatus.running))]
    if max_running is not None:
        _serialize_owner_claims(session, job_id)
        other = aliased(Job)
        running = (
            select(func.count())
            .select_from(other)
            .where(
                other.status == JobStatus.running.value,
                other.owner.is_not_distinct_from(Job.owner),
            )  # fmt: skip
            .scalar_subquery()
        )
        conditions.append(running < max_running)
    statement = (
        update(Job)
        .where(*conditions)
        .values(
            status=JobStatus.running.value,
            worker=worker,
            started_at=now,
            heartbeat_at=now,
            attempts=Job.attempts + 1,
            stage="starting",
            error=None,
            **({} if device is None else {"device": device[:64]}),
        )
        .returning(Job.attempts)
        .execution_options(synchronize_session=False)
    )
    attempt = session.execute(statement).scalar_one_or_none()
    session.commit()
    if attempt is None:
        _get(session, job_id)
    return attempt


def claim_job(session: Session, job_id: str, worker: str) -> bool:
    """:func:`claim` that answers only whether ``worker`` won the claim."""
    return claim(session, job_id, worker) is not None


def holds_claim(session: Session, job_id: str, attempt: int) -> bool:
    """Whether the job is still running under the claim ``attempt``."""
    found = session.scalar(select(Job.id).where(Job.id == job_id, *_fence(attempt)))
    session.commit()
    return found is not None


def update_progress(
    session: Session,
    job_id: str,
    *,
    progress: float | None = None,
    stage: str | None = None,
    eta_s: float | None = None,
    metrics: Mapping[str, Any] | None = None,
    attempt: int | None = None,
) -> bool:
    """Write progress (0..1), stage, ETA and metrics of a running job and beat its heartbeat.

    The caller throttles (see ``Settings.progress_throttle_s``). ``metrics`` replaces the stored
    metrics. Returns True when cancellation was requested (the worker should stop at the next
    step); False otherwise, including when the job is no longer running. With ``attempt`` the
    write is fenced: it raises :class:`ClaimLost` when the job is not running under that claim.
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
    return _write_running(session, job_id, values, attempt)


def heartbeat(session: Session, job_id: str, attempt: int | None = None) -> bool:
    """Record that the worker running the job is alive; returns the cancel flag.

    With ``attempt``: fenced, raises :class:`ClaimLost` when the job is not running under that claim.
    """
    return _write_running(session, job_id, {"heartbeat_at": utcnow()}, attempt)


def _write_running(session: Session, job_id: str, values: Mapping[str, Any], attempt: int | None) -> bool:
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.running.value, *_fence(attempt))
        .values(**values)
        .returning(Job.cancel_requested)
        .execution_options(synchronize_session=False)
    )
    flag = session.execute(statement).scalar_one_or_none()
    session.commit()
    if flag is None and attempt is not None:
        raise ClaimLost(job_id, attempt)
    return bool(flag)


def request_cancel(session: Session, job_id: str) -> Job:
    """Cancel a job: a queued job becomes ``cancelled`` at once, a running one gets its cancel flag set.

    Returns the updated row. Raises :class:`JobNotFound`, or :class:`InvalidTransition` when the
    job has already finished.
    """
    now = utcnow()
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.queued.value)
        .values(status=JobStatus.cancelled.value, cancel_requested=True, finished_at=now, stage="cancelled", eta_s=None)
        .execution_options(synchronize_session=False)
    )
    if rows_matched(session.execute(statement)) == 1:
        _open_callback(session, job_id, JobStatus.cancelled)
    else:
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
    attempt: int | None = None,
) -> bool:
    """End a job as ``succeeded``, ``failed`` or ``cancelled``, registering ``outputs`` atomically.

    ``outputs`` are new Volume/Model rows (their files already stored under job-scoped keys);
    they get ``source_job_id`` and the job's ``owner`` and are inserted in the same transaction
    that marks the job, so they exist exactly when the job succeeded; so is the pending webhook
    delivery record of a job whose spec names a ``callback_url``. Returns False (inserting nothing)
    when the job was not in a status that may become ``status`` (e.g. a duplicate run finishing late), or,
    with ``attempt``, when it is not running under that claim (a worker that lost its claim).
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
    won = _cas(session, job_id, target, values, attempt)
    if not won:
        session.rollback()
        _get(session, job_id)
        return False
    _open_callback(session, job_id, target)
    owner = session.scalar(select(Job.owner).where(Job.id == job_id))
    for row in outputs:
        row.source_job_id = job_id
        row.owner = owner
        session.add(row)
    session.commit()
    return True


def _open_callback(session: Session, job_id: str, status: JobStatus) -> None:
    """Write the pending delivery record of a job that has just ended in ``status`` (in the caller's
    transaction), when its spec names a ``callback_url``."""
    spec = session.scalar(select(Job.spec).where(Job.id == job_id))
    url = spec.get("callback_url") if isinstance(spec, dict) else None
    if isinstance(url, str) and url:
        statement = (
            update(Job)
            .where(Job.id == job_id)
            .values(callback=new_record(url, status.value))
            .execution_options(synchronize_session=False)
        )
        session.execute(statement)


def requeue_job(session: Session, job_id: str, attempt: int | None = None, *, lost: bool = False) -> bool:
    """Put a running job back to ``queued`` (its worker is stopping, or was ``lost``: counted in
    ``lost_workers``); False if it was not running (with ``attempt``: not running under that claim)."""
    values: dict[str, Any] = {"worker": None, "stage": "requeued", "heartbeat_at": None}
    if lost:
        values["lost_workers"] = Job.lost_workers + 1
    won = _cas(session, job_id, JobStatus.queued, values, attempt)
    session.commit()
    return won


def overdue_queued(session: Session, older_than_s: float, now: datetime | None = None, limit: int = 1000) -> list[str]:
    """Ids of queued jobs created more than ``older_than_s`` seconds ago (oldest first, at most ``limit``)."""
    cutoff = (now or utcnow()) - timedelta(seconds=older_than_s)
    rows = session.scalars(
        select(Job.id)
        .where(Job.status == JobStatus.queued.value, Job.created_at < cutoff)
        .order_by(Job.created_at, Job.id)
        .limit(limit)
    ).all()
    session.commit()
    return list(rows)


def queues_of(session: Session, job_ids: Sequence[str]) -> dict[str, str | None]:
    """``id -> queue`` (None: the default queue) of the jobs among ``job_ids`` that exist."""
    rows = session.execute(select(Job.id, Job.queue).where(Job.id.in_(list(job_ids)))).all()
    session.commit()
    return {str(job_id): queue for job_id, queue in rows}


def finished_since(session: Session, since: datetime) -> list[tuple[str, str, int]]:
    """(id, status, attempts) of the jobs that finished at or after ``since``."""
    rows = session.execute(
        select(Job.id, Job.status, Job.attempts).where(
            Job.status.in_([s.value for s in TERMINAL_STATUSES]), Job.finished_at >= since
        )
    ).all()
    session.commit()
    return [(job_id, status, attempts) for job_id, status, attempts in rows]


def job_states(session: Session, job_ids: Sequence[str]) -> dict[str, tuple[str, int]]:
    """``id -> (status, attempts)`` of the jobs among ``job_ids`` that exist."""
    rows = session.execute(select(Job.id, Job.status, Job.attempts).where(Job.id.in_(list(job_ids)))).all()
    session.commit()
    return {job_id: (status, attempts) for job_id, status, attempts in rows}


def registered_keys(session: Session, job_ids: Sequence[str]) -> dict[str, set[str]]:
    """``job id -> storage keys`` of the volumes and models each of ``job_ids`` registered (its outputs),
    and of the files its result lists (a predict job's object tables)."""
    keys: dict[str, set[str]] = {job_id: set() for job_id in job_ids}
    for table in (Volume, Model):
        rows = session.execute(
            select(table.source_job_id, table.storage_key).where(table.source_job_id.in_(list(job_ids)))
        ).all()
        for job_id, key in rows:
            if job_id is not None:
                keys[job_id].add(key)
    for job_id, result in session.execute(select(Job.id, Job.result).where(Job.id.in_(list(job_ids)))).all():
        keys[job_id].update(table_keys(job_id, result))
    session.commit()
    return keys


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
