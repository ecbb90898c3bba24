"""Fetch-or-404 of one volume, job or model, scoped to the caller's owner.

A row of another owner answers exactly as a missing id does (404, same detail), so ids of other
owners' rows never leak.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from starlette.concurrency import run_in_threadpool

from embedseg_service.api.auth import PrincipalDep
from embedseg_service.api.deps import JobBodies, SessionDep
from embedseg_service.records.orm import Job, Model, Volume
from embedseg_service.records.schemas import ID_PATTERN

IdPath = Annotated[str, Path(max_length=64, pattern=ID_PATTERN)]


def not_found(what: str, row_id: str) -> HTTPException:
    """The 404 of a missing (or not visible) row."""
    return HTTPException(status_code=404, detail=f"{what} {row_id} not found")


def get_volume(session: SessionDep, principal: PrincipalDep, volume_id: IdPath) -> Volume:
    volume = session.get(Volume, volume_id)
    if volume is None or not principal.can_see(volume.owner):
        raise not_found("Volume", volume_id)
    return volume


def get_job(session: SessionDep, principal: PrincipalDep, job_id: IdPath) -> Job:
    job = session.get(Job, job_id)
    if job is None or not principal.can_see(job.owner):
        raise not_found("Job", job_id)
    return job


def get_model(session: SessionDep, principal: PrincipalDep, model_id: IdPath) -> Model:
    model = session.get(Model, model_id)
    if model is None or not principal.can_see(model.owner):
        raise not_found("Model", model_id)
    return model


async def get_job_body(request: Request, principal: PrincipalDep, job_id: IdPath) -> bytes:
    """The job's ``JobOut`` body, or 404 (the same detail as :func:`get_job`)."""
    bodies: JobBodies = request.app.state.job_bodies
    if bodies.on_event_loop:
        found = bodies.get_with_owner(job_id)
    else:
        found = await run_in_threadpool(bodies.get_with_owner, job_id)
    if found is None or not principal.can_see(found[0]):
        raise not_found("Job", job_id)
    return found[1]


VolumeDep = Annotated[Volume, Depends(get_volume)]
JobDep = Annotated[Job, Depends(get_job)]
ModelDep = Annotated[Model, Depends(get_model)]
JobBodyDep = Annotated[bytes, Depends(get_job_body)]
