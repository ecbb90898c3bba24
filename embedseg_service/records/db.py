"""Database engine, sessions and migrations (SQLAlchemy 2.0; SQLite or PostgreSQL via psycopg 3)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from embedseg_service.records.settings import Settings, get_settings

if TYPE_CHECKING:
    from alembic.config import Config


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


# Connections a file-backed SQLite engine keeps open: one per thread of the threadpool that runs
# sync routes (anyio's default limit is 40), so that concurrent requests reuse connections
# instead of opening (and setting the pragmas of) a new one each time and closing it after.
SQLITE_POOL_SIZE = 40
SQLITE_MAX_OVERFLOW = 40


def make_engine(url: str, *, echo: bool = False) -> Engine:
    """An engine for ``url``: SQLite with WAL, foreign keys and cross-thread use; PostgreSQL with pre-ping.

    A file-backed SQLite database gets its parent folder created and a pool of
    ``SQLITE_POOL_SIZE`` connections (WAL lets them read while one of them writes).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
        if not database or database == ":memory:":
            kwargs["poolclass"] = StaticPool
        else:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs.update(pool_size=SQLITE_POOL_SIZE, max_overflow=SQLITE_MAX_OVERFLOW)
        engine = create_engine(url, echo=echo, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, echo=echo, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Session factory bound to ``engine``; objects stay readable after commit."""
    return sessionmaker(bind=engine, expire_on_commit=False)


_engines: dict[tuple[str, bool], Engine] = {}
_engines_lock = threading.Lock()


def get_engine(settings: Settings | None = None) -> Engine:
    """The process-wide engine for the settings' database URL (one per URL)."""
    settings = settings or get_settings()
    key = (settings.database_url_resolved, settings.sql_echo)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = make_engine(key[0], echo=key[1])
        return engine


def get_sessionmaker(settings: Settings | None = None) -> sessionmaker[Session]:
    """A session factory bound to the process-wide engine of the settings' database (:func:`get_engine`)."""
    return make_sessionmaker(get_engine(settings))


def dispose_engines() -> None:
    """Close every cached engine's connections and forget them (tests, shutdown)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


@contextmanager
def session_scope(settings: Settings | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(settings)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def migrations_dir() -> Path:
    """Folder of the Alembic scripts shipped in :mod:`embedseg_service.migrations`."""
    folder = resources.files("embedseg_service.migrations")
    if not isinstance(folder, Path) or not (folder / "env.py").is_file():
        raise RuntimeError("the Alembic scripts of embedseg_service.migrations are not on disk; reinstall the project")
    return folder.resolve()


def alembic_config(url: str) -> Config:
    """An Alembic ``Config`` built in code for ``url`` (no ini file needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["embedseg_url"] = url
    return config


def run_migrations(url: str | None = None, revision: str = "head") -> None:
    """Upgrade the database at ``url`` (default: the settings' URL) to ``revision``."""
    from alembic import command

    url = url or get_settings().database_url_resolved
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Downgrade the database at ``url`` to ``revision``."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)
