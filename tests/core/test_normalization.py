"""Tests of embedseg_service.core.data.normalization."""

from __future__ import annotations

import numpy as np
import pytest

from embedseg_service.core.data.normalization import NormalizationMode, NormalizationSettings, normalize


def test_percentile_maps_p1_p99_8_to_0_1_without_clipping():
    x = np.arange(1000, dtype=np.uint16).reshape(10, 100)
    out = normalize(x)
    lo, hi = np.percentile(x, (1.0, 99.8))
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, (x - lo) / (hi - lo), rtol=1e-6, atol=1e-6)
    assert out.min() < 0 and out.max() > 1  # no clip


def test_camera_offset_and_dtype_do_not_change_the_result():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 200, size=(64, 64))
    u8 = base.astype(np.uint8)
    u16 = (base * 7 + 400).astype(np.uint16)  # gain and camera offset
    f = base.astype(np.float32) / 200.0
    a, b, c = normalize(u8), normalize(u16), normalize(f)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)
    assert abs(np.percentile(b, 1.0)) < 1e-6 and abs(np.percentile(b, 99.8) - 1) < 1e-6


def test_hot_pixels_do_not_squash_the_range():
    x = np.full((100, 100), 500, dtype=np.uint16)
    x[:, 50:] = 1500
    x[0, 0] = 65535
    out = normalize(x)
    np.testing.assert_allclose(out[5, 5], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[5, 60], 1.0, atol=1e-6)


def test_meanstd_and_none():
    x = np.array([[1.0, 2.0], [3.0, 6.0]])
    out = normalize(x, "meanstd")
    np.testing.assert_allclose(out, (x - 3.0) / np.std(x), rtol=1e-6)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(normalize(x.astype(np.uint8), NormalizationMode.none), x.astype(np.float32))


@pytest.mark.parametrize("mode", list(NormalizationMode))
def test_constant_image_gives_finite_values(mode):
    x = np.full((8, 9), 300, dtype=np.uint16)
    out = normalize(x, mode)
    assert np.all(np.isfinite(out))
    if mode is not NormalizationMode.none:
        np.testing.assert_array_equal(out, 0)


def test_channels_are_normalised_separately():
    rng = np.random.default_rng(1)
    x = np.stack([rng.random((5, 6, 7)) * 10, rng.random((5, 6, 7)) * 1000 + 50]).astype(np.float32)
    out = normalize(x, channel_axis=0)
    for c in range(2):
        np.testing.assert_allclose(out[c], normalize(x[c]), rtol=1e-6)
    last = normalize(np.moveaxis(x, 0, -1), channel_axis=-1)
    np.testing.assert_allclose(np.moveaxis(last, -1, 0), out, rtol=1e-6)


def test_bad_options():
    x = np.zeros((4, 4))
    with pytest.raises(ValueError, match="valid choices: percentile, meanstd, none"):
        normalize(x, "minmax")
    with pytest.raises(ValueError, match="0 <= p_low < p_high <= 100"):
        normalize(x, p_low=50, p_high=10)
    with pytest.raises(ValueError, match="channel_axis 3 is out of range"):
        normalize(x, channel_axis=3)
    with pytest.raises(ValueError, match="non-finite"):
        normalize(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="real numbers"):
        normalize(np.array([["a"]]))


def test_settings_round_trip():
    s = NormalizationSettings("meanstd", 2.0, 99.0)
    assert s.mode is NormalizationMode.meanstd
    assert NormalizationSettings.from_dict(s.to_dict()) == s
    x = np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(s.apply(x), normalize(x, "meanstd", 2.0, 99.0))
    with pytest.raises(ValueError, match="unknown normalization settings: clip"):
        NormalizationSettings.from_dict({"clip": True})
