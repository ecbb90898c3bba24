"""Hand a committed job to whatever runs it (no FastAPI, no torch, no worker imports here).

- With ``EMBEDSEG_BROKER_URL`` set, :class:`CeleryDispatcher` sends the task *by name*
  (``send_task("embedseg.run_job", [job_id], queue="gpu")``) to the job's queue through a light
  producer app, so the API process never imports torch or the worker package.
- On the embedded default the job row itself is the queue: an embedded local worker
  (:class:`embedseg_service.worker.local.LocalWorker`, which ``embedseg serve`` starts) polls the
  database for queued jobs; dispatching just wakes it up. Without a local worker in this
  process the job waits, queued, for one to start. The local worker runs the jobs of every queue.

Always commit the job row before dispatching it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Protocol

from embedseg_service.records.broker import celery_config
from embedseg_service.records.settings import Settings

log = logging.getLogger(__name__)


class DispatchError(RuntimeError):
    """The job could not be handed to the broker."""


class Dispatcher(Protocol):
    def submit(self, job_id: str, queue: str | None = None) -> None:
        """Hand the committed job ``job_id`` of the broker queue ``queue`` (None: ``Settings.gpu_queue``) over;
        raise :class:`DispatchError` when it cannot be."""
        ...


class CeleryDispatcher:
    """Sends ``settings.task_name`` with the job id to the job's queue (default ``settings.gpu_queue``; producer
    only)."""

    def __init__(self, settings: Settings) -> None:
        if settings.broker_url is None:
            raise ValueError("CeleryDispatcher needs EMBEDSEG_BROKER_URL (redis://host:6379/0)")
        self.settings = settings
        self._app: Any = None
        self._lock = threading.Lock()

    @property
    def app(self) -> Any:
        """The producer-only Celery app (made on first use; routes run in a thread pool)."""
        with self._lock:
            if self._app is None:
                from celery import Celery

                app = Celery("embedseg-api", set_as_current=False)
                app.conf.update(celery_config(self.settings))
                self._app = app
            return self._app

    def submit(self, job_id: str, queue: str | None = None) -> None:
        try:
            self.app.send_task(
                self.settings.task_name,
                args=[job_id],
                queue=queue or self.settings.gpu_queue,
                retry=True,
                retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
            )
        except Exception as error:  # kombu raises OperationalError and socket errors when Redis is down
            raise DispatchError(f"the job broker is unreachable ({type(error).__name__}: {error})") from error

    def close(self) -> None:
        with self._lock:
            if self._app is not None:
                self._app.close()
                self._app = None


class WaitForLocalWorker:
    """Embedded default without a local worker in this process: the job stays queued in the database."""

    def submit(self, job_id: str, queue: str | None = None) -> None:  # noqa: ARG002 - the Dispatcher interface
        log.info("job %s queued; it runs when an embedded local worker polls the database", job_id)


def make_dispatcher(settings: Settings) -> Dispatcher:
    """The dispatcher for ``settings``: Celery when a broker is configured, else wait for a local worker."""
    if settings.broker_url is not None:
        return CeleryDispatcher(settings)
    return WaitForLocalWorker()
