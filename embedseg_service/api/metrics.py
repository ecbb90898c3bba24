"""Prometheus metrics of one app: HTTP requests counted in the process, and the jobs, broker queue and stored
bytes read from the database and the broker when ``/metrics`` is scraped.

Each app has its own :class:`prometheus_client.CollectorRegistry` (``app.state.metrics.registry``), never
the process-wide default one. Every label has a bounded set of values: HTTP routes are route templates
(``/api/v1/jobs/{job_id}``, ``unmatched`` for a path no route serves), never raw paths; statuses are
classes (``2xx``); job labels are the ``JobStatus`` and ``JobKind`` values; stages are the first word
of a running job's stage (``training``, ``predicting``, ...); worker processes, hosts and owners are as
many as the deployment has.

Workers export through the database rather than a port of their own or a pushgateway: each process that
runs jobs records its device and GPU memory in the ``workers`` table at every heartbeat
(:mod:`embedseg_service.worker.presence`), and this process reads the rows at each scrape. So one scrape
target (the API) covers workers on any host, and a worker that died stops counting as alive after
:data:`embedseg_service.records.workers.ALIVE_BEATS` heartbeat periods.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedseg_service.records.broker import queue_lengths
from embedseg_service.records.orm import Job, JobKind, JobStatus, WorkerProcess, utcnow
from embedseg_service.records.settings import Settings
from embedseg_service.records.usage import stored_bytes
from embedseg_service.records.workers import alive_workers

HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Request duration histogram buckets in seconds (uploads of large volumes take minutes)."""
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
"""The route label of a request no route served (an unknown path, or one refused before routing)."""
DURATION_WINDOW = 200
"""Job durations are quantiles of the last this-many succeeded jobs of each kind (newest by creation)."""
QUANTILES = (0.5, 0.95)
BROKER_TIMEOUT_S = 2.0


class HttpMetrics:
    """Counter of HTTP requests by method, route template and status class, and a duration histogram by
    method and route template, in ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "embedseg_http_requests",
            "HTTP requests answered, by method, route template and status class",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "embedseg_http_request_duration_seconds",
            "Seconds from receiving an HTTP request to the end of its answer, by method and route template",
            ["method", "route"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request (``method`` outside :data:`METHODS` is counted as ``other``)."""
        method = method if method in METHODS else "other"
        self.requests.labels(method=method, route=route, status=f"{status // 100}xx").inc()
        self.duration.labels(method=method, route=route).observe(seconds)


def route_template(scope: Scope) -> str:
    """The path template of the route that served ``scope`` with the prefixes of the routers it is included
    in (``/api/v1/jobs/{job_id}``), the mount path for an app mounted under one (``/dashboard``), or
    :data:`UNMATCHED`.

    The route's own template has its parameters filled in from ``path_params``; what precedes that in the
    request path is the static prefix of the routers (this app's prefixes hold no parameters).
    """
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(template, str) or not template:
        mounted = str(scope.get("root_path", ""))[len(str(scope.get("app_root_path", ""))) :]
        return mounted if scope.get("endpoint") is not None and mounted else UNMATCHED
    path = str(scope.get("path", ""))
    try:
        concrete = template.format(**scope.get("path_params", {}))
    except (KeyError, IndexError, ValueError):
        return template
    return path[: len(path) - len(concrete)] + template if path.endswith(concrete) else template


