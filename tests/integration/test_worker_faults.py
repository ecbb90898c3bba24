"""Jobs survive their workers and the broker: real Redis, real PostgreSQL and ``embedseg worker`` processes.

The API runs in-process (test client); the workers are separate processes started with the
``embedseg worker`` command (Celery prefork pool, as in the compose file), each on a database
schema and a queue of the test's own. Checked:

- SIGTERM (``docker compose stop``) mid-train: the job goes back to the queue; the next worker
  resumes from the last stored checkpoint (epoch > 0); then ``kill -9`` of that worker mid-train:
  a third worker takes the job over once the heartbeat is stale and resumes again. The job
  succeeds once, and its one model file is the registered one.
- ``kill -9`` mid-predict: another worker reruns the job; each labels volume exists once, with the
  sha256 of its row, and nothing of the killed attempt is left.
- a Redis restart without persistence (``shutdown nosave``) with jobs queued: ``/ready`` reports
  the queued jobs the broker lost, a worker's reconciler sends them again and all complete; the
  worker and the API reconnect after a second restart. This uses a private ``redis-server`` on a
  free port, never the shared one.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from helpers import (
    API,
    production_settings,
    register_tiny_model,
    service_missing,
    tiff_bytes,
    upload,
    worker_processes,
)

from embedseg_service.api.app import create_app
from embedseg_service.core.data.synthetic import random_labels, render_image
from embedseg_service.records.jobs import registered_keys
from embedseg_service.records.orm import Model, Volume
from embedseg_service.records.settings import Settings
from embedseg_service.records.storage import TEMP_DIR, LocalStorage

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

FAST = {"heartbeat_s": 0.5, "progress_throttle_s": 0.2, "requeue_after_s": 2.0}
"""A lost worker's job is taken over after 4 heartbeats (2 s); a queued job without a message is sent
again after 2 s."""
WAIT_S = 240.0


# --------------------------------------------------------------------------- the stack


@pytest.fixture
def settings(services: None, tmp_path: Path) -> Iterator[Settings]:  # noqa: ARG001 - services checked first
    with production_settings(tmp_path, prefix="faults") as values:
        yield values.model_copy(update=FAST)


@contextmanager
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings, migrate=False)) as client:
        yield client


def wait_for(client: TestClient, job_id: str, done: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        body = client.get(f"{API}/jobs/{job_id}").json()
        if done(body):
            return body
        assert body["status"] not in ("failed", "cancelled"), body
        assert time.monotonic() < deadline, f"job {job_id}: {what} did not happen: {body}"
        time.sleep(0.2)


def succeeded(body: dict[str, Any]) -> bool:
    return body["status"] == "succeeded"


def training_data(client: TestClient) -> tuple[str, str]:
    """A generated 64 x 64 image of 4 objects and its labels, uploaded: (image id, mask id)."""
    labels = random_labels((64, 64), 4, radius=(4.0, 7.0), seed=1).astype(np.uint16)
    image = (render_image(labels, seed=1) * 1000).clip(0, None).astype(np.uint16)
    ids = []
    for data, kind in ((image, "image"), (labels, "labels")):
        response = upload(client, tiff_bytes(data), kind=kind)
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids[0], ids[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_only_registered_files(settings: Settings, client: TestClient, job_id: str) -> list[Any]:
    """The job's folder holds exactly its registered outputs (one file each, sha256 of its volume row, and
    the object tables its result lists), and no temporary file is left in the store; returns the output rows.

    The worker removes the other files right after it marks the job succeeded: call this while it runs.
    """
    storage = LocalStorage(settings.storage_path)
    with client.app.state.sessionmaker() as session:
        rows = [
            *session.scalars(sa.select(Volume).where(Volume.source_job_id == job_id)),
            *session.scalars(sa.select(Model).where(Model.source_job_id == job_id)),
        ]
        registered = sorted(registered_keys(session, [job_id])[job_id])  # the rows' files and the object tables
    assert rows
    assert {row.storage_key for row in rows} <= set(registered)
    deadline = time.monotonic() + 30
    while storage.list_keys(f"jobs/{job_id}") != registered and time.monotonic() < deadline:
        time.sleep(0.2)
    assert storage.list_keys(f"jobs/{job_id}") == registered
    for row in rows:
        path = storage.path_for(row.storage_key)
        assert path.stat().st_size == row.size_bytes
        if isinstance(row, Volume):
            assert sha256(path) == row.sha256
    assert list((storage.root / TEMP_DIR).glob("*")) == []
    return rows


# --------------------------------------------------------------------------- train: SIGTERM, then kill -9


def test_train_job_survives_sigterm_and_kill_9_resuming_from_its_checkpoint(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(settings.storage_path)
    with api(settings) as client, worker_processes(settings, tmp_path) as start:
        image, mask = training_data(client)
        first = start("w1")
        response = client.post(
            f"{API}/jobs/train",
            json={
                "image_ids": [image],
                "mask_ids": [mask],
                "epochs": 4,
                "crop_size": 32,
                "batch_size": 1,
                "max_time_minutes": 30,
                "name": "survivor",
            },
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        # SIGTERM once the first epoch's state is stored: the job stops at its next step, back to the queue
        wait_for(client, job_id, lambda _: storage.exists(f"jobs/{job_id}/a1/last.pt"), "a stored checkpoint")
        first.sigterm()
        assert first.process.wait(120) == 0, first.text()[-3000:]
        body = client.get(f"{API}/jobs/{job_id}").json()
        assert (body["status"], body["stage"], body["attempts"], body["worker"]) == ("queued", "requeued", 1, None)
        log = first.text()  # the job stopped at a step and its task sent it again; the pool process was not killed
        assert f"job {job_id} interrupted by a worker shutdown; requeued" in log and f"job {job_id}: requeued" in log
        assert "WorkerLostError" not in log

        # the next worker resumes from that state
        second = start("w2")
        body = wait_for(
            client,
            job_id,
            lambda b: (
                b["attempts"] == 2
                and (b["metrics"] or {}).get("resumed_from_epoch", 0) >= 1
                and storage.exists(f"jobs/{job_id}/a2/last.pt")
            ),
            "a resumed epoch",
        )
        assert body["status"] == "running"

        # kill -9 mid-train: a third worker takes the job over after the stale heartbeat and resumes again
        second.kill9()
        start("w3")
        body = wait_for(client, job_id, succeeded, "success")
        (model,) = assert_only_registered_files(settings, client, job_id)
    assert body["attempts"] == 3 and body["metrics"]["resumed_from_epoch"] >= 2
    assert body["metrics"]["epochs_completed"] == 4
    assert model.id == body["result"]["model_id"] and model.storage_key == f"jobs/{job_id}/a3/model.pt"
    assert model.metrics["history"][0]["epoch"] == 1  # the history of the first attempt was carried over


# --------------------------------------------------------------------------- predict: kill -9


def test_predict_job_survives_kill_9_and_registers_each_output_once(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    storage = LocalStorage(settings.storage_path)
    with api(settings) as client, worker_processes(settings, tmp_path) as start:
        model_id = register_tiny_model(client, settings, tmp_path)
        volumes = []
        for seed in range(8):
            image = (render_image(random_labels((128, 128), 8, seed=seed), seed=seed) * 1000).clip(0, None)
            volumes.append(upload(client, tiff_bytes(image.astype(np.uint16))).json()["id"])
        first = start("w1")
        response = client.post(
            f"{API}/jobs/predict", json={"model_id": model_id, "volume_ids": volumes, "tta": True, "tile": [32, 32]}
        )
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        body = wait_for(client, job_id, lambda _: len(storage.list_keys(f"jobs/{job_id}/a1")) >= 1, "a first output")
        first.kill9()
        assert body["status"] == "running" and body["attempts"] == 1
        start("w2")
        body = wait_for(client, job_id, succeeded, "success")
        outputs = assert_only_registered_files(settings, client, job_id)
        for row in outputs:
            download = client.get(f"{API}/volumes/{row.id}/download")
            assert download.status_code == 200 and hashlib.sha256(download.content).hexdigest() == row.sha256
    assert body["attempts"] == 2
    assert sorted(row.id for row in outputs) == sorted(body["result"]["label_volume_ids"])
    assert sorted(row.image_volume_id for row in outputs) == sorted(volumes)
    assert all(row.storage_key.startswith(f"jobs/{job_id}/a2/") for row in outputs)


# --------------------------------------------------------------------------- Redis restart


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` of this test on a free port, without persistence."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.launch()

    def launch(self) -> None:
        import redis

        self.processes.append(
            subprocess.Popen(
                [self.server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=subprocess.DEVNULL,
            )
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=1).ping()
                return
            except redis.RedisError:
                assert time.monotonic() < deadline, "the private redis-server did not start"
                time.sleep(0.1)

    def restart(self) -> None:
        """``shutdown nosave`` (every queued message is lost), then start again on the same port."""
        import redis

        try:
            redis.Redis(port=self.port).shutdown(nosave=True)
        except redis.ConnectionError:  # the server closes the connection as it stops
            pass
        self.processes[-1].wait(30)
        self.launch()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(30)


@contextmanager
def private_redis() -> Iterator[PrivateRedis]:
    """A :class:`PrivateRedis`, stopped on exit whatever happened (the shared Redis is never touched)."""
    server = shutil.which("redis-server")
    if server is None:
        service_missing("redis-server is not installed")
    redis_server = PrivateRedis(str(server))
    try:
        yield redis_server
    finally:
        redis_server.stop()


def test_jobs_queued_when_redis_restarts_all_complete(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    labels = random_labels((48, 48), 3, seed=2).astype(np.uint16)
    with private_redis() as broker:
        settings = settings.model_copy(update={"broker_url": broker.url})
        with api(settings) as client, worker_processes(settings, tmp_path) as start:
            volume = upload(client, tiff_bytes(labels), kind="labels").json()["id"]
            spec = {"pairs": [{"gt_id": volume, "pred_id": volume}]}
            queued = [client.post(f"{API}/jobs/evaluate", json=spec).json()["id"] for _ in range(3)]
            assert client.get(f"{API}/ready").status_code == 200
            broker.restart()  # the three messages are gone; their rows stay queued
            time.sleep(settings.requeue_after_s + 0.5)
            ready = client.get(f"{API}/ready")
            assert ready.status_code == 503
            assert ready.json()["detail"] == (
                f"3 queued job(s) (oldest {queued[0]}) waited more than 2 s (EMBEDSEG_REQUEUE_AFTER_S) with no "
                f"message in the broker queue {settings.gpu_queue!r}: the queue and the database disagree; a "
                "running worker sends them again within 0.5 s, so start a worker ('embedseg worker') if none runs"
            )
            start("w1")
            for job_id in queued:
                assert wait_for(client, job_id, succeeded, "success")["attempts"] == 1
            assert client.get(f"{API}/ready").status_code == 200

            broker.restart()  # the worker and the API's producer reconnect
            later = [client.post(f"{API}/jobs/evaluate", json=spec) for _ in range(2)]
            assert [response.status_code for response in later] == [202, 202], [r.text for r in later]
            for response in later:
                wait_for(client, response.json()["id"], succeeded, "success")


# --------------------------------------------------------------------------- presence


def listed_workers(client: TestClient, count: int) -> list[dict[str, Any]]:
    """``GET /workers`` once it lists ``count`` processes (within :data:`WAIT_S`)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        workers = client.get(f"{API}/workers").json()
        if len(workers) == count:
            return workers
        assert time.monotonic() < deadline, f"expected {count} workers, got {workers}"
        time.sleep(0.1)


