"""Deletion of a stored volume or model, refused while a queued or running job uses it.

The check and the delete are one transaction that holds the row's lock (PostgreSQL ``FOR
UPDATE``; on SQLite the database's write lock), and job creation share-locks its inputs
(:func:`embedseg_service.records.jobs.create_job`), so a job submitted at the same moment either
comes first and makes the delete refuse, or comes second and finds its input gone. The
``RESTRICT`` foreign key of the job-volume links backs this up inside the database.
"""

from __future__ import annotations

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from embedseg_service.records.jobs import active_jobs_using_model, active_jobs_using_volume
from embedseg_service.records.orm import TERMINAL_STATUSES, Job, JobVolume, Model, Volume
from embedseg_service.records.storage import Storage


class ResourceInUse(Exception):
    """A queued or running job uses the volume or model; ``job_ids`` names them, oldest first."""

    def __init__(self, row: Volume | Model, job_ids: list[str]) -> None:
        super().__init__(
            f"{type(row).__name__} {row.id} is used by queued or running job(s) {', '.join(job_ids)}; "
            "cancel them or wait until they finish"
        )
        self.resource_id = row.id
        self.job_ids = job_ids


def jobs_using(session: Session, row: Volume | Model) -> list[str]:
    """Ids of the queued or running jobs that read the volume or name the model (oldest first)."""
    if isinstance(row, Volume):
        return active_jobs_using_volume(session, row.id)
    return active_jobs_using_model(session, row.id)


def lock_for_delete(session: Session, row: Volume | Model) -> None:
    """Lock ``row`` until the session's transaction ends, so that no job can start using it meanwhile."""
    table = type(row)
    if session.get_bind().dialect.name == "sqlite":
        # no row locks: a first write (this no-op update) takes the database's write lock, so no
        # other transaction commits until this one ends, and what is read after it is current
        session.execute(update(table).where(table.id == row.id).values(id=table.id))
    else:
        session.execute(select(table.id).where(table.id == row.id).with_for_update())


def delete_unless_in_use(session: Session, storage: Storage, row: Volume | Model) -> None:
    """Delete ``row`` and its stored file, or raise :class:`ResourceInUse` when an active job uses it.

    The links of finished jobs to a volume go with it (those jobs keep their spec, results and
    outputs). The row goes first (committed), the file after it, so a failure never leaves a row
    pointing at a missing file.
    """
    key = row.storage_key
    for _ in range(3):
        try:
            lock_for_delete(session, row)
            users = jobs_using(session, row)
            if users:
                raise ResourceInUse(row, users)
            _delete_row(session, row)
        except IntegrityError:  # a link of an active job the check could not see: the foreign key refused
            session.rollback()
            continue
        except BaseException:
            session.rollback()
            raise
        session.commit()
        storage.delete(key)
        return
    raise ResourceInUse(row, jobs_using(session, row))


def _delete_row(session: Session, row: Volume | Model) -> None:
    if isinstance(row, Volume):
        finished = select(Job.id).where(Job.status.in_([s.value for s in TERMINAL_STATUSES]))
        session.execute(
            delete(JobVolume).where(JobVolume.volume_id == row.id, JobVolume.job_id.in_(finished)),
            execution_options={"synchronize_session": False},
        )
    session.delete(row)
    session.flush()
