"""Celery settings shared by the API's producer and the workers (plain data: Celery is not imported here)."""

from __future__ import annotations

from typing import Any

from embedseg_service.records.settings import Settings


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
