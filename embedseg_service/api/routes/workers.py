"""``/workers``: the processes that run jobs and are alive now (admins: scaling and GPU memory)."""

from __future__ import annotations

from collections import defaultdict

from fastapi import APIRouter, HTTPException
from sqlalchemy import select

from embedseg_service.api.auth import PrincipalDep
from embedseg_service.api.deps import SessionDep, SettingsDep
from embedseg_service.records.orm import Job, JobStatus
from embedseg_service.records.schemas import WorkerOut
from embedseg_service.records.workers import alive_workers

router = APIRouter(prefix="/workers", tags=["workers"])

ADMIN_ONLY = (
    "the worker list needs an admin API key (embedseg keys create --owner NAME --admin); this key is an owner's"
)


@router.get(
    "",
    response_model=list[WorkerOut],
    summary="Worker processes alive now",
    responses={403: {"description": "an owner's key: the list names every owner's running jobs"}},
)
def list_workers(session: SessionDep, settings: SettingsDep, principal: PrincipalDep) -> list[WorkerOut]:
    """Worker processes whose last beat is within three heartbeat periods, by name, each with its device,
    GPU memory and running jobs. Needs an admin key once keys exist (403 for an owner's key)."""
    if not principal.admin:
        raise HTTPException(status_code=403, detail=ADMIN_ONLY)
    running: dict[str, list[str]] = defaultdict(list)
    statement = select(Job.worker, Job.id).where(Job.status == JobStatus.running.value).order_by(Job.started_at)
    for worker, job_id in session.execute(statement):
        running[worker or ""].append(job_id)
    return [
        WorkerOut.model_validate(row).model_copy(update={"running_job_ids": running.get(row.name, [])})
        for row in alive_workers(session, settings.heartbeat_s)
    ]