def test_pool_processes_report_themselves_and_leave_when_stopped(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client.parser import text_string_to_metric_families

    with api(settings) as client, worker_processes(settings, tmp_path) as start:
        first = start("presence-a")
        (seen,) = listed_workers(client, 1)
        # the prefork pool process runs the jobs, so it is the one listed, under the name jobs record
        assert seen["host"] == socket.gethostname() and seen["pid"] != first.process.pid
        assert seen["name"] == f"{seen['host']}:{seen['pid']}"
        assert (seen["queues"], seen["device"], seen["gpu_memory_bytes"]) == (settings.gpu_queue, None, None)
        second = start("presence-b")
        names = {worker["name"] for worker in listed_workers(client, 2)}
        text = client.get("/metrics").text
        alive = {
            (sample.labels["host"], sample.labels["device"]): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "embedseg_workers_alive"
        }
        assert alive == {(socket.gethostname(), "none"): 2}

        second.kill9()  # no goodbye: it stops counting after 3 heartbeat periods, its row stays
        (left,) = listed_workers(client, 1)
        assert left["name"] == seen["name"]
        first.sigterm()  # a clean stop removes the pool process's row at once
        first.process.wait(60)
        engine = sa.create_engine(str(settings.database_url))
        with engine.connect() as connection:
            rows = {name for (name,) in connection.execute(sa.text("SELECT name FROM workers"))}
        engine.dispose()
        assert rows == names - {seen["name"]}
