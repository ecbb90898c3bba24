"""TIFF reading and writing with voxel sizes (torch-free: the HTTP front end imports it).

Arrays come out in a canonical axis order: an optional channel axis ``C`` first, then
``Z`` (3D only), ``Y``, ``X``; so ``axes`` is one of ``"YX"``, ``"ZYX"``, ``"CYX"``, ``"CZYX"``.

Axis policy when reading:

* An explicit ``axes`` argument names the axes of the stored array (as tifffile presents it)
  and overrides everything else; it is honoured exactly (no axis is dropped).
* Otherwise the axes the file declares (ImageJ hyperstack or OME metadata) are used; axes of
  length 1 other than Y and X are dropped (singleton channel, time or Z); unnamed axes are
  guessed: the last two are Y, X, one more is Z, two more are C then Z.
* Colour (RGB) samples, time series with more than one frame and more than 4 dimensions
  are refused with a ``ValueError`` that says what is wrong.

Voxel sizes are in micrometres where the file states a known unit (otherwise in the file's
unit), in array order ``(z, y, x)`` or ``(y, x)``; ``None`` when the file does not state them.
"""

from __future__ import annotations

import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import tifffile

SUPPORTED_DTYPES = ("uint8", "uint16", "int16", "int32", "uint32", "float32")
"""Pixel types accepted when reading (images: uint8/uint16/float32; labels also int16/int32/uint32)."""

CANONICAL_AXES = ("YX", "ZYX", "CYX", "CZYX")
_IMAGEJ_DTYPES = ("uint8", "uint16", "float32")
_UNIT_TO_UM = {
    "um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "cm": 1e4, "m": 1e6,
}  # fmt: skip

PathOrFile = str | os.PathLike | IO[bytes]


@dataclass
class TiffInfo:
    """Layout of a TIFF's main image, read without loading its pixels.

    ``shape``/``axes`` are in the canonical order that :func:`read_tiff` returns.
    """

    shape: tuple[int, ...]
    axes: str
    dtype: np.dtype
    voxel_size: tuple[float, ...] | None

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.axes.startswith("C") else self.shape

    @property
    def spatial_dims(self) -> int:
        return len(self.axes.replace("C", ""))

    @property
    def n_channels(self) -> int:
        return self.shape[0] if self.axes.startswith("C") else 1


@dataclass
class TiffVolume:
    """A TIFF's pixels in canonical axis order (see module docstring)."""

    data: np.ndarray
    axes: str
    voxel_size: tuple[float, ...] | None = None

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.data.shape[1:] if self.axes.startswith("C") else self.data.shape

    @property
    def spatial_dims(self) -> int:
        return len(self.axes.replace("C", ""))

    @property
    def channel_axis(self) -> int | None:
        """0 when there is a channel axis, else None."""
        return 0 if self.axes.startswith("C") else None


# --------------------------------------------------------------------------- axes


def _check_explicit_axes(axes: str, shape: tuple[int, ...]) -> str:
    axes = axes.upper()
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes!r} has {len(axes)} letters but the image has {len(shape)} dimensions {shape}")
    if set(axes) - set("CZYX") or len(set(axes)) != len(axes):
        raise ValueError(f"axes {axes!r} must use each of the letters C, Z, Y, X at most once")
    if "Y" not in axes or "X" not in axes:
        raise ValueError(f"axes {axes!r} must contain Y and X")
    return axes