class RequestMetrics:
    """ASGI middleware recording every HTTP request in :class:`HttpMetrics` (an exception counts as 500)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe(scope["method"], route_template(scope), status, time.perf_counter() - started)


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values`` by linear interpolation between the closest ranks (numpy's
    default); ``values`` must not be empty."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class JobSnapshot:
    """Job counts read in one scrape."""

    counts: dict[tuple[str, str], int]
    oldest_queued_s: float
    running_by_host: dict[str, int]
    durations: dict[str, list[float]]
    running_by_stage: dict[tuple[str, str], int]


def read_jobs(session: Session) -> JobSnapshot:
    """Jobs by (status, kind) and the oldest queued job's age (one grouped query), running jobs per worker
    host (the worker name up to its ``:pid``), and the durations of the last :data:`DURATION_WINDOW`
    succeeded jobs of each kind."""
    counts: dict[tuple[str, str], int] = {}
    oldest = None
    grouped = select(Job.status, Job.kind, func.count(), func.min(Job.created_at)).group_by(Job.status, Job.kind)
    for status, kind, count, first in session.execute(grouped):
        counts[(status, kind)] = int(count)
        if status == JobStatus.queued.value and first is not None:
            oldest = first if oldest is None else min(oldest, first)
    running: dict[str, int] = defaultdict(int)
    stages: dict[tuple[str, str], int] = defaultdict(int)
    by_worker = select(Job.worker, Job.kind, Job.stage, func.count()).where(Job.status == JobStatus.running.value)
    for worker, kind, stage, count in session.execute(by_worker.group_by(Job.worker, Job.kind, Job.stage)):
        running[(worker or "").split(":", 1)[0]] += int(count)
        stages[(kind, stage_class(stage))] += int(count)
    durations: dict[str, list[float]] = {}
    for kind in JobKind:
        recent = (
            select(Job.started_at, Job.finished_at)
            .where(Job.status == JobStatus.succeeded.value, Job.kind == kind.value)
            .where(Job.started_at.is_not(None), Job.finished_at.is_not(None))
            .order_by(Job.created_at.desc())
            .limit(DURATION_WINDOW)
        )
        durations[kind.value] = [
            (end - start).total_seconds() for start, end in session.execute(recent) if start is not None and end
        ]
    age = 0.0 if oldest is None else max(0.0, (utcnow() - oldest).total_seconds())
    return JobSnapshot(
        counts=counts, oldest_queued_s=age, running_by_host=dict(running), durations=durations,
        running_by_stage=dict(stages),
    )  # fmt: skip


def stage_class(stage: str | None) -> str:
    """The first word of a job's stage (``training epoch 3/40`` → ``training``), ``none`` when unset."""
    words = (stage or "").split()
    return words[0].lower()[:32] if words else "none"


def read_stored_bytes(session: Session) -> dict[tuple[str, str], int]:
    """Bytes of stored volumes and models per (owner, what): ``''`` is the owner of rows made without a key."""
    return {(owner or "", what): total for (owner, what), total in stored_bytes(session).items()}


class StoreCollector(Collector):
    """Gauges read from the database (and the broker, when one is configured) at each scrape."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering the collector must not query the database."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The job, storage and broker gauges; a database error propagates (the route answers 503)."""
        with self.sessions() as session:
            snapshot = read_jobs(session)
            stored = read_stored_bytes(session)
            workers = alive_workers(session, self.settings.heartbeat_s)
        yield from job_families(snapshot)
        yield from worker_families(workers)
        bytes_family = GaugeMetricFamily(
            "embedseg_stored_bytes", "Bytes of stored volumes and models per owner ('' without a key)",
            labels=["owner", "what"],
        )  # fmt: skip
        for (owner, what), total in sorted(stored.items()):
            bytes_family.add_metric([owner, what], total)
        yield bytes_family
        yield from self._broker_families(workers)

    def _broker_families(self, workers: Sequence[WorkerProcess]) -> Iterable[Metric]:
        if self.settings.broker_url is None:
            return  # the embedded default: the database is the queue (embedseg_jobs{status="queued"})
        import redis

        queues = self.settings.job_queues
        serving = GaugeMetricFamily(
            "embedseg_queue_workers_alive", "Alive worker processes consuming each broker queue jobs may name "
            "(0: its jobs wait)", labels=["queue"],
        )  # fmt: skip
        for queue in queues:
            serving.add_metric([queue], sum(queue in (worker.queues or "").split(",") for worker in workers))
        yield serving
        up = GaugeMetricFamily("embedseg_broker_up", "1 when the broker queues could be read at this scrape")
        try:
            lengths = queue_lengths(self.settings, queues, BROKER_TIMEOUT_S)
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        waiting = GaugeMetricFamily(
            "embedseg_broker_queue_length", "Task messages waiting in each broker queue jobs may name", labels=["queue"]
        )
        for queue, length in lengths.items():
            waiting.add_metric([queue], length)
        yield waiting


