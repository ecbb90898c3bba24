"""The Celery application of the GPU workers (Redis broker; the job row, not a result backend, is the truth).

Run a worker with ``embedseg worker --queues gpu`` or ``celery -A embedseg_service.worker.celery_app worker -Q gpu``.
The configuration (late acks, requeue on a lost worker, prefetch 1, visibility timeout above the
longest job, routing of ``embedseg.run_job`` to the ``gpu`` queue) is shared with the API's
producer: see :func:`embedseg_service.records.broker.celery_config`.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from embedseg_service.records.broker import celery_config
from embedseg_service.records.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured from ``settings`` with the job task registered.

    Without a broker URL (embedded default) the app points at ``memory://`` so that it can still
    be imported; real workers need ``EMBEDSEG_BROKER_URL``.
    """
    settings = settings or get_settings()
    app = Celery("embedseg", set_as_current=False)
    config = celery_config(settings)
    config["broker_url"] = settings.broker_url or "memory://"
    app.conf.update(config)
    app.conf.embedseg_settings = settings

    from embedseg_service.worker.tasks import register_tasks

    register_tasks(app, settings)
    return app


def recover_and_resend(app: Celery, settings: Settings) -> list[str]:
    """Requeue running jobs whose worker stopped beating and send their task again; returns their ids."""
    from embedseg_service.worker.runner import recover_stale_jobs

    requeued = recover_stale_jobs(settings)
    for job_id in requeued:
        app.send_task(settings.task_name, args=[job_id], queue=settings.gpu_queue)
    return requeued


_recovery: dict[int, threading.Event] = {}


def _recovery_loop(app: Celery, settings: Settings, stop: threading.Event) -> None:
    while not stop.wait(settings.heartbeat_s):
        try:
            recover_and_resend(app, settings)
        except Exception as error:  # database or broker briefly down: try again next period
            log.warning("stale-job recovery: %s: %s", type(error).__name__, error)


@worker_ready.connect(weak=False)
def _start_recovery(sender: Any = None, **_: Any) -> None:
    """Each worker watches for jobs abandoned by a lost worker (killed, out of memory) and re-sends them."""
    app = getattr(sender, "app", None)
    settings = getattr(getattr(app, "conf", None), "embedseg_settings", None)
    if app is None or settings is None or id(app) in _recovery:
        return
    stop = _recovery[id(app)] = threading.Event()
    threading.Thread(target=_recovery_loop, args=(app, settings, stop), name="embedseg-recovery", daemon=True).start()


@worker_shutdown.connect(weak=False)
def _stop_recovery(**_: Any) -> None:
    for stop in _recovery.values():
        stop.set()
    _recovery.clear()


app = create_celery()
celery = app  # ``celery -A embedseg_service.worker.celery_app`` finds either name
