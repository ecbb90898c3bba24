"""Alembic environment: metadata from ``embedseg_service.records.orm``, URL from the caller or the service settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from embedseg_service.records.db import make_engine
from embedseg_service.records.orm import Base, UTCDateTime

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    url = config.attributes.get("embedseg_url")
    if url:
        return url
    configured = config.get_main_option("sqlalchemy.url")
    if configured:
        return configured
    from embedseg_service.records.settings import get_settings

    return get_settings().database_url_resolved


def _render_item(type_: str, obj: object, _autogen_context) -> str | bool:  # type: ignore[no-untyped-def]
    """Render the ORM's UTC timestamp type as a plain ``sa.DateTime(timezone=True)`` in new revisions."""
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    return False


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    dialect = connection.dialect.name if connection is not None else url.split(":", 1)[0].split("+", 1)[0]
    options = {
        "target_metadata": target_metadata,
        "render_as_batch": dialect == "sqlite",
        "compare_type": True,
        "compare_server_default": False,
        "render_item": _render_item,
    }
    if connection is not None:
        context.configure(connection=connection, **options)
    else:
        context.configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"}, **options)


def run_migrations_offline() -> None:
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
