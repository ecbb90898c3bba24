"""``/jobs`` routes on SQLite and PostgreSQL: creation (202 + Location), every 4xx with its detail, list, cancel."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import tiff_bytes, upload

from embedseg_service.records import jobs
from embedseg_service.records.orm import Job, JobStatus, Model

API = "/api/v1"


def _upload_array(client, data: np.ndarray, **fields) -> str:  # type: ignore[no-untyped-def]
    response = upload(client, tiff_bytes(data), **fields)
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def pair(client) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """A 2D image and its label image."""
    image = _upload_array(client, np.zeros((32, 48), np.uint8))
    mask = np.zeros((32, 48), np.uint16)
    mask[4:10, 4:10] = 1
    return image, _upload_array(client, mask, kind="labels")


@pytest.fixture
def model_id(session) -> str:  # type: ignore[no-untyped-def]
    """A 2D single-channel model row (its file is never read by the API)."""
    model = Model(
        name="m",
        spatial_dims=2,
        config={"in_channels": 1, "spatial_dims": 2},
        storage_key="models/test-model.pt",
        size_bytes=1,
    )
    session.add(model)
    session.commit()
    return model.id


class Recorder:
    """A dispatcher that records what it was given and checks the row was committed first."""

    def __init__(self, app) -> None:  # type: ignore[no-untyped-def]
        self.app = app
        self.submitted: list[tuple[str, str]] = []

    def submit(self, job_id: str, queue: str | None = None) -> None:  # noqa: ARG002 - the Dispatcher interface
        with self.app.state.sessionmaker() as other:
            self.submitted.append((job_id, other.get(Job, job_id).status))


# --------------------------------------------------------------------------- create


def test_train_job_is_queued_with_location_and_dispatched_after_commit(client, app, pair) -> None:
    recorder = app.state.dispatcher = Recorder(app)
    image, mask = pair
    response = client.post(f"{API}/jobs/train", json={"image_ids": [image], "mask_ids": [mask], "epochs": 3})
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"{API}/jobs/{body['id']}"
    assert body["kind"] == "train"
    assert body["status"] == "queued"
    assert body["progress"] == 0.0
    assert body["spec"]["epochs"] == 3 and body["spec"]["dims"] == 2 and body["spec"]["crop_size"] == "auto"
    assert body["worker"] is None and body["result"] is None and body["owner"] is None
    assert recorder.submitted == [(body["id"], "queued")]
    again = client.get(response.headers["location"])
    assert again.status_code == 200
    assert again.json() == body


def test_predict_and_evaluate_jobs_are_queued(client, app, pair, model_id) -> None:
    recorder = app.state.dispatcher = Recorder(app)
    image, mask = pair
    predict = client.post(
        f"{API}/jobs/predict",
        json={"model_id": model_id, "volume_ids": [image], "gt_ids": [mask], "tta": True, "tile": [32, 32]},
    )
    assert predict.status_code == 202, predict.text
    assert predict.json()["spec"]["tile"] == [32, 32] and predict.json()["spec"]["tta"] is True
    evaluate = client.post(f"{API}/jobs/evaluate", json={"pairs": [{"gt_id": mask, "pred_id": mask}]})
    assert evaluate.status_code == 202, evaluate.text
    assert evaluate.json()["spec"]["thresholds"] is None  # the job takes those of the volumes' dimensionality
    assert [job_id for job_id, _ in recorder.submitted] == [predict.json()["id"], evaluate.json()["id"]]


def test_without_a_local_worker_the_embedded_job_waits_queued(client, pair) -> None:
    image, mask = pair
    job = client.post(f"{API}/jobs/train", json={"image_ids": [image], "mask_ids": [mask]}).json()
    assert client.get(f"{API}/jobs/{job['id']}").json()["status"] == "queued"


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"image_ids": ["nope"], "mask_ids": ["{mask}"]}, 404, "image_ids: Volume nope not found"),
        ({"image_ids": ["{image}"], "mask_ids": ["gone"]}, 404, "mask_ids: Volume gone not found"),
        (
            {"image_ids": ["{image}"], "mask_ids": ["{mask}"], "val_image_ids": ["x"], "val_mask_ids": ["{mask}"]},
            404,
            "val_image_ids: Volume x not found",
        ),
        (
            {"image_ids": ["{mask}"], "mask_ids": ["{mask}"]},
            422,
            "image_ids: volume {mask} is a label image; give intensity images here (uploaded with kind=image)",
        ),
        (
            {"image_ids": ["{image}"], "mask_ids": ["{image}"]},
            422,
            "mask_ids: volume {image} is an image, not a label image; upload masks with kind=labels",
        ),
        (
            {"image_ids": ["{image}"], "mask_ids": ["{mask}"], "dims": 3},
            422,
            "image_ids: volume {image} is 2D but dims is 3D",
        ),
        (
            {"image_ids": ["{image}"], "mask_ids": ["{mask}", "{image}"]},
            422,
            "image_ids has 1 volumes but mask_ids has 2; give one mask per image, in the same order",
        ),
        (
            {"image_ids": ["{image}"], "mask_ids": ["{mask}"], "max_time_minutes": 2000},
            422,
            "max_time_minutes: must be at most 1440 (EMBEDSEG_MAX_JOB_MINUTES)",
        ),
        (
            {"image_ids": ["{image}"], "mask_ids": ["{mask}"], "epochs": 0},
            422,
            "epochs: Input should be greater than or equal to 1",
        ),
        (
            {"image_ids": ["{image}"], "mask_ids": ["{mask}"], "crop_size": 100},
            422,
            "crop_size: crop_size must be a positive multiple of 8 (e.g. 128), got 100",
        ),
        (
            {"image_ids": ["{image}"], "mask_ids": ["{mask}"], "colour": 1},
            422,
            "colour: Extra inputs are not permitted",
        ),
    ],
)
def test_train_job_refusals(client, pair, body, status, detail) -> None:  # type: ignore[no-untyped-def]
    image, mask = pair

    def fill(value):  # type: ignore[no-untyped-def]
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value.format(image=image, mask=mask) if isinstance(value, str) else value

    response = client.post(f"{API}/jobs/train", json={key: fill(value) for key, value in body.items()})
    assert response.status_code == status, response.text
    assert response.json() == {"detail": detail.format(image=image, mask=mask)}
    assert client.get(f"{API}/jobs").json()["total"] == 0


def test_train_job_refuses_a_mask_of_another_shape(client) -> None:
    image = _upload_array(client, np.zeros((32, 48), np.uint8))
    mask = _upload_array(client, np.ones((32, 40), np.uint16), kind="labels")
    response = client.post(f"{API}/jobs/train", json={"image_ids": [image], "mask_ids": [mask]})
    assert response.status_code == 422
    assert response.json() == {
        "detail": f"mask_ids: mask {mask} has shape [32, 40] but volume {image} has [32, 48]; give the mask of the "
        "same image, in the same order"
    }


def test_train_job_refuses_images_with_different_channel_counts(client) -> None:
    plain = _upload_array(client, np.zeros((32, 48), np.uint8))
    two = _upload_array(client, np.zeros((2, 32, 48), np.uint8), axes="CYX")
    masks = [_upload_array(client, np.ones((32, 48), np.uint16), kind="labels") for _ in range(2)]
    response = client.post(f"{API}/jobs/train", json={"image_ids": [plain, two], "mask_ids": masks})
    assert response.status_code == 422
    assert response.json() == {
        "detail": "image_ids: the images have different channel counts [1, 2]; give images with one layout"
    }


def test_predict_job_refusals(client, pair, model_id) -> None:
    image, mask = pair
    volume3d = _upload_array(client, np.zeros((4, 16, 16), np.uint8), axes="ZYX")
    two_channels = _upload_array(client, np.zeros((2, 32, 48), np.uint8), axes="CYX")
    other_shape = _upload_array(client, np.ones((16, 16), np.uint16), kind="labels")
    cases = [
        ({"model_id": "nope", "volume_ids": [image]}, 404, "model_id: Model nope not found"),
        ({"model_id": model_id, "volume_ids": ["gone"]}, 404, "volume_ids: Volume gone not found"),
        ({"model_id": model_id, "volume_ids": [image], "gt_ids": ["x"]}, 404, "gt_ids: Volume x not found"),
        (
            {"model_id": model_id, "volume_ids": [mask]},
            422,
            f"volume_ids: volume {mask} is a label image; give intensity images here (uploaded with kind=image)",
        ),
        (
            {"model_id": model_id, "volume_ids": [volume3d]},
            422,
            f"volume_ids: volume {volume3d} is 3D but model {model_id} is 2D",
        ),
        (
            {"model_id": model_id, "volume_ids": [two_channels]},
            422,
            f"volume_ids: volume {two_channels} has 2 channel(s) but model {model_id} expects 1",
        ),
        (
            {"model_id": model_id, "volume_ids": [image], "tile": [32, 32, 32]},
            422,
            "tile: give 2 sizes for the 2D model, got 3",
        ),
        (
            {"model_id": model_id, "volume_ids": [image], "gt_ids": [image]},
            422,
            f"gt_ids: volume {image} is an image, not a label image; upload masks with kind=labels",
        ),
        (
            {"model_id": model_id, "volume_ids": [image], "gt_ids": [other_shape]},
            422,
            f"gt_ids: ground truth {other_shape} has shape [16, 16] but volume {image} has [32, 48]; give the mask "
            "of the same image, in the same order",
        ),
        (
            {"model_id": model_id, "volume_ids": [image], "gt_ids": [mask, mask]},
            422,
            "gt_ids has 2 volumes but volume_ids has 1; give one ground-truth mask per volume, in the same order",
        ),
        (
            {"model_id": model_id, "volume_ids": [image], "tile": "big"},
            422,
            "tile: tile must be 'auto' or 2 (y,x) or 3 (z,y,x) sizes, each a positive multiple of 8",
        ),
        (
            {"model_id": model_id, "volume_ids": []},
            422,
            "volume_ids: List should have at least 1 item after validation, not 0",
        ),
    ]
    for body, status, detail in cases:
        response = client.post(f"{API}/jobs/predict", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json() == {"detail": detail}, body
    assert client.get(f"{API}/jobs").json()["total"] == 0


def test_evaluate_job_refusals(client, pair) -> None:
    image, mask = pair
    small = _upload_array(client, np.ones((16, 16), np.uint16), kind="labels")
    cases = [
        ({"pairs": [{"gt_id": "nope", "pred_id": mask}]}, 404, "pairs.gt_id: Volume nope not found"),
        ({"pairs": [{"gt_id": mask, "pred_id": "nope"}]}, 404, "pairs.pred_id: Volume nope not found"),
        (
            {"pairs": [{"gt_id": image, "pred_id": mask}]},
            422,
            f"pairs.gt_id: volume {image} is an image, not a label image; upload masks with kind=labels",
        ),
        (
            {"pairs": [{"gt_id": mask, "pred_id": image}]},
            422,
            f"pairs.pred_id: volume {image} is an image, not a label image; upload masks with kind=labels",
        ),
        (
            {"pairs": [{"gt_id": mask, "pred_id": mask}, {"gt_id": mask, "pred_id": small}]},
            422,
            f"pairs.1: ground truth {mask} has shape [32, 48] but prediction {small} has [16, 16]",
        ),
        ({"pairs": []}, 422, "pairs: List should have at least 1 item after validation, not 0"),
        (
            {"pairs": [{"gt_id": mask, "pred_id": mask}], "thresholds": [0.5, 1.5]},
            422,
            "thresholds: every IoU threshold must be in (0, 1], e.g. [0.5, 0.75]",
        ),
    ]
    for body, status, detail in cases:
        response = client.post(f"{API}/jobs/evaluate", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json() == {"detail": detail}, body


def test_unreachable_broker_answers_503_and_fails_the_job(pair_in_broker_app) -> None:
    client, image, mask, app = pair_in_broker_app
    response = client.post(f"{API}/jobs/evaluate", json={"pairs": [{"gt_id": mask, "pred_id": mask}]})
    assert response.status_code == 503
    listed = client.get(f"{API}/jobs").json()["items"]
    assert len(listed) == 1
    job = listed[0]
    assert response.json() == {
        "detail": f"Job {job['id']} could not be queued: the job broker is unreachable; check EMBEDSEG_BROKER_URL "
        "and that Redis is running, then resubmit"
    }
    assert job["status"] == "failed"
    assert job["error"].startswith("could not be queued: the job broker is unreachable")


@pytest.fixture
def pair_in_broker_app(settings):  # type: ignore[no-untyped-def]
    """A client of an app whose broker (port 1) refuses connections, and an image + labels in it."""
    from fastapi.testclient import TestClient

    from embedseg_service.api.app import create_app

    broken = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    app = create_app(broken, migrate=False)
    with TestClient(app) as client:
        image = _upload_array(client, np.zeros((32, 48), np.uint8))
        mask = _upload_array(client, np.ones((32, 48), np.uint16), kind="labels")
        yield client, image, mask, app


def test_broker_mode_api_imports_neither_torch_nor_the_worker() -> None:
    code = textwrap.dedent(
        """
        import sys
        from embedseg_service.api.app import create_app
        from embedseg_service.api.dispatch import make_dispatcher
        from embedseg_service.records.settings import Settings
        settings = Settings(_env_file=None, database_url="sqlite://", broker_url="redis://127.0.0.1:1/0")
        app = create_app(settings, migrate=False)
        dispatcher = make_dispatcher(settings)
        dispatcher.app  # builds the Celery producer
        app.openapi()
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "embedseg_service.worker")))
        print(type(dispatcher).__name__, loaded)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "CeleryDispatcher []"


