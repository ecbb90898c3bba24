"""Limits checked from a TIFF's header before any pixel is decoded (torch-free).

The rules, in the order they are applied:

1. **Pages.** A file may hold at most :data:`MAX_PAGES` pages (IFDs); counting stops there, so a
   file made of millions of tiny IFDs is refused after reading that many.
2. **Voxels.** The main image's declared shape (every axis, channels included) may hold at most
   ``max_voxels`` voxels; the header alone says so, nothing is allocated.
3. **Pixel data** (:func:`check_pixel_data`): each page lists as many strips or tiles as its shape
   needs, every one lies inside the file (else the file is truncated), and no two of them share a
   byte. A writer never stores two segments in the same bytes; a file whose segments all point at
   one small compressed row would otherwise decode to far more pixels than the file can hold (a
   "TIFF bomb"). Empty segments (offset or byte count 0, sparse files) decode to zeros and are allowed.
4. **Inflation.** Past :data:`INFLATION_FLOOR` decoded bytes, the declared pixels may take at most
   :data:`MAX_INFLATION` times the file's size. Deflate, the densest codec decoded here, reaches
   about 1000 times on a constant image, so a file beyond that declares pixels it does not hold.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tifffile

from embedseg_service.core.data.tiff_errors import TiffDamaged, TiffTooLarge

MAX_PAGES = 100_000
"""Most pages (IFDs) a TIFF may hold."""

MAX_INFLATION = 4096
"""Most times a TIFF's declared pixel bytes may exceed its file size (beyond :data:`INFLATION_FLOOR`)."""

INFLATION_FLOOR = 64 * 1024**2
"""Declared pixel bytes up to which :data:`MAX_INFLATION` is not applied."""


def product(values: Iterable[int]) -> int:
    """The product of ``values`` as a Python int (1 for none)."""
    result = 1
    for value in values:
        result *= int(value)
    return result


def keyframe_of(page: tifffile.TiffPage | tifffile.TiffFrame) -> tifffile.TiffPage:
    """The page that describes ``page``'s layout; :class:`TiffDamaged` when the file lacks it."""
    keyframe = page.keyframe
    if keyframe is None:
        raise TiffDamaged("a page of the TIFF has no description of its layout; save the image again")
    return keyframe


def check_page_count(tif: tifffile.TiffFile) -> None:
    """Raise :class:`TiffTooLarge` when ``tif`` has more than :data:`MAX_PAGES` pages (reads at most that many IFDs)."""
    try:
        tif.pages[MAX_PAGES]
    except IndexError:
        return
    raise TiffTooLarge(f"the TIFF holds more than {MAX_PAGES} pages; split it into smaller files")


def check_voxels(shape: Sequence[int], max_voxels: int | None) -> None:
    """Raise :class:`TiffTooLarge` when ``shape`` holds more than ``max_voxels`` voxels (``None``: no limit)."""
    if max_voxels is None:
        return
    voxels = product(shape)
    if voxels > max_voxels:
        raise TiffTooLarge(
            f"the TIFF declares shape {tuple(int(n) for n in shape)} = {voxels} voxels, more than the limit of "
            f"{max_voxels} voxels"
        )


def _segments(series: tifffile.TiffPageSeries) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(offsets, byte counts) of every page of ``series``; :class:`TiffDamaged` for a missing page or one
    with another number of strips/tiles than its shape needs."""
    for number, page in enumerate(series.pages):
        if page is None:
            raise TiffDamaged(f"the TIFF lacks page {number} of its image; upload the complete file")
        offsets = np.asarray(page.dataoffsets, dtype=np.uint64).ravel()
        counts = np.asarray(page.databytecounts, dtype=np.uint64).ravel()
        needed = product(keyframe_of(page).chunked)
        if len(offsets) != needed or len(counts) != needed:
            raise TiffDamaged(
                f"page {number} of the TIFF lists {len(offsets)} strip/tile offsets and {len(counts)} byte counts "
                f"but its shape needs {needed}; save the image again with a standard TIFF writer"
            )
        yield offsets, counts


def check_pixel_data(tif: tifffile.TiffFile, series: tifffile.TiffPageSeries) -> None:
    """Check where the pixel data of ``series`` lies (rules 3 and 4 of the module docstring), reading no pixel.

    Raises :class:`TiffDamaged`: truncated (the message says where the data ends and how long the
    file is), strips/tiles that share bytes or do not match the shape, or far more pixels
    declared than the file holds.
    """
    size = int(tif.filehandle.size)
    decoded = product(series.shape) * np.dtype(series.dtype).itemsize
    if decoded > INFLATION_FLOOR and decoded > MAX_INFLATION * size:
        raise TiffDamaged(
            f"the TIFF declares {decoded} bytes of pixels in a file of {size} bytes, more than {MAX_INFLATION} "
            "times its size, so it does not hold the pixels it declares; save the image again with a standard "
            "TIFF writer, uncompressed or with zlib/deflate"
        )
    if series.dataoffset is not None:  # one contiguous, uncompressed block
        end = int(series.dataoffset) + int(series.nbytes)
        if end > size:
            raise TiffDamaged(_truncated(end, size))
        return
    offsets, counts = [], []
    for page_offsets, page_counts in _segments(series):
        offsets.append(page_offsets)
        counts.append(page_counts)
    start = np.concatenate(offsets) if offsets else np.zeros(0, np.uint64)
    count = np.concatenate(counts) if counts else np.zeros(0, np.uint64)
    used = (start > 0) & (count > 0)
    start, stop = start[used], start[used] + count[used]
    if len(stop) and int(stop.max()) > size:
        raise TiffDamaged(_truncated(int(stop.max()), size))
    order = np.argsort(start, kind="stable")
    start, stop = start[order], stop[order]
    shared = np.nonzero(start[1:] < stop[:-1])[0]
    if len(shared):
        first = int(shared[0])
        raise TiffDamaged(
            f"the TIFF's strips/tiles share bytes (two of its {len(start)} data segments start at bytes "
            f"{int(start[first])} and {int(start[first + 1])}), so the file would decode to far more pixels "
            "than it holds; save the image again with a standard TIFF writer"
        )


def _truncated(end: int, size: int) -> str:
    return (
        f"the TIFF is truncated: its pixel data ends at byte {end} but the file has {size} bytes; "
        "upload the complete file"
    )
