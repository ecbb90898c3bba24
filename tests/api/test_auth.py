"""API keys and owners on SQLite and PostgreSQL: every route refuses a missing or revoked key once keys
exist, another owner's id answers 404 exactly like an unknown id on every route, an admin sees all."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from helpers import RecordingDispatcher, tiff_bytes, upload

from embedseg_service.api.app import API_PREFIX
from embedseg_service.api.commands import access_check, is_loopback
from embedseg_service.records import keys
from embedseg_service.records.orm import ApiKey, Model
from embedseg_service.records.settings import Settings

OPEN = {("GET", "/health"), ("GET", "/ready")}

# Every API route, and what a request with another owner's ids must get. "id": the path names one
# row of owner A (404 for B); "list": B's listing must not show A's rows; "refers": a job whose body
# names A's rows (404 for B); "create": makes B's own row; "admin": admins only (403 for an owner's
# key: it lists every owner's rows). A route missing here fails the test.
ROUTES: dict[tuple[str, str], str] = {
    ("POST", "/volumes"): "create",
    ("GET", "/volumes"): "list",
    ("GET", "/volumes/{volume_id}"): "id",
    ("GET", "/volumes/{volume_id}/download"): "id",
    ("DELETE", "/volumes/{volume_id}"): "id",
    ("GET", "/volumes/{volume_id}/preview.png"): "id",
    ("POST", "/jobs/train"): "refers",
    ("POST", "/jobs/predict"): "refers",
    ("POST", "/jobs/evaluate"): "refers",
    ("GET", "/jobs"): "list",
    ("GET", "/jobs/{job_id}"): "id",
    ("POST", "/jobs/{job_id}/cancel"): "id",
    ("GET", "/jobs/{job_id}/labels.zip"): "id",
    ("GET", "/jobs/{job_id}/objects"): "id",
    ("GET", "/jobs/{job_id}/objects.csv"): "id",
    ("GET", "/models"): "list",
    ("GET", "/models/{model_id}"): "id",
    ("GET", "/models/{model_id}/download"): "id",
    ("GET", "/models/{model_id}/export"): "id",
    ("POST", "/models"): "create",
    ("DELETE", "/models/{model_id}"): "id",
    ("GET", "/workers"): "admin",
}


def api_routes(app: Any) -> set[tuple[str, str]]:
    """(method, path below the prefix) of every operation in the OpenAPI schema."""
    return {
        (method.upper(), path[len(API_PREFIX) :])
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _upload(client: Any, secret: str, data: np.ndarray, **fields: str) -> str:
    response = upload(client, tiff_bytes(data), "x.tif", headers=bearer(secret), **fields)
    assert response.status_code == 201, response.text
    return response.json()["id"]


@pytest.fixture
def world(client: Any, app: Any, session: Any) -> dict[str, Any]:
    """Keys of owners A and B and an admin; A's image, labels, model and train job."""
    app.state.dispatcher = RecordingDispatcher()
    secrets = {
        "a": keys.create_key(session, "lab-a").secret,
        "b": keys.create_key(session, "lab-b").secret,
        "admin": keys.create_key(session, "core-facility", admin=True).secret,
    }
    image = _upload(client, secrets["a"], np.arange(32 * 48, dtype=np.uint16).reshape(32, 48))
    mask = np.zeros((32, 48), np.uint16)
    mask[4:10, 4:10] = 1
    labels = _upload(client, secrets["a"], mask, kind="labels", image_id=image)
    storage = app.state.storage
    stored = storage.put("models/owned-by-a.pt", iter([b"weights"]))
    model = Model(owner="lab-a", name="a", spatial_dims=2, config={"in_channels": 1, "spatial_dims": 2},
                  storage_key="models/owned-by-a.pt", size_bytes=stored.size)  # fmt: skip
    session.add(model)
    session.commit()
    response = client.post(
        f"{API_PREFIX}/jobs/train",
        json={"image_ids": [image], "mask_ids": [labels], "epochs": 1},
        headers=bearer(secrets["a"]),
    )
    assert response.status_code == 202, response.text
    return {"keys": secrets, "volume": image, "labels": labels, "model": model.id, "job": response.json()["id"]}


def _request(client: Any, method: str, path: str, world: dict[str, Any], secret: str | None) -> Any:
    url = API_PREFIX + path.format(volume_id=world["volume"], job_id=world["job"], model_id=world["model"])
    headers = {} if secret is None else bearer(secret)
    body: dict[str, Any] | None = None
    if path == "/jobs/train":
        body = {"image_ids": [world["volume"]], "mask_ids": [world["labels"]]}
    elif path == "/jobs/predict":
        body = {"model_id": world["model"], "volume_ids": [world["volume"]]}
    elif path == "/jobs/evaluate":
        body = {"pairs": [{"gt_id": world["labels"], "pred_id": world["labels"]}]}
    if path == "/volumes" and method == "POST":
        return client.post(url, files={"file": ("b.tif", tiff_bytes(np.ones((8, 8), np.uint8)), "image/tiff")},
                           headers=headers)  # fmt: skip
    if path == "/models" and method == "POST":
        return client.post(url, files={"file": ("m.pt", b"not a model", "application/octet-stream")}, headers=headers)
    return client.request(method, url, json=body, headers=headers)


