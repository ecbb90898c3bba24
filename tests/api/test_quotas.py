"""Per-owner quotas on SQLite and PostgreSQL: stored bytes (413) and queued jobs (429), each owner counted apart."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import RecordingDispatcher, tiff_bytes, upload

from embedseg_service.api.app import create_app
from embedseg_service.records import keys
from embedseg_service.records.settings import Settings

API = "/api/v1"


@pytest.fixture
def small_quota_client(settings: Settings) -> Any:
    from fastapi.testclient import TestClient

    app = create_app(settings.model_copy(update={"quota_stored_bytes": 6000, "quota_queued_jobs": 2}), migrate=False)
    app.state.dispatcher = RecordingDispatcher()
    with TestClient(app) as client, app.state.sessionmaker() as session:
        client.secrets = {owner: keys.create_key(session, owner).secret for owner in ("lab-a", "lab-b")}
        yield client


def _post(client: Any, owner: str, data: np.ndarray, **fields: str) -> Any:
    return upload(client, tiff_bytes(data), "x.tif", headers={"Authorization": f"Bearer {client.secrets[owner]}"},
                  **fields)  # fmt: skip


def test_stored_bytes_quota_is_per_owner_and_says_which_limit(small_quota_client: Any) -> None:
    client = small_quota_client
    first = _post(client, "lab-a", np.zeros((50, 50), np.uint8))  # ~2.7 kB
    assert first.status_code == 201, first.text
    used = first.json()["size_bytes"]
    refused = _post(client, "lab-a", np.zeros((60, 60), np.uint8))  # would pass 6000 bytes
    assert refused.status_code == 413
    detail = refused.json()["detail"]
    assert detail.startswith(f"storage quota exceeded: owner 'lab-a' store {used} bytes and this upload adds ")
    assert "the limit is 6000 bytes (EMBEDSEG_QUOTA_STORED_BYTES)" in detail
    # nothing of the refused upload is kept; another owner is not affected
    listed = client.get(f"{API}/volumes", headers={"Authorization": f"Bearer {client.secrets['lab-a']}"}).json()
    assert [item["id"] for item in listed["items"]] == [first.json()["id"]]
    assert _post(client, "lab-b", np.zeros((60, 60), np.uint8)).status_code == 201
    # deleting frees the quota
    headers = {"Authorization": f"Bearer {client.secrets['lab-a']}"}
    assert client.delete(f"{API}/volumes/{first.json()['id']}", headers=headers).status_code == 204
    assert _post(client, "lab-a", np.zeros((60, 60), np.uint8)).status_code == 201


def test_queued_jobs_quota_answers_429_with_retry_after(small_quota_client: Any) -> None:
    client = small_quota_client
    image = _post(client, "lab-a", np.zeros((16, 16), np.uint8)).json()["id"]
    mask = np.zeros((16, 16), np.uint16)
    mask[2:6, 2:6] = 1
    labels = _post(client, "lab-a", mask, kind="labels").json()["id"]
    headers = {"Authorization": f"Bearer {client.secrets['lab-a']}"}
    body = {"image_ids": [image], "mask_ids": [labels], "epochs": 1}
    for _ in range(2):
        assert client.post(f"{API}/jobs/train", json=body, headers=headers).status_code == 202
    refused = client.post(f"{API}/jobs/train", json=body, headers=headers)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "60"
    assert refused.json()["detail"] == (
        "queue quota reached: owner 'lab-a' have 2 queued jobs; the limit is 2 (EMBEDSEG_QUOTA_QUEUED_JOBS); "
        "wait for some to start or cancel them"
    )
    jobs = client.get(f"{API}/jobs", headers=headers).json()
    assert jobs["total"] == 2
    client.post(f"{API}/jobs/{jobs['items'][0]['id']}/cancel", headers=headers)
    assert client.post(f"{API}/jobs/train", json=body, headers=headers).status_code == 202
