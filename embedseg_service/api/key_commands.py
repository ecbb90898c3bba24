"""``embedseg keys create|list|revoke``: API keys, managed by an admin on the server's database.

``create`` prints the new key on the last line of its output: the only time it is shown (the
database keeps its hash).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from embedseg_service.records.settings import get_settings


def _sessions() -> Any:
    from embedseg_service.records.db import get_sessionmaker, run_migrations

    settings = get_settings()
    if settings.is_sqlite and settings.embedded:
        settings.data_dir.expanduser().mkdir(parents=True, exist_ok=True)
        run_migrations(settings.database_url_resolved)
    return get_sessionmaker(settings)


def cmd_keys(args: argparse.Namespace) -> int:
    from embedseg_service.records import keys

    with _sessions()() as session:
        if args.keys_command == "create":
            try:
                new = keys.create_key(session, args.owner, admin=args.admin, name=args.name)
            except ValueError as error:
                print(f"embedseg keys create: {error}", file=sys.stderr)
                return 2
            role = "admin key (sees every owner's data)" if new.row.admin else "key"
            print(f"created {role} {new.row.prefix}... for owner {new.row.owner!r} (id {new.row.id})")
            print("store it now: it is not shown again; send it as 'Authorization: Bearer <key>'")
            print(new.secret)
        elif args.keys_command == "list":
            rows = keys.list_keys(session, owner=args.owner)
            print(f"{'prefix':<14}{'owner':<20}{'admin':<7}{'created':<22}{'last used':<22}{'revoked':<22}id")
            for row in rows:
                print(
                    f"{row.prefix:<14}{row.owner[:19]:<20}{'yes' if row.admin else 'no':<7}{_when(row.created_at):<22}"
                    f"{_when(row.last_used_at):<22}{_when(row.revoked_at):<22}{row.id}"
                )
        else:
            try:
                row = keys.revoke_key(session, args.key)
            except keys.KeyNotFound as error:
                print(f"embedseg keys revoke: {error}", file=sys.stderr)
                return 1
            print(f"revoked key {row.prefix}... of owner {row.owner!r} (id {row.id}) at {_when(row.revoked_at)}")
    return 0


def _when(value: Any) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def register_keys(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``embedseg keys create|list|revoke``."""
    parser = subparsers.add_parser(
        "keys",
        help="API keys: create (printed once), list, revoke",
        description="Manage the API keys of the database in EMBEDSEG_DATABASE_URL (default: the embedded SQLite). "
        "Once any key exists, every API route but /health and /ready needs one.",
    )
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION")
    sub.required = True
    create = sub.add_parser("create", help="create a key for an owner; the key is the last line printed")
    create.add_argument("--owner", required=True, help="the lab or pipeline the key's data belongs to")
    create.add_argument("--admin", action="store_true", help="the key sees and manages every owner's data")
    create.add_argument("--name", help="a note to recognise the key by in listings")
    listing = sub.add_parser("list", help="list keys (never the keys themselves)")
    listing.add_argument("--owner", help="only this owner's keys")
    revoke = sub.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("key", help="the key's id or printed prefix (see: embedseg keys list)")
    parser.set_defaults(func=cmd_keys)
    return parser
