"""Axes and voxel sizes of a TIFF's main image, as :func:`embedseg_service.core.data.io.read_tiff` names them.

Axis policy and units: module docstring of :mod:`embedseg_service.core.data.io`. Torch-free. Layouts
that are not supported raise :class:`~embedseg_service.core.data.tiff_errors.TiffUnsupported`; voxel
sizes are optional metadata, so a malformed resolution tag or OME block means "no voxel size".
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import numpy as np
import tifffile

from embedseg_service.core.data.tiff_errors import TiffUnsupported

# --------------------------------------------------------------------------- axes


def check_explicit_axes(axes: str, shape: tuple[int, ...]) -> str:
    """``axes`` in upper case: one letter of ``CZYX`` per dimension of ``shape``, each at most once, Y and X present."""
    axes = axes.upper()
    if len(axes) != len(shape):
        raise TiffUnsupported(
            f"axes {axes!r} has {len(axes)} letters but the image has {len(shape)} dimensions {shape}"
        )
    if set(axes) - set("CZYX") or len(set(axes)) != len(axes):
        raise TiffUnsupported(f"axes {axes!r} must use each of the letters C, Z, Y, X at most once")
    if "Y" not in axes or "X" not in axes:
        raise TiffUnsupported(f"axes {axes!r} must contain Y and X")
    return axes


def resolve_axes(shape: tuple[int, ...], file_axes: str, declared: bool) -> tuple[str, list[int]]:
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
            raise TiffUnsupported(
                f"colour (RGB/RGBA) images are not supported (shape {shape}, {n} samples per pixel); "
                "save a single-channel grayscale image, or the channels as separate planes"
            )
        if a == "T" and n > 1:
            raise TiffUnsupported(
                f"time series are not supported ({n} time points, shape {shape}); save one time point"
            )
        if a not in "CZYX":
            letters[i] = "?"
    named = {a for a in letters if a != "?"}
    for a in named:
        if letters.count(a) > 1:
            raise TiffUnsupported(f"the file declares axis {a} twice (axes {file_axes!r}); pass axes explicitly")
    if "Y" not in named and "X" not in named:
        # the last two axes are Y and X
        if letters[-1] != "?" or letters[-2] != "?":
            raise TiffUnsupported(f"cannot tell which axes are Y and X (axes {file_axes!r}); pass axes explicitly")
        letters[-2], letters[-1] = "Y", "X"
        others = [i for i, n in enumerate(shape[:-2]) if n > 1]
        if others and shape[-1] <= 4 and shape[-2] > 4:
            raise TiffUnsupported(
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
            raise TiffUnsupported(
                f"image of shape {shape} has more than 4 dimensions (C, Z, Y, X); this is not supported"
            )
        if len(unknown) == 1:
            letters[unknown[0]] = "Z" if "Z" in free else "C"
        elif len(unknown) == 2:
            letters[unknown[0]], letters[unknown[1]] = "C", "Z"
    kept_axes = "".join(a for a in letters if a != "_")
    if "Y" not in kept_axes or "X" not in kept_axes:
        raise TiffUnsupported(f"image of shape {shape} (axes {file_axes!r}) has no Y and X axes")
    return "".join(letters), [i for i, a in enumerate(letters) if a == "_"]


def canonical_order(axes: str) -> tuple[str, list[int]]:
    """``axes`` in ``CZYX`` order and the transposition that takes an array there."""
    order = [axes.index(a) for a in "CZYX" if a in axes]
    return "".join(axes[i] for i in order), order


# --------------------------------------------------------------------------- voxel sizes


_UNIT_TO_UM = {
    "um": 1.0, "µm": 1.0, "μm": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "cm": 1e4, "m": 1e6,
}  # fmt: skip


def _to_um(value: float, unit: str | None) -> float:
    if unit is None:
        return float(value)
    return float(value) * _UNIT_TO_UM.get(unit.strip().lower(), 1.0)


def _resolution_size(tag: Any) -> float | None:
    if tag is None:
        return None
    value = tag.value
    num, den = value if isinstance(value, tuple) else (value, 1)
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


def file_voxel_size(tif: tifffile.TiffFile) -> dict[str, float]:
    """Voxel sizes by axis letter (X, Y, Z) that the file states; empty when it states none or its
    resolution metadata is malformed (a voxel size is optional, a broken one is not a reason to refuse)."""
    try:
        return _stated_voxel_size(tif)
    except (ValueError, TypeError, ArithmeticError, LookupError, AttributeError):
        return {}


def _stated_voxel_size(tif: tifffile.TiffFile) -> dict[str, float]:
    if tif.is_ome:
        ome = _ome_voxel_size(tif)
        if ome:
            return ome
    page = tif.pages[0]
    if not isinstance(page, tifffile.TiffPage):  # tifffile reads the first page in full, never as a frame
        return {}
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
    unit_tag = tags.get("ResolutionUnit")
    res_unit = int(unit_tag.value) if unit_tag is not None else 1
    factor = {2: 25400.0, 3: 10000.0}.get(res_unit)  # inch, centimetre -> µm
    if factor is None:
        return {}
    for axis, name in (("X", "XResolution"), ("Y", "YResolution")):
        size = _resolution_size(tags.get(name))
        if size is not None:
            sizes[axis] = size * factor
    return sizes


def voxel_size_for(axes: str, sizes: dict[str, float]) -> tuple[float, ...] | None:
    """Voxel size in array order for the spatial ``axes``; ``None`` unless ``sizes`` holds a positive one for each."""
    spatial = axes.replace("C", "")
    if not all(a in sizes for a in spatial):
        return None
    values = tuple(float(sizes[a]) for a in spatial)
    if any(not (v > 0) or not np.isfinite(v) for v in values):
        return None
    return values
