"""Tests of embedseg_service.core.training.hyperparams.DataProperties."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from embedseg_service.core.data.io import read_tiff
from embedseg_service.core.data.normalization import NormalizationMode, NormalizationSettings
from embedseg_service.core.model.embedding import step_for
from embedseg_service.core.training.hyperparams import (
    MIN_SEED_RADIUS,
    DataProperties,
    anisotropy_from_voxel_size,
    max_seed_radius,
    round_up_8,
)


def boxes_2d():
    m = np.zeros((100, 120), dtype=np.int32)
    m[10:15, 10:30] = 1  # extents y 4, x 19; 100 px
    m[50:60, 50:58] = 2  # extents y 9, x 7; 80 px
    m[80:83, 100:103] = 7  # extents y 2, x 2; 9 px
    return m


def test_2d_statistics_and_crop_rule():
    m = boxes_2d()
    p = DataProperties.from_masks([m], spatial_dims=2)
    ext = np.array([[4, 19], [9, 7], [2, 2]], dtype=float)
    np.testing.assert_allclose(p.extent_mean, ext.mean(0))
    np.testing.assert_allclose(p.extent_std, ext.std(0))
    # x: mean 9.33, std 7.13 -> 45.0 -> 48; y: mean 5, std 2.94 -> 19.7 -> 24; Y = X = the larger
    assert p.object_crop_shape == (48, 48)
    assert p.crop_shape == (96, 96)  # enlarged for context (the image is 100 x 120)
    assert "crop shape: 96 x 96 (YX); objects need 48 x 48, enlarged for context" in p.describe()
    assert p.min_object_size == 4  # half of the smallest object (9 px), rounded down
    assert p.foreground_weight == 10.0
    assert p.n_objects == 3 and p.n_images == 1
    assert p.max_object_size == 100 and p.mean_object_size == pytest.approx(189 / 3)
    assert p.anisotropy == 1.0 and p.step == step_for(2)
    # clustering's seed radius limit: mean + 5 std of the extents per axis (y 5 + 5 * 2.94, x 9.33 + 5 * 7.13)
    assert p.max_seed_radius == pytest.approx(tuple(ext.mean(0) + 5 * ext.std(0)))
    assert "largest seed radius (pixels): Y 19.7, X 45.0" in p.describe()


def test_max_seed_radius_rule():
    assert max_seed_radius([1.0, 0.0], [0.0, 0.0]) == (MIN_SEED_RADIUS, MIN_SEED_RADIUS)
    assert max_seed_radius([3.0, 10.0, 10.0], [0.5, 2.0, 1.0]) == (5.5, 20.0, 15.0)
    assert max_seed_radius(None, None) is None and max_seed_radius([], []) is None  # older checkpoints


def test_3d_foreground_weight_anisotropy_and_z_crop():
    a = np.zeros((20, 40, 40), dtype=np.uint16)
    a[2:6, 5:15, 5:15] = 1  # 400 voxels, bg 31600
    b = np.zeros((20, 40, 40), dtype=np.uint16)
    b[10:12, 20:30, 20:25] = 3  # 100 voxels
    b[0:1, 0:2, 0:2] = 4  # 4 voxels
    empty = np.zeros((20, 40, 40), dtype=np.uint16)  # skipped for the weight
    p = DataProperties.from_masks([a, b, empty], spatial_dims=3, voxel_size=(2.0, 0.5, 0.5))
    expected_w = np.mean([(32000 - 400) / 400, (32000 - 104) / 104])
    assert p.foreground_weight == pytest.approx(expected_w)
    assert p.min_object_size == 50  # half of 100: the 4-voxel object at the corner is cut by the border
    assert p.anisotropy == 4.0
    assert p.step == pytest.approx(step_for(3, 4.0))
    ext = np.array([[3, 9, 9], [1, 9, 4], [0, 1, 1]], dtype=float)
    z = round_up_8(ext[:, 0].mean() + 5 * ext[:, 0].std())
    yx = max(round_up_8(ext[:, 1].mean() + 5 * ext[:, 1].std()), round_up_8(ext[:, 2].mean() + 5 * ext[:, 2].std()))
    yx = min(yx, 40)
    assert p.crop_shape == p.object_crop_shape == (z, yx, yx)  # 3D: no enlargement for context


def test_context_crop_is_capped_by_the_largest_image():
    m = np.zeros((40, 64), dtype=np.int32)
    m[5:10, 5:10] = 1
    m[20:26, 30:35] = 2
    p = DataProperties.from_masks([m], spatial_dims=2)
    assert p.object_crop_shape == (8, 8)
    assert p.crop_shape == (64, 64)  # at least 96 for context, but no larger than the image's 64
    big = np.zeros((40, 400), dtype=np.int32)
    big[:30, :150] = 1  # an object wider than the context minimum: its crop is kept
    q = DataProperties.from_masks([big], spatial_dims=2)
    assert q.crop_shape == q.object_crop_shape and q.crop_shape[0] >= 152


def test_crop_is_capped_by_image_size_and_memory():
    m = np.zeros((30, 300, 300), dtype=np.int32)
    m[:, :250, :250] = 1  # one huge object
    m[0:2, 280:282, 280:282] = 2
    p = DataProperties.from_masks([m], spatial_dims=3)
    assert p.crop_shape[0] == 32 and p.crop_shape[1] == p.crop_shape[2] <= 304
    assert np.prod(p.crop_shape) <= 2 * 32 * 136 * 136
    capped = DataProperties.from_masks([m], spatial_dims=3, max_crop_voxels=16 * 64 * 64)
    assert np.prod(capped.crop_shape) <= 16 * 64 * 64
    assert all(s % 8 == 0 for s in capped.crop_shape)


def test_no_objects_gives_defaults():
    p = DataProperties.from_masks([np.zeros((30, 30), np.uint8)], spatial_dims=2)
    assert p.min_object_size == 36 and p.crop_shape == (256, 256) and p.n_objects == 0
    p3 = DataProperties.from_masks([np.zeros((5, 30, 30), np.uint8)], spatial_dims=3)
    assert p3.foreground_weight == 10.0 and p3.crop_shape == (32, 128, 128)
    assert "0 object(s)" in p3.describe()
    assert p.max_seed_radius is None and p3.max_seed_radius is None  # no objects: clustering keeps no limit


def test_overrides_and_describe():
    m = boxes_2d()
    p = DataProperties.from_masks([m], spatial_dims=2, crop_shape=64, min_object_size=20, foreground_weight=3.0)
    assert p.crop_shape == (64, 64) and p.min_object_size == 20 and p.foreground_weight == 3.0
    assert p.object_crop_shape == (64, 64)  # the user's crop is used as it is
    assert set(p.overrides) == {"crop_shape", "min_object_size", "foreground_weight"}
    text = p.describe()
    assert "crop shape: 64 x 64 (YX) (set by user)" in text
    assert "min object size: 20 (set by user)" in text
    assert "3 object(s)" in text and "normalization: percentile (P1-P99.8)" in text
    q = p.with_overrides(crop_shape=(32, 32), normalization="meanstd")
    assert q.crop_shape == q.object_crop_shape == (32, 32) and q.normalization is NormalizationMode.meanstd
    auto = DataProperties.from_masks([m], spatial_dims=2).with_overrides(crop_shape=128)
    assert auto.crop_shape == auto.object_crop_shape == (128, 128)
    assert "normalization" in q.overrides
    m3 = np.zeros((4, 16, 16), dtype=np.int32)
    m3[1:3, 4:8, 4:8] = 1
    r = DataProperties.from_masks([m3], spatial_dims=3, voxel_size=(3, 1, 1)).with_overrides(anisotropy=2.0)
    assert r.anisotropy == 2.0 and r.step == pytest.approx(step_for(3, 2.0))
    with pytest.raises(ValueError, match="cannot override n_objects"):
        p.with_overrides(n_objects=3)
    with pytest.raises(ValueError, match="positive multiples of 8"):
        p.with_overrides(crop_shape=(30, 30))


def test_dict_round_trip_is_json():
    m = boxes_2d()
    p = DataProperties.from_masks([m], spatial_dims=2, voxel_size=(0.3, 0.3), p_low=2.0)
    data = json.loads(json.dumps(p.to_dict()))
    q = DataProperties.from_dict(data)
    assert q == p
    assert q.normalization_settings == NormalizationSettings("percentile", 2.0, 99.8)
    assert q.object_crop_shape == (48, 48) and q.crop_shape == (96, 96)
    with pytest.raises(ValueError, match="unknown data properties: grid"):
        DataProperties.from_dict({**data, "grid": 1024})
    older = {k: v for k, v in data.items() if k != "object_crop_shape"}  # a checkpoint from before the field
    assert DataProperties.from_dict(older).object_crop_shape == (96, 96)


def test_voxel_size_rules():
    assert anisotropy_from_voxel_size(None, 3) == 1.0
    assert anisotropy_from_voxel_size((1.0, 0.25, 0.25), 3) == 4.0
    assert anisotropy_from_voxel_size((0.5, 0.5), 2) == 1.0
    with pytest.raises(ValueError, match="voxel_y \\(0.3\\) differs from voxel_x \\(0.25\\)"):
        anisotropy_from_voxel_size((1.0, 0.3, 0.25), 3)
    with pytest.raises(ValueError, match="needs 3 values"):
        anisotropy_from_voxel_size((1.0, 0.3), 3)
    with pytest.raises(ValueError, match="must be positive"):
        anisotropy_from_voxel_size((0.0, 1.0, 1.0), 3)


def test_bad_masks():
    with pytest.raises(ValueError, match="mask 0 has shape \\(4, 5\\); 3D masks need 3 axes"):
        DataProperties.from_masks([np.zeros((4, 5), np.int32)], spatial_dims=3)
    with pytest.raises(ValueError, match="label masks must be integers"):
        DataProperties.from_masks([np.zeros((4, 5), np.float32)], spatial_dims=2)
    with pytest.raises(ValueError, match=">= 0"):
        DataProperties.from_masks([-np.ones((4, 5), np.int32)], spatial_dims=2)
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        DataProperties.from_masks([], spatial_dims=4)


def test_min_object_size_ignores_objects_cut_by_the_border():
    m = np.zeros((30, 30), dtype=np.uint16)
    m[10:20, 10:20] = 1  # 100 px inside
    m[0:2, 5:8] = 2  # 6 px fragment on the top border
    m[25:30, 27:30] = 3  # 15 px fragment in the corner
    assert DataProperties.from_masks([m], spatial_dims=2).min_object_size == 50
    only_cut = np.zeros((30, 30), dtype=np.uint16)
    only_cut[0:2, 5:8] = 2
    only_cut[25:30, 27:30] = 3
    assert DataProperties.from_masks([only_cut], spatial_dims=2).min_object_size == 3


def test_real_masks(data_dir):
    m2 = read_tiff(data_dir / "nuclei2d_dsb" / "masks" / "dsb2018_img2d.tif").data
    p = DataProperties.from_masks([m2], spatial_dims=2)
    assert p.n_objects == 125
    slices = ndimage.find_objects(m2)
    counts = np.bincount(m2.ravel())
    whole = [counts[i + 1] for i, sl in enumerate(slices)
             if sl is not None and all(0 < a.start and a.stop < n for a, n in zip(sl, m2.shape))]  # fmt: skip
    assert 0 < len(whole) < 125 and p.min_object_size == min(whole) // 2
    # the top three quarters cut nuclei in two at row 384: the fragments do not set the size
    top = DataProperties.from_masks([m2[:384]], spatial_dims=2)
    assert top.min_object_size >= min(whole) // 2
    assert all(s % 8 == 0 and 16 <= s <= 512 for s in p.crop_shape)
    m3 = read_tiff(data_dir / "nuclei3d_synthetic" / "masks" / "synthetic_img3d.tif").data
    p3 = DataProperties.from_masks([m3], spatial_dims=3)
    assert p3.n_objects == 51
    fg = int((m3 > 0).sum())
    assert p3.foreground_weight == pytest.approx((m3.size - fg) / fg)
    assert p3.crop_shape[0] <= 32 and p3.crop_shape[1] == p3.crop_shape[2] <= 64
