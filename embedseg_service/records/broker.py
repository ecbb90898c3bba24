"""Celery settings shared by the API's producer and the workers (plain data: Celery is not imported here),
and a read-only look into the Redis queue: which jobs have a task message waiting there.

The queue and the job rows can disagree: a broker restart without persistence loses the
messages, and a crash between committing a row and sending its message loses one. A queued row
older than ``requeue_after_s`` whose message is not waiting is what a worker's reconciler sends
again and what ``/ready`` reports (:func:`unsent_jobs`).

Each job goes to the broker queue its row names (``Job.queue``, one of ``Settings.job_queues``); a
row without one (made before jobs named queues) belongs to ``Settings.gpu_queue`` (:func:`job_queue`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.orm import Session

from embedseg_service.records import jobs
from embedseg_service.records.settings import Settings

PRIORITY_SEPARATOR = "\x06\x16"
PRIORITY_STEPS = (3, 6, 9)
"""kombu's Redis transport keeps a message of priority p > 0 in the list ``<queue>\\x06\\x16<p>``."""
PAGE = 500


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings shared by the API's producer and the workers.

    Late acks + requeue on a lost worker + prefetch 1 make a crash redeliver the job, and the
    visibility timeout (longer than the longest job) keeps Redis from redelivering a job that is
    still running. The job row, not a result backend, holds the outcome.
    """
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": {"visibility_timeout": settings.job_visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "result_backend": None,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": settings.gpu_queue,
        "task_routes": {settings.task_name: {"queue": settings.gpu_queue}},
        "task_track_started": False,
        "worker_hijack_root_logger": False,
    }


def job_queue(queue: str | None, settings: Settings) -> str:
    """The broker queue of a job whose row names ``queue``: that one, or ``settings.gpu_queue`` for None."""
    return queue or settings.gpu_queue


def job_queues(session: Session, job_ids: Sequence[str], settings: Settings) -> dict[str, str]:
    """``id -> broker queue`` of the jobs among ``job_ids`` that exist (:func:`job_queue`)."""
    return {job_id: job_queue(queue, settings) for job_id, queue in jobs.queues_of(session, job_ids).items()}


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold a queue's waiting messages (one per priority step)."""
    return [queue] + [f"{queue}{PRIORITY_SEPARATOR}{step}" for step in PRIORITY_STEPS]


def message_job_id(raw: bytes | str, task_name: str) -> str | None:
    """The job id a waiting kombu message of the task ``task_name`` carries, or None (another task,
    or a message this does not understand)."""
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != task_name:
            return None
        body: Any = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        args = decoded[0] if isinstance(decoded, list) else decoded.get("args")
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None


def waiting_job_ids(settings: Settings, queues: Iterable[str] | None = None) -> set[str]:
    """Ids of the jobs whose task message waits in one of the broker ``queues`` (default: every queue a job
    may name, ``settings.job_queues``), read without consuming anything.

    Messages a worker has taken but not yet acknowledged (its running job) are not counted.
    Raises ``redis.RedisError`` when the broker cannot be reached.
    """
    import redis

    if settings.broker_url is None:
        return set()
    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=5, socket_timeout=30)
    ids: set[str] = set()
    try:
        keys = [key for queue in (settings.job_queues if queues is None else queues) for key in queue_keys(queue)]
        for key in keys:
            length = int(client.llen(key))
            for start in range(0, length, PAGE):
                for raw in client.lrange(key, start, start + PAGE - 1):
                    job_id = message_job_id(raw, settings.task_name)
                    if job_id is not None:
                        ids.add(job_id)
    finally:
        client.close()
    return ids


def queue_length(settings: Settings, timeout_s: float = 2.0, queue: str | None = None) -> int:
    """Messages waiting in the broker queue ``queue`` (default ``settings.gpu_queue``; every priority list;
    taken but unacknowledged messages not counted). Raises ValueError without a broker, ``redis.RedisError``
    when it cannot be read."""
    queue = queue or settings.gpu_queue
    return queue_lengths(settings, [queue], timeout_s)[queue]


def queue_lengths(settings: Settings, queues: Iterable[str] | None = None, timeout_s: float = 2.0) -> dict[str, int]:
    """``queue -> messages waiting`` (:func:`queue_length`) of each of ``queues`` (default: every queue a job may
    name, ``settings.job_queues``), read over one connection. Raises like :func:`queue_length`."""
    import redis

    if settings.broker_url is None:
        raise ValueError("no broker is configured (EMBEDSEG_BROKER_URL)")
    client = redis.Redis.from_url(settings.broker_url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        return {
            queue: sum(int(client.llen(key)) for key in queue_keys(queue))
            for queue in (settings.job_queues if queues is None else queues)
        }
    finally:
        client.close()


def unsent_jobs(session: Session, settings: Settings) -> list[str]:
    """Queued jobs created more than ``settings.requeue_after_s`` ago whose message is not waiting in their
    broker queue (oldest first); none on the embedded default, where the database is the queue."""
    if settings.broker_url is None:
        return []
    overdue = jobs.overdue_queued(session, settings.requeue_after_s)
    if not overdue:
        return []
    waiting = waiting_job_ids(settings, sorted(set(job_queues(session, overdue, settings).values())))
    return [job_id for job_id in overdue if job_id not in waiting]
