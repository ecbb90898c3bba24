"""``embedseg serve`` and ``embedseg db``, plugged into the ``embedseg`` command line (entry points).

``embedseg serve`` on the embedded default (no ``EMBEDSEG_BROKER_URL``) migrates the SQLite
database, starts the API and an embedded local worker, and prints where the docs and the data
are. With ``EMBEDSEG_DATABASE_URL=postgresql+psycopg://...`` and ``EMBEDSEG_BROKER_URL=redis://...``
it serves the API only; jobs go to Celery workers (``embedseg worker``) and migrations run
with ``embedseg db upgrade``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from typing import Any

from embedseg_service.records.settings import LOOPBACK_NAMES, Settings, get_settings

log = logging.getLogger(__name__)


def redact(url: str) -> str:
    """``url`` without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else f"{scheme}://{user}@{host}"


def local_worker_hooks(settings: Settings) -> tuple[list[Any], list[Any]]:
    """Start-up and shutdown hooks that run an embedded local worker, the app's dispatcher meanwhile."""
    from embedseg_service.worker.local import LocalWorker

    def start(app: Any) -> None:
        app.state.dispatcher = LocalWorker(settings).start()

    def stop(app: Any) -> None:
        worker = getattr(app.state, "dispatcher", None)
        if worker is not None and hasattr(worker, "stop"):
            worker.stop()

    return [start], [stop]


def describe(settings: Settings, host: str, port: int) -> str:
    """The start-up banner: URLs of the API and its docs, where the data lives, how jobs run."""
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    lines = [
        f"EmbedSeg service: {base}/api/v1",
        f"API docs:         {base}/docs",
        f"Database:         {redact(settings.database_url_resolved)}",
        f"Files:            {settings.storage_url or settings.storage_path.expanduser().resolve()}",
    ]
    if settings.embedded:
        lines.insert(2, f"Data directory:   {settings.data_dir.expanduser().resolve()}")
        lines.append(f"Jobs:             embedded local worker ({settings.local_workers} process(es))")
    else:
        lines.append(
            f"Jobs:             Celery via {redact(settings.broker_url or '')}, queue '{settings.gpu_queue}' "
            "(start workers with: embedseg worker)"
        )
    return "\n".join(lines)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a listening address) is reachable only from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def access_check(settings: Settings, host: str, keys_configured: bool) -> tuple[bool, str]:
    """(may start, what to print) for listening on ``host``: without API keys only a loopback address is allowed."""
    if keys_configured:
        notice = "Access:           API keys required (Authorization: Bearer <key>)"
        if not is_loopback(host) and all(name in LOOPBACK_NAMES for name in settings.allowed_hosts):
            notice += (
                f"\nWarning:          only the Host names {', '.join(settings.allowed_hosts)} are answered; set "
                "EMBEDSEG_ALLOWED_HOSTS to the names clients use (JSON list, e.g. '[\"gpu1.lab.org\"]')"
            )
        return True, notice
    if is_loopback(host):
        return True, (
            "Access:           no API keys: open to anyone on this machine (create keys with "
            "'embedseg keys create --owner LAB' to require them)"
        )
    return False, (
        f"embedseg serve: refusing to listen on {host} without API keys: anyone who can reach the port could "
        "read, change and delete every lab's data.\nCreate an admin key first:  embedseg keys create --owner admin "
        "--admin\n(then one per lab: embedseg keys create --owner LAB), or listen on 127.0.0.1."
    )


def _keys_configured(settings: Settings) -> bool:
    from sqlalchemy.exc import DBAPIError

    from embedseg_service.records.db import get_sessionmaker
    from embedseg_service.records.keys import keys_exist

    try:
        with get_sessionmaker(settings)() as session:
            return keys_exist(session)
    except DBAPIError as error:
        raise SystemExit(
            f"embedseg serve: cannot read the API keys from {redact(settings.database_url_resolved)} "
            f"({type(error.orig).__name__}); is the database migrated? run: embedseg db upgrade"
        ) from None


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from embedseg_service.api.app import create_app
    from embedseg_service.records.db import run_migrations

    settings = get_settings()
    migrate = settings.is_sqlite and settings.embedded
    if migrate:
        settings.data_dir.expanduser().mkdir(parents=True, exist_ok=True)
        run_migrations(settings.database_url_resolved)
    may_start, notice = access_check(settings, args.host, _keys_configured(settings))
    if not may_start:
        print(notice, file=sys.stderr, flush=True)
        return 2
    on_startup, on_shutdown = local_worker_hooks(settings) if settings.embedded else ([], [])
    app = create_app(settings, migrate=False, on_startup=on_startup, on_shutdown=on_shutdown)
    print(describe(settings, args.host, args.port), notice, sep="\n", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def register_serve(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``embedseg serve [--host 127.0.0.1] [--port 8000]``."""
    parser = subparsers.add_parser(
        "serve",
        help="run the REST service (embedded default: API + local worker on SQLite, no Redis needed)",
        description="Run the REST API. Without EMBEDSEG_BROKER_URL jobs run on an embedded local worker and the "
        "SQLite database under EMBEDSEG_DATA_DIR is migrated automatically; with EMBEDSEG_BROKER_URL and "
        "EMBEDSEG_DATABASE_URL jobs go to Celery workers ('embedseg worker') and migrations run with "
        "'embedseg db upgrade'.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=cmd_serve)
    return parser


def _current(url: str) -> tuple[str | None, str | None]:
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from embedseg_service.records.db import alembic_config, make_engine

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            current = MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
    return current, head


def cmd_db(args: argparse.Namespace) -> int:
    from embedseg_service.records.db import downgrade, run_migrations

    url = get_settings().database_url_resolved
    if args.db_command == "upgrade":
        run_migrations(url, args.revision)
    elif args.db_command == "downgrade":
        downgrade(url, args.revision)
    current, head = _current(url)
    state = "up to date" if current == head else "behind head" if current else "empty (run: embedseg db upgrade)"
    print(f"database {redact(url)}: revision {current or 'none'} (head {head}; {state})")
    return 0


def register_db(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``embedseg db upgrade|downgrade|current``."""
    parser = subparsers.add_parser("db", help="database migrations (Alembic): upgrade, downgrade, current")
    sub = parser.add_subparsers(dest="db_command", metavar="ACTION")
    sub.required = True
    up = sub.add_parser("upgrade", help="migrate the database to a revision (default: head)")
    up.add_argument("revision", nargs="?", default="head")
    down = sub.add_parser("downgrade", help="migrate the database back to a revision (e.g. -1 or base)")
    down.add_argument("revision", help="target revision: -1 (one step), base (empty) or a revision id")
    sub.add_parser("current", help="print the database's revision and the newest one")
    parser.set_defaults(func=cmd_db)
    return parser
