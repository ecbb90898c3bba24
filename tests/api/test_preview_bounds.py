"""Previews of large volumes read a bounded number of pages and only the rows they show: memory stays far below
the volume's size (small volumes: tests/api/test_volumes.py)."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import tifffile

from embedseg_service.api import preview

PEAK_BYTES = 64 * 1024**2


def _marked_volume(path: Path, depth: int, side: int) -> None:
    """A zlib volume of ``depth`` slices of ``side`` x ``side`` uint8, slice k bright in rows 8k..8k+8."""

    def planes():  # type: ignore[no-untyped-def]
        for k in range(depth):
            plane = np.zeros((side, side), np.uint8)
            plane[8 * k : 8 * k + 8, 64:192] = 100 + k
            yield plane

    tifffile.imwrite(
        path, planes(), shape=(depth, side, side), dtype=np.uint8, photometric="minisblack", compression="zlib"
    )


def _peak(call) -> tuple[object, int]:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_preview_of_a_large_volume_reads_few_pages_in_bounded_memory(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    depth, side = 48, 2048  # 192 MiB of pixels in a file of about 100 KB
    path = tmp_path / "big.tif"
    _marked_volume(path, depth, side)
    reads: list[int] = []
    original = preview.read_plane

    def counting(tif, layout, c, z, stride=1):  # type: ignore[no-untyped-def]
        reads.append(z)
        return original(tif, layout, c, z, stride)

    monkeypatch.setattr(preview, "read_plane", counting)

    png, peak = _peak(lambda: preview.render_preview(path, max_px=1024))
    assert isinstance(png, bytes) and peak < PEAK_BYTES
    assert reads == [depth // 2]

    reads.clear()
    _, peak = _peak(lambda: preview.render_preview(path, projection=preview.Projection.max, max_px=1024))
    assert peak < PEAK_BYTES
    step = math.ceil(depth * side * side / preview.PREVIEW_READ_BYTES)
    assert step > 1 and reads == list(range(0, depth, step))

    plane = preview.load_plane(path, preview.Projection.max, None, 0, stride=2)
    assert plane.shape == (1024, 1024)
    for k in range(depth):
        assert plane[4 * k, 40] == (100 + k if k % step == 0 else 0)
    middle = preview.load_plane(path, preview.Projection.middle, None, 0, stride=2)
    assert middle[4 * (depth // 2), 40] == 100 + depth // 2 and middle[0, 40] == 0


def test_preview_of_a_large_plane_decodes_only_the_rows_it_shows(tmp_path) -> None:  # type: ignore[no-untyped-def]
    height, width = 16384, 8192  # 128 MiB in one page of 32-row strips
    path = tmp_path / "plane.tif"
    data = np.zeros((height, width), np.uint8)
    data[::16, ::16] = 200
    tifffile.imwrite(path, data, photometric="minisblack", compression="zlib", rowsperstrip=32)
    del data
    plane, peak = _peak(lambda: preview.load_plane(path, preview.Projection.middle, None, 0, stride=16))
    assert peak < PEAK_BYTES
    assert plane.shape == (1024, 512) and (plane == 200).all()


def test_sections_of_a_large_volume_read_one_line_per_page_within_the_budget(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    depth, side = 48, 2048  # 192 MiB of pixels
    path = tmp_path / "big.tif"
    _marked_volume(path, depth, side)
    windows: list[tuple[int, int, int]] = []  # (z, rows read, columns read)
    original = preview.read_window

    def counting(tif, layout, c, z, rows, cols):  # type: ignore[no-untyped-def]
        windows.append((z, len(rows), len(cols)))
        return original(tif, layout, c, z, rows, cols)

    monkeypatch.setattr(preview, "read_window", counting)

    # XZ through a marked row: one row of each page read (one band of strips decoded), as many pages as
    # rows drawn (48 slices over columns of stride 2: 24, the nearest slice for each)
    png, peak = _peak(lambda: preview.render_section(path, plane=preview.Plane.xz, index=8 * 5 + 1, max_px=1024))
    assert isinstance(png, bytes) and peak < PEAK_BYTES
    assert windows == [(z, 1, 1024) for z in range(1, depth, 2)]
    section = preview.load_section(path, preview.plan_section((depth, side, side), preview.Plane.xz, 41,
                                                               None, 1024, lambda _rows, _cols: 1), 0)  # fmt: skip
    assert section.shape == (24, 1024)  # row 2 shows slice 5, the one bright in rows 40..47
    assert (section[2, 32:96] == 105).all() and (np.delete(section, 2, axis=0)[:, 32:96] == 0).all()

    # YZ: a column of every page decodes whole pages; 8x taller slices want 192 rows, but only as many
    # pages as fit PREVIEW_READ_BYTES are read (every k-th slice, nearest)
    windows.clear()
    _, peak = _peak(lambda: preview.render_section(path, plane=preview.Plane.yz, voxel_size=[8, 1, 1], max_px=1024))
    assert peak < PEAK_BYTES
    pages = preview.PREVIEW_READ_BYTES // (side * side)
    assert pages < depth and len(windows) == pages
    assert all(rows == 1024 and cols == 1 for _, rows, cols in windows)
    assert [z for z, _, _ in windows] == sorted({z for z, _, _ in windows})
