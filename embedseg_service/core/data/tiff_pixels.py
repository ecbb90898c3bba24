"""Bounded-memory access to the pixels of a TIFF's main image (torch-free).

Nothing here holds more than one strip or tile (or :data:`BLOCK_BYTES` of uncompressed data)
decoded at a time, besides the plane it returns:

* :func:`iter_blocks` yields every pixel of the image as 2D blocks of rows, to scan values.
* :func:`read_plane` reads one canonical ``(c, z)`` plane, every ``stride``-th row and column, and
  :func:`read_window` any rows and columns of one (a row or a column: one line of an orthogonal
  section), decoding only the strips or tiles that hold them.

Inflation rule: before a compressed strip or tile is decoded, its output is measured with a
bounded decompressor (Deflate, LZMA, PackBits) unless the codec's densest ratio already keeps it
small; a segment that would inflate beyond the size its strip or tile declares is refused with
:class:`TiffDamaged` (a "zip bomb" inside one strip). Other codecs are decoded by the parser into
a buffer of the declared size.
"""

from __future__ import annotations

import lzma
import math
import zlib
from collections.abc import Iterator, Sequence
from typing import cast

import numpy as np
import tifffile

from embedseg_service.core.data.io import TiffLayout
from embedseg_service.core.data.tiff_errors import TiffDamaged, TiffUnsupported, reason
from embedseg_service.core.data.tiff_limits import keyframe_of, product

BLOCK_BYTES = 16 * 1024**2
"""Most bytes of uncompressed pixel data read at once, and the read buffer of compressed segments."""

INFLATE_UNCHECKED_BYTES = 16 * 1024**2
"""Segments whose worst-case output is at most this many bytes are decoded without measuring first."""

_DEFLATE = (8, 32946)
_LZMA = 34925
_PACKBITS = 32773
_DENSEST = {8: 1032 + 1, 32946: 1032 + 1, _PACKBITS: 64 * 8}
"""Most bytes of output (PackBits: of the parser's list of ints) per byte of input, by codec; LZMA has no bound."""


def _packbits_length(data: bytes, limit: int) -> int:
    """Length of the PackBits-decoded ``data``, counting stops once past ``limit``."""
    position, length, size = 0, 0, len(data)
    while position < size and length <= limit:
        header = data[position]
        if header < 128:
            length += header + 1
            position += header + 2
        elif header > 128:
            length += 257 - header
            position += 2
        else:
            position += 1
    return length


def _inflated_length(data: bytes, compression: int, limit: int) -> int:
    """How many bytes ``data`` decodes to (counting stops past ``limit``) for Deflate, LZMA and PackBits; ``0``
    for other codecs and when the codec's densest ratio keeps the output within ``limit`` or
    :data:`INFLATE_UNCHECKED_BYTES`. Raises the codec's error for corrupt data."""
    densest = _DENSEST.get(compression)
    if densest is not None and len(data) * densest <= max(limit, INFLATE_UNCHECKED_BYTES):
        return 0
    if compression in _DEFLATE:
        return len(zlib.decompressobj().decompress(data, limit + 1))
    if compression == _LZMA:
        total, rest = 0, data
        while rest and total <= limit:
            decompressor = lzma.LZMADecompressor()
            total += len(decompressor.decompress(rest, max_length=limit + 1 - total))
            rest = decompressor.unused_data if decompressor.eof else b""
        return total
    if compression == _PACKBITS:
        return _packbits_length(data, limit)
    return 0


def _segment_bytes(keyframe: tifffile.TiffPage) -> int:
    return product(keyframe.chunks) * max(1, int(keyframe.shaped[-1])) * np.dtype(keyframe.dtype).itemsize