def _resolve_axes(shape: tuple[int, ...], file_axes: str, declared: bool) -> tuple[str, list[int]]:
    """Name the axes of an array of ``shape`` described as ``file_axes`` by tifffile.

    ``declared``: the file's metadata names its axes (ImageJ, OME); otherwise only colour
    samples are taken from ``file_axes`` and the rest is guessed. Returns the full axes string
    (one letter per dim, ``_`` for dims to drop) and the indices of dropped dims.
    """
    letters = list(file_axes.upper()) if len(file_axes) == len(shape) else ["Q"] * len(shape)
    if not declared:
        letters = [a if a == "S" else "?" for a in letters]
    for i, (a, n) in enumerate(zip(letters, shape)):
        if a == "S" and i == 0 and len(shape) > 2:
            # samples stored as separate planes (tifffile's default for 3 or 4 planes): a stack
            letters[i] = "?"
            continue
        if a == "S" and n > 1:
            raise ValueError(
                f"colour (RGB/RGBA) images are not supported (shape {shape}, {n} samples per pixel); "
                "save a single-channel grayscale image, or the channels as separate planes"
            )
        if a == "T" and n > 1:
            raise ValueError(f"time series are not supported ({n} time points, shape {shape}); save one time point")
        if a not in "CZYX":
            letters[i] = "?"
    named = {a for a in letters if a != "?"}
    for a in named:
        if letters.count(a) > 1:
            raise ValueError(f"the file declares axis {a} twice (axes {file_axes!r}); pass axes explicitly")
    if "Y" not in named and "X" not in named:
        # the last two axes are Y and X
        if letters[-1] != "?" or letters[-2] != "?":
            raise ValueError(f"cannot tell which axes are Y and X (axes {file_axes!r}); pass axes explicitly")
        letters[-2], letters[-1] = "Y", "X"
        others = [i for i, n in enumerate(shape[:-2]) if n > 1]
        if others and shape[-1] <= 4 and shape[-2] > 4:
            raise ValueError(
                f"the last axis of shape {shape} has only {shape[-1]} values: this looks like a "
                "colour or channel-last layout, which is not supported; store channels first "
                "or pass axes explicitly"
            )
    # drop singleton axes other than Y and X
    for i, n in enumerate(shape):
        if n == 1 and letters[i] not in "YX":
            letters[i] = "_"
    unknown = [i for i, a in enumerate(letters) if a == "?"]
    if unknown:
        free = [a for a in "CZ" if a not in letters]
        if len(unknown) > len(free):
            raise ValueError(f"image of shape {shape} has more than 4 dimensions (C, Z, Y, X); this is not supported")
        if len(unknown) == 1:
            letters[unknown[0]] = "Z" if "Z" in free else "C"
        elif len(unknown) == 2:
            letters[unknown[0]], letters[unknown[1]] = "C", "Z"
    kept_axes = "".join(a for a in letters if a != "_")
    if "Y" not in kept_axes or "X" not in kept_axes:
        raise ValueError(f"image of shape {shape} (axes {file_axes!r}) has no Y and X axes")
    return "".join(letters), [i for i, a in enumerate(letters) if a == "_"]


def _canonical_order(axes: str) -> tuple[str, list[int]]:
    order = [axes.index(a) for a in "CZYX" if a in axes]
    return "".join(axes[i] for i in order), order


# --------------------------------------------------------------------------- metadata


def _to_um(value: float, unit: str | None) -> float:
    if unit is None:
        return float(value)
    return float(value) * _UNIT_TO_UM.get(unit.strip().lower(), 1.0)


def _resolution_size(tag: Any) -> float | None:
    if tag is None:
        return None
    value = tag.value
    num, den = (value if isinstance(value, tuple) else (value, 1))
    if not num or not den:
        return None
    return float(den) / float(num)


def _ome_voxel_size(tif: tifffile.TiffFile) -> dict[str, float]:
    xml = tif.ome_metadata
    if not xml:
        return {}
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return {}
    for element in root.iter():
        if element.tag.split("}")[-1] == "Pixels":
            sizes = {}
            for axis in "XYZ":
                value = element.get(f"PhysicalSize{axis}")
                if value is not None:
                    sizes[axis] = _to_um(float(value), element.get(f"PhysicalSize{axis}Unit", "µm"))
            return sizes
    return {}


