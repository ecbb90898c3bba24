"""The services segment as the library does: one trained model, one held-out image, three paths.

Model: the session's ``dsb_model`` (trained on the top rows of the DSB image). Image: the held-out
rows below them, with their ground truth. Paths: (a) HTTP on the embedded default (SQLite, local
storage, the local worker's processes), (b) HTTP with a Celery worker on Redis + PostgreSQL, both
given the checkpoint through the model upload route; (c) ``load_model(path).segment`` in this
process. Options are passed explicitly (TTA on, one tile size), never left to defaults.

Asserted: the labels downloaded from (a) and (b) equal (c)'s array; the AP a predict job reports
equals the AP recomputed with :func:`embedseg_service.core.metrics.average_precision` from the
downloaded labels and the ground truth at the thresholds the job reports; an evaluate job with
explicit thresholds reports the AP recomputed at those thresholds.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    API,
    DSB_SPLIT_ROW,
    celery_worker,
    download_labels,
    dsb_image,
    embedded_service,
    production_services_problem,
    production_settings,
    service_missing,
    tiff_bytes,
    upload,
    wait_job,
)

from embedseg_service.api.app import create_app
from embedseg_service.core.metrics import average_precision
from embedseg_service.core.model.checkpoint import load_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.slow

TTA = True
TILE = (128, 256)
THRESHOLDS = [0.5, 0.7, 0.9]


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    """The DSB rows the model never saw in training: ``(image, ground truth)``."""
    image, mask = dsb_image()
    return image[DSB_SPLIT_ROW:], mask[DSB_SPLIT_ROW:]


@pytest.fixture(scope="module")
def direct_labels(dsb_model: Path, held_out: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Path (c): the library called directly, on the device a job would choose."""
    labels = load_model(dsb_model).segment(held_out[0], tta=TTA, tile=TILE)
    assert labels.max() > 0, "the shared model finds no object on the held-out rows"
    return labels


@pytest.fixture(params=["embedded", pytest.param("celery", marks=[pytest.mark.redis, pytest.mark.postgres])])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestClient]:
    """A test client of path (a) or (b), each in a fresh database and storage folder."""
    if request.param == "embedded":
        with embedded_service(tmp_path) as client:
            yield client
        return
    problem = production_services_problem()
    if problem:
        service_missing(problem)
    with production_settings(tmp_path, "equal") as settings, celery_worker(settings):
        with TestClient(create_app(settings, migrate=False)) as client:
            yield client


def _succeeded(client: TestClient, response) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == 202, response.text
    job = wait_job(client, response.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job["error"]
    return job


def test_services_return_the_labels_of_the_library(
    service: TestClient, dsb_model: Path, held_out: tuple[np.ndarray, np.ndarray], direct_labels: np.ndarray
) -> None:
    image, truth = held_out
    model = service.post(f"{API}/models", files={"file": ("dsb.pt", dsb_model.read_bytes())})
    assert model.status_code == 201, model.text
    image_id = upload(service, tiff_bytes(image), "held_out.tif").json()["id"]
    gt_id = upload(service, tiff_bytes(truth), "held_out_mask.tif", kind="labels", image_id=image_id).json()["id"]

    predicted = _succeeded(service, service.post(f"{API}/jobs/predict", json={
        "model_id": model.json()["id"], "volume_ids": [image_id], "gt_ids": [gt_id], "tta": TTA, "tile": list(TILE),
    }))  # fmt: skip
    labels_id = predicted["result"]["labels"][image_id]
    labels = download_labels(service, labels_id)
    assert labels.shape == direct_labels.shape
    assert np.array_equal(labels, direct_labels), f"{int((labels != direct_labels).sum())} pixels differ"

    reported = predicted["metrics"]["ap"]
    recomputed = average_precision(truth, labels, reported["thresholds"])
    assert reported["ap"] == recomputed.ap
    assert [(r["tp"], r["fp"], r["fn"]) for r in reported["pooled"]] == [(r.tp, r.fp, r.fn) for r in recomputed.results]
    (volume,) = predicted["metrics"]["volumes"]
    assert (volume["ap"], volume["n_gt"], volume["n_pred"]) == (recomputed.ap, recomputed.n_gt, recomputed.n_pred)

    evaluated = _succeeded(service, service.post(f"{API}/jobs/evaluate", json={
        "pairs": [{"gt_id": gt_id, "pred_id": labels_id}], "thresholds": THRESHOLDS,
    }))  # fmt: skip
    assert evaluated["metrics"]["ap"]["thresholds"] == THRESHOLDS
    assert evaluated["metrics"]["ap"]["ap"] == average_precision(truth, direct_labels, THRESHOLDS).ap