def decoded_segments(
    page: tifffile.TiffPage | tifffile.TiffFrame, indices: Sequence[int] | None = None
) -> Iterator[tuple[np.ndarray | None, tuple[int, ...]]]:
    """Decode the strips or tiles of ``page`` (all, or those at ``indices``) one at a time.

    Yields ``(segment, position)``: the segment as ``(depth, length, width, samples)`` (``None`` for
    an empty one) and its position ``(sample, depth, y, x, 0)`` in the page. Raises
    :class:`TiffDamaged` for a segment that inflates beyond its declared size or cannot be decoded.
    """
    keyframe = keyframe_of(page)
    compression = int(keyframe.compression)
    limit = _segment_bytes(keyframe)
    offsets: Sequence[int] = page.dataoffsets
    counts: Sequence[int] = page.databytecounts
    if indices is not None:
        offsets, counts = [offsets[i] for i in indices], [counts[i] for i in indices]
    fh = page.parent.filehandle
    segments = fh.read_segments(offsets, counts, indices, sort=False, buffersize=BLOCK_BYTES, flat=True)
    for data, index in cast("Iterator[tuple[bytes | None, int]]", segments):
        try:
            if data is not None and _inflated_length(data, compression, limit) > limit:
                raise TiffDamaged(
                    f"a compressed strip/tile of the TIFF inflates to more than the {limit} bytes it declares; "
                    "save the image again with a standard TIFF writer"
                )
            segment, position, _ = keyframe.decode(data, index, _fullsize=False)
        except TiffDamaged:
            raise
        except Exception as exc:  # the codec or the parser on corrupt data
            raise TiffDamaged(f"cannot decode the TIFF pixel data: {reason(exc)}") from None
        yield segment, tuple(int(n) for n in position)


