"""Checks of an uploaded zipped OME-Zarr store before it is accepted, in bounded memory (torch-free).

1. The archive (:mod:`embedseg_service.core.data.zip_checks`): at most
   :data:`~embedseg_service.core.data.zip_checks.MAX_ZIP_ENTRIES` entries, plain relative names, stored or
   deflated entries that declare no more than their compression can produce, at most
   :func:`unpacked_limit` bytes in all.
2. The image (:class:`embedseg_service.core.data.ome_zarr.OmeZarrVolume`): metadata, axes, pixel type,
   voxel budget; chunks of at most :data:`~embedseg_service.core.data.ome_zarr.MAX_CHUNK_BYTES`.
3. The level-0 encoding: Zarr format 2 without filters and with no compressor, Blosc, Zstd, zlib or
   gzip; or format 3 with the ``bytes`` codec and at most one of Blosc, Zstd or gzip (no sharding).
4. Every stored chunk of level 0, one at a time: decoded into a buffer of its declared size first (a
   chunk that would inflate further is refused before the reader allocates for it), then its values
   are checked as a TIFF's are (:func:`embedseg_service.core.data.tiff_values.value_problem`). Chunks
   that are not stored hold the fill value, which is checked once.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embedseg_service.core.data.ome_zarr import (
    MAX_CHUNK_BYTES,
    OmeZarrDamaged,
    OmeZarrInfo,
    OmeZarrTooLarge,
    OmeZarrUnreadable,
    OmeZarrUnsupported,
    OmeZarrVolume,
    is_metadata,
)
from embedseg_service.core.data.tiff_values import ValueCounts, value_problem
from embedseg_service.core.data.zip_checks import open_checked_zip

METADATA_SLACK = 64 * 1024**2
"""Bytes an archive may unpack to beyond its image's pixels (metadata, other levels' share is counted too)."""
_CODECS = {"blosc", "zstd", "zlib", "gzip"}


def unpacked_limit(max_voxels: int | None) -> int:
    """Most bytes an archive may unpack to: 8 bytes per voxel of the budget (every level of a pyramid and
    the widest pixel type) plus :data:`METADATA_SLACK`."""
    return (1 << 44 if max_voxels is None else 8 * max_voxels) + METADATA_SLACK


def _codec_name(codec: Any) -> str:
    name = getattr(codec, "codec_id", None) or type(codec).__name__.lower().removesuffix("codec")
    return str(name).lower()


def _compressor(array: Any) -> str | None:
    """The one compressor of the level-0 array (``None``: none); :class:`OmeZarrUnsupported` otherwise."""
    metadata = array.metadata
    if metadata.zarr_format == 2:
        if metadata.filters:
            raise OmeZarrUnsupported("level 0 uses Zarr filters; write it without filters")
        found = [] if metadata.compressor is None else [_codec_name(metadata.compressor)]
    else:
        names = [_codec_name(c) for c in metadata.codecs]
        if not names or names[0] != "bytes":
            raise OmeZarrUnsupported(f"level 0 uses the codecs {names}; write it with the bytes codec (no sharding)")
        found = names[1:]
    if len(found) > 1 or (found and found[0] not in _CODECS):
        raise OmeZarrUnsupported(f"level 0 is compressed with {found}; use one of blosc, zstd, zlib, gzip or none")
    return found[0] if found else None


def _inflated(data: bytes, wbits: int, limit: int) -> int:
    """Bytes the zlib/gzip stream(s) of ``data`` decode to, counting stops past ``limit``."""
    total, rest = 0, data
    while rest and total <= limit:
        decompressor = zlib.decompressobj(wbits)
        total += len(decompressor.decompress(rest, limit + 1 - total))
        rest = decompressor.unused_data if decompressor.eof else b""
    return total


def check_chunk(data: bytes, compressor: str | None, size: int) -> None:
    """Refuse a chunk that decodes to more than ``size`` bytes (or, uncompressed, holds another count)."""
    import numcodecs.blosc
    import numcodecs.zstd

    try:
        if compressor is None:
            length = len(data)
        elif compressor == "blosc":
            length = len(numcodecs.blosc.decompress(data, bytearray(size)))
        elif compressor == "zstd":
            length = len(numcodecs.zstd.decompress(data, bytearray(size)))
        else:
            length = _inflated(data, 15 if compressor == "zlib" else 31, size)
    except (ValueError, RuntimeError, zlib.error) as error:
        raise OmeZarrDamaged(f"a chunk of level 0 cannot be decoded or inflates beyond its {size} bytes: "
                             f"{str(error)[:200]}") from None  # fmt: skip
    if length > size or (compressor is None and length != size):
        raise OmeZarrDamaged(f"a chunk of level 0 decodes to {length} bytes where its shape holds {size}")


def _chunk_coords(rest: str, grid: tuple[int, ...]) -> tuple[int, ...] | None:
    """Chunk coordinates of a key below the array (``0.1.2``, ``0/1/2``, ``c/0/1/2``), or ``None``."""
    parts = re.split(r"[./]", rest[2:] if rest[:2] in ("c/", "c.") else rest)
    if len(parts) != len(grid) or not all(p.isdigit() for p in parts):
        return None
    coords = tuple(int(p) for p in parts)
    return coords if all(c < g for c, g in zip(coords, grid)) else None


def stored_chunks(volume: OmeZarrVolume) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(entry name, chunk coordinates) of every stored chunk of level 0; :class:`OmeZarrUnsupported` for an
    entry below the array that is neither metadata nor a chunk of it."""
    info = volume.info
    prefix = info.path.strip("/") + "/"
    grid = tuple(math.ceil(n / c) for n, c in zip(info.stored_shape, volume.array.chunks))
    for name in volume.names:
        if not name.startswith(prefix) or name.endswith("/") or is_metadata(name):
            continue
        coords = _chunk_coords(name[len(prefix) :], grid)
        if coords is None:
            raise OmeZarrUnsupported(f"the store holds {name[:200]!r} below level 0, neither metadata nor one of its "
                                     "chunks")  # fmt: skip
        yield name, coords


