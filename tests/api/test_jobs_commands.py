"""The service's commands plugged into ``embedseg``: ``serve`` options and banner, ``db``, ``worker``."""

from __future__ import annotations

from pathlib import Path

from embedseg_service.api.commands import describe, local_worker_hooks, redact
from embedseg_service.core.cli import build_parser, main
from embedseg_service.records.settings import Settings


def test_serve_defaults_to_localhost_port_8000() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", "9001"])
    assert (args.host, args.port) == ("0.0.0.0", 9001)
    args = build_parser().parse_args(["worker"])
    assert (args.queues, args.concurrency, args.pool) == (None, 1, "prefork")


def test_banner_says_where_the_docs_and_the_data_are(tmp_path: Path) -> None:
    embedded = describe(Settings(_env_file=None, data_dir=tmp_path / "d"), "127.0.0.1", 8123)
    assert "API docs:         http://127.0.0.1:8123/docs" in embedded
    assert f"Data directory:   {(tmp_path / 'd').resolve()}" in embedded
    assert f"Files:            {(tmp_path / 'd' / 'storage').resolve()}" in embedded
    assert "Jobs:             embedded local worker (1 process(es))" in embedded
    production = describe(
        Settings(
            _env_file=None, database_url="postgresql+psycopg://u:secret@db/x", broker_url="redis://:pw@redis:6379/0"
        ),
        "0.0.0.0",
        8000,
    )
    assert "http://localhost:8000/docs" in production
    assert "Database:         postgresql+psycopg://u:***@db/x" in production
    assert "Celery via redis://:***@redis:6379/0, queue 'gpu'" in production
    assert "secret" not in production and "pw@" not in production


def test_redact_keeps_user_and_host() -> None:
    assert redact("postgresql+psycopg://postgres@127.0.0.1/test") == "postgresql+psycopg://postgres@127.0.0.1/test"
    assert redact("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_db_upgrade_current_downgrade(tmp_path: Path, capsys) -> None:
    from embedseg_service.records.settings import set_settings

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    set_settings(Settings(_env_file=None, database_url=url))
    try:
        assert main(["db", "current"]) == 0
        assert "revision none" in capsys.readouterr().out
        assert main(["db", "upgrade"]) == 0
        out = capsys.readouterr().out
        assert "up to date" in out and "(head " in out
        assert main(["db", "downgrade", "base"]) == 0
        assert "revision none" in capsys.readouterr().out
    finally:
        set_settings(None)


def test_worker_needs_a_broker(capsys) -> None:
    from embedseg_service.records.settings import set_settings

    set_settings(Settings(_env_file=None))
    try:
        assert main(["worker"]) == 2
    finally:
        set_settings(None)
    assert "set EMBEDSEG_BROKER_URL=redis://host:6379/0" in capsys.readouterr().err


def test_serve_hooks_run_the_embedded_local_worker_as_the_dispatcher(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from embedseg_service.records.db import run_migrations
    from embedseg_service.worker.local import LocalWorker

    settings = Settings(_env_file=None, data_dir=tmp_path)
    run_migrations(settings.database_url_resolved)
    app = SimpleNamespace(state=SimpleNamespace())
    (start,), (stop,) = local_worker_hooks(settings)
    start(app)
    worker = app.state.dispatcher
    try:
        assert isinstance(worker, LocalWorker) and worker.alive
    finally:
        stop(app)
    assert not worker.alive
