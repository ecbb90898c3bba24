"""Tests of embedseg_service.core.data.crops (windows, padding) and embedseg_service.core.data.augment (consistent
transforms)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from embedseg_service.core.data.augment import Transform, all_transforms, random_transform
from embedseg_service.core.data.crops import CropWindow, extract_crop, object_centroids, object_windows, window_start
from embedseg_service.core.data.datasets import CropDataset


def blobs(shape, n, seed, radius=(2, 5)):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int32)
    grid = np.indices(shape)
    for k in range(1, n + 1):
        c = rng.uniform(0, np.array(shape))
        r = rng.uniform(*radius, size=len(shape))
        labels[sum(((g - ci) / ri) ** 2 for g, ci, ri in zip(grid, c, r)) <= 1] = 10 + 3 * k
    return labels


def test_object_centroids_match_brute_force():
    labels = blobs((30, 40), 6, seed=0)
    ids, cents = object_centroids(labels)
    np.testing.assert_array_equal(ids, np.unique(labels)[1:])
    for k, c in zip(ids, cents):
        np.testing.assert_allclose(c, np.argwhere(labels == k).mean(axis=0))


def test_window_start_centres_and_shifts_inside():
    assert window_start((50.0, 50.0), (100, 100), (16, 16)) == (42, 42)
    assert window_start((2.0, 97.0), (100, 100), (16, 16)) == (0, 84)
    # axis shorter than the crop: the window is centred on the image
    assert window_start((2.0, 30.0, 30.0), (5, 64, 64), (8, 16, 16)) == (-1, 22, 22)
    assert window_start((3.0, 3.0), (7, 6), (16, 16)) == (-4, -5)


def test_object_windows_one_per_object_and_fraction():
    labels = blobs((60, 70), 12, seed=1)
    ids = np.unique(labels)[1:]
    windows = object_windows(labels, (16, 16), image_index=3)
    assert [w.object_id for w in windows] == ids.tolist()
    assert all(w.image_index == 3 and w.shape == (16, 16) for w in windows)
    for w in windows:
        assert all(0 <= s <= n - 16 for s, n in zip(w.start, labels.shape))
    some = object_windows(labels, (16, 16), fraction=0.5, rng=np.random.default_rng(0))
    again = object_windows(labels, (16, 16), fraction=0.5, rng=np.random.default_rng(0))
    assert len(some) == round(0.5 * len(ids)) and some == again
    with pytest.raises(ValueError, match="does not fit labels of shape"):
        object_windows(labels, (16, 16, 16))
    with pytest.raises(ValueError, match="fraction must be in"):
        object_windows(labels, (16, 16), fraction=0.0)


def test_extract_crop_inside_is_a_plain_slice():
    rng = np.random.default_rng(0)
    image = rng.random((2, 30, 40)).astype(np.float32)
    labels = blobs((30, 40), 5, seed=2)
    img, lab, ign = extract_crop(image, labels, CropWindow(0, (4, 10), (16, 24)))
    np.testing.assert_array_equal(img, image[:, 4:20, 10:34])
    np.testing.assert_array_equal(lab, labels[4:20, 10:34])
    assert img.shape == (2, 16, 24) and not ign.any()


def test_extract_crop_pads_by_reflection_and_marks_ignore():
    image = np.arange(5 * 6 * 7, dtype=np.float32).reshape(1, 5, 6, 7)
    labels = np.ones((5, 6, 7), dtype=np.int32)
    user_ignore = np.zeros((5, 6, 7), dtype=bool)
    user_ignore[2, 3, 3] = True
    img, lab, ign = extract_crop(image, labels, CropWindow(0, (-1, -1, 0), (8, 8, 8)), user_ignore)
    assert img.shape == (1, 8, 8, 8) and lab.shape == ign.shape == (8, 8, 8)
    expected = np.pad(image[0], ((1, 2), (1, 1), (0, 1)), mode="reflect")
    np.testing.assert_array_equal(img[0], expected)
    inside = np.zeros((8, 8, 8), dtype=bool)
    inside[1:6, 1:7, 0:7] = True
    assert np.all(lab[inside] == 1) and np.all(lab[~inside] == 0)
    assert np.all(ign[~inside]) and ign[inside].sum() == 1 and ign[3, 4, 3]
    with pytest.raises(ValueError, match="lies outside the image"):
        extract_crop(image, labels, CropWindow(0, (10, 0, 0), (8, 8, 8)))


@pytest.mark.parametrize("shape", [(5, 7), (4, 5, 7)])
def test_transform_points_follow_the_pixels(shape):
    rng = np.random.default_rng(0)
    points = np.array([[rng.integers(n) for n in shape] for _ in range(6)], dtype=float)
    for t in all_transforms(len(shape)):
        for p in points:
            img = np.zeros(shape, dtype=np.uint8)
            img[tuple(p.astype(int))] = 1
            moved = t.apply(img, len(shape))
            assert moved.shape == t.spatial_shape(shape)
            np.testing.assert_array_equal(np.argwhere(moved)[0], t.apply_points(p[None], shape)[0])


def test_all_transforms_are_distinct_and_keep_leading_axes():
    rng = np.random.default_rng(1)
    for dims, count in ((2, 8), (3, 16)):
        a = rng.random((2,) + (6,) * dims)
        outs = [t.apply(a, dims) for t in all_transforms(dims)]
        assert len(outs) == count
        for x, y in itertools.combinations(outs, 2):
            assert not np.array_equal(x, y)
        for o in outs:
            assert o.shape == a.shape and o.flags.c_contiguous
            np.testing.assert_array_equal(np.sort(o[0].ravel()), np.sort(a[0].ravel()))  # channel 0 stays channel 0
    # Z never moves into YX
    t = Transform(1, True, True)
    z_profile = np.arange(4.0)[:, None, None] * np.ones((4, 5, 5))
    np.testing.assert_array_equal(t.apply(z_profile, 3)[:, 0, 0], np.arange(4.0)[::-1])


def test_random_transform_is_seeded_and_keeps_shape_when_not_square():
    a = [random_transform(np.random.default_rng(5), 3) for _ in range(2)]
    assert a[0] == a[1]
    ks = {random_transform(np.random.default_rng(s), 2, square=False).k for s in range(40)}
    assert ks == {0, 2}
    draws = {random_transform(np.random.default_rng(s), 3) for s in range(400)}
    assert len(draws) == 16


def test_thin_stack_gives_padded_crops_with_centres_on_objects():
    # Z = 5 below the crop depth of 8 (the reference made no crops from such stacks)
    labels = np.zeros((5, 40, 40), dtype=np.int32)
    labels[1:4, 5:12, 6:14] = 1
    labels[0:5, 25:33, 20:30] = 2
    image = (labels > 0).astype(np.float32) * 100 + 10
    ds = CropDataset([image], [labels], crop_shape=(8, 16, 16), center_mode="medoid", augment=False)
    assert len(ds) == 2
    for item in (ds[0], ds[1]):
        assert item["image"].shape == (1, 8, 16, 16)
        assert item["labels"].shape == item["ignore"].shape == (8, 16, 16)
        ignore = item["ignore"].numpy()
        # Z pad: 1 slice before, 2 after, all ignored
        assert ignore[0].all() and ignore[6:].all() and not ignore[1:6].any()
        assert (item["labels"].numpy()[ignore] == 0).all()
        for k, c in zip(item["center_ids"].tolist(), item["centers"].numpy()):
            assert item["labels"].numpy()[tuple(np.round(c).astype(int))] == k


def test_nothing_to_crop_raises():
    with pytest.raises(ValueError, match="no crops can be made: the 2 mask\\(s\\) hold no object"):
        CropDataset(
            [np.zeros((20, 20)), np.zeros((20, 20))],
            [np.zeros((20, 20), np.int32), np.zeros((20, 20), np.int32)],
            crop_shape=(16, 16),
        )
    empty = CropDataset([np.zeros((20, 20))], [np.zeros((20, 20), np.int32)], crop_shape=(16, 16), allow_empty=True)
    assert len(empty) == 0


@pytest.mark.parametrize("shape,crop", [((48, 52), (24, 24)), ((12, 40, 44), (8, 24, 24)), ((12, 40, 44), (8, 16, 24))])
def test_augmentation_moves_image_labels_ignore_and_centres_together(shape, crop):
    labels = blobs(shape, 10, seed=3, radius=(2, 6))
    image = labels.astype(np.float32) * 7.0 + 1.0  # identifies the labels pixel by pixel
    plain = CropDataset([image], [labels], crop_shape=crop, augment=False, normalization="none")
    aug = CropDataset([image], [labels], crop_shape=crop, augment=True, seed=11, normalization="none")
    transforms_seen = set()
    for epoch in range(3):
        aug.set_epoch(epoch)
        for i in range(len(aug)):
            a, p = aug[i], plain[i]
            img, lab, ign = a["image"].numpy(), a["labels"].numpy(), a["ignore"].numpy()
            assert img.shape[1:] == lab.shape == ign.shape == tuple(crop)
            valid = ~ign
            np.testing.assert_array_equal(img[0][valid], lab[valid] * 7.0 + 1.0)
            np.testing.assert_array_equal(a["center_ids"].numpy(), p["center_ids"].numpy())
            for k, c in zip(a["center_ids"].tolist(), a["centers"].numpy()):
                assert lab[tuple(np.round(c).astype(int))] == k  # medoid stays on its object
            # the augmented sample is one of the group's transforms of the plain one
            found = [
                t
                for t in all_transforms(len(shape))
                if np.array_equal(t.apply(p["labels"].numpy(), len(shape)), lab)
                and np.array_equal(t.apply(p["ignore"].numpy(), len(shape)), ign)
            ]
            assert found
            t = found[0]
            np.testing.assert_allclose(t.apply_points(p["centers"].numpy(), crop), a["centers"].numpy(), atol=1e-6)
            transforms_seen.add(t)
    assert len(transforms_seen) > 3
    # same seed and epoch: same draws
    again = CropDataset([image], [labels], crop_shape=crop, augment=True, seed=11, normalization="none")
    again.set_epoch(2)
    for i in range(len(again)):
        assert np.array_equal(again[i]["labels"].numpy(), aug[i]["labels"].numpy())
