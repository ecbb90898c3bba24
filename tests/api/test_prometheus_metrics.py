"""``GET /metrics`` on SQLite and PostgreSQL: the gauges equal the rows in the database, HTTP requests are
counted by route template (never an id in a label), only an admin key may scrape once keys exist, and
each app has its own registry."""

from __future__ import annotations

import re
import uuid
import warnings
from datetime import timedelta
from typing import Any

import pytest
from helpers import API, service_missing
from prometheus_client.parser import text_string_to_metric_families

from embedseg_service.api.app import create_app
from embedseg_service.api.metrics import quantile
from embedseg_service.records import keys
from embedseg_service.records.broker import queue_keys
from embedseg_service.records.orm import Job, JobKind, JobStatus, Model, Volume, WorkerProcess, utcnow
from embedseg_service.records.workers import Beat, prune_workers, record_beat

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: Any, headers: dict[str, str] | None = None) -> Samples:
    """Every sample of ``/metrics``, keyed by (sample name, labels), parsed by prometheus-client."""
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def job(status: JobStatus, kind: JobKind, *, age_s: float = 0.0, run_s: float | None = None,
        worker: str | None = None) -> Job:  # fmt: skip
    created = utcnow() - timedelta(seconds=age_s)
    started = None if run_s is None else created + timedelta(seconds=1)
    finished = None if run_s is None or started is None else started + timedelta(seconds=run_s)
    return Job(kind=kind.value, status=status.value, spec={}, worker=worker, created_at=created,
               started_at=started, finished_at=finished)  # fmt: skip


def test_job_gauges_equal_the_rows(client: Any, session: Any) -> None:
    session.add_all([job(JobStatus.queued, JobKind.train, age_s=age) for age in (100.0, 50.0, 10.0)])
    session.add_all([
        job(JobStatus.running, JobKind.predict, worker="gpu-a:12"),
        job(JobStatus.running, JobKind.predict, worker="gpu-a:13"),
        job(JobStatus.running, JobKind.train, worker="gpu-b:7"),
        job(JobStatus.failed, JobKind.evaluate, run_s=3.0),
    ])  # fmt: skip
    durations = [10.0 * step for step in range(1, 11)]
    session.add_all([job(JobStatus.succeeded, JobKind.predict, age_s=500.0 + d, run_s=d) for d in durations])
    session.commit()

    samples = scrape(client)

    expected = {(JobStatus.queued, JobKind.train): 3, (JobStatus.running, JobKind.predict): 2,
                (JobStatus.running, JobKind.train): 1, (JobStatus.failed, JobKind.evaluate): 1,
                (JobStatus.succeeded, JobKind.predict): 10}  # fmt: skip
    for status in JobStatus:
        for kind in JobKind:
            got = value(samples, "embedseg_jobs", status=status.value, kind=kind.value)
            assert got == expected.get((status, kind), 0), (status, kind, got)
    oldest = value(samples, "embedseg_queued_job_oldest_age_seconds")
    assert oldest is not None and 100.0 <= oldest < 160.0
    assert value(samples, "embedseg_running_jobs", host="gpu-a") == 2
    assert value(samples, "embedseg_running_jobs", host="gpu-b") == 1
    assert value(samples, "embedseg_job_duration_recent_seconds", kind="predict", quantile="0.5") == pytest.approx(55)
    assert value(samples, "embedseg_job_duration_recent_seconds", kind="predict", quantile="0.95") == pytest.approx(
        95.5
    )
    assert value(samples, "embedseg_job_duration_recent_jobs", kind="predict") == 10
    assert value(samples, "embedseg_job_duration_recent_jobs", kind="train") == 0
    train_quantiles = [
        key for key in samples if key[0] == "embedseg_job_duration_recent_seconds" and ("kind", "train") in key[1]
    ]
    assert not train_quantiles  # no succeeded train job: no quantile
    assert not [key for key in samples if key[0].startswith("embedseg_broker")]  # embedded default: no broker


def test_no_queued_job_is_age_zero(client: Any) -> None:
    samples = scrape(client)
    assert value(samples, "embedseg_queued_job_oldest_age_seconds") == 0
    assert value(samples, "embedseg_jobs", status="queued", kind="train") == 0


