"""``Idempotency-Key`` on SQLite and PostgreSQL: a resend returns the first answer and creates nothing; the
same key with another body is 409; keys of different owners never collide; a failed first request frees it."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from helpers import RecordingDispatcher, tiff_bytes, upload

from embedseg_service.records import keys
from embedseg_service.records.orm import Job, Volume

API = "/api/v1"


def _upload(client: Any, data: np.ndarray, headers: dict[str, str], **fields: str) -> Any:
    return upload(client, tiff_bytes(data), "x.tif", headers=headers, **fields)


@pytest.fixture
def pair(client: Any, app: Any) -> tuple[str, str]:
    app.state.dispatcher = RecordingDispatcher()
    image = _upload(client, np.zeros((16, 16), np.uint8), {}).json()["id"]
    mask = np.zeros((16, 16), np.uint16)
    mask[2:6, 2:6] = 1
    return image, _upload(client, mask, {}, kind="labels").json()["id"]


def test_a_resent_job_returns_the_first_job(client: Any, app: Any, session: Any, pair: tuple[str, str]) -> None:
    body = {"image_ids": [pair[0]], "mask_ids": [pair[1]], "epochs": 2}
    headers = {"Idempotency-Key": "run-42"}
    first = client.post(f"{API}/jobs/train", json=body, headers=headers)
    again = client.post(f"{API}/jobs/train", json=body, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
    assert session.query(Job).count() == 1 and app.state.dispatcher.submitted == [first.json()["id"]]
    other = client.post(f"{API}/jobs/train", json={**body, "epochs": 3}, headers=headers)
    assert other.status_code == 409
    assert other.json()["detail"] == (
        "Idempotency-Key 'run-42' was first used with another request (POST /jobs/train, another body); "
        "send a new key with a new request"
    )
    elsewhere = client.post(f"{API}/jobs/evaluate", json={"pairs": [{"gt_id": pair[1], "pred_id": pair[1]}]},
                            headers=headers)  # fmt: skip
    assert elsewhere.status_code == 409
    assert client.post(f"{API}/jobs/train", json=body, headers={"Idempotency-Key": "run-43"}).json()["id"] != \
        first.json()["id"]  # fmt: skip


def test_a_failed_first_request_frees_its_key(client: Any, pair: tuple[str, str]) -> None:
    headers = {"Idempotency-Key": "k1"}
    bad = client.post(f"{API}/jobs/train", json={"image_ids": [pair[0]], "mask_ids": [pair[0]]}, headers=headers)
    assert bad.status_code == 422
    good = client.post(f"{API}/jobs/train", json={"image_ids": [pair[0]], "mask_ids": [pair[1]]}, headers=headers)
    assert good.status_code == 202 and "idempotent-replayed" not in good.headers


def test_a_resent_upload_stores_one_volume(client: Any, session: Any) -> None:
    data = np.arange(256, dtype=np.uint8).reshape(16, 16)
    headers = {"Idempotency-Key": "upload-1"}
    first = _upload(client, data, headers, name="a")
    again = _upload(client, data, headers, name="a")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert session.query(Volume).count() == 1
    changed = _upload(client, data, headers, name="b")
    assert changed.status_code == 409
    assert session.query(Volume).count() == 1
    assert client.delete(f"{API}/volumes/{first.json()['id']}").status_code == 204
    deleted = _upload(client, data, headers, name="a")
    assert deleted.status_code == 409
    assert deleted.json()["detail"] == (
        f"Idempotency-Key 'upload-1' made volume {first.json()['id']}, which was deleted since; send a new key"
    )
    bad_key = _upload(client, data, {"Idempotency-Key": "bad key with spaces"})
    assert bad_key.status_code == 422
    assert bad_key.json()["detail"] == "header.Idempotency-Key: must be 1-255 visible ASCII characters (e.g. a UUID)"


def test_keys_of_different_owners_never_collide(client: Any, session: Any) -> None:
    secrets = [keys.create_key(session, owner).secret for owner in ("lab-a", "lab-b")]
    ids = []
    for secret in secrets:
        response = _upload(client, np.ones((8, 8), np.uint8),
                           {"Idempotency-Key": "same", "Authorization": f"Bearer {secret}"})  # fmt: skip
        assert response.status_code == 201 and "idempotent-replayed" not in response.headers
        ids.append(response.json()["id"])
    assert ids[0] != ids[1]


def test_concurrent_resends_make_one_job(client: Any, session: Any, pair: tuple[str, str]) -> None:
    body = {"image_ids": [pair[0]], "mask_ids": [pair[1]]}
    answers: list[Any] = []

    def send() -> None:
        answers.append(client.post(f"{API}/jobs/train", json=body, headers={"Idempotency-Key": "race"}))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    made = {a.json()["id"] for a in answers if a.status_code == 202}
    assert len(made) == 1
    assert all(a.status_code in (202, 409) for a in answers)
    assert all("still being handled" in a.json()["detail"] for a in answers if a.status_code == 409)
    assert session.query(Job).count() == 1


def test_a_resent_model_upload_stores_one_model(settings: Any, session: Any, tmp_path: Any) -> None:
    from fastapi.testclient import TestClient
    from test_models import checkpoint_bytes

    from embedseg_service.api.app import create_app
    from embedseg_service.records.orm import Model

    content = checkpoint_bytes(tmp_path)  # a real network's weights: larger than the fixture's upload limit
    app = create_app(settings.model_copy(update={"max_upload_bytes": 4 * len(content)}), migrate=False)
    headers = {"Idempotency-Key": "model-1"}
    with TestClient(app) as client:

        def post(name: str) -> Any:
            return client.post(f"{API}/models", files={"file": ("m.pt", content, "application/octet-stream")},
                               data={"name": name}, headers=headers)  # fmt: skip

        first, again, other = post("m"), post("m"), post("other")
    assert first.status_code == again.status_code == 201, first.text
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert other.status_code == 409
    assert session.query(Model).count() == 1
