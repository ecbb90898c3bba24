"""TIFF writing with voxel sizes, through a temporary file renamed into place (torch-free)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import tifffile

from embedseg_service.core.data.io import CANONICAL_AXES, SUPPORTED_DTYPES
from embedseg_service.core.data.labels import check_label_image

_IMAGEJ_DTYPES = ("uint8", "uint16", "float32")


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_voxel_size(voxel_size: Sequence[float] | None, spatial_dims: int) -> tuple[float, ...] | None:
    if voxel_size is None:
        return None
    values = tuple(float(v) for v in voxel_size)
    if len(values) != spatial_dims:
        raise ValueError(f"voxel_size needs {spatial_dims} values (array order), got {values}")
    if any(not (v > 0) or not np.isfinite(v) for v in values):
        raise ValueError(f"voxel_size values must be positive, got {values}")
    return values


def _file_layout(axes: str, dtype: np.dtype, voxel: tuple[float, ...] | None) -> tuple[bool, dict[str, Any]]:
    """Whether the file stores Z before C (ImageJ order), and the :func:`tifffile.imwrite` arguments that
    record the axes and voxel size: an ImageJ hyperstack for uint8/uint16/float32, else OME-TIFF."""
    spatial = axes.replace("C", "")
    if dtype.name in _IMAGEJ_DTYPES:
        metadata: dict[str, Any] = {"axes": axes.replace("CZ", "ZC")}
        resolution = None
        if voxel is not None:
            resolution = (1.0 / voxel[-1], 1.0 / voxel[-2])
            metadata["unit"] = "um"
            if "Z" in spatial:
                metadata["spacing"] = voxel[0]
        return axes == "CZYX", {"imagej": True, "resolution": resolution, "metadata": metadata}
    metadata = {"axes": axes}
    if voxel is not None:
        for letter, size in zip(spatial, voxel):
            metadata[f"PhysicalSize{letter}"] = size
            metadata[f"PhysicalSize{letter}Unit"] = "µm"
    return False, {"ome": True, "metadata": metadata}


def _check_array(axes: str, shape: tuple[int, ...], dtype: np.dtype) -> str:
    axes = axes.upper()
    if axes not in CANONICAL_AXES:
        raise ValueError(f"axes must be one of {', '.join(CANONICAL_AXES)}, got {axes!r}")
    if len(shape) != len(axes):
        raise ValueError(f"axes {axes!r} do not fit an array of shape {shape}")
    if dtype.name not in SUPPORTED_DTYPES:
        raise ValueError(f"pixel type {dtype.name} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    return axes


def write_tiff(
    path: str | os.PathLike | BinaryIO,
    data: np.ndarray,
    *,
    axes: str,
    voxel_size: Sequence[float] | None = None,
    compress: bool = True,
) -> None:
    """Write ``data`` with axes ``axes`` (one of ``YX``, ``ZYX``, ``CYX``, ``CZYX``) to ``path``.

    uint8, uint16 and float32 are written as ImageJ hyperstacks (voxel size in the resolution
    tags and ``spacing``, unit µm); other supported types as OME-TIFF with physical sizes. The
    file is written to a temporary name in the same folder, then renamed into place; ``path`` may
    also be a seekable binary file object (e.g. ``io.BytesIO``), written directly.
    """
    data = np.asarray(data)
    axes = _check_array(axes, data.shape, data.dtype)
    voxel = _check_voxel_size(voxel_size, len(axes.replace("C", "")))
    z_first, options = _file_layout(axes, data.dtype, voxel)
    array = np.moveaxis(data, 0, 1) if z_first else data
    compression = "zlib" if compress else None

    def write(tmp: str | BinaryIO) -> None:
        tifffile.imwrite(tmp, array, compression=compression, **options)

    if isinstance(path, (str, os.PathLike)):
        _atomic_write(path, write)
    else:
        write(path)


def write_tiff_planes(
    path: str | os.PathLike,
    plane: Callable[[int, int], np.ndarray],
    *,
    shape: Sequence[int],
    dtype: np.dtype,
    axes: str,
    voxel_size: Sequence[float] | None = None,
    compress: bool = True,
) -> None:
    """Write the image of ``shape`` and ``axes`` whose ``(Y, X)`` plane of channel ``c`` and slice ``z`` is
    ``plane(c, z)``, one plane at a time (never the whole image in memory); the file is the one
    :func:`write_tiff` writes for the same array."""
    shape = tuple(int(n) for n in shape)
    dtype = np.dtype(dtype)
    axes = _check_array(axes, shape, dtype)
    voxel = _check_voxel_size(voxel_size, len(axes.replace("C", "")))
    z_first, options = _file_layout(axes, dtype, voxel)
    channels = shape[0] if axes.startswith("C") else 1
    depth = shape[axes.index("Z")] if "Z" in axes else 1
    if z_first:
        order = [(c, z) for z in range(depth) for c in range(channels)]
        stored = (shape[1], shape[0], *shape[2:])
    else:
        order = [(c, z) for c in range(channels) for z in range(depth)]
        stored = shape

    def write(tmp: str) -> None:
        planes = (np.ascontiguousarray(plane(c, z), dtype=dtype) for c, z in order)
        tifffile.imwrite(tmp, planes, shape=stored, dtype=dtype, compression="zlib" if compress else None, **options)

    _atomic_write(path, write)


def label_dtype(max_id: int) -> np.dtype:
    """Smallest stored type for labels up to ``max_id``: uint16, else int32, else uint32."""
    if max_id <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if max_id <= np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    if max_id <= np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise ValueError(f"label id {max_id} does not fit in 32 bits")


def write_labels(
    path: str | os.PathLike | BinaryIO,
    labels: np.ndarray,
    *,
    voxel_size: Sequence[float] | None = None,
    compress: bool = True,
) -> None:
    """Write a label image (Y, X) or (Z, Y, X) of non-negative integers, keeping its voxel size, to a file
    or a binary file object (as :func:`write_tiff`).

    Stored as uint16 when all ids fit, else int32, else uint32.
    """
    labels = check_label_image(labels)
    max_id = int(labels.max()) if labels.size else 0
    out = labels.astype(label_dtype(max_id), copy=False)
    write_tiff(path, out, axes="YX" if labels.ndim == 2 else "ZYX", voxel_size=voxel_size, compress=compress)