# --------------------------------------------------------------------------- read, list


def test_get_unknown_job_is_404(client) -> None:
    response = client.get(f"{API}/jobs/nope")
    assert response.status_code == 404
    assert response.json() == {"detail": "Job nope not found"}


def test_list_filters_and_paginates(client, session, pair) -> None:
    image, mask = pair
    ids = []
    for _ in range(3):
        ids.append(client.post(f"{API}/jobs/train", json={"image_ids": [image], "mask_ids": [mask]}).json()["id"])
    evaluate = client.post(f"{API}/jobs/evaluate", json={"pairs": [{"gt_id": mask, "pred_id": mask}]}).json()["id"]
    assert jobs.claim_job(session, ids[0], "host:1")

    everything = client.get(f"{API}/jobs").json()
    assert everything["total"] == 4 and everything["limit"] == 50 and everything["offset"] == 0
    assert [item["id"] for item in everything["items"]] == [evaluate, ids[2], ids[1], ids[0]]

    page = client.get(f"{API}/jobs", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 4 and [item["id"] for item in page["items"]] == [ids[2], ids[1]]

    trains = client.get(f"{API}/jobs", params={"kind": "train"}).json()
    assert trains["total"] == 3
    running = client.get(f"{API}/jobs", params={"status": "running"}).json()
    assert [item["id"] for item in running["items"]] == [ids[0]]
    assert running["items"][0]["worker"] == "host:1" and running["items"][0]["started_at"] is not None
    queued_evaluations = client.get(f"{API}/jobs", params={"status": "queued", "kind": "evaluate"}).json()
    assert [item["id"] for item in queued_evaluations["items"]] == [evaluate]


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"limit": 501}, "query.limit: must be at most 500"),
        ({"limit": 0}, "query.limit: Input should be greater than or equal to 1"),
        ({"offset": -1}, "query.offset: Input should be greater than or equal to 0"),
        ({"status": "done"}, "query.status: Input should be 'queued', 'running', 'succeeded', 'failed' or 'cancelled'"),
        ({"kind": "segment"}, "query.kind: Input should be 'train', 'predict' or 'evaluate'"),
    ],
)
def test_list_refusals(client, params, detail) -> None:  # type: ignore[no-untyped-def]
    response = client.get(f"{API}/jobs", params=params)
    assert response.status_code == 422
    assert response.json() == {"detail": detail}


