"""Tests of embedseg_service.core.data.centers against brute-force definitions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from embedseg_service.core.data import centers as centers_mod
from embedseg_service.core.data.centers import CenterMode, medoid, object_centers


def brute_medoid(coords: np.ndarray, anisotropy: float = 1.0) -> np.ndarray:
    scale = np.ones(coords.shape[1])
    if coords.shape[1] == 3:
        scale[0] = anisotropy
    phys = coords * scale
    sums = cdist(phys, phys).sum(axis=1)
    return coords[int(np.argmin(sums))]


def random_labels(shape, n_objects, seed):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int32)
    grid = np.indices(shape)
    for k in range(1, n_objects + 1):
        c = rng.uniform(0, np.array(shape))
        r = rng.uniform(2, 6, size=len(shape))
        inside = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) <= 1
        labels[inside] = k * 3  # non-consecutive ids
    return labels


@pytest.mark.parametrize("shape,anisotropy", [((40, 50), 1.0), ((12, 30, 28), 1.0), ((12, 30, 28), 2.5)])
def test_medoid_matches_brute_force(shape, anisotropy):
    labels = random_labels(shape, 8, seed=len(shape))
    ids, cent = object_centers(labels, CenterMode.medoid, anisotropy)
    expected_ids = np.unique(labels)[1:]
    np.testing.assert_array_equal(ids, expected_ids)
    assert ids.dtype == np.int64 and cent.dtype == np.float64 and cent.shape == (len(ids), len(shape))
    for k, c in zip(ids, cent):
        coords = np.argwhere(labels == k).astype(float)
        np.testing.assert_array_equal(c, brute_medoid(coords, anisotropy))
        assert labels[tuple(c.astype(int))] == k


def test_anisotropy_changes_the_medoid():
    # An L-shaped 3D object: scaling Z changes which pixel is central.
    labels = np.zeros((10, 3, 12), dtype=np.int32)
    labels[:, 1, 0] = 1
    labels[0, 1, :] = 1
    _, c1 = object_centers(labels, "medoid", 1.0)
    _, c5 = object_centers(labels, "medoid", 5.0)
    coords = np.argwhere(labels == 1).astype(float)
    np.testing.assert_array_equal(c1[0], brute_medoid(coords, 1.0))
    np.testing.assert_array_equal(c5[0], brute_medoid(coords, 5.0))
    assert not np.array_equal(c1[0], c5[0])


def test_ties_go_to_lowest_index():
    labels = np.zeros((5, 6), dtype=np.int32)
    labels[2, 1:5] = 1  # 4 pixels in a row: two central pixels tie
    _, c = object_centers(labels)
    np.testing.assert_array_equal(c[0], [2, 2])
    labels = np.zeros((6, 6), dtype=np.int32)
    labels[1:3, 1:3] = 7  # 2x2 square: all four tie
    _, c = object_centers(labels, "approximate_medoid")
    np.testing.assert_array_equal(c[0], [1, 1])


def test_centroid_and_approximate_medoid():
    labels = np.zeros((20, 20), dtype=np.int64)
    labels[2:5, 3:10] = 1  # mean (3, 6)
    # a C shape whose centroid lies outside the object
    labels[10:19, 10] = 2
    labels[10, 10:18] = 2
    labels[18, 10:18] = 2
    ids, cent = object_centers(labels, CenterMode.centroid)
    np.testing.assert_array_equal(ids, [1, 2])
    np.testing.assert_array_equal(cent[0], [3, 6])
    coords = np.argwhere(labels == 2)
    np.testing.assert_array_equal(cent[1], np.round(coords.mean(axis=0)))
    assert labels[tuple(cent[1].astype(int))] == 0
    _, am = object_centers(labels, CenterMode.approximate_medoid)
    assert labels[tuple(am[1].astype(int))] == 2
    med = np.median(coords, axis=0)
    d = np.linalg.norm(coords - med, axis=1)
    np.testing.assert_array_equal(am[1], coords[np.argmin(d)])


def test_large_object_uses_candidates_and_subsample(monkeypatch):
    monkeypatch.setattr(centers_mod, "EXACT_MEDOID_MAX_PIXELS", 500)
    monkeypatch.setattr(centers_mod, "MEDOID_CANDIDATES", 64)
    monkeypatch.setattr(centers_mod, "MEDOID_SUBSAMPLE", 300)
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(2000, 2)) * [10, 3]
    approx = pts[medoid(pts)]
    exact = pts[np.argmin(cdist(pts, pts).sum(1))]
    # Candidate + subsample medoid lands close to the exact one
    assert np.linalg.norm(approx - exact) < 1.0


def test_default_large_object_is_inside_and_central():
    labels = np.zeros((200, 200), dtype=np.int32)
    yy, xx = np.indices(labels.shape)
    labels[(yy - 100) ** 2 + (xx - 90) ** 2 <= 95**2] = 1  # ~28 000 px, above the exact limit
    _, c = object_centers(labels)
    assert np.linalg.norm(c[0] - [100, 90]) <= 1.5


def test_empty_and_bad_inputs():
    ids, cent = object_centers(np.zeros((4, 5), dtype=np.uint8))
    assert ids.shape == (0,) and cent.shape == (0, 2)
    with pytest.raises(ValueError, match="integer"):
        object_centers(np.zeros((4, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="2D"):
        object_centers(np.zeros((4,), dtype=np.int32))
    with pytest.raises(ValueError, match=">= 0"):
        object_centers(-np.ones((4, 5), dtype=np.int32))
    with pytest.raises(ValueError, match="valid choices: medoid, approximate_medoid, centroid"):
        object_centers(np.ones((4, 5), dtype=np.int32), "middle")
    with pytest.raises(ValueError, match="anisotropy"):
        object_centers(np.ones((3, 4, 5), dtype=np.int32), anisotropy=0.0)


def test_huge_sparse_ids():
    labels = np.zeros((10, 10), dtype=np.int64)
    labels[1:3, 1:3] = 2**40
    labels[6:9, 6:9] = 5
    ids, cent = object_centers(labels)
    np.testing.assert_array_equal(ids, [5, 2**40])
    np.testing.assert_array_equal(cent, [[7, 7], [1, 1]])


@pytest.mark.parametrize("anisotropy", [1.0, 3.0])
def test_fft_medoid_matches_brute_force_on_large_objects(anisotropy):
    rng = np.random.default_rng(4)
    labels = np.zeros((14, 40, 44), dtype=np.int32)
    grid = np.indices(labels.shape)
    for k, (c, r) in enumerate([((6, 12, 12), (5, 9, 7)), ((7, 28, 30), (6, 8, 11))], start=1):
        inside = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) <= 1
        labels[inside & (rng.random(labels.shape) < 0.9)] = k  # ragged, non-convex objects
    assert all((labels == k).sum() >= centers_mod.FFT_MIN_PIXELS for k in (1, 2))
    ids, cent = object_centers(labels, "medoid", anisotropy)
    for k, c in zip(ids, cent):
        coords = np.argwhere(labels == k).astype(float)
        np.testing.assert_array_equal(c, brute_medoid(coords, anisotropy))


def test_fft_medoid_ties_and_fallback(monkeypatch):
    labels = np.zeros((40, 50), dtype=np.int32)
    labels[5:25, 10:40] = 1  # 20 x 30 rectangle: the four central pixels tie
    _, c = object_centers(labels)
    coords = np.argwhere(labels == 1).astype(float)
    np.testing.assert_array_equal(c[0], brute_medoid(coords))
    np.testing.assert_array_equal(c[0], [14, 24])
    monkeypatch.setattr(centers_mod, "FFT_MAX_ELEMENTS", 10)  # forces blocked pairwise sums
    _, c2 = object_centers(labels)
    np.testing.assert_array_equal(c2, c)
