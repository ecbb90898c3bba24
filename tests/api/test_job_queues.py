"""Job queues on SQLite and PostgreSQL: a job names one of the queues the server lists (422 otherwise), the row
and ``JobOut`` record it, the dispatcher gets it, and the embedded local worker runs the jobs of every queue."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from helpers import REDIS_URL, RecordingDispatcher, embedded_service, service_missing, tiff_bytes, upload, wait_job
from pydantic import ValidationError
from sqlalchemy import update

from embedseg_service.api.dispatch import CeleryDispatcher
from embedseg_service.records import jobs
from embedseg_service.records.broker import queue_keys, unsent_jobs, waiting_job_ids
from embedseg_service.records.orm import Job, JobKind, utcnow
from embedseg_service.records.settings import Settings
from embedseg_service.worker.reconcile import Reconciler

API = "/api/v1"
QUEUES = ["gpu", "gpu-large"]


@pytest.fixture
def labels(client) -> str:  # type: ignore[no-untyped-def]
    """A stored 2D label volume (an evaluate job compares it with itself)."""
    mask = np.zeros((32, 32), np.uint16)
    mask[4:12, 4:12] = 1
    response = upload(client, tiff_bytes(mask), kind="labels")
    assert response.status_code == 201, response.text
    return response.json()["id"]


def evaluate(client, labels: str, **fields):  # type: ignore[no-untyped-def]
    return client.post(f"{API}/jobs/evaluate", json={"pairs": [{"gt_id": labels, "pred_id": labels}], **fields})


def test_a_job_goes_to_the_queue_it_names_or_to_the_default_one(app, client, session, settings, labels) -> None:  # type: ignore[no-untyped-def]
    app.state.settings = settings.model_copy(update={"queues": QUEUES})
    dispatcher = app.state.dispatcher = RecordingDispatcher()
    default = evaluate(client, labels)
    large = evaluate(client, labels, queue="gpu-large")
    assert (default.status_code, large.status_code) == (202, 202), (default.text, large.text)
    bodies = [default.json(), large.json()]
    assert [(body["queue"], body["device"], body["spec"]["queue"]) for body in bodies] == [
        ("gpu", None, None), ("gpu-large", None, "gpu-large"),
    ]  # fmt: skip
    assert dispatcher.submitted == [body["id"] for body in bodies]
    assert dispatcher.queues == ["gpu", "gpu-large"]
    assert [session.get(Job, body["id"]).queue for body in bodies] == ["gpu", "gpu-large"]
    assert [job["queue"] for job in client.get(f"{API}/jobs").json()["items"]] == ["gpu-large", "gpu"]
    assert client.get(f"{API}/jobs/{bodies[1]['id']}").json()["queue"] == "gpu-large"


@pytest.mark.parametrize(
    ("queues", "queue", "detail"),
    [
        (
            QUEUES,
            "huge",
            "queue: 'huge' is not a queue of this server; use one of 'gpu', 'gpu-large' (EMBEDSEG_QUEUES)",
        ),
        ([], "gpu-large", "queue: 'gpu-large' is not a queue of this server; use one of 'gpu' (EMBEDSEG_QUEUES)"),
        (QUEUES, "gpu large", "queue: String should match pattern '^[A-Za-z0-9_.:-]{1,64}$'"),
        (QUEUES, "", "queue: String should have at least 1 character"),
    ],
)
def test_a_queue_the_server_does_not_list_answers_422(app, client, settings, labels, queues, queue, detail) -> None:  # type: ignore[no-untyped-def]
    app.state.settings = settings.model_copy(update={"queues": queues})
    dispatcher = app.state.dispatcher = RecordingDispatcher()
    response = evaluate(client, labels, queue=queue)
    assert response.status_code == 422, response.text
    assert response.json() == {"detail": detail}
    assert dispatcher.submitted == [] and client.get(f"{API}/jobs").json()["total"] == 0


def test_the_queues_setting_must_hold_the_default_queue(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, queues=["gpu-large", "gpu", "gpu-large"])
    assert settings.job_queues == ["gpu-large", "gpu"]
    assert Settings(_env_file=None, data_dir=tmp_path, gpu_queue="a100").job_queues == ["a100"]
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, data_dir=tmp_path, queues=["gpu-large"])
    assert "queues must include gpu_queue 'gpu', the queue of jobs that name none; got gpu-large" in str(refused.value)
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None, data_dir=tmp_path, queues=["gpu", "big gpu"])
    assert "queues: 'big gpu' must be 1-64 characters of letters, digits, '_', '.', ':' or '-'" in str(refused.value)


def test_the_embedded_local_worker_runs_the_jobs_of_every_queue(tmp_path: Path) -> None:
    mask = np.zeros((32, 32), np.uint16)
    mask[4:12, 4:12] = 1
    with embedded_service(tmp_path, queues=QUEUES) as client:
        volume = upload(client, tiff_bytes(mask), kind="labels").json()["id"]
        response = evaluate(client, volume, queue="gpu-large")
        assert response.status_code == 202, response.text
        body = wait_job(client, response.json()["id"], timeout=120)
    assert (body["status"], body["queue"], body["device"]) == ("succeeded", "gpu-large", "cpu")
    assert set(body["metrics"]["ap"]["ap"]) == {1.0}  # the volume against itself


@pytest.mark.redis
def test_the_reconciler_sends_each_job_again_to_its_own_queue(session, settings) -> None:  # type: ignore[no-untyped-def]
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        service_missing("Redis is not reachable at 127.0.0.1:6379")
    queue = f"gpu-test-{uuid.uuid4().hex[:8]}"
    large = f"{queue}-large"
    broker = settings.model_copy(
        update={"broker_url": REDIS_URL, "gpu_queue": queue, "queues": [queue, large], "requeue_after_s": 60.0}
    )
    lost = jobs.create_job(session, JobKind.evaluate, {}, queue=large).id  # its message was lost
    legacy = jobs.create_job(session, JobKind.evaluate, {}).id  # a row from before queues: the default queue
    stale = jobs.create_job(session, JobKind.evaluate, {}, queue=large).id  # its worker stopped beating
    assert jobs.claim(session, stale, "gone:1", device="cuda:0 (CUDA_VISIBLE_DEVICES=3)") == 1
    long_ago = utcnow() - timedelta(seconds=120)
    session.execute(update(Job).where(Job.id.in_([lost, legacy])).values(created_at=long_ago))
    session.execute(update(Job).where(Job.id == stale).values(heartbeat_at=long_ago))
    session.commit()
    dispatcher = CeleryDispatcher(broker)
    sent: list[tuple[str, str]] = []

    def send(job_id: str, to: str) -> None:
        sent.append((job_id, to))
        dispatcher.submit(job_id, to)

    try:
        done = Reconciler(broker, send).run_once()
        assert (done.requeued, sorted(done.resent)) == ([stale], sorted([lost, legacy]))
        assert sorted(sent) == sorted([(stale, large), (lost, large), (legacy, queue)])
        assert waiting_job_ids(broker, [large]) == {lost, stale}
        assert waiting_job_ids(broker, [queue]) == {legacy}
        assert waiting_job_ids(broker) == {lost, stale, legacy}  # every queue jobs may name
        assert unsent_jobs(session, broker) == []
        row = session.get(Job, stale, populate_existing=True)
        assert (row.status, row.queue, row.device) == ("queued", large, "cuda:0 (CUDA_VISIBLE_DEVICES=3)")
    finally:
        dispatcher.close()
        client.delete(*queue_keys(queue), *queue_keys(large))
        client.close()