def _raw_rows(fh: tifffile.FileHandle, offset: int, rows: int, width: int, dtype: np.dtype) -> Iterator[np.ndarray]:
    """``rows`` rows of ``width`` uncompressed values at ``offset``, as blocks of at most :data:`BLOCK_BYTES`."""
    row_bytes = width * dtype.itemsize
    if row_bytes > BLOCK_BYTES:  # rows longer than a block come in pieces
        step = BLOCK_BYTES // dtype.itemsize
        for start in range(0, rows * width, step):
            count = min(step, rows * width - start)
            yield _read(fh, offset + start * dtype.itemsize, count, dtype).reshape(1, count)
        return
    per_block = max(1, BLOCK_BYTES // row_bytes)
    for first in range(0, rows, per_block):
        count = min(per_block, rows - first)
        yield _read(fh, offset + first * row_bytes, count * width, dtype).reshape(count, width)


def _read(fh: tifffile.FileHandle, offset: int, count: int, dtype: np.dtype) -> np.ndarray:
    fh.seek(offset)
    data = fh.read(count * dtype.itemsize)
    if len(data) != count * dtype.itemsize:
        raise TiffDamaged("the TIFF's pixel data ends early; upload the complete file")
    return np.frombuffer(data, dtype=dtype)


def _stored_dtype(tif: tifffile.TiffFile, dtype: np.dtype) -> np.dtype:
    return dtype.newbyteorder(tif.byteorder)


def iter_blocks(tif: tifffile.TiffFile, layout: TiffLayout) -> Iterator[np.ndarray]:
    """Every pixel of the main image of ``tif``, as 2D blocks whose rows are runs of the stored last axis.

    Blocks follow the stored order (not the canonical one); values keep the stored dtype. Raises
    :class:`TiffDamaged` for data that cannot be decoded.
    """
    series = layout.series
    dtype = _stored_dtype(tif, layout.dtype)
    if series.dataoffset is not None:
        width = layout.shape[-1]
        rows = product(layout.shape) // max(1, width)
        yield from _raw_rows(tif.filehandle, int(series.dataoffset), rows, width, dtype)
        return
    for page in series.pages:
        if page is None:
            raise TiffDamaged("the TIFF lacks a page of its image; upload the complete file")
        shaped = keyframe_of(page).shaped
        if page.is_contiguous:
            rows = product(shaped[:-2])
            yield from _raw_rows(tif.filehandle, int(page.dataoffsets[0]), rows, shaped[-2] * shaped[-1], dtype)
            continue
        height, width = int(shaped[-3]), int(shaped[-2])
        for segment, (_, _, y0, x0, _) in decoded_segments(page):
            if segment is not None:  # edge tiles are cut to the image
                block = segment[:, : height - y0, : width - x0]
                yield block.reshape(-1, block.shape[-2] * block.shape[-1])


# --------------------------------------------------------------------------- one plane


def plane_page(layout: TiffLayout, c: int, z: int) -> int | None:
    """Index of the page holding the canonical plane ``(c, z)`` when every page is one 2D plane whose
    axes are Y and X (in either order); ``None`` for other layouts."""
    if sorted(layout.full[-2:]) != ["X", "Y"]:
        return None
    keyframe = layout.series.keyframe
    if keyframe is None or tuple(keyframe.shaped) != (1, 1, layout.shape[-2], layout.shape[-1], 1):
        return None
    outer = layout.shape[:-2]
    if not outer:
        return 0
    position = tuple(c if a == "C" else z if a == "Z" else 0 for a in layout.full[:-2])
    return int(np.ravel_multi_index(position, outer))


def _first_at_or_after(kept: range, lo: int) -> int:
    """Position in ``kept`` (a range with a positive step) of its first element >= ``lo``."""
    return max(0, -(-(lo - kept.start) // kept.step))


def _span(kept: range, lo: int, hi: int) -> tuple[int, int]:
    """(first position, count) of the elements of ``kept`` within ``[lo, hi)``."""
    first = _first_at_or_after(kept, lo)
    last = min(len(kept), _first_at_or_after(kept, hi))
    return first, max(0, last - first)


def _window_raw(
    tif: tifffile.TiffFile, offset: int, width: int, dtype: np.dtype, rows: range, cols: range
) -> np.ndarray:
    """Rows ``rows`` and columns ``cols`` of an uncompressed page at ``offset``: per row, only the bytes
    from its first to its last kept column."""
    out = np.empty((len(rows), len(cols)), dtype=dtype.newbyteorder("="))
    if not len(rows) or not len(cols):
        return out
    count = cols[-1] - cols.start + 1
    for k, row in enumerate(rows):
        start = offset + (row * width + cols.start) * dtype.itemsize
        out[k] = _read(tif.filehandle, start, count, dtype)[:: cols.step]
    return out


def _segment_grid(keyframe: tifffile.TiffPage, width: int) -> tuple[int, int, int]:
    """(rows, columns) of one strip or tile of a page ``width`` wide, and the segments per segment row."""
    seg_rows, seg_cols = (
        (int(keyframe.chunks[-2]), int(keyframe.chunks[-1])) if keyframe.is_tiled else (int(keyframe.chunks[0]), width)
    )
    return seg_rows, seg_cols, max(1, math.ceil(width / seg_cols))


def _wanted_segments(keyframe: tifffile.TiffPage, shape: tuple[int, int], rows: range, cols: range) -> list[int]:
    """Indices of the strips or tiles of a page of ``shape`` that hold a kept row and a kept column."""
    height, width = shape
    seg_rows, seg_cols, per_row = _segment_grid(keyframe, width)
    hit_rows = [r for r in range(math.ceil(height / seg_rows)) if _span(rows, r * seg_rows, (r + 1) * seg_rows)[1]]
    hit_cols = [c for c in range(per_row) if _span(cols, c * seg_cols, (c + 1) * seg_cols)[1]]
    return [r * per_row + c for r in hit_rows for c in hit_cols]


def _window_segments(
    page: tifffile.TiffPage | tifffile.TiffFrame, shape: tuple[int, int], dtype: np.dtype, rows: range, cols: range
) -> np.ndarray:
    height, width = shape
    out = np.zeros((len(rows), len(cols)), dtype=dtype)
    wanted = _wanted_segments(keyframe_of(page), shape, rows, cols)
    for segment, (_, _, y0, x0, _) in decoded_segments(page, wanted):
        if segment is None:
            continue
        block = segment[0, :, :, 0][: height - y0, : width - x0]
        top, n_rows = _span(rows, y0, y0 + block.shape[0])
        left, n_cols = _span(cols, x0, x0 + block.shape[1])
        if n_rows and n_cols:
            r0, c0 = rows[top] - y0, cols[left] - x0
            picked = block[
                r0 : r0 + (n_rows - 1) * rows.step + 1 : rows.step, c0 : c0 + (n_cols - 1) * cols.step + 1 : cols.step
            ]
            out[top : top + n_rows, left : left + n_cols] = picked
    return out


def _page_axes(layout: TiffLayout, rows: range, cols: range) -> tuple[tuple[int, int], range, range, bool]:
    """(stored page shape, page rows, page columns, transposed) for canonical ``rows`` (Y) and ``cols`` (X)."""
    transposed = layout.full[-2:] == "XY"
    shape = (layout.shape[-2], layout.shape[-1])
    return (shape, cols, rows, True) if transposed else (shape, rows, cols, False)


def read_window(tif: tifffile.TiffFile, layout: TiffLayout, c: int, z: int, rows: range, cols: range) -> np.ndarray:
    """The canonical plane ``(c, z)`` of ``tif``'s main image at rows ``rows`` (Y) and columns ``cols`` (X),
    ranges with a positive step within the plane: a ``(len(rows), len(cols))`` array.

    Decodes only the strips or tiles holding a kept row and a kept column (uncompressed pages: reads
    only the span of kept columns of each kept row). ``c``/``z`` are ignored for axes the image lacks.
    Raises :class:`TiffUnsupported` when the pages are not 2D planes of Y and X (see
    :func:`plane_page`), :class:`TiffDamaged` for data that cannot be decoded.
    """
    number = plane_page(layout, c, z)
    if number is None:
        raise TiffUnsupported(f"the TIFF stores its image (axes {layout.full}) other than one Y-X plane per page")
    shape, page_rows, page_cols, transposed = _page_axes(layout, rows, cols)
    series = layout.series
    stored = _stored_dtype(tif, layout.dtype)
    if series.dataoffset is not None:
        offset = int(series.dataoffset) + number * shape[0] * shape[1] * stored.itemsize
        plane = _window_raw(tif, offset, shape[1], stored, page_rows, page_cols)
    else:
        page = series.pages[number]
        if page is None:
            raise TiffDamaged(f"the TIFF lacks page {number} of its image; upload the complete file")
        if page.is_contiguous:
            plane = _window_raw(tif, int(page.dataoffsets[0]), shape[1], stored, page_rows, page_cols)
        else:
            plane = _window_segments(page, shape, layout.dtype, page_rows, page_cols)
    return plane.T if transposed else plane


def window_bytes(layout: TiffLayout, rows: range, cols: range) -> int:
    """Bytes :func:`read_window` reads (uncompressed pages) or decodes (strips and tiles) for one page."""
    shape, page_rows, page_cols, _ = _page_axes(layout, rows, cols)
    itemsize = np.dtype(layout.dtype).itemsize
    keyframe = layout.series.keyframe
    if layout.series.dataoffset is not None or keyframe is None or keyframe.is_contiguous:
        span = page_cols[-1] - page_cols.start + 1 if len(page_cols) else 0
        return len(page_rows) * span * itemsize
    return len(_wanted_segments(keyframe, shape, page_rows, page_cols)) * _segment_bytes(keyframe)


def read_plane(tif: tifffile.TiffFile, layout: TiffLayout, c: int, z: int, stride: int = 1) -> np.ndarray:
    """The canonical plane ``(c, z)`` (``Y``, ``X``) of ``tif``'s main image, every ``stride``-th row and column.

    Reads one page (only its rows that are kept): :func:`read_window` of every ``stride``-th row and column.
    """
    height, width = (layout.shape[-1], layout.shape[-2]) if layout.full[-2:] == "XY" else layout.shape[-2:]
    return read_window(tif, layout, c, z, range(0, height, stride), range(0, width, stride))
