"""Deletion of a stored volume or model, refused while a queued or running job uses it."""

from __future__ import annotations

from sqlalchemy.orm import Session

from embedseg_service.records.jobs import active_jobs_using_model, active_jobs_using_volume
from embedseg_service.records.orm import Model, Volume
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


def delete_unless_in_use(session: Session, storage: Storage, row: Volume | Model) -> None:
    """Delete ``row`` and its stored file, or raise :class:`ResourceInUse` when an active job uses it.

    The row goes first (committed), the file after it, so a failure never leaves a row
    pointing at a missing file.
    """
    users = jobs_using(session, row)
    if users:
        raise ResourceInUse(row, users)
    key = row.storage_key
    session.delete(row)
    session.commit()
    storage.delete(key)