def test_stored_bytes_per_owner(client: Any, session: Any) -> None:
    def volume(owner: str | None, size: int) -> Volume:
        return Volume(owner=owner, name="v", sha256="0" * 64, shape=[8, 8], dtype="uint8", axes="YX",
                      size_bytes=size, storage_key=f"volumes/{uuid.uuid4()}.tif")  # fmt: skip

    def model(owner: str | None, size: int) -> Model:
        return Model(owner=owner, name="m", spatial_dims=2, config={}, size_bytes=size,
                     storage_key=f"models/{uuid.uuid4()}.pt")  # fmt: skip

    session.add_all([volume("lab-a", 100), volume("lab-a", 23), volume(None, 7)])
    session.add_all([model("lab-a", 1000), model("lab-b", 5)])
    session.commit()
    samples = scrape(client)
    assert value(samples, "embedseg_stored_bytes", owner="lab-a", what="volumes") == 123
    assert value(samples, "embedseg_stored_bytes", owner="lab-a", what="models") == 1000
    assert value(samples, "embedseg_stored_bytes", owner="lab-b", what="models") == 5
    assert value(samples, "embedseg_stored_bytes", owner="", what="volumes") == 7
    assert value(samples, "embedseg_stored_bytes", owner="lab-b", what="volumes") is None


def test_worker_gauges_and_the_worker_list_equal_the_rows(client: Any, session: Any, settings: Any) -> None:
    now = utcnow()
    stale = now - timedelta(seconds=3 * settings.heartbeat_s + 1)
    session.add_all([
        WorkerProcess(name="gpu-a:12", host="gpu-a", pid=12, queues="gpu", device="cuda:0",
                      gpu_memory_bytes=2048, gpu_memory_total_bytes=8192, started_at=now, seen_at=now),
        WorkerProcess(name="gpu-a:13", host="gpu-a", pid=13, queues="gpu", device="cuda:1",
                      gpu_memory_bytes=0, gpu_memory_total_bytes=8192, started_at=now, seen_at=now),
        WorkerProcess(name="cpu-b:7", host="cpu-b", pid=7, queues="gpu,cpu", started_at=now, seen_at=now),
        WorkerProcess(name="gone:1", host="gone", pid=1, device="cpu", started_at=stale, seen_at=stale),
    ])  # fmt: skip
    session.add_all([
        job(JobStatus.running, JobKind.train, worker="gpu-a:12"),
        job(JobStatus.running, JobKind.predict, worker="gpu-a:13"),
        job(JobStatus.running, JobKind.predict, worker="cpu-b:7"),
    ])  # fmt: skip
    session.commit()
    stages = dict(zip(("training epoch 3/40", "predicting volume 1/2", None), session.query(Job).all(), strict=True))
    for stage, row in stages.items():
        row.stage = stage
    session.commit()

    samples = scrape(client)
    assert value(samples, "embedseg_workers_alive", host="gpu-a", device="cuda:0") == 1
    assert value(samples, "embedseg_workers_alive", host="gpu-a", device="cuda:1") == 1
    assert value(samples, "embedseg_workers_alive", host="cpu-b", device="none") == 1
    assert value(samples, "embedseg_workers_alive", host="gone", device="cpu") is None
    assert value(samples, "embedseg_worker_gpu_memory_bytes", worker="gpu-a:12", device="cuda:0") == 2048
    assert value(samples, "embedseg_worker_gpu_memory_total_bytes", worker="gpu-a:13", device="cuda:1") == 8192
    assert value(samples, "embedseg_worker_gpu_memory_bytes", worker="cpu-b:7", device="none") is None
    assert value(samples, "embedseg_running_jobs_by_stage", kind="train", stage="training") == 1
    assert value(samples, "embedseg_running_jobs_by_stage", kind="predict", stage="predicting") == 1
    assert value(samples, "embedseg_running_jobs_by_stage", kind="predict", stage="none") == 1

    listed = client.get(f"{API}/workers").json()
    assert [(w["name"], w["device"], w["gpu_memory_bytes"]) for w in listed] == [
        ("cpu-b:7", None, None), ("gpu-a:12", "cuda:0", 2048), ("gpu-a:13", "cuda:1", 0),
    ]  # fmt: skip
    running = {w["name"]: w["running_job_ids"] for w in listed}
    assert [len(ids) for ids in running.values()] == [1, 1, 1]
    assert session.get(Job, running["gpu-a:12"][0]).kind == "train"


def test_workers_not_seen_for_a_day_are_pruned(session: Any) -> None:
    now = utcnow()
    old = now - timedelta(days=1, seconds=1)
    session.add_all([
        WorkerProcess(name="old:1", host="old", pid=1, started_at=old, seen_at=old),
        WorkerProcess(name="new:2", host="new", pid=2, started_at=now, seen_at=now),
    ])  # fmt: skip
    session.commit()
    assert prune_workers(session) == 1
    assert [row.name for row in session.query(WorkerProcess).all()] == ["new:2"]
    record_beat(session, Beat(name="new:2", host="new", pid=2, device="cuda:0", gpu_memory_bytes=5))
    record_beat(session, Beat(name="new:2", host="new", pid=2))  # a beat without a device keeps the known one
    session.expire_all()
    row = session.get(WorkerProcess, "new:2")
    assert (row.device, row.gpu_memory_bytes, row.seen_at >= now) == ("cuda:0", None, True)


