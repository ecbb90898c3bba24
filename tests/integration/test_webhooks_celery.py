"""Webhooks on the production path: a job run by a real Celery worker (Redis, PostgreSQL) is delivered
from the worker's process, with its retries, to a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import (
    API,
    WebhookReceiver,
    celery_worker,
    production_services_problem,
    production_settings,
    service_missing,
    tiff_bytes,
    upload,
)

from embedseg_service.api.app import create_app
from embedseg_service.records.settings import Settings
from embedseg_service.records.webhooks import verify_signature

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = [pytest.mark.redis, pytest.mark.postgres]

SECRET = "celery-webhook-secret-0123456789"


@pytest.fixture
def settings(tmp_path) -> Iterator[Settings]:  # type: ignore[no-untyped-def]
    problem = production_services_problem()
    if problem:
        service_missing(problem)
    with production_settings(tmp_path, prefix="webhooks") as values:
        webhooks = {"webhook_secret": SECRET, "webhook_allowed_networks": ["127.0.0.1/32"], "webhook_attempts": 3,
                    "webhook_backoff_s": 0.01, "webhook_max_delay_s": 0.05}  # fmt: skip
        yield Settings(_env_file=None, **{**values.model_dump(), **webhooks})  # validated, unlike model_copy


def test_a_job_run_by_a_celery_worker_is_delivered_after_a_retry(settings: Settings) -> None:
    receiver = WebhookReceiver([(503, {}), (200, {})])
    labels = np.zeros((32, 48), np.uint16)
    labels[4:12, 6:20] = 1
    try:
        with celery_worker(settings), TestClient(create_app(settings, migrate=False)) as client:
            volume = upload(client, tiff_bytes(labels), kind="labels").json()["id"]
            spec = {"pairs": [{"gt_id": volume, "pred_id": volume}], "callback_url": receiver.url}
            response = client.post(f"{API}/jobs/evaluate", json=spec)
            assert response.status_code == 202, response.text
            job_id = response.json()["id"]
            deadline = time.monotonic() + 120
            body = client.get(f"{API}/jobs/{job_id}").json()
            while body["callback"] is None or body["callback"]["state"] == "pending":
                assert time.monotonic() < deadline, body["callback"]
                time.sleep(0.1)
                body = client.get(f"{API}/jobs/{job_id}").json()
    finally:
        receiver.close()
    assert body["status"] == "succeeded" and body["worker"] is not None
    callback = body["callback"]
    assert (callback["state"], callback["attempts"], callback["last_status"]) == ("delivered", 2, 200)
    assert [headers["X-EmbedSeg-Attempt"] for _, headers, _ in receiver.received] == ["1", "2"]
    _, headers, raw = receiver.received[-1]
    assert headers["X-EmbedSeg-Event"] == "job.succeeded"
    assert verify_signature(SECRET, headers["X-EmbedSeg-Signature"], raw)
    assert json.loads(raw) == {**body, "callback": None}
