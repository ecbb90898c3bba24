"""Synthetic labels, images and ideal raw outputs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import otsu_labels
from scipy import ndimage

from embedseg_service.core.data.io import read_tiff
from embedseg_service.core.data.synthetic import (
    anisotropic_nuclei_stack,
    object_geometry,
    perfect_raw,
    random_labels,
    render_confocal,
    render_image,
    touching_nuclei_labels,
)
from embedseg_service.core.metrics import average_precision

H = 1.0 / 1023.0


@pytest.mark.parametrize(
    "shape, n, radius",
    [((96, 128), 10, (4, 9)), ((20, 48, 48), 6, [(2, 4), (4, 7), (4, 7)])],
)
def test_random_labels_shape_count_and_separation(shape, n, radius):
    labels = random_labels(shape, n, radius, seed=3, gap=2)
    assert labels.shape == shape and labels.dtype == np.int32
    assert sorted(np.unique(labels).tolist()) == list(range(n + 1))
    # objects never touch: growing one object by one pixel never reaches another
    for k in range(1, n + 1):
        grown = ndimage.binary_dilation(labels == k)
        assert set(np.unique(labels[grown]).tolist()) <= {0, k}
    # each object lies inside the image and is one connected blob
    for k in range(1, n + 1):
        assert ndimage.label(labels == k)[1] == 1


def test_random_labels_deterministic_and_seed_dependent():
    a = random_labels((64, 64), 5, (3, 6), seed=1)
    b = random_labels((64, 64), 5, (3, 6), seed=1)
    c = random_labels((64, 64), 5, (3, 6), seed=2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_labels_radius_range_respected():
    labels = random_labels((200, 200), 8, (5, 6), seed=0)
    _, _, half = object_geometry(labels)
    assert np.all(half >= 4.5) and np.all(half <= 6.5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape": (10,), "n_objects": 1}, r"\(Y, X\) or \(Z, Y, X\)"),
        ({"shape": (10, 10), "n_objects": -1}, "n_objects"),
        ({"shape": (10, 10), "n_objects": 1, "radius": (5, 2)}, "0 < min <= max"),
        ({"shape": (10, 10), "n_objects": 1, "radius": [(1, 2)]}, "one \\(min, max\\) pair per axis"),
        ({"shape": (16, 16), "n_objects": 40, "radius": (3, 4)}, "could not place object"),
    ],
)
def test_random_labels_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        random_labels(**kwargs)


def test_render_image():
    labels = random_labels((48, 48), 4, (4, 6), seed=0)
    img = render_image(labels, seed=0, noise=0.05)
    assert img.shape == labels.shape and img.dtype == np.float32
    assert np.array_equal(img, render_image(labels, seed=0, noise=0.05))
    clean = render_image(labels, seed=0, noise=0.0)
    assert clean[labels > 0].mean() > 0.4 and clean[ndimage.binary_dilation(labels > 0, iterations=3) == 0].max() < 0.11


def test_object_geometry():
    labels = np.zeros((10, 10), dtype=np.int32)
    labels[2:5, 3:8] = 4
    ids, centroids, half = object_geometry(labels)
    assert ids.tolist() == [4]
    np.testing.assert_allclose(centroids, [[3.0, 5.0]])
    np.testing.assert_allclose(half, [[1.5, 2.5]])


@pytest.mark.parametrize("dims", [2, 3])
def test_perfect_raw_embeds_objects_at_their_centroids(dims):
    if dims == 2:
        labels = random_labels((64, 80), 5, (4, 8), seed=0)
        step = (H, H)
    else:
        labels = random_labels((16, 40, 40), 4, [(2, 4), (4, 7), (4, 7)], seed=0)
        step = (2.5 * H, H, H)
    raw = perfect_raw(labels, step)
    assert raw.shape == (2 * dims + 1, *labels.shape) and raw.dtype == np.float32
    ids, centroids, half = object_geometry(labels)
    coords = np.indices(labels.shape)
    for a in range(dims):
        emb = np.tanh(raw[dims - 1 - a].astype(np.float64)) + coords[a] * step[a]  # x, y[, z] channel order
        for k, label in enumerate(ids):
            np.testing.assert_allclose(emb[labels == label], centroids[k, a] * step[a], atol=1e-6 * step[a] + 1e-9)
        np.testing.assert_allclose(emb[labels == 0], coords[a][labels == 0] * step[a], atol=1e-9)
        lam = np.exp(10 * raw[2 * dims - 1 - a].astype(np.float64))
        for k, label in enumerate(ids):
            radius_px = math.sqrt(math.log(2) / lam[labels == label][0]) / step[a]
            assert radius_px == pytest.approx(half[k, a] + 0.5, rel=1e-4)
    q = raw[2 * dims]
    assert np.all(q[labels == 0] == -10.0)
    assert np.all(q[labels > 0] >= 1.0 - 1e-6) and np.all(q[labels > 0] <= 6.0 + 1e-6)
    for k, label in enumerate(ids):
        peak = np.unravel_index(np.argmax(np.where(labels == label, q, -np.inf)), labels.shape)
        assert np.all(np.abs(np.array(peak) - centroids[k]) <= 1.0)


def test_perfect_raw_noise_is_seeded():
    labels = random_labels((32, 32), 2, (4, 6), seed=0)
    clean = perfect_raw(labels, H)
    a = perfect_raw(labels, H, offset_noise=0.5, sigma_noise=0.01, seed_noise=0.3, seed=5)
    b = perfect_raw(labels, H, offset_noise=0.5, sigma_noise=0.01, seed_noise=0.3, seed=5)
    c = perfect_raw(labels, H, offset_noise=0.5, sigma_noise=0.01, seed_noise=0.3, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    for ch in range(5):
        assert not np.array_equal(a[ch], clean[ch])
    quiet_bg = perfect_raw(labels, H, seed_noise=0.3, background_seed_noise=0.0, seed=5)
    assert np.all(quiet_bg[4][labels == 0] == -10.0)


def test_perfect_raw_background_sigma():
    labels = random_labels((32, 32), 2, (4, 6), seed=0)
    raw = perfect_raw(labels, H, background_sigma=1.25)
    assert np.all(raw[2:4][:, labels == 0] == np.float32(1.25))


# --------------------------------------------------------------------------------------------
# few-slice anisotropic nuclei


def _touching_ids(labels: np.ndarray) -> set[int]:
    """Labels that share a face (Z, Y or X neighbour) with another label, no background between."""
    out: set[int] = set()
    for axis in range(labels.ndim):
        a, b = np.moveaxis(labels, axis, 0)[1:], np.moveaxis(labels, axis, 0)[:-1]
        edge = (a != b) & (a > 0) & (b > 0)
        out |= set(np.unique(a[edge]).tolist()) | set(np.unique(b[edge]).tolist())
    return out


@pytest.mark.parametrize("shape, n, seed", [((5, 192, 192), 6, 0), ((5, 192, 256), 8, 1), ((5, 256, 256), 10, 2)])
def test_anisotropic_nuclei_stack_shape_dtype_and_objects(shape, n, seed):
    image, labels = anisotropic_nuclei_stack(shape, n, seed)
    assert image.shape == labels.shape == shape
    assert image.dtype == np.uint8 and labels.dtype == np.int32
    assert sorted(np.unique(labels).tolist()) == list(range(n + 1))
    _, _, half = object_geometry(labels)
    z_extent = 2 * half[:, 0]
    assert np.all((z_extent >= 3) & (z_extent <= 5)), z_extent  # 3-5 of the 5 slices
    widths = 2 * half[:, 1:].max(axis=1)
    assert np.all(widths <= 2 * 46 + 1) and np.median(widths) >= 60, widths  # about 80 px wide
    for k in range(1, n + 1):
        assert ndimage.label(labels == k)[1] == 1
    # most nuclei touch a neighbour: no background between them
    assert len(_touching_ids(labels)) >= n - 2
    # nuclei are brighter than the background they sit on
    assert image[labels > 0].mean() > 2 * image[labels == 0].mean()


def test_anisotropic_nuclei_stack_deterministic_and_seed_dependent():
    a_img, a_lab = anisotropic_nuclei_stack((5, 128, 160), 3, seed=4)
    b_img, b_lab = anisotropic_nuclei_stack((5, 128, 160), 3, seed=4)
    c_img, c_lab = anisotropic_nuclei_stack((5, 128, 160), 3, seed=5)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)
    assert not np.array_equal(a_lab, c_lab) and not np.array_equal(a_img, c_img)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_and_connected_components_merge_touching_nuclei(seed):
    """The failure the stand-in must reproduce: a global threshold plus connected components
    cannot tell touching nuclei apart, so its AP0.5 against the true labels stays low."""
    image, labels = anisotropic_nuclei_stack((5, 192, 192), 6, seed)
    components = otsu_labels(image)
    ap50 = average_precision(labels, components, [0.5]).results[0].ap
    assert ap50 < 0.5
    # the largest component holds several nuclei
    largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
    assert len(set(np.unique(labels[components == largest]).tolist()) - {0}) >= 3


def test_render_confocal_background_and_axial_blur():
    labels = np.zeros((5, 96, 96), dtype=np.int32)
    labels[1:4, 30:66, 30:66] = 1
    image = render_confocal(labels, seed=0, photons=1e6, read_noise=0.0).astype(np.float64)
    assert np.array_equal(render_confocal(labels, seed=0), render_confocal(labels, seed=0))
    inside = image[2, 40:56, 40:56].mean()
    above = image[0, 40:56, 40:56].mean()  # one slice off the nucleus: light spread along Z
    far = image[0, :12, :12].mean()
    assert inside > above > far
    # uneven background: the background differs between the corners, unless unevenness is 0
    flat = render_confocal(labels, seed=0, photons=1e6, read_noise=0.0, unevenness=0.0).astype(np.float64)
    ends = (slice(0, 16), slice(80, 96))
    corners = np.array([[im[2, ys, xs].mean() for ys in ends for xs in ends] for im in (image, flat)])
    assert np.ptp(corners[0]) > 1.0 and np.ptp(corners[1]) < 0.5


def test_touching_nuclei_boundaries_are_dimmed():
    labels = np.zeros((5, 64, 96), dtype=np.int32)
    labels[1:4, 16:48, 8:48] = 1
    labels[1:4, 16:48, 48:88] = 2
    image = render_confocal(labels, seed=0, brightness=(0.8, 0.8), texture=0.0, photons=1e6, read_noise=0.0)
    row = image[2, 32].astype(np.float64)
    assert row[46:50].min() < 0.95 * row[30:40].mean()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape": (64, 64), "n_objects": 1}, r"\(Z, Y, X\)"),
        ({"shape": (5, 64, 64), "n_objects": 0}, "n_objects"),
        ({"shape": (5, 64, 64), "n_objects": 2, "overlap": (0.3, 0.1)}, "overlap"),
        ({"shape": (5, 96, 96), "n_objects": 12}, "could not place nucleus"),
    ],
)
def test_touching_nuclei_labels_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        touching_nuclei_labels(**kwargs, max_tries=50)


def test_committed_fewslice_synthetic_standin_matches_its_generator(data_dir, monkeypatch):
    """``tests/data/nuclei3d_fewslice_synthetic`` is what ``tests/data/make_standins.py`` writes."""
    spec = importlib.util.spec_from_file_location("make_standins", Path(data_dir) / "make_standins.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    folder = Path(data_dir) / module.SYNTHETIC_SET
    for name, (image, labels) in module.synthetic_stacks().items():
        stored_image = read_tiff(folder / "images" / f"{name}.tif")
        stored_labels = read_tiff(folder / "masks" / f"{name}.tif")
        assert np.array_equal(stored_image.data, image) and np.array_equal(stored_labels.data, labels)
        assert stored_image.voxel_size == pytest.approx(module.SYNTHETIC_VOXEL_UM)
