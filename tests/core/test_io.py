"""Tests of embedseg_service.core.data.io: layouts, voxel sizes, atomic writes and every refusal."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import tifffile

from embedseg_service.core.data.io import inspect_tiff, read_tiff, stem
from embedseg_service.core.data.tiff_write import label_dtype, write_labels, write_tiff


@pytest.mark.parametrize(
    "axes,shape,dtype,voxel",
    [
        ("YX", (17, 23), np.uint8, (0.5, 0.5)),
        ("ZYX", (5, 17, 23), np.uint16, (2.0, 0.25, 0.25)),
        ("CYX", (3, 17, 23), np.float32, None),
        ("CZYX", (2, 4, 17, 23), np.float32, (1.5, 0.3, 0.3)),
        ("ZYX", (4, 9, 11), np.int32, (3.0, 0.5, 0.5)),
        ("YX", (9, 11), np.uint32, (0.1, 0.1)),
        ("ZYX", (4, 9, 11), np.int16, None),
    ],
)
def test_round_trip_keeps_pixels_axes_and_voxel_size(tmp_path, axes, shape, dtype, voxel):
    rng = np.random.default_rng(0)
    data = (rng.random(shape) * 200).astype(dtype)
    path = tmp_path / "out.tif"
    write_tiff(path, data, axes=axes, voxel_size=voxel)
    vol = read_tiff(path)
    assert vol.axes == axes
    assert vol.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(vol.data, data)
    if voxel is None:
        assert vol.voxel_size is None
    else:
        np.testing.assert_allclose(vol.voxel_size, voxel, rtol=1e-6)
    info = inspect_tiff(path)
    assert info.shape == shape and info.axes == axes and info.dtype == np.dtype(dtype)
    assert info.voxel_size == vol.voxel_size
    assert info.spatial_shape == vol.spatial_shape
    assert info.n_channels == (shape[0] if axes.startswith("C") else 1)
    assert os.listdir(tmp_path) == ["out.tif"]  # no temporary file left behind


def test_uncompressed_write_is_readable_by_plain_tifffile(tmp_path):
    data = np.arange(2 * 3 * 4 * 5, dtype=np.uint16).reshape(2, 3, 4, 5)
    write_tiff(tmp_path / "a.tif", data, axes="CZYX", voxel_size=(2, 1, 1), compress=False)
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        assert tif.is_imagej
        assert tif.series[0].axes == "ZCYX"
        assert tif.imagej_metadata["spacing"] == 2.0
        assert tif.pages[0].compression == 1


def test_write_labels_chooses_the_smallest_type_and_keeps_voxel_size(tmp_path):
    small = np.zeros((4, 6, 7), dtype=np.int32)
    small[1, 2:4, 2:5] = 65535
    write_labels(tmp_path / "s.tif", small, voxel_size=(4.0, 0.5, 0.5))
    vol = read_tiff(tmp_path / "s.tif")
    assert vol.dtype == np.uint16 and vol.axes == "ZYX"
    np.testing.assert_array_equal(vol.data, small)
    np.testing.assert_allclose(vol.voxel_size, (4.0, 0.5, 0.5))
    big = small.copy()
    big[2, 0, 0] = 70000
    write_labels(tmp_path / "b.tif", big, voxel_size=(4.0, 0.5, 0.5))
    vol = read_tiff(tmp_path / "b.tif")
    assert vol.dtype == np.int32
    np.testing.assert_array_equal(vol.data, big)
    np.testing.assert_allclose(vol.voxel_size, (4.0, 0.5, 0.5))
    huge = np.zeros((3, 4), dtype=np.int64)
    huge[1, 1] = 2**31 + 5
    write_labels(tmp_path / "h.tif", huge)
    vol = read_tiff(tmp_path / "h.tif")
    assert vol.dtype == np.uint32 and vol.axes == "YX" and vol.data[1, 1] == 2**31 + 5
    assert label_dtype(10) == np.uint16 and label_dtype(2**16) == np.int32 and label_dtype(2**32 - 1) == np.uint32


def test_imagej_hyperstack_is_reordered_and_units_converted(tmp_path):
    data = np.arange(3 * 2 * 8 * 9, dtype=np.uint8).reshape(3, 2, 8, 9)  # Z, C, Y, X
    tifffile.imwrite(
        tmp_path / "ij.tif",
        data,
        imagej=True,
        resolution=(1 / 100, 1 / 100),
        metadata={"axes": "ZCYX", "unit": "nm", "spacing": 500},
    )
    vol = read_tiff(tmp_path / "ij.tif")
    assert vol.axes == "CZYX" and vol.channel_axis == 0 and vol.spatial_dims == 3
    np.testing.assert_array_equal(vol.data, np.moveaxis(data, 1, 0))
    np.testing.assert_allclose(vol.voxel_size, (0.5, 0.1, 0.1))


def test_ome_voxel_size_and_singleton_axes(tmp_path):
    data = np.ones((1, 1, 4, 8, 9), dtype=np.uint16)  # T, C, Z, Y, X with T = C = 1
    tifffile.imwrite(
        tmp_path / "o.ome.tif",
        data,
        ome=True,
        metadata={"axes": "TCZYX", "PhysicalSizeX": 0.2, "PhysicalSizeY": 0.2, "PhysicalSizeZ": 1.0},
    )
    vol = read_tiff(tmp_path / "o.ome.tif")
    assert vol.axes == "ZYX" and vol.data.shape == (4, 8, 9)
    np.testing.assert_allclose(vol.voxel_size, (1.0, 0.2, 0.2))


def test_plain_tiff_guesses_axes_and_reads_file_objects(tmp_path):
    stack = np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, stack)
    buffer.seek(0)
    vol = read_tiff(buffer)
    assert vol.axes == "ZYX" and vol.voxel_size is None
    np.testing.assert_array_equal(vol.data, stack)
    four = np.zeros((2, 5, 6, 7), dtype=np.float32)
    tifffile.imwrite(tmp_path / "four.tif", four)
    assert read_tiff(tmp_path / "four.tif").axes == "CZYX"
    thin = np.arange(5, dtype=np.uint8).reshape(1, 5)  # one row is still a 2D image
    tifffile.imwrite(tmp_path / "row.tif", thin)
    vol = read_tiff(tmp_path / "row.tif")
    assert vol.axes == "YX" and vol.data.shape == (1, 5)
    single = np.zeros((1, 6, 7), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "single.tif", single)
    assert read_tiff(tmp_path / "single.tif").data.shape == (6, 7)


def test_explicit_axes_override_the_guess(tmp_path):
    data = np.arange(3 * 6 * 7, dtype=np.uint16).reshape(3, 6, 7)
    tifffile.imwrite(tmp_path / "c.tif", data, photometric="minisblack")
    vol = read_tiff(tmp_path / "c.tif", axes="cyx")
    assert vol.axes == "CYX"
    vol = read_tiff(tmp_path / "c.tif", axes="YXC")
    assert vol.axes == "CYX" and vol.data.shape == (7, 3, 6)
    np.testing.assert_array_equal(vol.data, np.moveaxis(data, 2, 0))
    assert inspect_tiff(tmp_path / "c.tif", axes="YXZ").shape == (7, 3, 6)
    singleton = np.zeros((1, 6, 7), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", singleton)
    assert read_tiff(tmp_path / "s.tif", axes="ZYX").data.shape == (1, 6, 7)


def test_three_planes_stored_as_separate_samples_are_a_stack(tmp_path):
    data = np.arange(3 * 6 * 7, dtype=np.uint8).reshape(3, 6, 7)
    with pytest.warns(DeprecationWarning):
        tifffile.imwrite(tmp_path / "planes.tif", data)  # tifffile stores this as planar RGB
    vol = read_tiff(tmp_path / "planes.tif")
    assert vol.axes == "ZYX"
    np.testing.assert_array_equal(vol.data, data)


def test_imagej_resolution_without_unit_is_not_a_voxel_size(tmp_path):
    tifffile.imwrite(tmp_path / "p.tif", np.zeros((6, 7), np.uint8), imagej=True)
    assert read_tiff(tmp_path / "p.tif").voxel_size is None
    tifffile.imwrite(tmp_path / "cm.tif", np.zeros((6, 7), np.uint8), resolution=(10000, 10000), resolutionunit=3)
    np.testing.assert_allclose(read_tiff(tmp_path / "cm.tif").voxel_size, (1.0, 1.0))


def test_inspect_does_not_read_pixel_data(tmp_path):
    path = tmp_path / "t.tif"
    tifffile.imwrite(path, np.ones((20, 100, 100), np.uint16))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100_000)  # cut the pixel data, keep the header
    info = inspect_tiff(path)
    assert info.shape == (20, 100, 100) and info.axes == "ZYX"
    with pytest.raises(ValueError, match="cannot read the TIFF pixel data"):
        read_tiff(path)


def write_raw(path, data, **kwargs):
    tifffile.imwrite(path, data, **kwargs)
    return path


@pytest.mark.parametrize(
    "make,axes,message",
    [
        (lambda p: p.write_bytes(b"hello, not an image"), None, "not a readable TIFF file"),
        (lambda p: write_raw(p, np.zeros((8, 9, 3), np.uint8), photometric="rgb"), None, "colour \\(RGB/RGBA\\)"),
        (
            lambda p: write_raw(p, np.zeros((3, 8, 9), np.uint8), imagej=True, metadata={"axes": "TYX"}),
            None,
            "time series are not supported \\(3 time points",
        ),
        (lambda p: write_raw(p, np.zeros((2, 2, 2, 8, 9), np.uint8)), None, "more than 4 dimensions"),
        (lambda p: write_raw(p, np.zeros(9, np.uint8)), None, "fewer than two dimensions"),
        (lambda p: write_raw(p, np.zeros((5, 8, 9), np.float64)), None, "pixel type float64 is not supported"),
        (lambda p: write_raw(p, np.zeros((8, 9), np.int64)), None, "pixel type int64 is not supported"),
        (lambda p: write_raw(p, np.zeros((8, 9), np.int8)), None, "pixel type int8 is not supported"),
        (
            lambda p: write_raw(p, np.zeros((5, 8, 3), np.uint8), photometric="minisblack"),
            None,
            "channel-last layout",
        ),
        (lambda p: write_raw(p, np.zeros((5, 8, 9), np.uint8)), "YX", "has 2 letters but the image has 3"),
        (lambda p: write_raw(p, np.zeros((5, 8, 9), np.uint8)), "ZYT", "C, Z, Y, X at most once"),
        (lambda p: write_raw(p, np.zeros((5, 8, 9), np.uint8)), "YYX", "C, Z, Y, X at most once"),
        (lambda p: write_raw(p, np.zeros((5, 8, 9), np.uint8)), "CZY", "must contain Y and X"),
    ],
)
def test_read_refusals(tmp_path, make, axes, message):
    path = tmp_path / "bad.tif"
    make(path)
    with pytest.raises(ValueError, match=message):
        read_tiff(path, axes=axes)
    with pytest.raises(ValueError, match=message):
        inspect_tiff(path, axes=axes)


def test_write_refusals(tmp_path):
    with pytest.raises(ValueError, match="axes must be one of YX, ZYX, CYX, CZYX"):
        write_tiff(tmp_path / "a.tif", np.zeros((3, 4), np.uint8), axes="XY")
    with pytest.raises(ValueError, match="do not fit an array of shape"):
        write_tiff(tmp_path / "a.tif", np.zeros((3, 4), np.uint8), axes="ZYX")
    with pytest.raises(ValueError, match="pixel type float64 is not supported"):
        write_tiff(tmp_path / "a.tif", np.zeros((3, 4)), axes="YX")
    with pytest.raises(ValueError, match="voxel_size needs 3 values"):
        write_tiff(tmp_path / "a.tif", np.zeros((2, 3, 4), np.uint8), axes="ZYX", voxel_size=(1, 1))
    with pytest.raises(ValueError, match="voxel_size values must be positive"):
        write_tiff(tmp_path / "a.tif", np.zeros((3, 4), np.uint8), axes="YX", voxel_size=(0, 1))
    with pytest.raises(ValueError, match="labels must be integers"):
        write_labels(tmp_path / "a.tif", np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="labels must be >= 0"):
        write_labels(tmp_path / "a.tif", -np.ones((3, 4), np.int32))
    with pytest.raises(ValueError, match="labels must be 2D \\(Y, X\\) or 3D \\(Z, Y, X\\)"):
        write_labels(tmp_path / "a.tif", np.zeros((2, 2, 3, 4), np.int32))
    with pytest.raises(ValueError, match="does not fit in 32 bits"):
        label_dtype(2**33)
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "keep.tif"
    write_tiff(path, np.ones((3, 4), np.uint8), axes="YX")

    def boom(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tifffile, "imwrite", boom)
    with pytest.raises(OSError, match="disk full"):
        write_tiff(path, np.zeros((3, 4), np.uint8), axes="YX")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["keep.tif"]
    np.testing.assert_array_equal(read_tiff(path).data, np.ones((3, 4), np.uint8))


def test_real_test_data(data_dir):
    vol = read_tiff(data_dir / "nuclei3d_synthetic" / "images" / "synthetic_img3d.tif")
    assert vol.axes == "ZYX" and vol.data.shape == (31, 61, 57) and vol.dtype == np.uint16
    mask = read_tiff(data_dir / "nuclei2d_dsb" / "masks" / "dsb2018_img2d.tif")
    assert mask.axes == "YX" and len(np.unique(mask.data)) - 1 == 125
    assert stem("a/b/img.ome.tif") == "img" and stem("X.TIFF") == "X"


def test_core_io_does_not_import_torch():
    import subprocess
    import sys

    modules = "embedseg_service.core.data.io, embedseg_service.core.data.tiff_write"
    code = f"import sys, {modules}; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
