"""OME-Zarr images: one image's full-resolution level, read a region at a time, and label volumes written
chunk by chunk (torch-free: the HTTP front end imports it).

A store is a folder or a ZIP archive of one (``.ome.zarr.zip``), read without extraction. The image is
the first ``multiscales`` entry of the shallowest group that has one (OME-NGFF 0.4 in ``.zattrs``, or 0.5
under ``ome`` in ``zarr.json``; a bioformats2raw layout's series 0); its level 0 (the first dataset) is the
full-resolution array, the other levels are ignored. Axes follow the NGFF order (time, channel, then Z, Y,
X, each at most once, Y and X always); as for TIFF files (:mod:`embedseg_service.core.data.io`), axes of
length 1 other than Y and X are dropped, so arrays come out in the canonical order ``YX``, ``ZYX``, ``CYX``
or ``CZYX``, and a time axis longer than 1 is refused. The voxel size is level 0's ``scale`` (times the
multiscale's own), in micrometres where the axes name a known unit, in array order.

Labels are written as OME-NGFF 0.4 (Zarr format 2: what most viewers read), uint32, Blosc-compressed,
then zipped uncompressed in sorted order (:func:`zip_folder`).
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedseg_service.core.data.io import SUPPORTED_DTYPES

OME_ZARR_ZIP_SUFFIX = ".ome.zarr.zip"
MAX_METADATA_BYTES = 1024**2
"""Largest metadata document (``.zattrs``, ``.zarray``, ``zarr.json``) read."""
MAX_CHUNK_BYTES = 64 * 1024**2
"""Largest chunk of the level-0 array (decoded whole when read)."""
_UNITS_IN_UM = {"micrometer": 1.0, "micron": 1.0, "nanometer": 1e-3, "angstrom": 1e-4, "millimeter": 1e3,
                "centimeter": 1e4, "meter": 1e6, "picometer": 1e-6}  # fmt: skip
_METADATA = (".zattrs", ".zgroup", ".zarray", "zarr.json")


class OmeZarrError(ValueError):
    """An OME-Zarr store that is refused; the message says what is wrong."""


class OmeZarrUnreadable(OmeZarrError):
    """Not a readable archive or store, or no OME-Zarr image in it."""


class OmeZarrUnsupported(OmeZarrError):
    """A readable image whose metadata, axes, pixel type or encoding is not supported."""


class OmeZarrTooLarge(OmeZarrError):
    """More voxels, entries or bytes than allowed."""


class OmeZarrTooManyVoxels(OmeZarrTooLarge):
    """The image holds more voxels than the budget."""


class OmeZarrDamaged(OmeZarrError):
    """Chunks that cannot be decoded, inflate beyond their size, or hold values the image kind does not allow."""


@dataclass(frozen=True)
class OmeZarrInfo:
    """The full-resolution image of a store: canonical ``shape``/``axes`` (see the module docstring),
    ``dtype``, ``voxel_size`` (spatial, array order, or ``None``), the array's ``path`` in the store, its
    NGFF ``stored_axes`` (lower case, e.g. ``"tczyx"``) and ``stored_shape``, and which of those are kept."""

    shape: tuple[int, ...]
    axes: str
    dtype: np.dtype
    voxel_size: tuple[float, ...] | None
    path: str
    stored_axes: str
    stored_shape: tuple[int, ...]
    chunks: tuple[int, ...]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.axes.startswith("C") else self.shape

    @property
    def spatial_dims(self) -> int:
        return len(self.axes.replace("C", ""))

    @property
    def n_channels(self) -> int:
        return self.shape[0] if self.axes.startswith("C") else 1

    def stored_index(self, region: Sequence[Any]) -> tuple[Any, ...]:
        """Index of the stored array for a canonical ``region`` (dropped axes at 0)."""
        kept = iter(region)
        return tuple(next(kept) if self._kept(i) else 0 for i in range(len(self.stored_axes)))

    def _kept(self, i: int) -> bool:
        return self.stored_axes[i] in "yx" or (self.stored_shape[i] > 1 and self.stored_axes[i] != "t")


def _json(read: Any, name: str) -> dict[str, Any] | None:
    """The JSON document ``name`` (``None`` when absent); :class:`OmeZarrUnsupported` when too large or invalid."""
    data = read(name)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise OmeZarrUnsupported(f"the metadata file {name!r} is not valid JSON") from None
    if not isinstance(value, dict):
        raise OmeZarrUnsupported(f"the metadata file {name!r} is not a JSON object")
    return value


def _group_attributes(read: Any, prefix: str) -> dict[str, Any] | None:
    """The attributes of the group at ``prefix`` (``""`` or ending in ``/``): ``.zattrs``, or the ``attributes``
    of ``zarr.json`` (OME-NGFF 0.5 nests them under ``ome``)."""
    attrs = _json(read, prefix + ".zattrs")
    if attrs is not None:
        return attrs
    v3 = _json(read, prefix + "zarr.json")
    if v3 is None:
        return None
    attributes = v3.get("attributes") or {}
    return attributes.get("ome", attributes) if isinstance(attributes, dict) else None


def _find_image(names: Sequence[str], read: Any) -> tuple[str, dict[str, Any]]:
    """(group prefix, its first ``multiscales`` entry) of the shallowest group holding one."""
    groups = sorted({n[: -len(m)] for n in names for m in (".zattrs", "zarr.json") if n.endswith("/" + m) or n == m},
                    key=lambda p: (p.count("/"), p))  # fmt: skip
    for prefix in groups:
        attrs = _group_attributes(read, prefix)
        if attrs is None:
            continue
        multiscales = attrs.get("multiscales")
        if multiscales is None and "bioformats2raw.layout" in attrs:
            inner = _group_attributes(read, prefix + "0/") or {}
            multiscales, prefix = inner.get("multiscales"), prefix + "0/"
        if multiscales is not None:
            if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
                raise OmeZarrUnsupported("'multiscales' must be a list of at least one image description")
            return prefix, multiscales[0]
    raise OmeZarrUnreadable(
        "no OME-Zarr image in the store: no group has 'multiscales' metadata (.zattrs or zarr.json)"
    )


def _axes(multiscale: dict[str, Any]) -> tuple[str, list[str | None]]:
    """The NGFF axes (lower-case letters) and their units; :class:`OmeZarrUnsupported` for other layouts."""
    axes = multiscale.get("axes")
    if not isinstance(axes, list) or not 2 <= len(axes) <= 5:
        raise OmeZarrUnsupported("'multiscales' needs 'axes': a list of 2 to 5 axes (t, c, z, y, x)")
    names = [a.get("name") if isinstance(a, dict) else a for a in axes]
    units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
    letters = "".join(str(n).lower() for n in names if isinstance(n, str) and len(n) == 1)
    if len(letters) != len(names) or letters not in _ORDERS:
        raise OmeZarrUnsupported(f"axes {names} are not supported; use t, c, z, y, x in this order (y and x always)")
    return letters, [u if isinstance(u, str) else None for u in units]


_ORDERS = frozenset(
    "".join(a for a, keep in zip("tczyx", mask) if keep)
    for mask in ((t, c, z, True, True) for t in (0, 1) for c in (0, 1) for z in (0, 1))
)


def _scale(multiscale: dict[str, Any], dataset: dict[str, Any], n: int) -> list[float] | None:
    """Level 0's scale per stored axis (the dataset's times the multiscale's), or ``None`` without one."""
    total: list[float] | None = None
    for transforms in (dataset.get("coordinateTransformations"), multiscale.get("coordinateTransformations")):
        if transforms is None:
            continue
        if not isinstance(transforms, list):
            raise OmeZarrUnsupported("'coordinateTransformations' must be a list")
        for t in transforms:
            if isinstance(t, dict) and t.get("type") == "scale":
                scale = t.get("scale")
                if not isinstance(scale, list) or len(scale) != n:
                    raise OmeZarrUnsupported(f"a 'scale' transformation needs {n} numbers, one per axis")
                if not all(isinstance(v, (int, float)) for v in scale):
                    raise OmeZarrUnsupported(f"a 'scale' transformation needs {n} numbers, one per axis")
                if not all(math.isfinite(v) and v > 0 for v in scale):
                    raise OmeZarrUnsupported(f"scale values must be positive, got {scale}")
                total = [float(v) * (total[i] if total else 1.0) for i, v in enumerate(scale)]
    return total


