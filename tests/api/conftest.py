"""Fixtures for the HTTP API: an app on SQLite or PostgreSQL (tables made by the migrations)."""

from __future__ import annotations

import shutil
import sqlite3
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from helpers import service_missing

from embedseg_service.api.app import create_app
from embedseg_service.records.db import make_engine, run_migrations
from embedseg_service.records.orm import Base
from embedseg_service.records.settings import Settings

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


@pytest.fixture(scope="session")
def _postgres_migrated(_postgres_up: bool) -> Iterator[str]:
    """URL of a PostgreSQL schema (in database ``test``) made by the migrations once per test run."""
    if not _postgres_up:
        service_missing("PostgreSQL is not reachable at 127.0.0.1:5432 (database test)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_ADMIN_URL)
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = f"{POSTGRES_ADMIN_URL}?options=-csearch_path%3D{schema}"
    try:
        run_migrations(url)
        yield url
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file made by the migrations once per test run (copied for each test)."""
    path = tmp_path_factory.mktemp("sqlite-template") / "embedseg.db"
    run_migrations(f"sqlite:///{path}")
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    return path


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database at the migrations' head: a fresh SQLite file or the emptied PostgreSQL schema."""
    if request.param == "sqlite":
        path = tmp_path / "embedseg.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("_postgres_migrated")
    engine = make_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(sa.text("SET LOCAL lock_timeout = '20s'"))
            tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
            connection.execute(sa.text(f"TRUNCATE {tables} CASCADE"))
    finally:
        engine.dispose()
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
