"""Synthetic labels, images and ideal raw outputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from core.synthetic import object_geometry, perfect_raw, random_labels, render_image

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