def job_families(snapshot: JobSnapshot) -> Iterable[Metric]:
    """Prometheus families of a :class:`JobSnapshot` (every status and kind listed, zeros included)."""
    jobs = GaugeMetricFamily("embedseg_jobs", "Jobs by status and kind", labels=["status", "kind"])
    for status in JobStatus:
        for kind in JobKind:
            jobs.add_metric([status.value, kind.value], snapshot.counts.get((status.value, kind.value), 0))
    yield jobs
    yield GaugeMetricFamily(
        "embedseg_queued_job_oldest_age_seconds", "Seconds the oldest queued job has waited (0: none queued)",
        value=snapshot.oldest_queued_s,
    )  # fmt: skip
    running = GaugeMetricFamily("embedseg_running_jobs", "Running jobs per worker host", labels=["host"])
    for host, count in sorted(snapshot.running_by_host.items()):
        running.add_metric([host], count)
    yield running
    quantiles = GaugeMetricFamily(
        "embedseg_job_duration_recent_seconds",
        f"Quantiles of the run time of the last {DURATION_WINDOW} succeeded jobs of each kind",
        labels=["kind", "quantile"],
    )
    window = GaugeMetricFamily(
        "embedseg_job_duration_recent_jobs", "Succeeded jobs behind embedseg_job_duration_recent_seconds",
        labels=["kind"],
    )  # fmt: skip
    for name, values in snapshot.durations.items():
        window.add_metric([name], len(values))
        for q in QUANTILES if values else ():
            quantiles.add_metric([name, f"{q:g}"], quantile(values, q))
    yield quantiles
    yield window
    by_stage = GaugeMetricFamily(
        "embedseg_running_jobs_by_stage", "Running jobs by kind and stage (the first word of the job's stage)",
        labels=["kind", "stage"],
    )  # fmt: skip
    for (kind, stage), count in sorted(snapshot.running_by_stage.items()):
        by_stage.add_metric([kind, stage], count)
    yield by_stage


def worker_families(workers: Sequence[WorkerProcess]) -> Iterable[Metric]:
    """Alive worker processes per host and device, and the GPU memory each one holds."""
    alive = GaugeMetricFamily(
        "embedseg_workers_alive", "Worker processes alive (beat within the last 3 heartbeat periods) per host "
        "and device ('none' before a process's first job)", labels=["host", "device"],
    )  # fmt: skip
    held = GaugeMetricFamily(
        "embedseg_worker_gpu_memory_bytes", "GPU memory held by a worker process's torch allocator",
        labels=["worker", "device"],
    )  # fmt: skip
    total = GaugeMetricFamily(
        "embedseg_worker_gpu_memory_total_bytes", "Memory of the GPU a worker process uses", labels=["worker", "device"]
    )
    per_host: dict[tuple[str, str], int] = defaultdict(int)
    for worker in workers:
        device = worker.device or "none"
        per_host[(worker.host, device)] += 1
        if worker.gpu_memory_bytes is not None:
            held.add_metric([worker.name, device], worker.gpu_memory_bytes)
        if worker.gpu_memory_total_bytes is not None:
            total.add_metric([worker.name, device], worker.gpu_memory_total_bytes)
    for (host, device), count in sorted(per_host.items()):
        alive.add_metric([host, device], count)
    yield alive
    yield held
    yield total


@dataclass
class AppMetrics:
    """An app's metrics: its own registry, and the HTTP request metrics recorded in it."""

    registry: CollectorRegistry
    http: HttpMetrics


def install_metrics(app: FastAPI, settings: Settings) -> AppMetrics:
    """Give ``app`` its registry (``app.state.metrics``) with the scrape-time store collector, and record its
    HTTP requests. Call after every other middleware is added, so that refused requests are counted too."""
    registry = CollectorRegistry(auto_describe=False)
    metrics = AppMetrics(registry=registry, http=HttpMetrics(registry))
    registry.register(StoreCollector(app.state.sessionmaker, settings))
    app.state.metrics = metrics
    app.add_middleware(RequestMetrics, metrics=metrics.http)
    return metrics