def describe(array: Any, multiscale: dict[str, Any]) -> OmeZarrInfo:
    """The :class:`OmeZarrInfo` of the level-0 ``array`` (a zarr array) of the image ``multiscale`` describes."""
    letters, units = _axes(multiscale)
    shape = tuple(int(n) for n in array.shape)
    if len(shape) != len(letters):
        raise OmeZarrUnsupported(f"level 0 has {len(shape)} dimensions but the metadata names {len(letters)} axes")
    if 0 in shape:
        raise OmeZarrUnsupported(f"the image of shape {shape} is empty (an axis of length 0)")
    if "t" in letters and shape[letters.index("t")] > 1:
        raise OmeZarrUnsupported(f"the image has {shape[letters.index('t')]} time points; send one")
    dtype = np.dtype(array.dtype)
    if dtype.byteorder not in ("=", "|", "<" if np.little_endian else ">"):
        dtype = dtype.newbyteorder("=")
    if dtype.name not in SUPPORTED_DTYPES:
        raise OmeZarrUnsupported(f"pixel type {dtype.name} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    scale = _scale(multiscale, multiscale["datasets"][0], len(letters))
    keep = [a in "yx" or (n > 1 and a != "t") for a, n in zip(letters, shape)]
    axes = "".join(a for a, k in zip(letters, keep) if k).upper()
    voxel = None
    if scale is not None:
        voxel = tuple(s * _UNITS_IN_UM.get((u or "").lower(), 1.0)
                      for a, s, u, k in zip(letters, scale, units, keep) if k and a in "zyx")  # fmt: skip
    chunks = tuple(int(c) for c, k in zip(array.chunks, keep) if k)
    kept = tuple(n for n, k in zip(shape, keep) if k)
    return OmeZarrInfo(kept, axes, dtype, voxel, array.path, letters, shape, chunks)


def _level_zero(multiscale: dict[str, Any], prefix: str) -> str:
    datasets = multiscale.get("datasets")
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
        raise OmeZarrUnsupported("'multiscales' needs 'datasets': a list with the full-resolution level first")
    path = datasets[0].get("path")
    if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
        raise OmeZarrUnsupported("the first dataset of 'multiscales' needs a relative 'path'")
    return prefix + path.strip("/")


class OmeZarrVolume:
    """An open OME-Zarr image (a folder or a ``.zip`` of one): :attr:`info`, regions via :meth:`read`. Use as
    a context manager, or :meth:`close`. ``max_voxels`` bounds the image (:class:`OmeZarrTooLarge`)."""

    def __init__(self, path: str | os.PathLike, *, max_voxels: int | None = None) -> None:
        from zarr.storage import LocalStore, ZipStore

        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        if self.path.is_dir():
            self.store: Any = LocalStore(self.path, read_only=True)
            names = [str(p.relative_to(self.path)).replace(os.sep, "/") for p in self.path.rglob("*") if p.is_file()]
        else:
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError, ValueError) as error:
                raise OmeZarrUnreadable(f"not a readable ZIP archive: {str(error)[:200]}") from None
            names = self._zip.namelist()
            self.store = ZipStore(self.path, mode="r")
        self.names = names
        try:
            prefix, multiscale = _find_image(names, self._read_metadata)
            self.array = self._open_array(_level_zero(multiscale, prefix))
            self.info = describe(self.array, multiscale)
        except BaseException:
            self.close()
            raise
        voxels = math.prod(self.info.stored_shape)
        if max_voxels is not None and voxels > max_voxels:
            self.close()
            raise OmeZarrTooManyVoxels(f"the OME-Zarr image has shape {self.info.stored_shape} = {voxels} voxels, more "
                                  f"than the limit of {max_voxels} voxels")  # fmt: skip

    def _read_metadata(self, name: str) -> bytes | None:
        if self._zip is not None:
            try:
                info = self._zip.getinfo(name)
            except KeyError:
                return None
            if info.file_size > MAX_METADATA_BYTES:
                raise OmeZarrUnsupported(f"the metadata file {name!r} is larger than {MAX_METADATA_BYTES} bytes")
            try:
                return self._zip.read(info)
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
                raise OmeZarrDamaged(f"cannot read {name!r} from the archive: {str(error)[:200]}") from None
        file = self.path / name
        if not file.is_file():
            return None
        if file.stat().st_size > MAX_METADATA_BYTES:
            raise OmeZarrUnsupported(f"the metadata file {name!r} is larger than {MAX_METADATA_BYTES} bytes")
        return file.read_bytes()

    def _open_array(self, path: str) -> Any:
        import zarr

        for name in (path + "/.zarray", path + "/zarr.json"):
            self._read_metadata(name)  # size-checked before zarr parses it
        try:
            return zarr.open_array(store=self.store, path=path, mode="r")
        except Exception as error:  # zarr raises many types on missing or malformed metadata
            raise OmeZarrUnsupported(f"cannot open level 0 ({path!r}) as a Zarr array: {str(error)[:200]}") from None

    def read(self, region: Sequence[slice] | None = None) -> np.ndarray:
        """The canonical ``region`` (one slice per canonical axis; default everything) as an array in
        native byte order; :class:`OmeZarrDamaged` for chunks that cannot be decoded."""
        info = self.info
        region = tuple(slice(0, n) for n in info.shape) if region is None else tuple(region)
        try:
            data = np.asarray(self.array[info.stored_index(region)])
        except Exception as error:  # the codec or the store on corrupt chunks
            raise OmeZarrDamaged(f"cannot decode the OME-Zarr pixel data: {str(error)[:200]}") from None
        return data.astype(data.dtype.newbyteorder("="), copy=False)

    def select(self, selection: Sequence[slice | int | Sequence[int]]) -> np.ndarray:
        """An orthogonal selection in canonical axes (per axis an index, a slice with a positive step, or a list
        of indices), reading only the chunks it touches; :class:`OmeZarrDamaged` for undecodable chunks."""
        index = tuple(list(s) if not isinstance(s, (slice, int)) else s for s in selection)
        try:
            data = np.asarray(self.array.get_orthogonal_selection(self.info.stored_index(index)))
        except Exception as error:  # the codec or the store on corrupt chunks
            raise OmeZarrDamaged(f"cannot decode the OME-Zarr pixel data: {str(error)[:200]}") from None
        return data.astype(data.dtype.newbyteorder("="), copy=False)

    def close(self) -> None:
        """Release the archive."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None
            if getattr(self.store, "_is_open", False):
                self.store.close()

    def __enter__(self) -> OmeZarrVolume:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def is_metadata(name: str) -> bool:
    """True for the name of a Zarr metadata document."""
    return name.rsplit("/", 1)[-1] in _METADATA


# --------------------------------------------------------------------------- writing


def create_labels(folder: str | os.PathLike, shape: Sequence[int], *, voxel_size: Sequence[float] | None,
                  chunks: Sequence[int], name: str = "labels") -> Any:  # fmt: skip
    """A new OME-NGFF 0.4 label image in ``folder`` (``(Z, Y, X)`` or ``(Y, X)``, uint32, Blosc zstd, 0 =
    background) and its writable level-0 zarr array; zip the folder with :func:`zip_folder` when done."""
    import numcodecs
    import zarr
    from zarr.storage import LocalStore

    dims = len(shape)
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"[-dims:]]
    scale = [float(v) for v in voxel_size] if voxel_size is not None and len(voxel_size) == dims else [1.0] * dims
    group = zarr.open_group(store=LocalStore(Path(folder)), mode="w", zarr_format=2)
    group.attrs["multiscales"] = [{"version": "0.4", "name": name, "axes": axes,
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": scale}]}]}]  # fmt: skip
    group.attrs["image-label"] = {"version": "0.4"}
    compressor = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.BITSHUFFLE)
    return group.create_array("0", shape=tuple(int(n) for n in shape), chunks=tuple(int(c) for c in chunks),
                              dtype="uint32", compressors=compressor, fill_value=0)  # fmt: skip


def zip_folder(folder: str | os.PathLike, target: str | os.PathLike) -> int:
    """Zip every file under ``folder`` (names relative to it, sorted, stored uncompressed: the chunks are
    compressed already) into ``target``; returns its size in bytes."""
    root = Path(folder)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for file in files:
            archive.write(file, str(file.relative_to(root)).replace(os.sep, "/"))
    return Path(target).stat().st_size
