"""Tests of embedseg_service.core.data.datasets on the real files of tests/data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedseg_service.core.data.centers import CenterMode, object_centers
from embedseg_service.core.data.datasets import CropDataset, collate_crops, split_train_val
from embedseg_service.core.data.io import read_tiff
from embedseg_service.core.data.normalization import NormalizationSettings, normalize
from embedseg_service.core.training.hyperparams import DataProperties


def load(data_dir, name, stem):
    image = read_tiff(data_dir / name / "images" / f"{stem}.tif").data
    mask = read_tiff(data_dir / name / "masks" / f"{stem}.tif").data
    return image, mask


def test_split_by_image_is_seeded_and_keeps_both_sides():
    images = [np.full((4, 4), i) for i in range(10)]
    masks = [np.full((4, 4), i, dtype=np.int32) for i in range(10)]
    (ti, tm), (vi, vm) = split_train_val(images, masks, val_fraction=0.15, seed=3)
    assert len(vi) == 2 and len(ti) == 8  # round(1.5) = 2
    assert sorted(int(i[0, 0]) for i in ti + vi) == list(range(10))
    assert [int(i[0, 0]) for i in vi] == [int(m[0, 0]) for m in vm]  # pairs stay together
    (ti2, _), (vi2, _) = split_train_val(images, masks, val_fraction=0.15, seed=3)
    assert [int(i[0, 0]) for i in vi2] == [int(i[0, 0]) for i in vi]
    picks = {tuple(int(i[0, 0]) for i in split_train_val(images, masks, seed=s)[1][0]) for s in range(10)}
    assert len(picks) > 1
    (ti, _), (vi, _) = split_train_val(images[:2], masks[:2], val_fraction=0.01)
    assert len(ti) == 1 and len(vi) == 1
    (ti, _), (vi, _) = split_train_val(images[:2], masks[:2], val_fraction=0.99)
    assert len(ti) == 1 and len(vi) == 1


def test_single_image_is_split_along_its_longest_axis(data_dir):
    image, mask = load(data_dir, "nuclei3d_synthetic", "synthetic_img3d")  # 31 x 61 x 57: Y is longest
    (ti, tm), (vi, vm) = split_train_val([image], [mask], val_fraction=0.15)
    assert tm[0].shape == (31, 52, 57) and vm[0].shape == (31, 9, 57)
    np.testing.assert_array_equal(np.concatenate([ti[0], vi[0]], axis=1), image)
    assert np.shares_memory(ti[0], image)  # views, not copies
    chan = np.stack([image, image])
    (ti, tm), (vi, vm) = split_train_val([chan], [mask], val_fraction=0.15, spatial_dims=3)
    assert ti[0].shape == (2, 31, 52, 57) and vi[0].shape == (2, 31, 9, 57)
    with pytest.raises(ValueError, match="val_fraction must be between 0 and 1"):
        split_train_val([image], [mask], val_fraction=1.0)
    with pytest.raises(ValueError, match="1 images but 2 masks"):
        split_train_val([image], [mask, mask])
    with pytest.raises(ValueError, match="no images given"):
        split_train_val([], [])
    with pytest.raises(ValueError, match="too small to split"):
        split_train_val([np.zeros((1, 1))], [np.zeros((1, 1), np.int32)])


def test_crop_dataset_2d_real_data(data_dir):
    image, mask = load(data_dir, "nuclei2d_dsb", "dsb2018_img2d")
    props = DataProperties.from_masks([mask], spatial_dims=2)
    ds = CropDataset(
        [image], [mask], crop_shape=props.crop_shape, augment=True, seed=0, normalization=props.normalization_settings
    )
    assert len(ds) == 125  # one crop per object
    norm = normalize(image)
    item = ds[7]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, *props.crop_shape)
    assert item["labels"].dtype == torch.int64 and item["ignore"].dtype == torch.bool
    assert item["centers"].dtype == torch.float32 and item["center_ids"].dtype == torch.int64
    assert item["centers"].shape == (len(item["center_ids"]), 2)
    plain = ds.crop(7)
    assert np.isin(plain[0][0], norm).all()  # crops are windows of the normalised image
    batch = collate_crops([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 1, *props.crop_shape)
    assert batch["labels"].shape == batch["ignore"].shape == (4, *props.crop_shape)
    assert isinstance(batch["centers"], list) and len(batch["centers"]) == 4
    for i in range(4):
        lab = batch["labels"][i].numpy()
        for k, c in zip(batch["center_ids"][i].tolist(), batch["centers"][i].numpy()):
            assert lab[tuple(np.round(c).astype(int))] == k
    loader = torch.utils.data.DataLoader(ds, batch_size=8, collate_fn=collate_crops)
    first = next(iter(loader))
    assert first["image"].shape == (8, 1, *props.crop_shape)


def test_centres_are_those_of_the_visible_part(data_dir):
    image, mask = load(data_dir, "cells2d_bbbc007", "f96_17_17P1_POS0006_D_1UL")
    ds = CropDataset([image], [mask], crop_shape=(32, 32), center_mode=CenterMode.medoid, augment=False)
    assert len(ds) == len(np.unique(mask)) - 1
    cut = 0
    for i in range(len(ds)):
        item = ds[i]
        ids, cents = object_centers(item["labels"].numpy(), CenterMode.medoid)
        np.testing.assert_array_equal(item["center_ids"].numpy(), ids)
        np.testing.assert_array_equal(item["centers"].numpy(), cents.astype(np.float32))
        w = ds.windows[i]
        full = mask[w.start[0] : w.start[0] + 32, w.start[1] : w.start[1] + 32]
        for k in ids:
            cut += int((mask == k).sum() != (full == k).sum())
    assert cut > 0  # some objects are cut by their neighbours' crops


def test_random_crops_are_redrawn_every_epoch_with_their_visible_centres(data_dir):
    image, mask = load(data_dir, "cells2d_bbbc007", "f96_17_17P1_POS0006_D_1UL")
    n_objects = len(np.unique(mask)) - 1
    ds = CropDataset(
        [image, image[60:80, 120:160]],
        [mask, mask[60:80, 120:160]],
        crop_shape=(32, 32),
        augment=False,
        random_fraction=0.25,
        seed=3,
    )
    small_objects = len(np.unique(mask[60:80, 120:160])) - 1
    assert ds.n_object_crops == n_objects + small_objects
    # per image a quarter of its object crops, rounded up
    assert len(ds) == ds.n_object_crops + int(np.ceil(0.25 * n_objects)) + int(np.ceil(0.25 * small_objects))
    first = ds.n_object_crops
    starts = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        window = ds.window(first)
        assert window.image_index == 0 and window.object_id == 0
        assert all(0 <= s <= n - 32 for s, n in zip(window.start, mask.shape))
        starts.add(window.start)
        item = ds[first]
        full = mask[window.start[0] : window.start[0] + 32, window.start[1] : window.start[1] + 32]
        np.testing.assert_array_equal(item["labels"].numpy(), full)
        ids, cents = object_centers(full, CenterMode.medoid)
        np.testing.assert_array_equal(item["center_ids"].numpy(), ids)
        np.testing.assert_array_equal(item["centers"].numpy(), cents.astype(np.float32))
        assert ds.window(first) == window  # the same draw within an epoch
    assert len(starts) == 4
    # the 20 x 40 image is smaller than the crop along Y: its random crops are centred and padded there
    last = ds.window(len(ds) - 1)
    assert last.image_index == 1 and last.start[0] == -6 and 0 <= last.start[1] <= 8
    assert ds[len(ds) - 1]["ignore"].numpy()[:6].all()
    # object crops are unchanged by the option
    plain = CropDataset([image], [mask], crop_shape=(32, 32), augment=False)
    assert len(plain) == n_objects and plain.windows == ds.windows[:n_objects]
    with pytest.raises(ValueError, match="random_fraction must be in"):
        CropDataset([image], [mask], crop_shape=(32, 32), random_fraction=-1)


@pytest.mark.parametrize("mode", list(CenterMode))
def test_3d_crop_centres_equal_a_direct_computation(data_dir, mode):
    image, mask = load(data_dir, "nuclei3d_synthetic", "synthetic_img3d")
    ds = CropDataset([image], [mask], crop_shape=(16, 24, 24), center_mode=mode, anisotropy=2.5)
    for i in range(len(ds)):
        item = ds[i]
        ids, cents = object_centers(item["labels"].numpy(), mode, 2.5)
        np.testing.assert_array_equal(item["center_ids"].numpy(), ids)
        np.testing.assert_array_equal(item["centers"].numpy(), cents.astype(np.float32))


def test_crop_dataset_3d_real_and_thin(data_dir):
    image, mask = load(data_dir, "nuclei3d_synthetic", "synthetic_img3d")
    props = DataProperties.from_masks([mask], spatial_dims=3)
    ds = CropDataset(
        [image],
        [mask],
        crop_shape=props.crop_shape,
        augment=True,
        seed=1,
        anisotropy=2.0,
        normalization=props.normalization,
    )
    assert len(ds) == 51
    item = ds[0]
    assert item["image"].shape == (1, *props.crop_shape) and item["centers"].shape[1] == 3
    thin_image, thin_mask = image[10:15], mask[10:15]  # Z = 5 below the crop depth of 8
    thin = CropDataset([thin_image], [thin_mask], crop_shape=(8, 32, 32), augment=True, seed=0)
    assert len(thin) == len(np.unique(thin_mask)) - 1 > 0
    for i in range(len(thin)):
        it = thin[i]
        ign = it["ignore"].numpy()
        assert ign.shape == (8, 32, 32)
        assert ign.sum() == 3 * 32 * 32  # three padded slices
        lab = it["labels"].numpy()
        for k, c in zip(it["center_ids"].tolist(), it["centers"].numpy()):
            assert lab[tuple(np.round(c).astype(int))] == k


def test_multichannel_images_and_settings(data_dir):
    image, mask = load(data_dir, "cells2d_bbbc007", "A9_A9_p5d")
    two = np.stack([image, 255 - image])
    settings = NormalizationSettings("meanstd")
    ds = CropDataset([two], [mask], crop_shape=(64, 64), normalization=settings)
    assert ds.in_channels == 2 and ds[0]["image"].shape == (2, 64, 64)
    np.testing.assert_allclose(ds.images[0][1], normalize(255 - image, "meanstd"), rtol=1e-5, atol=1e-5)


def test_crop_dataset_refusals():
    img, mask = np.zeros((20, 20)), np.ones((20, 20), np.int32)
    with pytest.raises(ValueError, match="1 images but 2 masks"):
        CropDataset([img], [mask, mask], crop_shape=(16, 16))
    with pytest.raises(ValueError, match="image 0 has shape \\(20, 21\\) but its mask has shape \\(20, 20\\)"):
        CropDataset([np.zeros((20, 21))], [mask], crop_shape=(16, 16))
    with pytest.raises(ValueError, match="need 3D"):
        CropDataset([img], [mask], crop_shape=(8, 16, 16))
    with pytest.raises(ValueError, match="label masks must be integers"):
        CropDataset([img], [mask.astype(float)], crop_shape=(16, 16))
    with pytest.raises(ValueError, match="image 1 has 2 channels, the first image 1"):
        CropDataset([img, np.zeros((2, 20, 20))], [mask, mask], crop_shape=(16, 16))
    with pytest.raises(ValueError, match="valid choices: percentile, meanstd, none"):
        CropDataset([img], [mask], crop_shape=(16, 16), normalization="zscore")
    with pytest.raises(ValueError, match="negative labels"):
        CropDataset([img], [-mask], crop_shape=(16, 16))
    with pytest.raises(IndexError):
        CropDataset([img], [mask], crop_shape=(16, 16))[5]
    with pytest.raises(ValueError, match="empty batch"):
        collate_crops([])
