"""Input files of the ``embedseg`` command line: TIFF files and folders, files matched by name, and
:class:`CommandError` for what the user must fix."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

TIFF_SUFFIXES = (".tif", ".tiff")


class CommandError(Exception):
    """A user error: printed as one line, exit code 2."""


def tiff_files(path: Path) -> list[Path]:
    """The TIFF files of a folder (sorted by name), or ``[path]`` for a file."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES)
        if not files:
            raise CommandError(f"no .tif/.tiff files in {path}")
        return files
    if path.is_file():
        return [path]
    raise CommandError(f"{path} does not exist")


def match_by_name(first: Path, second: Path, names: tuple[str, str]) -> list[tuple[str, Path, Path]]:
    """Pairs ``(name, file_a, file_b)`` of files with the same name (without .tif suffix).

    Two files are paired as they are; two folders are matched by name and every file of the
    first must have a partner in the second.
    """
    from embedseg_service.core.data.io import stem

    if first.is_file() and second.is_file():
        return [(stem(first), first, second)]
    a = {stem(p): p for p in tiff_files(first)}
    b = {stem(p): p for p in tiff_files(second)}
    missing = sorted(set(a) - set(b))
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise CommandError(f"no {names[1]} file for {len(missing)} {names[0]} file(s) in {second}: {shown}")
    return [(name, a[name], b[name]) for name in sorted(a)]


def read(path: Path) -> Any:
    """:func:`embedseg_service.core.data.io.read_tiff`, a file it refuses as a :class:`CommandError`."""
    from embedseg_service.core.data.io import read_tiff

    try:
        return read_tiff(path)
    except ValueError as exc:
        raise CommandError(f"{path}: {exc}") from None


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar on stderr."""
    from tqdm import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)
