"""``embedseg worker --gpus 0,1`` and job queues: real Redis, real PostgreSQL, real worker processes.

This host has no GPU, so the two children pinned to GPUs 0 and 1 (``CUDA_VISIBLE_DEVICES``) find none
and run their jobs on the CPU; nvidia-smi is left off the workers' PATH so that the list is taken as
given on any host. Checked:

- the parent starts one child per GPU, each with its GPU in its environment and a node name of its own;
  both take jobs from the one queue; every job row names the process that ran it (two distinct ones)
  and its device; a child killed outright is started again;
- a job sent to a queue no worker consumes stays queued, counted in that queue's broker length with no
  worker serving it, while the jobs of the served queue run;
- SIGTERM to the parent stops the children gracefully: the job one of them runs goes back to the queue
  and is sent again, and the parent exits 0.
"""

from __future__ import annotations

import os
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import (
    API,
    production_settings,
    register_tiny_model,
    tiff_bytes,
    upload,
    wait_job,
    worker_processes,
)

from embedseg_service.api.app import create_app
from embedseg_service.core.data.synthetic import random_labels, render_image
from embedseg_service.records.broker import queue_keys, waiting_job_ids
from embedseg_service.records.settings import Settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

FAST = {"heartbeat_s": 0.5, "progress_throttle_s": 0.2, "requeue_after_s": 2.0}
GPUS = ["--gpus", "0,1"]


@pytest.fixture
def settings(services: None, tmp_path: Path) -> Iterator[Settings]:  # noqa: ARG001 - services checked first
    """The production settings with a second queue, ``<gpu queue>-large``, that no worker of these tests consumes."""
    import redis

    with production_settings(tmp_path, prefix="gpus") as values:
        large = f"{values.gpu_queue}-large"
        try:
            yield values.model_copy(update={**FAST, "queues": [values.gpu_queue, large]})
        finally:
            redis.Redis.from_url(str(values.broker_url)).delete(*queue_keys(large))


def without_nvidia_smi() -> dict[str, str]:
    """The workers' PATH without nvidia-smi: ``--gpus 0,1`` is then taken as given."""
    folders = os.environ.get("PATH", "").split(os.pathsep)
    return {"PATH": os.pathsep.join(f for f in folders if f and not (Path(f) / "nvidia-smi").exists())}


def expected_device(gpu: int) -> str:
    """What ``jobs.device`` says for the child of ``gpu`` (``cpu`` where that GPU does not exist)."""
    import torch

    return f"cuda:0 (CUDA_VISIBLE_DEVICES={gpu})" if gpu < torch.cuda.device_count() else "cpu"


def environment_of(pid: int) -> dict[str, str]:
    """The environment a process started with (Linux ``/proc``)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def parent_of(pid: int) -> int:
    """The parent process id of ``pid`` (Linux ``/proc``; the field after the parenthesised name)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def images(client: TestClient, count: int, size: int = 96) -> list[str]:
    """``count`` generated images, uploaded; their ids."""
    ids = []
    for seed in range(count):
        image = (render_image(random_labels((size, size), 6, seed=seed), seed=seed) * 1000).clip(0, None)
        response = upload(client, tiff_bytes(image.astype(np.uint16)))
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


def predict(client: TestClient, model_id: str, volumes: list[str], **fields: Any) -> str:
    response = client.post(
        f"{API}/jobs/predict", json={"model_id": model_id, "volume_ids": volumes, "tile": [32, 32], **fields}
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def scrape(client: TestClient, name: str) -> dict[str, float]:
    """``queue label -> value`` of the metric ``name`` at one scrape of ``/metrics``."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples]
    return {sample.labels["queue"]: sample.value for sample in samples if sample.name == name}


def test_one_worker_per_gpu_share_the_queue_and_a_job_of_an_unserved_queue_waits(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    queue, large = settings.queues
    with TestClient(create_app(settings, migrate=False)) as client, worker_processes(settings, tmp_path) as start:
        model_id = register_tiny_model(client, settings, tmp_path)
        volumes = images(client, 2)
        waiting = predict(client, model_id, volumes[:1], queue=large)
        parent = start("gpus", args=GPUS, env=without_nvidia_smi(), nodes=2)
        assert "gpus-gpu0@" in parent.text() and "gpus-gpu1@" in parent.text()  # a Celery node each
        job_ids = [predict(client, model_id, volumes, tta=True) for _ in range(4)]
        bodies = [wait_job(client, job_id, timeout=120) for job_id in job_ids]
        assert [body["status"] for body in bodies] == ["succeeded"] * 4, bodies
        assert {body["queue"] for body in bodies} == {queue}

        # two processes ran the jobs: the pool processes of the two children, each pinned to its GPU
        workers = {body["worker"]: body["device"] for body in bodies}
        assert len(workers) == 2, workers
        pinned = {}
        for name, device in workers.items():
            host, pid = name.rsplit(":", 1)
            env = environment_of(int(pid))
            assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
            pinned[int(env["CUDA_VISIBLE_DEVICES"])] = device
            assert parent_of(parent_of(int(pid))) == parent.process.pid  # pool process -> child -> parent
        assert pinned == {0: expected_device(0), 1: expected_device(1)}

        # the job of the queue nobody consumes still waits, and the metrics say so
        body = client.get(f"{API}/jobs/{waiting}").json()
        assert (body["status"], body["queue"], body["worker"], body["device"]) == ("queued", large, None, None)
        assert scrape(client, "embedseg_broker_queue_length") == {queue: 0, large: 1}
        assert scrape(client, "embedseg_queue_workers_alive") == {queue: 2, large: 0}
        assert waiting_job_ids(settings, [large]) == {waiting}
        assert client.get(f"{API}/ready").status_code == 200  # its message waits: nothing is lost

        # a child killed outright is started again, and takes jobs again
        child = parent_of(int(next(iter(workers)).rsplit(":", 1)[1]))
        os.kill(child, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while parent.text().count(" ready.") < 3:
            assert time.monotonic() < deadline, parent.text()[-3000:]
            time.sleep(0.2)
        assert f"(pid {child}) exited with -9; restarting in 1 s" in parent.text()
        more = [predict(client, model_id, volumes[:1]) for _ in range(2)]
        assert [wait_job(client, job_id, timeout=120)["status"] for job_id in more] == ["succeeded"] * 2


def test_sigterm_to_the_parent_requeues_the_job_a_child_runs(settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with TestClient(create_app(settings, migrate=False)) as client, worker_processes(settings, tmp_path) as start:
        model_id = register_tiny_model(client, settings, tmp_path)
        volumes = images(client, 8, size=128)
        parent = start("gpus", args=GPUS, env=without_nvidia_smi(), nodes=2)
        job_id = predict(client, model_id, volumes, tta=True)
        wait_job(client, job_id, lambda body: body["status"] == "running" and body["progress"] > 0, timeout=120)
        parent.sigterm()
        assert parent.process.wait(120) == 0, parent.text()[-3000:]
        body = client.get(f"{API}/jobs/{job_id}").json()
        assert (body["status"], body["stage"], body["attempts"], body["worker"]) == ("queued", "requeued", 1, None)
        log = parent.text()
        assert f"job {job_id} interrupted by a worker shutdown; requeued" in log and f"job {job_id}: requeued" in log
        assert "WorkerLostError" not in log and "GPU workers stopped (exit codes [0, 0])" in log
        assert waiting_job_ids(settings, [settings.gpu_queue]) == {job_id}  # sent again, to its own queue
