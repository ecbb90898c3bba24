"""Liveness, readiness, error bodies and the OpenAPI document."""

from __future__ import annotations

import warnings

import pytest
from fastapi import APIRouter

from embedseg_service.api.app import create_app
from embedseg_service.records.settings import Settings
from embedseg_service.records.storage import LocalStorage

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient


def test_health(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/api/v1/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_ready_on_the_embedded_default(client, database_url) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/api/v1/ready")
    assert response.status_code == 200
    dialect = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    assert response.json() == {"status": "ready", "database": dialect, "broker": "embedded", "storage": "local"}


@pytest.mark.redis
def test_ready_pings_the_broker(settings) -> None:  # type: ignore[no-untyped-def]
    app = create_app(settings.model_copy(update={"broker_url": "redis://127.0.0.1:6379/0"}), migrate=False)
    with TestClient(app) as client:
        response = client.get("/api/v1/ready")
    assert response.status_code == 200
    assert response.json()["broker"] == "redis"


def test_ready_503_when_broker_unreachable(settings) -> None:  # type: ignore[no-untyped-def]
    app = create_app(settings.model_copy(update={"broker_url": "redis://user:secret@127.0.0.1:1/0"}), migrate=False)
    with TestClient(app) as client:
        response = client.get("/api/v1/ready")
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert detail.startswith("broker redis://***@127.0.0.1:1/0 unreachable: ")
    assert "secret" not in detail


def test_ready_503_when_storage_not_writable(app, client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    app.state.storage = LocalStorage(blocker)
    response = client.get("/api/v1/ready")
    assert response.status_code == 503
    assert response.json()["detail"].startswith(f"storage folder {blocker} is not writable: ")


def test_ready_503_and_routes_503_when_database_down(tmp_path) -> None:
    settings = Settings(
        _env_file=None, data_dir=tmp_path, database_url="postgresql+psycopg://postgres@127.0.0.1:1/test"
    )
    with TestClient(create_app(settings, migrate=False)) as client:
        ready = client.get("/api/v1/ready")
        listing = client.get("/api/v1/volumes")
    assert ready.status_code == 503
    assert ready.json() == {"detail": "database unreachable: OperationalError"}
    assert listing.status_code == 503
    assert listing.json() == {"detail": "database unavailable; retry later"}


def test_unknown_route_and_method_bodies(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get("/api/v1/nothing-here")
    assert (response.status_code, response.json()) == (404, {"detail": "Not Found"})
    response = client.put("/api/v1/volumes")
    assert (response.status_code, response.json()) == (405, {"detail": "Method Not Allowed"})


def test_unexpected_error_answers_500_detail(settings) -> None:  # type: ignore[no-untyped-def]
    app = create_app(settings, migrate=False)
    router = APIRouter()

    @router.get("/boom")
    def boom() -> None:
        raise KeyError("x")

    app.include_router(router)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error (KeyError); see the server log"}


def test_openapi_and_docs(client) -> None:  # type: ignore[no-untyped-def]
    assert client.get("/docs").status_code == 200
    schema = client.get("/api/v1/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/api/v1/health",
        "/api/v1/ready",
        "/api/v1/volumes",
        "/api/v1/volumes/{volume_id}",
        "/api/v1/volumes/{volume_id}/download",
        "/api/v1/volumes/{volume_id}/preview.png",
    ):
        assert path in paths
    assert set(paths["/api/v1/volumes/{volume_id}"]) == {"get", "delete"}
    form = paths["/api/v1/volumes"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"]
    assert set(form["properties"]) == {"file", "name", "kind", "axes", "voxel_size", "image_id"}


def test_cors_only_when_configured(settings) -> None:  # type: ignore[no-untyped-def]
    headers = {"Origin": "https://lab.example", "Access-Control-Request-Method": "GET"}
    with TestClient(create_app(settings, migrate=False)) as client:
        assert "access-control-allow-origin" not in client.options("/api/v1/health", headers=headers).headers
    configured = settings.model_copy(update={"cors_origins": ["https://lab.example"]})
    with TestClient(create_app(configured, migrate=False)) as client:
        response = client.options("/api/v1/health", headers=headers)
    assert response.headers["access-control-allow-origin"] == "https://lab.example"


def test_embedded_default_migrates_on_start(tmp_path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")
    with TestClient(create_app(settings)) as client:
        assert client.get("/api/v1/volumes").json()["total"] == 0
        assert client.get("/api/v1/ready").status_code == 200
    assert (tmp_path / "data" / "embedseg.db").is_file()
    assert (tmp_path / "data" / "storage").is_dir()
