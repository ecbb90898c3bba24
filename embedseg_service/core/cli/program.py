"""The ``embedseg`` program: its parser (built-in and plug-in sub-commands) and :func:`main`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

from embedseg_service.core.cli import evaluate, export, predict, train
from embedseg_service.core.cli.files import CommandError

PLUGIN_GROUP = "embedseg.commands"
BUILTIN_COMMANDS = ("train", "predict", "evaluate", "export")
EXIT_USAGE = 2


def _unavailable(name: str, reason: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        raise CommandError(f"the '{name}' command is not available: {reason}")

    return run


def _register_plugins(sub: Any) -> None:
    try:
        entry_points = metadata.entry_points(group=PLUGIN_GROUP)
    except Exception:  # a broken installation must not break the built-in commands
        return
    for ep in sorted(entry_points, key=lambda e: e.name):
        if ep.name in BUILTIN_COMMANDS:
            continue
        try:
            register = ep.load()
            register(sub)
        except Exception as exc:  # any failure of a plug-in is reported, not raised
            reason = f"{type(exc).__name__}: {exc}"
            if ep.name not in sub.choices:
                p = sub.add_parser(ep.name, help=f"(unavailable: {reason})")
                p.set_defaults(func=_unavailable(ep.name, reason))


def build_parser(with_plugins: bool = True) -> argparse.ArgumentParser:
    """The ``embedseg`` argument parser (plug-ins from the ``embedseg.commands`` group when asked)."""
    parser = argparse.ArgumentParser(prog="embedseg", description="EmbedSeg instance segmentation (2D and 3D).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    train.add_parser(sub)
    predict.add_parser(sub)
    evaluate.add_parser(sub)
    export.add_parser(sub)
    if with_plugins:
        _register_plugins(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``embedseg`` command line; returns the exit code (2 for bad input)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # the built-in commands never import the plug-ins (the service stack is not needed to train)
    builtin = bool(args_list) and args_list[0] in BUILTIN_COMMANDS
    parser = build_parser(with_plugins=not builtin)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse has printed its message
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code = func(args)
    except CommandError as exc:
        print(f"embedseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        print(f"embedseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
