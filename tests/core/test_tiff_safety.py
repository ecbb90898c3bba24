"""Hostile TIFFs at the reader level: limits from the header, where pixel data lies, bounded decoding, value
checks, and every parser failure as a TiffError."""

from __future__ import annotations

import io
import itertools
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile

from embedseg_service.core.data import tiff_limits, tiff_rewrite
from embedseg_service.core.data.io import inspect_tiff, open_tiff, read_tiff
from embedseg_service.core.data.tiff_errors import TiffDamaged, TiffTooLarge, TiffUnreadable, TiffUnsupported
from embedseg_service.core.data.tiff_limits import check_pixel_data
from embedseg_service.core.data.tiff_pixels import (
    decoded_segments,
    iter_blocks,
    read_plane,
    read_window,
    window_bytes,
)
from embedseg_service.core.data.tiff_rewrite import rewrite_canonical
from embedseg_service.core.data.tiff_values import check_pixel_values


def write(path: Path, data: np.ndarray, **kwargs) -> Path:  # type: ignore[no-untyped-def]
    if not kwargs.get("imagej") and not kwargs.get("ome"):
        kwargs.setdefault("photometric", "minisblack")
    tifffile.imwrite(path, data, **kwargs)
    return path


def one_strip(width: int, height: int, strip: bytes, compression: int) -> bytes:
    """A classic TIFF of one uint8 page stored as one strip."""
    tags = [
        (256, 4, width),
        (257, 4, height),
        (258, 3, 8),
        (259, 3, compression),
        (262, 3, 1),
        (273, 4, 8),
        (277, 3, 1),
        (278, 4, height),
        (279, 4, len(strip)),
    ]
    ifd = (
        struct.pack("<H", len(tags))
        + b"".join(struct.pack("<HHII", code, kind, 1, value) for code, kind, value in tags)
        + bytes(4)
    )
    return b"II*\x00" + struct.pack("<I", 8 + len(strip)) + strip + ifd


DATA = np.random.default_rng(0).integers(0, 60000, (2, 3, 50, 70)).astype(np.uint16)
LAYOUTS = {
    "plain": {},
    "zlib_strips": {"compression": "zlib", "rowsperstrip": 7},
    "zlib_tiles": {"compression": "zlib", "tile": (16, 32)},
    "big_endian_tiles": {"byteorder": ">", "compression": "zlib", "tile": (16, 16)},
    "ome_lzma": {"ome": True, "metadata": {"axes": "CZYX"}, "compression": "lzma"},
}


@pytest.mark.parametrize("options", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_planes_and_blocks_match_the_whole_read(tmp_path, options) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path / "v.tif", DATA, **options)
    with open_tiff(path) as (tif, layout):
        assert layout.canonical == "CZYX"
        values = np.concatenate([block.ravel() for block in iter_blocks(tif, layout)])
        np.testing.assert_array_equal(np.sort(values), np.sort(DATA.ravel()))
        for c, z, stride in itertools.product(range(2), range(3), (1, 3, 16)):
            np.testing.assert_array_equal(read_plane(tif, layout, c, z, stride), DATA[c, z, ::stride, ::stride])


@pytest.mark.parametrize("options", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_windows_rows_and_columns_match_the_whole_read(tmp_path, options) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path / "v.tif", DATA, **options)
    windows = [
        (range(13, 14), range(0, 70, 3)),  # one row (an XZ line)
        (range(0, 50, 2), range(41, 42)),  # one column (a YZ line)
        (range(5, 48, 7), range(17, 69, 5)),
        (range(49, 50), range(69, 70)),
    ]
    with open_tiff(path) as (tif, layout):
        for rows, cols in windows:
            window = read_window(tif, layout, 1, 2, rows, cols)
            np.testing.assert_array_equal(
                window, DATA[1, 2][rows.start : rows.stop : rows.step, cols.start : cols.stop : cols.step]
            )
        # a row decodes one band of strips or tiles, a column every band
        row_bytes = window_bytes(layout, range(13, 14), range(0, 70))
        column_bytes = window_bytes(layout, range(0, 50), range(41, 42))
        page_bytes = 50 * 70 * 2
        assert 0 < row_bytes <= page_bytes and 0 < column_bytes
        if "rowsperstrip" in options:
            assert row_bytes == 7 * 70 * 2 and column_bytes == 8 * 7 * 70 * 2
        if options.get("tile") == (16, 32):
            assert row_bytes == 3 * 16 * 32 * 2 and column_bytes == 4 * 16 * 32 * 2
        if not options:
            assert row_bytes == 70 * 2 and column_bytes == 50 * 1 * 2


def test_imagej_order_and_transposed_planes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path / "ij.tif", np.moveaxis(DATA, 0, 1), imagej=True, metadata={"axes": "ZCYX"})
    with open_tiff(path) as (tif, layout):
        np.testing.assert_array_equal(read_plane(tif, layout, 1, 2, 2), DATA[1, 2, ::2, ::2])
    flat = write(tmp_path / "xy.tif", DATA[0, 0], compression="zlib", rowsperstrip=5)
    with open_tiff(flat, axes="XY") as (tif, layout):
        np.testing.assert_array_equal(read_plane(tif, layout, 0, 0, 3), DATA[0, 0].T[::3, ::3])


