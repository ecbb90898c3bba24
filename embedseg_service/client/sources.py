"""What an upload reads: TIFF files named directly, in a folder or by a glob pattern, and numpy arrays."""

from __future__ import annotations

import glob
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from embedseg_service.core.data.tiff_write import write_labels, write_tiff

TIFF_SUFFIXES = (".tif", ".tiff")
GLOB_CHARACTERS = frozenset("*?[")
ARRAY_AXES = {2: "YX", 3: "ZYX", 4: "CZYX"}
"""Axes of an uploaded array by its number of dimensions, unless given."""

PathSource = str | os.PathLike[str]


def _is_tiff(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(TIFF_SUFFIXES)


def tiff_files(source: PathSource | Sequence[PathSource]) -> list[Path]:
    """The files an upload of ``source`` sends, in order.

    A file is itself; a folder gives its ``.tif``/``.tiff`` files (not its subfolders) sorted by
    name; a string with ``*``, ``?`` or ``[`` is a glob pattern whose matching files are sorted by
    name; a list gives the files of each entry in turn. Raises FileNotFoundError when a path does
    not exist or a folder or pattern holds no TIFF file.
    """
    if isinstance(source, Sequence) and not isinstance(source, str):
        return [path for entry in source for path in tiff_files(entry)]
    text = os.fspath(source)
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = sorted(child for child in path.iterdir() if _is_tiff(child))
        if not found:
            raise FileNotFoundError(f"folder {text} holds no .tif or .tiff file")
        return found
    if GLOB_CHARACTERS & set(text):
        found = sorted(Path(match) for match in glob.glob(text) if Path(match).is_file())
        if not found:
            raise FileNotFoundError(f"no file matches the pattern {text!r}")
        return found
    raise FileNotFoundError(f"{text} does not exist; give a TIFF file, a folder of TIFFs or a glob pattern")


def voxel_size_field(voxel_size: Sequence[float] | str | None) -> str | None:
    """The ``voxel_size`` form field: ``"z,y,x"`` or ``"y,x"`` from a sequence of numbers (a string as is)."""
    if voxel_size is None or isinstance(voxel_size, str):
        return voxel_size
    return ",".join(repr(float(value)) for value in voxel_size)


@contextmanager
def array_as_tiff(
    data: np.ndarray,
    *,
    labels: bool,
    axes: str | None = None,
    voxel_size: Sequence[float] | None = None,
) -> Iterator[Path]:
    """A temporary TIFF file holding ``data``, removed when the block ends.

    ``data`` is ``(Y, X)``, ``(Z, Y, X)`` or ``(C, Z, Y, X)`` unless ``axes`` names its axes (one of
    ``YX``, ``ZYX``, ``CYX``, ``CZYX``). ``labels`` writes a label image (``(Y, X)`` or ``(Z, Y, X)``
    integers >= 0, stored as the smallest type that holds its ids). The file keeps axes and voxel
    size (ImageJ or OME metadata), as the service's own files do. Raises ValueError for an
    array that cannot be written so.
    """
    data = np.asarray(data)
    with tempfile.TemporaryDirectory(prefix="embedseg-upload-") as folder:
        path = Path(folder) / "array.tif"
        if labels:
            write_labels(path, data, voxel_size=voxel_size)
        else:
            named = axes or ARRAY_AXES.get(data.ndim)
            if named is None:
                raise ValueError(f"an array of {data.ndim} dimensions needs axes (YX, ZYX, CYX or CZYX)")
            write_tiff(path, data, axes=named, voxel_size=voxel_size)
        yield path