def _file_voxel_size(tif: tifffile.TiffFile) -> dict[str, float]:
    """Voxel sizes by axis letter (X, Y, Z) that the file states."""
    if tif.is_ome:
        sizes = _ome_voxel_size(tif)
        if sizes:
            return sizes
    page = tif.pages[0]
    tags = page.tags
    sizes: dict[str, float] = {}
    ij = tif.imagej_metadata if tif.is_imagej else None
    if ij is not None:
        unit = ij.get("unit")
        if isinstance(unit, str) and unit.lower() in ("pixel", "pixels", ""):
            unit = None
        for axis, name in (("X", "XResolution"), ("Y", "YResolution")):
            size = _resolution_size(tags.get(name))
            if size is not None and (unit is not None or size != 1.0):
                sizes[axis] = _to_um(size, unit)
        if "spacing" in ij and sizes:
            sizes["Z"] = _to_um(float(ij["spacing"]), unit)
        return sizes
    res_unit = tags.get("ResolutionUnit")
    res_unit = int(res_unit.value) if res_unit is not None else 1
    factor = {2: 25400.0, 3: 10000.0}.get(res_unit)  # inch, centimetre -> µm
    if factor is None:
        return {}
    for axis, name in (("X", "XResolution"), ("Y", "YResolution")):
        size = _resolution_size(tags.get(name))
        if size is not None:
            sizes[axis] = size * factor
    return sizes


def _voxel_size_for(axes: str, sizes: dict[str, float]) -> tuple[float, ...] | None:
    spatial = axes.replace("C", "")
    if not all(a in sizes for a in spatial):
        return None
    values = tuple(float(sizes[a]) for a in spatial)
    if any(not (v > 0) or not np.isfinite(v) for v in values):
        return None
    return values


# --------------------------------------------------------------------------- reading


def _open(path_or_file: PathOrFile) -> tifffile.TiffFile:
    try:
        return tifffile.TiffFile(path_or_file)
    except FileNotFoundError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError, IndexError, KeyError) as exc:
        raise ValueError(f"not a readable TIFF file: {exc}") from None


