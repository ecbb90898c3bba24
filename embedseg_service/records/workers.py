"""The worker processes table: each process that runs jobs records itself at every beat.

A process counts as alive while its last beat is younger than :data:`ALIVE_BEATS` heartbeat periods;
rows of processes gone longer than :data:`FORGET_AFTER` are removed by the reconciler. A process that
stops cleanly removes its own row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from embedseg_service.records.jobs import rows_matched
from embedseg_service.records.orm import WorkerProcess, utcnow

ALIVE_BEATS = 3
"""A worker is alive while its last beat is younger than this many heartbeat periods."""
FORGET_AFTER = timedelta(days=1)
"""Rows of workers not seen for this long are removed."""


@dataclass(frozen=True)
class Beat:
    """What a worker process reports at each beat."""

    name: str
    host: str
    pid: int
    queues: str | None = None
    device: str | None = None
    gpu_memory_bytes: int | None = None
    gpu_memory_total_bytes: int | None = None


def record_beat(session: Session, beat: Beat) -> None:
    """Insert or update the row of ``beat.name`` with ``seen_at`` now, and commit."""
    row = session.get(WorkerProcess, beat.name)
    if row is None:
        row = WorkerProcess(name=beat.name, host=beat.host, pid=beat.pid, started_at=utcnow())
        session.add(row)
    row.queues = beat.queues
    if beat.device is not None:
        row.device = beat.device
    row.gpu_memory_bytes = beat.gpu_memory_bytes
    row.gpu_memory_total_bytes = beat.gpu_memory_total_bytes
    row.seen_at = utcnow()
    session.commit()


def forget(session: Session, name: str) -> None:
    """Remove the row of the worker ``name`` (it stopped cleanly), and commit."""
    session.execute(delete(WorkerProcess).where(WorkerProcess.name == name))
    session.commit()


def alive_workers(session: Session, heartbeat_s: float, now: datetime | None = None) -> list[WorkerProcess]:
    """Workers whose last beat is younger than :data:`ALIVE_BEATS` heartbeat periods, by name."""
    cutoff = (now or utcnow()) - timedelta(seconds=ALIVE_BEATS * heartbeat_s)
    statement = select(WorkerProcess).where(WorkerProcess.seen_at >= cutoff).order_by(WorkerProcess.name)
    return list(session.scalars(statement).all())


def prune_workers(session: Session, now: datetime | None = None) -> int:
    """Remove the rows of workers not seen for :data:`FORGET_AFTER`; returns how many, and commits."""
    cutoff = (now or utcnow()) - FORGET_AFTER
    removed = rows_matched(session.execute(delete(WorkerProcess).where(WorkerProcess.seen_at < cutoff)))
    session.commit()
    return removed
