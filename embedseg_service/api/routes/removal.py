"""Deletion of a stored resource (volume or model) that no active job uses."""

from __future__ import annotations

from fastapi import HTTPException, Response
from sqlalchemy.orm import Session

from embedseg_service.records.orm import Model, Volume
from embedseg_service.records.storage import Storage


def remove_unless_in_use(
    session: Session, storage: Storage, row: Volume | Model, *, noun: str, users: list[str]
) -> Response:
    """Delete ``row`` and its stored file, or answer 409 naming the queued/running ``users`` jobs.

    The row goes first (committed), the file after it, so a failure never leaves a row
    pointing at a missing file.
    """
    if users:
        raise HTTPException(
            status_code=409,
            detail=f"{noun} {row.id} is used by queued or running job(s) {', '.join(users)}; "
            "cancel them or wait until they finish",
        )
    key = row.storage_key
    session.delete(row)
    session.commit()
    storage.delete(key)
    return Response(status_code=204)