# --------------------------------------------------------------------------- cancel


def test_cancel_queued_running_and_finished_jobs(client, session, pair) -> None:
    image, mask = pair
    queued, running = (
        client.post(f"{API}/jobs/train", json={"image_ids": [image], "mask_ids": [mask]}).json()["id"] for _ in range(2)
    )
    assert jobs.claim_job(session, running, "host:2")

    response = client.post(f"{API}/jobs/{queued}/cancel")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "cancelled" and body["cancel_requested"] is True and body["finished_at"] is not None

    response = client.post(f"{API}/jobs/{running}/cancel")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "running" and body["cancel_requested"] is True and body["finished_at"] is None

    response = client.post(f"{API}/jobs/{queued}/cancel")
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Job {queued} has already finished (cancelled); only queued or running jobs can be cancelled"
    }
    assert jobs.finish_job(session, running, JobStatus.cancelled)
    response = client.post(f"{API}/jobs/{running}/cancel")
    assert response.status_code == 409

    response = client.post(f"{API}/jobs/nope/cancel")
    assert response.status_code == 404
    assert response.json() == {"detail": "Job nope not found"}


def test_a_queued_job_keeps_its_volumes(client, pair) -> None:
    image, mask = pair
    job = client.post(f"{API}/jobs/train", json={"image_ids": [image], "mask_ids": [mask]}).json()
    response = client.delete(f"{API}/volumes/{mask}")
    assert response.status_code == 409
    assert job["id"] in response.json()["detail"]
    client.post(f"{API}/jobs/{job['id']}/cancel")
    assert client.delete(f"{API}/volumes/{mask}").status_code == 204


def test_train_crop_and_batch_are_bounded_by_the_images_and_the_voxel_budget(client, app, pair) -> None:  # type: ignore[no-untyped-def]
    app.state.dispatcher = Recorder(app)
    image, mask = pair  # 32 x 48
    body = {"image_ids": [image], "mask_ids": [mask]}
    too_wide = client.post(f"{API}/jobs/train", json={**body, "crop_size": 128})
    assert too_wide.status_code == 422
    assert too_wide.json()["detail"].startswith("crop_size 128 is larger than the training images need (their "
                                                "largest side is 48)")  # fmt: skip
    huge = client.post(f"{API}/jobs/train", json={**body, "crop_size": 1048576, "batch_size": 1024})
    assert huge.status_code == 422 and "crop_size" in huge.json()["detail"]
    fine = client.post(f"{API}/jobs/train", json={**body, "crop_size": 48, "batch_size": 2})
    assert fine.status_code == 202, fine.text
