"""Real Celery worker on real Redis (127.0.0.1:6379) and real PostgreSQL (database ``test``, migrated).

The API (in-process test client) sends ``embedseg.run_job`` by name to a queue of its own; an
embedded Celery worker (``celery.contrib.testing.worker.start_worker``) consumes it. Checked:
a predict job with a trained model (the session's ``dsb_model``, uploaded as a model file) and a
short train job run to success; the same job message delivered twice runs once; a running train
job is cancelled between steps.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery.signals import task_postrun
from helpers import (
    API,
    REDIS_URL,
    celery_worker,
    finished,
    production_services_problem,
    production_settings,
    service_missing,
    wait_job,
)

from embedseg_service.api.app import create_app
from embedseg_service.core.data.io import read_tiff
from embedseg_service.records.settings import Settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

DATA = Path(__file__).resolve().parents[1] / "data" / "nuclei2d_dsb"


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    problem = production_services_problem()
    if problem:
        service_missing(problem)
    with production_settings(tmp_path_factory.mktemp("celery")) as values:
        yield values


@pytest.fixture(scope="module")
def deliveries() -> Iterator[list[tuple[str, str]]]:
    """(job id, outcome) of every task the worker finished."""
    seen: list[tuple[str, str]] = []

    def record(sender=None, args=None, retval=None, **_) -> None:  # type: ignore[no-untyped-def]
        if sender is not None and sender.name == "embedseg.run_job":
            seen.append((args[0], retval))

    task_postrun.connect(record, weak=False)
    yield seen
    task_postrun.disconnect(record)


@pytest.fixture(scope="module")
def worker(settings: Settings, deliveries):  # type: ignore[no-untyped-def]  # noqa: ARG001 - recording before it starts
    with celery_worker(settings) as app:
        yield app


@pytest.fixture(scope="module")
def client(settings: Settings, worker) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]  # noqa: ARG001 - a running worker
    with TestClient(create_app(settings, migrate=False)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def volumes(client: TestClient) -> dict[str, str]:
    """A 256 x 256 corner of the real nuclei image and its mask, uploaded."""
    image = read_tiff(DATA / "images" / "dsb2018_img2d.tif").data[:256, :256]
    mask = read_tiff(DATA / "masks" / "dsb2018_img2d.tif").data[:256, :256]
    from embedseg_service.core.data.tiff_write import write_tiff

    ids = {}
    for name, data, kind in (("image", image, "image"), ("mask", mask, "labels")):
        path = Path(client.app.state.settings.data_dir) / f"{name}.tif"
        write_tiff(path, data, axes="YX")
        response = client.post(f"{API}/volumes", files={"file": (path.name, path.read_bytes())}, data={"kind": kind})
        assert response.status_code == 201, response.text
        ids[name] = response.json()["id"]
    return ids


@pytest.fixture(scope="module")
def trained_model(client: TestClient, dsb_model: Path) -> str:
    """The session's ``dsb_model`` (trained on the top rows of the DSB image), uploaded as a model file."""
    response = client.post(f"{API}/models", files={"file": ("dsb.pt", dsb_model.read_bytes())}, data={"name": "dsb"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.mark.slow  # the session's trained model
def test_predict_job_runs_on_the_celery_worker(client, volumes, trained_model, deliveries) -> None:
    response = client.post(
        f"{API}/jobs/predict",
        json={
            "model_id": trained_model,
            "volume_ids": [volumes["image"]],
            "gt_ids": [volumes["mask"]],
            "tta": False,
            "tile": [128, 128],
        },
    )
    assert response.status_code == 202, response.text
    job = wait_job(client, response.json()["id"], timeout=180)
    assert job["status"] == "succeeded", job["error"]
    assert job["worker"] and ":" in job["worker"]
    (labels_id,) = job["result"]["label_volume_ids"]
    labels = client.get(f"{API}/volumes/{labels_id}").json()
    assert labels["shape"] == [256, 256] and labels["source_job_id"] == job["id"]
    (volume,) = job["metrics"]["volumes"]
    assert volume["n_objects"] > 0 and len(job["metrics"]["ap"]["ap"]) == len(job["metrics"]["ap"]["thresholds"])
    assert job["metrics"]["ap"]["ap"][0] > 0  # a trained model matches some of the annotated nuclei
    assert (job["id"], "succeeded") in deliveries


def test_the_same_job_message_delivered_twice_runs_once(client, settings, worker, volumes, deliveries) -> None:
    from embedseg_service.records import jobs as job_records

    with client.app.state.sessionmaker() as session:
        job = job_records.create_job(
            session,
            "evaluate",
            {"pairs": [{"gt_id": volumes["mask"], "pred_id": volumes["mask"]}]},
            volumes=[(volumes["mask"], "gt"), (volumes["mask"], "pred")],
        )
    for _ in range(2):
        worker.send_task(settings.task_name, args=[job.id], queue=settings.gpu_queue)
    deadline = time.monotonic() + 120
    while sum(1 for job_id, _ in deliveries if job_id == job.id) < 2:
        assert time.monotonic() < deadline, deliveries
        time.sleep(0.2)
    outcomes = sorted(outcome for job_id, outcome in deliveries if job_id == job.id)
    assert outcomes == ["skipped", "succeeded"]
    body = client.get(f"{API}/jobs/{job.id}").json()
    assert body["status"] == "succeeded" and body["attempts"] == 1
    assert body["metrics"]["ap"]["ap"][0] == 1.0
    assert redis.Redis.from_url(REDIS_URL).llen(settings.gpu_queue) == 0


@pytest.mark.slow
def test_short_train_job_registers_a_model(client, volumes) -> None:
    response = client.post(
        f"{API}/jobs/train",
        json={
            "image_ids": [volumes["image"]],
            "mask_ids": [volumes["mask"]],
            "epochs": 2,
            "crop_size": 64,
            "batch_size": 4,
            "max_time_minutes": 0.5,
            "name": "celery-trained",
        },
    )
    assert response.status_code == 202, response.text
    job = wait_job(client, response.json()["id"], finished, timeout=400)
    assert job["status"] == "succeeded", job["error"]
    model = client.get(f"{API}/models/{job['result']['model_id']}").json()
    assert model["name"] == "celery-trained" and model["source_job_id"] == job["id"]
    assert model["config"]["crop_size"] == [64, 64] and model["data_properties"]["min_object_size"] > 0
    assert job["metrics"]["epochs"] and {"loss", "val_iou", "val_ap"} <= set(job["metrics"]["epochs"][-1])
    download = client.get(f"{API}/models/{model['id']}/download")
    assert download.status_code == 200 and len(download.content) == model["size_bytes"]


@pytest.mark.slow
def test_cancel_stops_a_running_train_job(client, volumes) -> None:
    response = client.post(
        f"{API}/jobs/train",
        json={
            "image_ids": [volumes["image"]],
            "mask_ids": [volumes["mask"]],
            "epochs": 500,
            "crop_size": 64,
            "batch_size": 2,
            "max_time_minutes": 20,
        },
    )
    job_id = response.json()["id"]
    wait_job(
        client,
        job_id,
        lambda b: b["status"] == "running" and (b["stage"] or "").startswith("training epoch"),
        timeout=240,
    )
    cancel = client.post(f"{API}/jobs/{job_id}/cancel")
    assert cancel.status_code == 200 and cancel.json()["cancel_requested"] is True
    job = wait_job(client, job_id, finished, timeout=240)
    assert job["status"] == "cancelled" and job["error"] == "cancelled on request"
    assert job["result"] is None
    assert all(m["source_job_id"] != job_id for m in client.get(f"{API}/models").json()["items"])
