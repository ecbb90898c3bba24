"""Liveness (``/health``) and readiness (``/ready``: database, broker and storage reachable)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import text

from embedseg_service.api.deps import SessionDep, SettingsDep, StorageDep
from embedseg_service.records.schemas import Health, Ready
from embedseg_service.records.settings import Settings

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="The process is up")
def health() -> Health:
    return Health()


def _broker_problem(settings: Settings) -> str | None:
    if settings.broker_url is None:
        return None
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as error:
        return f"broker {_redact(settings.broker_url)} unreachable: {error}"
    finally:
        client.close()
    return None


def _redact(url: str) -> str:
    """The URL without a password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


@router.get(
    "/ready",
    response_model=Ready,
    summary="Database, broker and storage are reachable",
    responses={503: {"description": "A dependency is down; `detail` says which"}},
)
def ready(session: SessionDep, settings: SettingsDep, storage: StorageDep) -> Ready:
    problems = []
    try:
        session.execute(text("SELECT 1"))
    except Exception as error:  # any driver error means not ready
        problems.append(f"database unreachable: {type(error).__name__}")
    broker = _broker_problem(settings)
    if broker:
        problems.append(broker)
    store = storage.reachable()
    if store:
        problems.append(store)
    if problems:
        raise HTTPException(status_code=503, detail="; ".join(problems))
    return Ready(
        database=session.get_bind().dialect.name,
        broker="redis" if settings.broker_url else "embedded",
        storage="local",
    )
