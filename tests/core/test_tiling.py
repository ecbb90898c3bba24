"""Sliding-window prediction: exact stitching with identity-like predictors, padding, memory, cancel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.tiling import (
    PredictionCancelled,
    auto_tile_shape,
    available_memory,
    axis_starts,
    axis_weights,
    pad_to_multiple,
    predict_tiled,
    reflect_pad_end,
)


class Recorder:
    """``x -> [x + 1, 2 x]`` per input channel; checks and records the window shapes it sees."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert all(s % 8 == 0 for s in x.shape[2:]), x.shape
        self.shapes.append(tuple(x.shape))
        return torch.cat([x + 1, 2 * x], dim=1)


def coordinate_image(spatial: tuple[int, ...]) -> np.ndarray:
    """One channel per axis holding that axis' index: any misplaced window shows."""
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in spatial], indexing="ij")
    return np.stack(grids)


CASES = [
    ((37, 53), (16, 24)),  # tile smaller, sizes not multiples of 8
    ((37, 53), (8, 8)),
    ((37, 53), (37, 53)),  # tile equal
    ((37, 53), (100, 100)),  # tile larger
    ((64, 64), (32, 32)),
    ((13, 30, 21), (8, 16, 8)),
    ((13, 30, 21), (13, 30, 21)),
    ((13, 30, 21), (40, 40, 40)),
    ((5, 17, 40), (16, 16, 16)),
]


