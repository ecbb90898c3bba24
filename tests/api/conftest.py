"""Fixtures for the HTTP API: an app on SQLite or PostgreSQL (tables made by the migrations)."""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from api.app import create_app
from api.db import make_engine, run_migrations
from api.settings import Settings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_available() -> bool:
    try:
        engine = make_engine(POSTGRES_ADMIN_URL)
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        engine.dispose()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def _postgres_up() -> bool:
    return postgres_available()


@pytest.fixture
def fresh_postgres_url(_postgres_up: bool) -> Iterator[str]:
    """URL of an empty PostgreSQL schema in database ``test`` (dropped afterwards)."""
    if not _postgres_up:
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432 (database test)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_ADMIN_URL)
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{POSTGRES_ADMIN_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database: SQLite file or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'embedseg.db'}"
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    run_migrations(url)
    return url


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,
        data_dir=tmp_path,
        database_url=database_url,
        broker_url=None,
        storage_dir=tmp_path / "storage",
        max_upload_bytes=4 * 1024 * 1024,
        upload_chunk_bytes=64 * 1024,
    )


@pytest.fixture
def app(settings: Settings):  # type: ignore[no-untyped-def]
    return create_app(settings, migrate=False)


@pytest.fixture
def client(app) -> Iterator[TestClient]:  # type: ignore[no-untyped-def]
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def session(app):  # type: ignore[no-untyped-def]
    with app.state.sessionmaker() as db_session:
        yield db_session