def test_the_route_table_names_every_route(app: Any) -> None:
    assert api_routes(app) == set(ROUTES) | OPEN


def test_another_owners_ids_answer_404_on_every_route(client: Any, world: dict[str, Any]) -> None:
    a, b = world["keys"]["a"], world["keys"]["b"]
    for (method, path), kind in ROUTES.items():
        response = _request(client, method, path, world, b)
        where = f"{method} {path}: {response.status_code} {response.text[:200]}"
        if kind == "id":
            assert response.status_code == 404, where
            unknown = client.request(method, f"{API_PREFIX}{path.split('{')[0]}{'0' * 36}"
                                     f"{path.split('}')[1] if '}' in path else ''}", headers=bearer(b))  # fmt: skip
            assert response.json() == {"detail": unknown.json()["detail"].replace("0" * 36, _id_in(path, world))}, where
        elif kind == "refers":
            assert response.status_code == 404, where
            assert "not found" in response.json()["detail"], where
        elif kind == "admin":
            assert response.status_code == 403, where
            assert "needs an admin API key" in response.json()["detail"], where
            assert _request(client, method, path, world, world["keys"]["admin"]).status_code == 200, where
        elif kind == "list":
            assert response.status_code == 200, where
            items = response.json()["items"]
            assert all(item["owner"] == "lab-b" for item in items), where
            assert response.json()["total"] == len(items), where
    # A still has everything, and sees it
    for path, row in (("/volumes/{volume_id}", "volume"), ("/jobs/{job_id}", "job"), ("/models/{model_id}", "model")):
        response = _request(client, "GET", path, world, a)
        assert response.status_code == 200, response.text
        assert response.json()["id"] == world[row] and response.json()["owner"] == "lab-a"
    listed = client.get(f"{API_PREFIX}/volumes", headers=bearer(a)).json()
    assert {item["id"] for item in listed["items"]} == {world["volume"], world["labels"]}


def _id_in(path: str, world: dict[str, Any]) -> str:
    for name, row in (("volume_id", "volume"), ("job_id", "job"), ("model_id", "model")):
        if "{" + name + "}" in path:
            return str(world[row])
    raise AssertionError(path)


