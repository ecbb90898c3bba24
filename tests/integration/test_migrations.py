"""Alembic migrations: upgrade head and downgrade base on SQLite and PostgreSQL, with no drift."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from helpers import service_missing

from embedseg_service.records.db import alembic_config, downgrade, make_engine, migrations_dir, run_migrations
from embedseg_service.records.orm import Base

REPO = Path(__file__).resolve().parents[2]
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
TABLES = {"jobs", "volumes", "models", "job_volumes", "api_keys", "idempotency_keys", "workers"}


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """An empty schema in the PostgreSQL database ``test`` (dropped afterwards)."""
    schema = f"mig_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES)
    try:
        with admin.begin() as connection:
            connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    except sa.exc.OperationalError:
        admin.dispose()
        service_missing("PostgreSQL is not reachable at 127.0.0.1:5432 (database test)")
    try:
        yield f"{POSTGRES}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'migrations.db'}"
    return request.getfixturevalue("postgres_url")


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return set(sa.inspect(connection).get_table_names())
    finally:
        engine.dispose()


def drift(url: str, metadata: sa.MetaData = Base.metadata) -> list:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, metadata)
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    heads = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    assert len(heads) == 1, f"migrations have several heads: {heads}"
    return heads[0]


def test_upgrade_head_matches_the_models_then_downgrade_base(url: str) -> None:
    run_migrations(url)
    assert tables(url) == TABLES | {"alembic_version"}
    assert current_revision(url) == head()
    assert drift(url) == []
    changed = sa.MetaData()
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["jobs"].append_column(sa.Column("extra", sa.Integer()))
    assert [d[0] for d in drift(url, changed)] == ["add_column"]  # the comparison does see differences
    downgrade(url, "base")
    assert tables(url) == {"alembic_version"}
    assert current_revision(url) is None
    run_migrations(url)  # repeatable
    assert tables(url) == TABLES | {"alembic_version"}
    assert drift(url) == []
    run_migrations(url)  # already at head: nothing to do
    assert current_revision(url) == head()


def test_constraint_names_follow_the_convention(url: str) -> None:
    run_migrations(url)
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            inspector = sa.inspect(connection)
            assert inspector.get_pk_constraint("jobs")["name"] in ("pk_jobs", None)  # SQLite does not keep pk names
            foreign = {fk["name"] for fk in inspector.get_foreign_keys("volumes")}
            assert foreign == {"fk_volumes_source_job_id_jobs", "fk_volumes_image_volume_id_volumes"}
            checks = {ck["name"] for ck in inspector.get_check_constraints("jobs")}
            assert checks == {"ck_jobs_kind", "ck_jobs_status", "ck_jobs_progress_range"}
            connection.rollback()
            with pytest.raises(sa.exc.IntegrityError):
                with connection.begin():
                    connection.execute(
                        sa.text(
                            "INSERT INTO jobs (id, kind, status, progress, spec, cancel_requested, created_at, "
                            "attempts) "
                            "VALUES ('j', 'train', 'paused', 0, '{}', false, CURRENT_TIMESTAMP, 0)"
                        )
                    )
    finally:
        engine.dispose()


def volume_link_ondelete(url: str) -> str | None:
    """The ``ON DELETE`` rule of the job_volumes -> volumes foreign key."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            (link,) = [
                fk for fk in sa.inspect(connection).get_foreign_keys("job_volumes") if fk["referred_table"] == "volumes"
            ]
    finally:
        engine.dispose()
    return (link.get("options") or {}).get("ondelete")


def test_a_volume_linked_to_a_job_is_restricted_and_the_downgrade_restores_cascade(url: str) -> None:
    run_migrations(url)
    assert volume_link_ondelete(url) == "RESTRICT"
    downgrade(url, "0003_idempotency_keys")
    assert volume_link_ondelete(url) == "CASCADE"


def test_migrations_ship_inside_the_package() -> None:
    folder = migrations_dir()
    assert (folder / "env.py").is_file()
    assert (folder / "script.py.mako").is_file()
    assert list((folder / "versions").glob("0001_*.py"))


def test_alembic_command_line_uses_the_settings(tmp_path: Path) -> None:
    database = tmp_path / "cli.db"
    env = {**os.environ, "EMBEDSEG_DATABASE_URL": f"sqlite:///{database}"}
    for args, expected in (
        (["upgrade", "head"], TABLES | {"alembic_version"}),
        (["downgrade", "base"], {"alembic_version"}),
    ):
        completed = subprocess.run(
            [sys.executable, "-m", "alembic", "-c", str(REPO / "alembic.ini"), *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert completed.returncode == 0, completed.stderr
        assert tables(f"sqlite:///{database}") == expected