def _layout(
    tif: tifffile.TiffFile, axes: str | None
) -> tuple[tifffile.TiffPageSeries, tuple[int, ...], str, list[int], list[int], np.dtype]:
    if not tif.series:
        raise ValueError("the TIFF file contains no image")
    series = tif.series[0]
    shape = tuple(int(n) for n in series.shape)
    dtype = np.dtype(series.dtype)
    if dtype.name not in SUPPORTED_DTYPES:
        raise ValueError(f"pixel type {dtype.name} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    if axes is not None:
        full = _check_explicit_axes(axes, shape)
        drop: list[int] = []
    else:
        if len(shape) < 2:
            raise ValueError(f"image of shape {shape} has fewer than two dimensions")
        full, drop = _resolve_axes(shape, series.axes, tif.is_imagej or tif.is_ome)
    kept = "".join(a for a in full if a != "_")
    if len(kept) > 4:
        raise ValueError(f"image of shape {shape} has more than 4 dimensions (C, Z, Y, X); this is not supported")
    canonical, order = _canonical_order(kept)
    return series, shape, canonical, drop, order, dtype


def inspect_tiff(path_or_file: PathOrFile, *, axes: str | None = None) -> TiffInfo:
    """Validate a TIFF's layout, dtype and shape without loading its pixel data.

    Raises ``ValueError`` saying what is wrong (see :func:`read_tiff`).
    """
    with _open(path_or_file) as tif:
        _, shape, canonical, drop, order, dtype = _layout(tif, axes)
        kept_shape = [n for i, n in enumerate(shape) if i not in drop]
        voxel = _voxel_size_for(canonical, _file_voxel_size(tif))
    return TiffInfo(tuple(kept_shape[i] for i in order), canonical, dtype, voxel)


def read_tiff(path_or_file: PathOrFile, *, axes: str | None = None) -> TiffVolume:
    """Read a 2D or 3D TIFF, optionally with a channel axis, and its voxel size.

    Args:
        path_or_file: a path or a binary file object.
        axes: letters from ``CZYX`` naming the stored array's axes; overrides the file's metadata.

    Returns:
        :class:`TiffVolume` with ``data`` in canonical order (``YX``, ``ZYX``, ``CYX`` or ``CZYX``),
        dtype one of :data:`SUPPORTED_DTYPES`, and ``voxel_size`` in array order or ``None``.

    Raises:
        ValueError: not a TIFF, colour samples, a time series, more than 4 dimensions, fewer
        than 2, an unsupported pixel type, or ``axes`` that do not fit the image.
    """
    with _open(path_or_file) as tif:
        series, shape, canonical, drop, order, _ = _layout(tif, axes)
        try:
            data = series.asarray()
        except Exception as exc:  # corrupt or truncated pixel data
            raise ValueError(f"cannot read the TIFF pixel data: {exc}") from None
        voxel = _voxel_size_for(canonical, _file_voxel_size(tif))
    data = data.reshape(shape)
    if drop:
        data = data.reshape([n for i, n in enumerate(shape) if i not in drop])
    data = np.ascontiguousarray(np.transpose(data, order))
    return TiffVolume(data=data, axes=canonical, voxel_size=voxel)


# --------------------------------------------------------------------------- writing


def _atomic_write(path: str | os.PathLike, write: Any) -> None:
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


def write_tiff(
    path: str | os.PathLike,
    data: np.ndarray,
    *,
    axes: str,
    voxel_size: Sequence[float] | None = None,
    compress: bool = True,
) -> None:
    """Write ``data`` with axes ``axes`` (one of ``YX``, ``ZYX``, ``CYX``, ``CZYX``) to ``path``.

    uint8, uint16 and float32 are written as ImageJ hyperstacks (voxel size in the resolution
    tags and ``spacing``, unit µm); other supported types as OME-TIFF with physical sizes. The
    file is written to a temporary name in the same folder, then renamed into place.
    """
    data = np.asarray(data)
    axes = axes.upper()
    if axes not in CANONICAL_AXES:
        raise ValueError(f"axes must be one of {', '.join(CANONICAL_AXES)}, got {axes!r}")
    if data.ndim != len(axes):
        raise ValueError(f"axes {axes!r} do not fit an array of shape {data.shape}")
    if data.dtype.name not in SUPPORTED_DTYPES:
        raise ValueError(f"pixel type {data.dtype.name} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    spatial = axes.replace("C", "")
    voxel = _check_voxel_size(voxel_size, len(spatial))
    compression = "zlib" if compress else None
    if data.dtype.name in _IMAGEJ_DTYPES:
        ij_axes = axes.replace("CZ", "ZC")
        array = np.moveaxis(data, 0, 1) if axes == "CZYX" else data
        metadata: dict[str, Any] = {"axes": ij_axes}
        resolution = None
        if voxel is not None:
            resolution = (1.0 / voxel[-1], 1.0 / voxel[-2])
            metadata["unit"] = "um"
            if "Z" in spatial:
                metadata["spacing"] = voxel[0]

        def write(tmp: str) -> None:
            tifffile.imwrite(
                tmp, array, imagej=True, resolution=resolution, metadata=metadata, compression=compression
            )

    else:
        metadata = {"axes": axes}
        if voxel is not None:
            for letter, size in zip(spatial, voxel):
                metadata[f"PhysicalSize{letter}"] = size
                metadata[f"PhysicalSize{letter}Unit"] = "µm"

        def write(tmp: str) -> None:
            tifffile.imwrite(tmp, data, ome=True, metadata=metadata, compression=compression)

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
    path: str | os.PathLike,
    labels: np.ndarray,
    *,
    voxel_size: Sequence[float] | None = None,
    compress: bool = True,
) -> None:
    """Write a label image (Y, X) or (Z, Y, X) of non-negative integers, keeping its voxel size.

    Stored as uint16 when all ids fit, else int32, else uint32.
    """
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.ndim not in (2, 3):
        raise ValueError(f"labels must be (Y, X) or (Z, Y, X), got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be >= 0 (0 = background)")
    max_id = int(labels.max()) if labels.size else 0
    out = labels.astype(label_dtype(max_id), copy=False)
    write_tiff(path, out, axes="YX" if labels.ndim == 2 else "ZYX", voxel_size=voxel_size, compress=compress)


def stem(path: str | os.PathLike) -> str:
    """File name without a ``.tif``/``.tiff``/``.ome.tif`` suffix (used to match images and masks)."""
    return re.sub(r"(\.ome)?\.tiff?$", "", Path(path).name, flags=re.IGNORECASE)