def test_missing_malformed_and_revoked_keys_answer_401(client: Any, world: dict[str, Any], session: Any) -> None:
    for method, path in ROUTES:
        response = _request(client, method, path, world, None)
        assert response.status_code == 401, f"{method} {path}: {response.status_code}"
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "requires an API key" in response.json()["detail"]
    for method, path in OPEN:
        assert client.request(method, API_PREFIX + path).status_code == 200
    response = client.get(f"{API_PREFIX}/volumes", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert response.status_code == 401 and "Bearer" in response.json()["detail"]
    response = client.get(f"{API_PREFIX}/volumes", headers=bearer("esk_" + "x" * 43))
    assert response.status_code == 401 and "not valid" in response.json()["detail"]
    prefix = session.query(ApiKey).filter_by(owner="lab-b").one().prefix
    keys.revoke_key(session, prefix)
    response = client.get(f"{API_PREFIX}/volumes", headers=bearer(world["keys"]["b"]))
    assert response.status_code == 401 and "revoked" in response.json()["detail"]
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert client.get(f"{API_PREFIX}/volumes", headers=bearer(world["keys"]["a"])).status_code == 200


def test_an_admin_sees_and_manages_every_owner(client: Any, world: dict[str, Any]) -> None:
    admin, b = world["keys"]["admin"], world["keys"]["b"]
    own = _upload(client, b, np.ones((8, 8), np.uint8))
    listed = client.get(f"{API_PREFIX}/volumes", headers=bearer(admin)).json()
    assert {item["id"] for item in listed["items"]} == {world["volume"], world["labels"], own}
    assert {item["owner"] for item in listed["items"]} == {"lab-a", "lab-b"}
    assert client.get(f"{API_PREFIX}/jobs/{world['job']}", headers=bearer(admin)).json()["owner"] == "lab-a"
    response = client.post(f"{API_PREFIX}/jobs/{world['job']}/cancel", headers=bearer(admin))
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert client.delete(f"{API_PREFIX}/volumes/{own}", headers=bearer(admin)).status_code == 204


def test_rows_get_the_owner_of_the_key(client: Any, world: dict[str, Any]) -> None:
    b = world["keys"]["b"]
    image = _upload(client, b, np.ones((16, 16), np.uint8))
    assert client.get(f"{API_PREFIX}/volumes/{image}", headers=bearer(b)).json()["owner"] == "lab-b"
    # labels of B can never point at A's image: 422 as for an unknown image
    response = client.post(
        f"{API_PREFIX}/volumes",
        files={"file": ("l.tif", tiff_bytes(np.zeros((32, 48), np.uint16)), "image/tiff")},
        data={"kind": "labels", "image_id": world["volume"]},
        headers=bearer(b),
    )
    assert response.status_code == 422
    assert response.json()["detail"] == f"image_id: Volume {world['volume']} not found"


def test_without_keys_requests_are_anonymous_and_see_everything(client: Any) -> None:
    response = client.post(f"{API_PREFIX}/volumes", files={"file": ("x.tif", tiff_bytes(np.ones((8, 8), np.uint8)),
                                                                     "image/tiff")})  # fmt: skip
    assert response.status_code == 201 and response.json()["owner"] is None
    assert client.get(f"{API_PREFIX}/volumes").json()["total"] == 1
    # a key sent while none exists is not valid
    assert client.get(f"{API_PREFIX}/volumes", headers=bearer("esk_nope")).status_code == 401


def test_the_openapi_schema_declares_the_bearer_scheme(client: Any) -> None:
    schema = client.get(f"{API_PREFIX}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["ApiKey"]
        ["description"]}  # fmt: skip
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            secured = operation.get("security") == [{"ApiKey": []}]
            assert secured == ((method.upper(), path[len(API_PREFIX) :]) not in OPEN), (method, path)


def test_foreign_hosts_and_cross_site_writes_are_refused(client: Any) -> None:
    response = client.get(f"{API_PREFIX}/health", headers={"Host": "attacker.example"})
    assert response.status_code == 400
    assert "EMBEDSEG_ALLOWED_HOSTS" in response.json()["detail"]
    form = {"file": ("x.tif", tiff_bytes(np.ones((8, 8), np.uint8)), "image/tiff")}
    response = client.post(f"{API_PREFIX}/volumes", files=form, headers={"Origin": "https://attacker.example"})
    assert response.status_code == 403
    assert response.json()["detail"].startswith("cross-origin request from https://attacker.example refused")
    assert client.get(f"{API_PREFIX}/volumes").json()["total"] == 0
    response = client.post(f"{API_PREFIX}/volumes", files=form, headers={"Origin": "http://testserver"})
    assert response.status_code == 201


def test_cors_never_allows_credentials(settings: Settings) -> None:
    from fastapi.testclient import TestClient

    from embedseg_service.api.app import create_app

    app = create_app(settings.model_copy(update={"cors_origins": ["*"]}), migrate=False)
    with TestClient(app) as client:
        response = client.options(f"{API_PREFIX}/volumes", headers={
            "Origin": "https://other.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"})  # fmt: skip
    assert response.status_code == 200
    assert "access-control-allow-credentials" not in response.headers


def test_listening_beyond_loopback_needs_keys() -> None:
    settings = Settings(_env_file=None)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    assert access_check(settings, "127.0.0.1", keys_configured=False)[0]
    assert "no API keys" in access_check(settings, "127.0.0.1", keys_configured=False)[1]
    allowed, message = access_check(settings, "0.0.0.0", keys_configured=False)
    assert not allowed and "embedseg keys create --owner admin --admin" in message
    assert access_check(settings, "0.0.0.0", keys_configured=True)[0]


def test_serve_refuses_a_public_address_without_keys_and_keys_cli_works(tmp_path: Any) -> None:
    env = {"EMBEDSEG_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    command = [sys.executable, "-m", "embedseg_service.core.cli"]
    refused = subprocess.run([*command, "serve", "--host", "0.0.0.0", "--port", "1"], env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "refusing to listen on 0.0.0.0 without API keys" in refused.stderr
    created = subprocess.run([*command, "keys", "create", "--owner", "lab-a"], env=env, capture_output=True,
                             text=True, timeout=120)  # fmt: skip
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("esk_") and len(secret) == 47
    listed = subprocess.run([*command, "keys", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert "lab-a" in listed.stdout and secret not in listed.stdout and secret[:12] in listed.stdout
    database = (tmp_path / "embedseg.db").read_bytes()
    assert secret.encode() not in database and keys.hash_key(secret).encode() in database
    revoked = subprocess.run([*command, "keys", "revoke", secret[:12]], env=env, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
    assert revoked.returncode == 0 and "revoked key" in revoked.stdout