def test_rewrite_in_canonical_order_matches_the_whole_read(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    source = write(tmp_path / "zc.tif", np.moveaxis(DATA, 0, 1), compression="zlib")
    monkeypatch.setattr(tiff_rewrite, "read_tiff", None)  # planes only, never the whole image
    rewrite_canonical(source, tmp_path / "out.tif", axes="ZCYX", voxel_size=[2.0, 0.5, 0.5])
    back = read_tiff(tmp_path / "out.tif")
    assert back.axes == "CZYX" and back.voxel_size == (2.0, 0.5, 0.5)
    np.testing.assert_array_equal(back.data, DATA)
    monkeypatch.undo()
    yxz = write(tmp_path / "yxz.tif", np.moveaxis(DATA[0], 0, -1))
    monkeypatch.setattr(tiff_rewrite, "WHOLE_REWRITE_BYTES", 100)
    with pytest.raises(TiffUnsupported, match="axes YXZ put Y and X before another stored axis"):
        rewrite_canonical(yxz, tmp_path / "out2.tif", axes="yxz")


def test_the_voxel_budget_and_the_page_count_are_read_from_the_header(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path / "v.tif", np.zeros((5, 10, 10), np.uint8))
    assert inspect_tiff(path, max_voxels=500).shape == (5, 10, 10)
    with pytest.raises(TiffTooLarge, match=r"declares shape \(5, 10, 10\) = 500 voxels, more than the limit of 499"):
        inspect_tiff(path, max_voxels=499)
    monkeypatch.setattr(tiff_limits, "MAX_PAGES", 4)
    with pytest.raises(TiffTooLarge, match="holds more than 4 pages"):
        inspect_tiff(path)


def test_a_strip_that_inflates_beyond_its_declared_size_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bomb.tif"
    path.write_bytes(one_strip(64, 64, zlib.compress(bytes(32 * 1024**2), 9), 8))
    with open_tiff(path) as (tif, layout), pytest.raises(TiffDamaged, match="inflates to more than the 4096 bytes"):
        list(decoded_segments(layout.series.pages[0]))
    fine = tmp_path / "fine.tif"
    fine.write_bytes(one_strip(64, 64, zlib.compress(bytes(range(64)) * 64), 8))
    with open_tiff(fine) as (tif, layout):
        ((segment, position),) = decoded_segments(layout.series.pages[0])
        assert segment.shape == (1, 64, 64, 1) and position == (0, 0, 0, 0, 0)


def test_undecodable_data_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "junk.tif"
    path.write_bytes(one_strip(16, 16, b"not zlib at all" * 4, 8))
    with open_tiff(path) as (tif, layout), pytest.raises(TiffDamaged, match="cannot decode the TIFF pixel data"):
        check_pixel_values(tif, layout, labels=False)


def test_shared_and_truncated_pixel_data_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path / "v.tif", np.ones((64, 64), np.uint8), compression="zlib", rowsperstrip=8)
    with open_tiff(path) as (tif, layout):
        check_pixel_data(tif, layout.series)
    data = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        offsets_at = tif.pages[0].tags["StripOffsets"].valueoffset
        first = tif.pages[0].dataoffsets[0]
    data[offsets_at + 4 : offsets_at + 8] = struct.pack("<I", first)  # strip 1 points at strip 0
    path.write_bytes(bytes(data))
    with open_tiff(path) as (tif, layout), pytest.raises(TiffDamaged, match="strips/tiles share bytes"):
        check_pixel_data(tif, layout.series)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(write(tmp_path / "w.tif", np.ones((64, 64), np.uint16)).read_bytes()[:4000])
    with open_tiff(cut) as (tif, layout), pytest.raises(TiffDamaged, match="the TIFF is truncated"):
        check_pixel_data(tif, layout.series)


@pytest.mark.parametrize(
    ("data", "labels", "message"),
    [
        (np.array([[np.nan, 1], [np.inf, -np.inf]], np.float32), False, "holds 1 NaN and 2 infinite value"),
        (np.array([[0, -1], [3, 3]], np.int32), True, "holds 1 negative value"),
        (
            np.random.default_rng(1).integers(1, 30000, (64, 64)).astype(np.int16),
            True,
            "this does not look like a label image: 100% of its 4032 pairs",
        ),
    ],
    ids=["nan_inf", "negative", "noise"],
)
def test_values_the_policy_refuses(tmp_path, data, labels, message) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path / "v.tif", data)
    with open_tiff(path) as (tif, layout), pytest.raises(TiffDamaged, match=message):
        check_pixel_values(tif, layout, labels=labels)


def test_real_masks_and_finite_images_pass(tmp_path, data_dir) -> None:  # type: ignore[no-untyped-def]
    for mask in sorted(data_dir.glob("*/masks/*.tif"))[:6]:
        with open_tiff(mask) as (tif, layout):
            check_pixel_values(tif, layout, labels=True)
    path = write(tmp_path / "f.tif", np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10), compression="zlib")
    with open_tiff(path) as (tif, layout):
        check_pixel_values(tif, layout, labels=False)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("bad"),
        ZeroDivisionError("division by zero"),
        RuntimeError("x"),
        TypeError("y"),
        AssertionError(),
        IndexError("z"),
        KeyError("k"),
        struct.error("unpack"),
        OverflowError("big"),
        MemoryError(),
        OSError("read"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_parser_failure_is_an_unreadable_tiff(tmp_path, monkeypatch, error) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path / "v.tif", np.zeros((4, 4), np.uint8))

    def broken(_self):  # type: ignore[no-untyped-def]
        raise error

    monkeypatch.setattr(tifffile.TiffFile, "series", property(broken))
    with pytest.raises(TiffUnreadable, match="^not a readable TIFF file: "):
        inspect_tiff(path)
    with pytest.raises(TiffUnreadable, match="^not a readable TIFF file: "):
        inspect_tiff(io.BytesIO(path.read_bytes()))
