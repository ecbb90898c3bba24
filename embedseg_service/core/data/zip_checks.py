"""Bounded checks of a ZIP archive before anything reads it (torch-free, imports nothing of ours).

A zipped OME-Zarr store is read entry by entry without being extracted. Before the central directory is
parsed, the end record's entry count is checked against :data:`MAX_ZIP_ENTRIES` (the parser holds one
object per entry). Then every entry must be a plain file or folder with a relative name, stored or
deflated, and its declared size is what a reader gets at most: Python's reader stops at the declared
size and verifies the CRC at the end, so a "zip bomb" can inflate no further than its entries declare,
and the declared sizes add up to at most the caller's limit. A deflated entry cannot inflate more than
:data:`DEFLATE_DENSEST` times its compressed size; one that declares more is refused.
"""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

MAX_ZIP_ENTRIES = 200_000
"""Most entries (files and folders) of an archive: a store of level-0 chunks of 64³ voxels holds 2³³ voxels in 32768."""
DEFLATE_DENSEST = 1032
"""Most bytes Deflate can produce per compressed byte."""
_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"
_TAIL = 22 + 0xFFFF


def is_zip(head: bytes) -> bool:
    """True for the first bytes of a ZIP archive (a local file header, or the end record of an empty one)."""
    return head[:4] in (b"PK\x03\x04", _EOCD)


def declared_entries(path: Path, fail: Callable[[str], Exception]) -> int:
    """The entry count the archive's end record declares (ZIP64 included), read from its last bytes only;
    ``fail(message)`` is raised for an archive without a readable end record."""
    with open(path, "rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        start = max(0, size - _TAIL)
        handle.seek(start)
        tail = handle.read()
        at = tail.rfind(_EOCD)
        if at < 0 or len(tail) - at < 22:
            raise fail("not a readable ZIP archive: no end of central directory record")
        entries = struct.unpack("<H", tail[at + 10 : at + 12])[0]
        if entries != 0xFFFF:
            return int(entries)
        locator = start + at - 20
        if locator < 0:
            raise fail("not a readable ZIP archive: a ZIP64 archive without its locator")
        handle.seek(locator)
        found = handle.read(20)
        if found[:4] != _ZIP64_LOCATOR:
            raise fail("not a readable ZIP archive: a ZIP64 archive without its locator")
        record = struct.unpack("<Q", found[8:16])[0]
        if record > size - 56:
            raise fail("not a readable ZIP archive: its ZIP64 end record lies past the end of the file")
        handle.seek(record)
        zip64 = handle.read(56)
        if zip64[:4] != _ZIP64_EOCD:
            raise fail("not a readable ZIP archive: a broken ZIP64 end record")
        return int(struct.unpack("<Q", zip64[32:40])[0])


def _check_name(name: str, fail: Callable[[str], Exception]) -> None:
    parts = name.rstrip("/").split("/")
    if name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
        raise fail(f"the ZIP archive holds an entry named {name[:200]!r}; entries need plain relative names")


def open_checked_zip(path: Path, max_bytes: int, fail: Callable[[str], Exception],
                     too_large: Callable[[str], Exception]) -> zipfile.ZipFile:  # fmt: skip
    """Open the archive at ``path`` after the checks of the module docstring; the caller closes it.

    ``fail(message)`` is raised for an archive that is not readable or holds a bad entry, ``too_large(message)``
    for more entries than :data:`MAX_ZIP_ENTRIES` or more than ``max_bytes`` declared in all.
    """
    count = declared_entries(path, fail)
    if count > MAX_ZIP_ENTRIES:
        raise too_large(f"the ZIP archive declares {count} entries, more than the limit of {MAX_ZIP_ENTRIES}; "
                        "write the store with larger chunks")  # fmt: skip
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, struct.error) as error:
        raise fail(f"not a readable ZIP archive: {str(error)[:200]}") from None
    try:
        total = 0
        for info in archive.infolist():
            _check_name(info.filename, fail)
            if info.flag_bits & 0x1:
                raise fail(f"the ZIP entry {info.filename[:200]!r} is encrypted; send an unencrypted archive")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise fail(f"the ZIP entry {info.filename[:200]!r} uses compression method {info.compress_type}; "
                           "store entries uncompressed or deflated")  # fmt: skip
            dense = DEFLATE_DENSEST if info.compress_type == zipfile.ZIP_DEFLATED else 1
            if info.file_size > max(info.compress_size, 1) * dense:
                raise fail(f"the ZIP entry {info.filename[:200]!r} declares {info.file_size} bytes from "
                           f"{info.compress_size}, more than its compression can produce")  # fmt: skip
            total += info.file_size
        if total > max_bytes:
            raise too_large(f"the ZIP archive unpacks to {total} bytes, more than the limit of {max_bytes} bytes")
    except BaseException:
        archive.close()
        raise
    return archive