def _entry(volume: OmeZarrVolume, name: str, limit: int) -> bytes:
    archive = volume._zip
    try:
        if archive is None:
            return (volume.path / name).read_bytes()
        if archive.getinfo(name).file_size > limit:
            raise OmeZarrDamaged(f"the chunk {name[:200]!r} is larger than its decoded size allows")
        return archive.read(name)
    except OmeZarrDamaged:
        raise
    except Exception as error:  # a bad CRC, a truncated entry
        raise OmeZarrDamaged(f"cannot read {name[:200]!r} from the archive: {str(error)[:200]}") from None


def scan_store(volume: OmeZarrVolume, *, labels: bool, progress: Callable[[int], None] | None = None) -> ValueCounts:
    """Check (:func:`check_chunk`) and count the values of every stored chunk of level 0, and of the fill value."""
    info, array = volume.info, volume.array
    chunk_shape = tuple(int(c) for c in array.chunks)
    size = math.prod(chunk_shape) * info.dtype.itemsize
    if size > MAX_CHUNK_BYTES:
        raise OmeZarrUnsupported(
            f"level 0 has chunks of {size} bytes, more than {MAX_CHUNK_BYTES}; write smaller chunks"
        )
    compressor = _compressor(array)
    floats = np.issubdtype(info.dtype, np.floating)
    counts = ValueCounts()
    fill = np.asarray(array.metadata.fill_value if array.metadata.fill_value is not None else 0, dtype=info.dtype)
    counts.add(fill.reshape(1, 1), floats=floats, labels=labels)
    for done, (name, coords) in enumerate(stored_chunks(volume)):
        check_chunk(_entry(volume, name, size + size // 100 + 65536), compressor, size)
        region = tuple(slice(c * s, min((c + 1) * s, n)) for c, s, n in zip(coords, chunk_shape, info.stored_shape))
        try:
            block = np.asarray(array[region])
        except Exception as error:  # the codec on data that passed the size check but is corrupt
            raise OmeZarrDamaged(f"cannot decode the chunk {name[:200]!r}: {str(error)[:200]}") from None
        counts.add(block.reshape(-1, block.shape[-1]), floats=floats, labels=labels)
        if progress is not None:
            progress(done + 1)
    return counts


def check_upload(path: Path, *, max_voxels: int | None, labels: bool,
                 check_info: Callable[[OmeZarrInfo], None] | None = None) -> OmeZarrInfo:  # fmt: skip
    """The image of the zipped OME-Zarr store at ``path`` after every check of the module docstring; raises an
    :class:`~embedseg_service.core.data.ome_zarr.OmeZarrError` saying what is wrong. ``check_info(info)`` runs
    before any chunk is read (the caller's own checks of the layout)."""

    def fail(message: str) -> Exception:
        return OmeZarrUnreadable(message)

    def too_large(message: str) -> Exception:
        return OmeZarrTooLarge(message)

    open_checked_zip(path, unpacked_limit(max_voxels), fail, too_large).close()
    with OmeZarrVolume(path, max_voxels=max_voxels) as volume:
        if check_info is not None:
            check_info(volume.info)
        problem = value_problem(scan_store(volume, labels=labels))
        if problem is not None:
            raise OmeZarrDamaged(problem)
        return volume.info