@pytest.mark.parametrize(("spatial", "tile"), CASES)
def test_stitching_is_exact(spatial, tile):
    image = coordinate_image(spatial)
    predictor = Recorder()
    seen = []
    out = predict_tiled(predictor, image, tile=tile, device="cpu", progress=lambda d, t: seen.append((d, t)))
    assert out.dtype == np.float32 and out.shape == (2 * len(spatial), *spatial)
    np.testing.assert_allclose(out[: len(spatial)], image + 1, rtol=1e-6, atol=2e-5)
    np.testing.assert_allclose(out[len(spatial) :], 2 * image, rtol=1e-6, atol=2e-5)
    expected_tiles = int(np.prod([len(axis_starts(n, min(-(-t // 8) * 8, n), 0.25)) for n, t in zip(spatial, tile)]))
    assert len(predictor.shapes) == expected_tiles
    assert seen == [(i, expected_tiles) for i in range(1, expected_tiles + 1)]
    for shape in predictor.shapes:  # windows never exceed the tile (rounded up to 8)
        assert all(s <= max(-(-t // 8) * 8, -(-n // 8) * 8) for s, t, n in zip(shape[2:], tile, spatial))


def test_windows_are_tile_sized_not_volume_sized():
    predictor = Recorder()
    predict_tiled(predictor, np.zeros((1, 40, 160, 160), np.float32), tile=(16, 32, 32), device="cpu")
    assert {s[2:] for s in predictor.shapes} == {(16, 32, 32)}
    assert len(predictor.shapes) == 4 * 7 * 7  # starts 0, 8, 16, 24 along Z; 0, 24, ..., 120, 128 along Y and X


def test_tensor_input_and_whole_image_window():
    image = torch.from_numpy(coordinate_image((20, 12)))
    predictor = Recorder()
    out = predict_tiled(predictor, image, tile=None, device="cpu")
    assert predictor.shapes == [(1, 2, 24, 16)]
    np.testing.assert_allclose(out[:2], image.numpy() + 1, atol=1e-6)


def test_blending_ignores_window_borders():
    """Outputs within 2 px of a window border are off by 1: at the seams they do not count at all."""

    def border_biased(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[..., :2] += 1.0
        out[..., -2:] += 1.0
        return out

    image = coordinate_image((8, 96))[1:]
    error = predict_tiled(border_biased, image, tile=(8, 32), device="cpu")[0] - image[0]
    # windows start at 0, 24, 48, 64 (multiples of 8, the last one ending at 96): 8-px overlaps
    # whose outer quarters (2 px next to each window border) have weight 0
    np.testing.assert_allclose(error[:, 2:-2], 0.0, atol=2e-5)
    np.testing.assert_allclose(error[:, :2], 1.0, atol=1e-6)  # the volume border is a border of every window
    np.testing.assert_allclose(error[:, -2:], 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("size", "tile", "overlap"),
    [(37, 16, 0.25), (100, 64, 0.25), (64, 64, 0.25), (9, 8, 0.25), (512, 256, 0.45), (500, 256, 0.25),
     (203, 24, 0.4), (61, 16, 0.0), (20, 13, 0.25)],
)
def test_axis_windows_are_aligned_and_weights_sum_to_one(size, tile, overlap):
    starts = axis_starts(size, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    if tile % 8 == 0:  # on the network's sampling grid, the last window reaching the end (within 7 px)
        assert all(s % 8 == 0 for s in starts)
        assert size - 8 < starts[-1] + tile if tile < size else starts == [0]
    else:
        assert starts[-1] + tile >= size
    for a, b in zip(starts, starts[1:]):  # consecutive windows overlap by the asked fraction (stride >= 8)
        assert a + tile - b >= min(round(overlap * tile), tile - 8)
    weights = axis_weights(size, tile, starts)
    total = np.zeros(size)
    for s, w in zip(starts, weights):
        assert w.shape == (min(tile, size - s),) and (w >= 0).all()
        total[s : s + len(w)] += w
    np.testing.assert_allclose(total, 1.0, rtol=1e-12)
    if len(starts) > 1:
        overlap_01 = starts[0] + tile - starts[1]
        assert weights[0][0] == 1.0  # weights fall only where a neighbour overlaps
        if overlap_01 >= 4:  # the outer quarter of an overlap does not count
            assert weights[0][-(overlap_01 // 4) :].max() == 0.0


def test_reflect_pad_matches_numpy():
    for n, target in [(5, 8), (3, 16), (1, 8), (8, 8), (2, 7)]:
        x = torch.arange(n, dtype=torch.float32).view(1, 1, n)
        x2 = x.view(1, 1, n, 1).expand(1, 1, n, 3)
        got = reflect_pad_end(x2, (target, 8))
        if n > 1:
            expected = np.pad(np.arange(n), (0, target - n), mode="reflect")
        else:
            expected = np.zeros(target)
        assert got.shape == (1, 1, target, 8)
        np.testing.assert_array_equal(got[0, 0, :, 0].numpy(), expected)
    assert pad_to_multiple(torch.zeros(2, 3, 9, 16, 1)).shape == (2, 3, 16, 16, 8)


def test_progress_can_cancel():
    calls = []

    def stop_after_two(done: int, total: int) -> bool:
        calls.append(done)
        return done < 2

    with pytest.raises(PredictionCancelled, match="after 2 of 16 tiles"):
        predict_tiled(Recorder(), np.zeros((1, 40, 40), np.float32), tile=(16, 16), device="cpu",
                      progress=stop_after_two)
    assert calls == [1, 2]

    def boom(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_tiled(Recorder(), np.zeros((1, 40, 40), np.float32), tile=(16, 16), device="cpu", progress=boom)


def test_tiled_tta_with_invariant_predictor():
    def pointwise(x: torch.Tensor) -> torch.Tensor:  # offsets 0, sigma and seed depend on the pixel only
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x), x * x, x * x, x - 0.5], dim=1)

    image = np.random.default_rng(0).random((1, 30, 45)).astype(np.float32)
    plain = predict_tiled(pointwise, image, tile=(16, 16), device="cpu")
    tta = predict_tiled(pointwise, image, tile=(16, 16), device="cpu", tta=True, tta_options={"batch_size": 3})
    np.testing.assert_allclose(tta, plain, atol=1e-6)
    np.testing.assert_allclose(plain[3], image[0] ** 2, atol=1e-6)


def test_auto_tile_shape():
    assert auto_tile_shape((60, 100, 100), free_bytes=8 << 30) == (60, 100, 100)
    tile = auto_tile_shape((60, 2048, 2048), free_bytes=2 << 30)
    assert tile[0] == 60 and tile[1] == tile[2] and tile[1] % 8 == 0
    assert 64 * tile[1] ** 2 * 256 <= 1 << 30  # Z is padded to 64
    assert 64 * (tile[1] + 8) ** 2 * 256 > 1 << 30
    smaller = auto_tile_shape((60, 2048, 2048), free_bytes=2 << 30, batch=8)
    assert smaller[1] < tile[1]
    assert all(t % 8 == 0 for t in auto_tile_shape((5000, 7000), free_bytes=1 << 30))
    assert available_memory("cpu") > 0
    assert len(auto_tile_shape((37, 53), device="cpu")) == 2


def test_bad_arguments_raise():
    image = np.zeros((1, 16, 16), np.float32)
    with pytest.raises(ValueError, match="tile needs 2 sizes"):
        predict_tiled(Recorder(), image, tile=(8, 8, 8), device="cpu")
    with pytest.raises(ValueError, match="tile must be 'auto'"):
        predict_tiled(Recorder(), image, tile="big", device="cpu")
    with pytest.raises(ValueError, match="overlap"):
        predict_tiled(Recorder(), image, tile=(8, 8), overlap=0.5, device="cpu")
    with pytest.raises(ValueError, match="image must be"):
        predict_tiled(Recorder(), np.zeros((16, 16), np.float32), device="cpu")
