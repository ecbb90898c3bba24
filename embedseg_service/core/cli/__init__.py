"""The ``embedseg`` command line: ``train``, ``predict``, ``evaluate``, ``export`` and plug-in sub-commands.

Plug-ins are entry points of the group ``embedseg.commands``; each names a
``register(subparsers)`` function that adds its sub-parser and sets ``func`` (called with the
parsed arguments, returning an exit code or ``None``). A plug-in that cannot be imported does
not break the built-in commands: it is listed with the reason and fails only when used.

Bad input ends with exit code 2 and a one-line message on stderr (no traceback).

Modules: the program (:mod:`.program`: parser, plug-ins, ``main``), argument types (:mod:`.arguments`),
input files (:mod:`.files`) and one module per built-in command (:mod:`.train`, :mod:`.predict`,
:mod:`.evaluate`, :mod:`.export`).
"""

from __future__ import annotations

from embedseg_service.core.cli.files import CommandError
from embedseg_service.core.cli.program import BUILTIN_COMMANDS, EXIT_USAGE, PLUGIN_GROUP, build_parser, main

__all__ = ["BUILTIN_COMMANDS", "EXIT_USAGE", "PLUGIN_GROUP", "CommandError", "build_parser", "main"]
