"""Liveness (``/health``) and readiness (``/ready``: database, broker and storage reachable, and the
broker queue agreeing with the queued job rows)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from sqlalchemy import text
from sqlalchemy.orm import Session

from embedseg_service.api.deps import SessionDep, SettingsDep, StorageDep
from embedseg_service.records.broker import job_queues, unsent_jobs
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


def _queue_problem(session: Session, settings: Settings) -> str | None:
    """The queued jobs whose message the broker no longer holds (lost by a broker restart, or by a crash
    between the row's commit and the send), if any."""
    import redis

    try:
        unsent = unsent_jobs(session, settings)
    except redis.RedisError as error:
        return f"{_queues_named(settings.job_queues)} could not be read: {error}"
    if not unsent:
        return None
    queues = sorted(set(job_queues(session, unsent, settings).values())) or settings.job_queues
    return (
        f"{len(unsent)} queued job(s) (oldest {unsent[0]}) waited more than {settings.requeue_after_s:g} s "
        f"(EMBEDSEG_REQUEUE_AFTER_S) with no message in the {_queues_named(queues)}: the queue and "
        f"the database disagree; a running worker sends them again within {settings.heartbeat_s:g} s, so start "
        "a worker ('embedseg worker') if none runs"
    )


def _queues_named(queues: list[str]) -> str:
    """``broker queue 'gpu'``, or ``broker queues 'gpu', 'gpu-large'``."""
    names = ", ".join(repr(queue) for queue in queues)
    return f"broker queue {names}" if len(queues) == 1 else f"broker queues {names}"


def _redact(url: str) -> str:
    """The URL without a password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


@router.get(
    "/ready",
    response_model=Ready,
    summary="Database, broker and storage are reachable, and the broker queue agrees with the database",
    responses={
        503: {"description": "A dependency is down, or queued jobs have no broker message; `detail` says which"}
    },
)
def ready(session: SessionDep, settings: SettingsDep, storage: StorageDep) -> Ready:
    problems = []
    database_up = True
    try:
        session.execute(text("SELECT 1"))
    except Exception as error:  # any driver error means not ready
        problems.append(f"database unreachable: {type(error).__name__}")
        database_up = False
    broker = _broker_problem(settings)
    if broker:
        problems.append(broker)
    elif database_up:
        queue = _queue_problem(session, settings)
        if queue:
            problems.append(queue)
    store = storage.reachable()
    if store:
        problems.append(store)
    if problems:
        raise HTTPException(status_code=503, detail="; ".join(problems))
    return Ready(
        database=session.get_bind().dialect.name,
        broker="redis" if settings.broker_url else "embedded",
        storage="s3" if settings.storage_url else "local",
    )
