"""Engines and sessions: SQLite pragmas, one cached engine per URL, commit/rollback scopes."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from embedseg_service.records.db import (
    SQLITE_POOL_SIZE,
    dispose_engines,
    get_engine,
    make_engine,
    run_migrations,
    session_scope,
)
from embedseg_service.records.orm import Job
from embedseg_service.records.settings import Settings


def test_sqlite_engine_has_wal_and_foreign_keys(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'x.db'}")
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("PRAGMA foreign_keys")).scalar() == 1
            assert connection.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"
    finally:
        engine.dispose()
    assert (tmp_path / "sub" / "x.db").is_file()


def test_get_engine_is_cached_per_url_and_session_scope_commits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(_env_file=None, data_dir=tmp_path / "data")
    run_migrations(settings.database_url_resolved)
    try:
        assert get_engine(settings) is get_engine(settings)
        other = Settings(_env_file=None, data_dir=tmp_path / "other")
        assert get_engine(other) is not get_engine(settings)
        with session_scope(settings) as session:
            session.add(Job(kind="train", status="queued", spec={}, progress=0.0))
        with pytest.raises(RuntimeError), session_scope(settings) as session:
            session.add(Job(kind="predict", status="queued", spec={}, progress=0.0))
            session.flush()
            raise RuntimeError("rolled back")
        with session_scope(settings) as session:
            assert session.scalars(sa.select(Job.kind)).all() == ["train"]
    finally:
        dispose_engines()
    assert (tmp_path / "data" / "embedseg.db").is_file()


def test_unknown_constructor_argument_is_refused() -> None:
    with pytest.raises(TypeError, match="'colour' is an invalid keyword argument for Job"):
        Job(colour="red")


def test_sqlite_file_engine_reuses_its_connections_under_concurrency(tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    opened = []
    sa.event.listen(engine, "connect", lambda *_: opened.append(1))
    try:
        for _ in range(2):
            connections = [engine.connect() for _ in range(SQLITE_POOL_SIZE)]
            for connection in connections:
                assert connection.execute(sa.text("SELECT 1")).scalar() == 1
            for connection in connections:
                connection.close()
        assert len(opened) == SQLITE_POOL_SIZE  # the second round opened none
    finally:
        engine.dispose()
