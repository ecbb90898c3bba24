"""FastAPI dependencies: settings, database session, storage, and one fetch-or-404 per resource."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from sqlalchemy.orm import Session

from api.orm import Job, Model, Volume
from api.settings import Settings
from api.storage import Storage


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A session per request; rolled back if the route raised, closed afterwards."""
    session: Session = request.app.state.sessionmaker()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def get_storage(request: Request) -> Storage:
    return request.app.state.storage


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]


def get_volume(session: SessionDep, volume_id: Annotated[str, Path(max_length=64)]) -> Volume:
    volume = session.get(Volume, volume_id)
    if volume is None:
        raise HTTPException(status_code=404, detail=f"Volume {volume_id} not found")
    return volume


def get_job(session: SessionDep, job_id: Annotated[str, Path(max_length=64)]) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"Job {job_id} not found")
    return job


def get_model(session: SessionDep, model_id: Annotated[str, Path(max_length=64)]) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise HTTPException(status_code=404, detail=f"Model {model_id} not found")
    return model


VolumeDep = Annotated[Volume, Depends(get_volume)]
JobDep = Annotated[Job, Depends(get_job)]
ModelDep = Annotated[Model, Depends(get_model)]
