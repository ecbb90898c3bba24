"""The Celery application of the GPU workers (Redis broker; the job row, not a result backend, is the truth).

Run a worker with ``embedseg worker --queues gpu`` or ``celery -A embedseg_service.worker.celery_app worker -Q gpu``.
The configuration (late acks, requeue on a lost worker, prefetch 1, visibility timeout above the
longest job, routing of ``embedseg.run_job`` to the ``gpu`` queue) is shared with the API's
producer: see :func:`embedseg_service.records.broker.celery_config`.

The reconciler lives here, in a thread of each worker's main process
(:class:`embedseg_service.worker.reconcile.Reconciler`): the workers are what must run alongside
the broker for jobs to run at all, they already hold a producer connection, and a duplicate send
from two workers is harmless (the claim is a compare-and-set), so no separate beat process or
leader election is needed. At start the worker also removes what dead processes left behind.

SIGTERM (``docker compose stop``) starts Celery's warm shutdown; the main process asks its pool
processes to stop their jobs, which stop at their next step and are put back to the queue and
sent again (:mod:`embedseg_service.worker.shutdown`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import (
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)

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


def send_job(app: Celery, settings: Settings, job_id: str, queue: str | None = None) -> None:
    """Send the job's task (by name) to its broker queue ``queue`` (None: ``settings.gpu_queue``)."""
    app.send_task(settings.task_name, args=[job_id], queue=queue or settings.gpu_queue)


_reconcilers: dict[int, threading.Event] = {}


def _reconcile_loop(app: Celery, settings: Settings, stop: threading.Event) -> None:
    from embedseg_service.worker.cleanup import clean_at_start
    from embedseg_service.worker.reconcile import Reconciler

    reconciler = Reconciler(settings, lambda job_id, queue: send_job(app, settings, job_id, queue))
    try:
        clean_at_start(reconciler.storage, reconciler.sessions)
    except Exception as error:  # the database or the store briefly unreachable: the passes go on
        log.warning("clean-up at start: %s: %s", type(error).__name__, error)
    while not stop.wait(settings.heartbeat_s):
        try:
            reconciler.run_once()
        except Exception as error:  # database or broker briefly down: try again next period
            log.warning("reconciler: %s: %s", type(error).__name__, error)


@worker_ready.connect(weak=False)
def _start_reconciler(sender: Any = None, **_: Any) -> None:
    """Each worker runs the reconciler (lost workers' jobs, messages lost by the broker, leftover files)."""
    app = getattr(sender, "app", None)
    settings = getattr(getattr(app, "conf", None), "embedseg_settings", None)
    if app is None or settings is None or id(app) in _reconcilers:
        return
    stop = _reconcilers[id(app)] = threading.Event()
    threading.Thread(
        target=_reconcile_loop, args=(app, settings, stop), name="embedseg-reconciler", daemon=True
    ).start()


@worker_shutdown.connect(weak=False)
def _stop_reconciler(**_: Any) -> None:
    for stop in _reconcilers.values():
        stop.set()
    _reconcilers.clear()
    _stop_presence()


_presence: list[Any] = []


def _start_presence(celery_app: Celery) -> None:
    """Record this process in the workers table (:mod:`embedseg_service.worker.presence`)."""
    from embedseg_service.worker.presence import Presence

    settings = getattr(celery_app.conf, "embedseg_settings", None)
    if _presence or settings is None:
        return
    queues = ",".join(sorted(celery_app.amqp.queues.consume_from or {})) or settings.gpu_queue
    _presence.append(Presence(settings, queues=queues).start())


@worker_ready.connect(weak=False)
def _main_process_presence(sender: Any = None, **_: Any) -> None:
    """The solo and threads pools run jobs in the main process: it records its presence."""
    pool = getattr(sender, "pool", None)
    celery_app = getattr(sender, "app", None)
    if celery_app is not None and pool is not None and not type(pool).__module__.endswith(".prefork"):
        _start_presence(celery_app)


@worker_process_init.connect(weak=False)
def _pool_process_start(**_: Any) -> None:
    """A prefork pool process (the process that runs the jobs) turns the main process's stop signal into
    a stop request of its job, and records its presence.

    Celery sends this signal in the pool process's main thread (where jobs run), after it has reset
    the signal handlers it inherited; an idle pool process that gets the stop signal then exits
    through the pool's normal shutdown (which removes its presence row) instead of dying of it.
    """
    from embedseg_service.worker.shutdown import POOL_STOP_SIGNAL, install_stop_handler

    install_stop_handler(POOL_STOP_SIGNAL)
    _start_presence(app)


@worker_process_shutdown.connect(weak=False)
def _stop_presence(**_: Any) -> None:
    while _presence:
        _presence.pop().stop()


@worker_shutting_down.connect(weak=False)
def _stop_running_jobs(**_: Any) -> None:
    """Warm shutdown (SIGTERM): the job running here (solo, threads pool) or in a pool process
    (prefork, signalled) stops at its next step and goes back to the queue."""
    from embedseg_service.worker.shutdown import POOL_STOP_SIGNAL, forward_to_children, request_stop

    request_stop()
    forward_to_children(POOL_STOP_SIGNAL)


app = create_celery()
celery = app  # ``celery -A embedseg_service.worker.celery_app`` finds either name