def test_a_process_reports_no_device_until_it_uses_one() -> None:
    import torch  # noqa: F401 - imported, CUDA never initialised in the test process

    from embedseg_service.worker.presence import device_use

    assert device_use() == ("cpu", None, None)


def test_once_keys_exist_only_an_admin_key_scrapes(client: Any, session: Any) -> None:
    owner = keys.create_key(session, "lab-a").secret
    admin = keys.create_key(session, "core-facility", admin=True).secret

    response = client.get("/metrics")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "requires an API key" in response.json()["detail"]
    response = client.get("/metrics", headers={"Authorization": "Bearer esk_" + "x" * 43})
    assert response.status_code == 401 and "not valid" in response.json()["detail"]
    response = client.get("/metrics", headers={"Authorization": f"Bearer {owner}"})
    assert response.status_code == 403
    assert response.json() == {
        "detail": "metrics need an admin API key (embedseg keys create --owner NAME --admin); this key is an owner's"
    }
    samples = scrape(client, {"Authorization": f"Bearer {admin}"})
    assert value(samples, "embedseg_jobs", status="queued", kind="train") == 0


def test_requests_are_counted_by_route_template_without_ids(client: Any, session: Any) -> None:
    row = job(JobStatus.queued, JobKind.train)
    session.add(row)
    session.commit()
    template = "/api/v1/jobs/{job_id}"
    before = value(scrape(client), "embedseg_http_requests_total", method="GET", route=template, status="2xx") or 0
    for _ in range(2):
        assert client.get(f"/api/v1/jobs/{row.id}").status_code == 200
    assert client.get(f"/api/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert client.get(f"/api/v1/no-such-route/{uuid.uuid4()}").status_code == 404

    response = client.get("/metrics")
    samples = scrape(client)
    assert value(samples, "embedseg_http_requests_total", method="GET", route=template, status="2xx") == before + 2
    assert value(samples, "embedseg_http_requests_total", method="GET", route=template, status="4xx") == 1
    assert value(samples, "embedseg_http_requests_total", method="GET", route="unmatched", status="4xx") == 1
    # the scrape being answered is counted once it ends: two earlier scrapes
    assert value(samples, "embedseg_http_requests_total", method="GET", route="/metrics", status="2xx") == 2
    assert value(samples, "embedseg_http_request_duration_seconds_count", method="GET", route=template) == 3
    labels = [label for _, pairs in samples for _, label in pairs]
    assert not [label for label in labels if UUID.search(label)]
    assert row.id not in response.text


def test_each_app_has_its_own_registry(client: Any, settings: Any) -> None:
    client.get("/api/v1/health")
    other = create_app(settings, migrate=False)
    with TestClient(other) as other_client:
        samples = scrape(other_client)
    assert value(samples, "embedseg_http_requests_total", method="GET", route="/api/v1/health", status="2xx") is None
    assert value(scrape(client), "embedseg_http_requests_total", method="GET", route="/api/v1/health",
                 status="2xx") == 1  # fmt: skip


def test_metrics_stay_out_of_the_openapi_schema(app: Any) -> None:
    assert not [path for path in app.openapi()["paths"] if "metrics" in path]


def test_an_unreachable_broker_is_reported_not_raised(settings: Any) -> None:
    app = create_app(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}), migrate=False)
    with TestClient(app) as client:
        samples = scrape(client)
    assert value(samples, "embedseg_broker_up") == 0
    assert not [key for key in samples if key[0] == "embedseg_broker_queue_length"]


@pytest.mark.redis
def test_broker_queue_length_counts_every_priority_list(settings: Any) -> None:
    import redis

    url = "redis://127.0.0.1:6379/0"
    queue = f"metrics-test-{uuid.uuid4().hex[:8]}"
    broker = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        broker.ping()
    except redis.RedisError:
        service_missing("Redis is not reachable at 127.0.0.1:6379")
    lists = queue_keys(queue)
    try:
        broker.rpush(lists[0], b"{}", b"{}")
        broker.rpush(lists[-1], b"{}")
        app = create_app(settings.model_copy(update={"broker_url": url, "gpu_queue": queue}), migrate=False)
        with TestClient(app) as client:
            samples = scrape(client)
    finally:
        broker.delete(*lists)
        broker.close()
    assert value(samples, "embedseg_broker_up") == 1
    assert value(samples, "embedseg_broker_queue_length", queue=queue) == 3


def test_quantile_interpolates_between_ranks() -> None:
    assert quantile([3.0], 0.95) == 3.0
    assert quantile([4.0, 1.0, 2.0, 3.0], 0.5) == 2.5
    assert quantile([10.0, 20.0], 0.95) == pytest.approx(19.5)
