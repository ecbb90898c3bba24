"""Test-time augmentation: transforms, inverses (offset signs included), batching, seed combination."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embedseg_service.core.inference.tta import Transform, TTACombine, predict_tta, transforms


def equivariant_toy(x: torch.Tensor) -> torch.Tensor:
    """A fixed function of the image that commutes with every axis-aligned transform.

    Offsets point from each pixel to the intensity centroid, sigma_a = (p_a - c_a)^2 per axis,
    the seed logit falls with the distance to the centroid. Channels x, y[, z].
    """
    spatial = x.shape[2:]
    d = len(spatial)
    grids = torch.meshgrid(*[torch.arange(n, dtype=x.dtype) for n in spatial], indexing="ij")
    out = []
    for b in range(x.shape[0]):
        w = x[b, 0]
        c = [(g * w).sum() / w.sum() for g in grids]
        offsets = [(c[a] - grids[a]) * 0.05 for a in range(d)]
        sigma = [((grids[a] - c[a]) * 0.05) ** 2 for a in range(d)]
        seed = 2.0 - sum(((grids[a] - c[a]) * 0.2) ** 2 for a in range(d))
        out.append(torch.stack(offsets[::-1] + sigma[::-1] + [seed]))
    return torch.stack(out)


def blob_image(spatial: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((1, 1, *spatial), generator=gen, dtype=torch.float64) ** 4


@pytest.mark.parametrize(("dims", "count"), [(2, 8), (3, 16)])
def test_transform_set(dims, count):
    ts = transforms(dims)
    assert len(ts) == count
    assert ts[0] == Transform(dims)
    assert len({t.matrix.tobytes() for t in ts}) == count
    for t in ts:
        assert abs(round(np.linalg.det(t.matrix))) == 1
        if dims == 3:  # Z never mixes with YX
            assert t.matrix[0].tolist() == [-1 if t.flip_z else 1, 0, 0]


@pytest.mark.parametrize("spatial", [(12, 20), (6, 10, 14)])
def test_every_transform_undoes_an_equivariant_field(spatial):
    x = blob_image(spatial)
    expected = equivariant_toy(x)
    for t in transforms(len(spatial)):
        moved = t.apply_image(x)
        assert moved.shape[2:] == t.transformed_shape(spatial)
        back = t.undo_output(equivariant_toy(moved))
        assert back.shape == expected.shape
        assert (back - expected).abs().max().item() <= 1e-6, t
        # and the raw field itself: apply_output then undo_output is the identity
        assert torch.equal(t.undo_output(t.apply_output(expected)), expected)
        assert (t.apply_output(expected) - equivariant_toy(moved)).abs().max().item() <= 1e-6


@pytest.mark.parametrize(
    ("transform", "expected"),
    [
        # constant raw output (o'_x, o'_y, s'_x, s'_y, q') = (1, 2, 3, 4, 5) of the transformed image
        (Transform(2, k=1), [-2, 1, 4, 3, 5]),
        (Transform(2, k=2), [-1, -2, 3, 4, 5]),
        (Transform(2, k=3), [2, -1, 4, 3, 5]),
        (Transform(2, flip_y=True), [1, -2, 3, 4, 5]),
        (Transform(2, k=1, flip_y=True), [2, 1, 4, 3, 5]),
    ],
)
def test_undo_signs_and_sigma_permutation_2d(transform, expected):
    raw = torch.tensor([1.0, 2, 3, 4, 5]).view(1, 5, 1, 1).expand(1, 5, 8, 8)
    back = transform.undo_output(raw)
    assert back[0, :, 3, 5].tolist() == expected


def test_undo_signs_3d_z_flip():
    raw = torch.tensor([1.0, 2, 3, 4, 5, 6, 7]).view(1, 7, 1, 1, 1).expand(1, 7, 8, 8, 8)
    assert Transform(3, flip_z=True).undo_output(raw)[0, :, 1, 2, 3].tolist() == [1, 2, -3, 4, 5, 6, 7]
    assert Transform(3, k=1, flip_z=True).undo_output(raw)[0, :, 1, 2, 3].tolist() == [-2, 1, -3, 5, 4, 6, 7]


@pytest.mark.parametrize("spatial", [(16, 24), (8, 16, 24)])
@pytest.mark.parametrize("combine", list(TTACombine))
def test_predict_tta_on_equivariant_toy_is_the_plain_prediction(spatial, combine):
    x = torch.cat([blob_image(spatial, 1), blob_image(spatial, 2)])
    out = predict_tta(equivariant_toy, x, combine=combine, batch_size=5)
    assert out.dtype == torch.float32
    assert out.shape == (2, 2 * len(spatial) + 1, *spatial)
    assert (out.double() - equivariant_toy(x)).abs().max().item() <= 1e-5


def test_predict_tta_batches_by_shape_group():
    shapes = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return equivariant_toy(x)

    predict_tta(recording, blob_image((16, 24)), batch_size=8)
    assert shapes == [(4, 1, 16, 24), (4, 1, 24, 16)]
    shapes.clear()
    predict_tta(recording, blob_image((8, 8, 16)), batch_size=3)
    assert [s[0] for s in shapes] == [3, 3, 2, 3, 3, 2]
    assert {s[2:] for s in shapes[:3]} == {(8, 8, 16)} and {s[2:] for s in shapes[3:]} == {(8, 16, 8)}


def shifted_seed_toy(x: torch.Tensor) -> torch.Tensor:
    """Not equivariant: the seed peak sits one pixel below (in its own frame) the brightest pixel."""
    b, _, h, w = x.shape
    out = torch.zeros(b, 5, h, w, dtype=x.dtype)
    out[:, 4] = -5.0
    for i in range(b):
        y, xx = divmod(int(torch.argmax(x[i, 0])), w)
        out[i, 4, y - 3 : y + 4, xx - 3 : xx + 4] = math.log(0.6 / 0.4)  # object, p = 0.6
        out[i, 4, y + 1, xx] = math.log(0.95 / 0.05)  # seed peak, p = 0.95
    return out


def _disagreeing_passes(x: torch.Tensor) -> list[torch.Tensor]:
    passes = [t.undo_output(shifted_seed_toy(t.apply_image(x))) for t in transforms(2)]
    peaks = {tuple(int(v) for v in np.unravel_index(int(torch.argmax(p[0, 4])), (17, 17))) for p in passes}
    assert len(peaks) == 4  # the passes disagree on the peak pixel
    assert all(torch.sigmoid(p[0, 4]).max() > 0.9 for p in passes)
    return passes


@pytest.mark.parametrize("combine", ["rescaled_mean", "max_in_foreground"])
def test_seed_peaks_survive(combine):
    x = torch.zeros(1, 1, 17, 17)
    x[0, 0, 8, 8] = 1.0
    _disagreeing_passes(x)
    mean = predict_tta(shifted_seed_toy, x, combine="mean")
    assert torch.sigmoid(mean[0, 4]).max() < 0.9  # the reference's rule loses the object
    robust = predict_tta(shifted_seed_toy, x, combine=combine)
    assert torch.sigmoid(robust[0, 4]).max() >= 0.9
    # the foreground decision is the mean's, and outside it the seed map is the mean's
    assert torch.equal(robust[0, 4] > 0, mean[0, 4] > 0)
    outside = mean[0, 4] <= 0
    assert torch.allclose(torch.sigmoid(robust[0, 4][outside]), torch.sigmoid(mean[0, 4][outside]), atol=1e-6)
    # offsets and sigma are the plain mean whatever the seed rule
    assert torch.equal(robust[0, :4], mean[0, :4])


def test_rescaled_mean_matches_a_hand_computation():
    x = torch.zeros(1, 1, 17, 17)
    x[0, 0, 8, 8] = 1.0
    passes = torch.cat(_disagreeing_passes(x))  # (8, 5, 17, 17)
    probability = torch.sigmoid(passes[:, 4])

    def local_max(p: torch.Tensor) -> torch.Tensor:  # (17, 17) -> (17, 17), 5 x 5 neighbourhood, by loops
        return torch.stack(
            [torch.stack([p[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3].max() for x in range(17)]) for y in range(17)]
        )

    mean_probability = probability.mean(0)
    passes_peaks = torch.stack([local_max(probability[p]) for p in range(8)]).mean(0)
    expected = torch.where(
        mean_probability > 0.5, mean_probability * passes_peaks / local_max(mean_probability), mean_probability
    )
    out = predict_tta(shifted_seed_toy, x, combine="rescaled_mean")
    assert torch.allclose(torch.sigmoid(out[0, 4]), expected.clamp(1e-6, 1 - 1e-6), atol=1e-6)
    # every pass has its 0.95 peak next to the centre: the mean's peaks there are raised to 0.95
    assert torch.sigmoid(out[0, 4]).max().item() == pytest.approx(0.95, abs=1e-5)


def test_median_is_the_default_and_matches_a_hand_computation():
    x = torch.zeros(1, 1, 17, 17)
    x[0, 0, 8, 8] = 1.0
    passes = torch.cat(_disagreeing_passes(x))  # (8, 5, 17, 17)

    def local_max(p: torch.Tensor) -> torch.Tensor:  # (17, 17) -> (17, 17), 5 x 5 neighbourhood, by loops
        return torch.stack(
            [torch.stack([p[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3].max() for x in range(17)]) for y in range(17)]
        )

    def median(v: torch.Tensor) -> torch.Tensor:  # of 8 values: the mean of the 4th and 5th smallest
        ordered = v.sort(dim=0).values
        return (ordered[3] + ordered[4]) / 2

    ordered = median(passes)
    probability = torch.sigmoid(ordered[4])
    pass_peaks = median(torch.stack([local_max(torch.sigmoid(passes[p, 4])) for p in range(8)]))
    expected = torch.where(probability > 0.5, probability * pass_peaks / local_max(probability), probability)
    out = predict_tta(shifted_seed_toy, x)
    assert torch.equal(out[0, :4], ordered[:4])
    assert torch.allclose(torch.sigmoid(out[0, 4]), expected.clamp(1e-6, 1 - 1e-6), atol=1e-6)
    # the median alone is 0.6 at every peak (each peak pixel is high in 2 of 8 passes); raised to 0.95
    assert torch.sigmoid(ordered[4]).max().item() == pytest.approx(0.6, abs=1e-6)
    assert torch.sigmoid(out[0, 4]).max().item() == pytest.approx(0.95, abs=1e-5)


def test_median_ignores_a_pass_that_places_the_centre_far_off():
    """Seven passes agree on offsets and bandwidth; one points every pixel elsewhere with a huge sigma."""

    def one_wild_pass(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 5, *x.shape[2:])
        out[:, 2:4] = 1.0  # sigma channels
        out[:, 4] = 3.0
        for i in range(x.shape[0]):
            if x[i, 0, 0, 0] > 0:  # the untransformed pass sees the marker in its corner
                out[i, :2] = 0.8
                out[i, 2:4] = -2.0
        return out

    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 0, 0] = 1.0
    median = predict_tta(one_wild_pass, x)
    assert torch.equal(median[0, :4], torch.cat([torch.zeros(2, 16, 16), torch.ones(2, 16, 16)]))
    mean = predict_tta(one_wild_pass, x, combine="mean")
    assert mean[0, :2].abs().max() > 0.09 and mean[0, 2:4].max() < 0.63  # the mean moves with the wild pass


def test_one_confident_pass_alone_does_not_make_a_seed():
    def lone_peak_toy(x: torch.Tensor) -> torch.Tensor:
        out = torch.full((x.shape[0], 5, *x.shape[2:]), 0.0)
        out[:, 4] = math.log(0.7 / 0.3)  # foreground everywhere, p = 0.7
        for i in range(x.shape[0]):
            if x[i, 0, 0, 0] > 0:  # only the untransformed pass sees its marker in the corner
                out[i, 4, 5, 5] = math.log(0.99 / 0.01)
        return out

    x = torch.zeros(1, 1, 16, 16)
    x[0, 0, 0, 0] = 1.0
    robust = predict_tta(lone_peak_toy, x)
    assert torch.sigmoid(robust[0, 4]).max() < 0.9
    assert torch.sigmoid(predict_tta(lone_peak_toy, x, combine="max_in_foreground")[0, 4]).max() > 0.9


def test_bad_options_raise():
    x = blob_image((8, 8))
    with pytest.raises(ValueError, match="valid choices: median, rescaled_mean, mean, max_in_foreground"):
        predict_tta(equivariant_toy, x, combine="average")
    with pytest.raises(ValueError, match="fg_thresh"):
        predict_tta(equivariant_toy, x, fg_thresh=1.0)
    with pytest.raises(ValueError, match="k must be"):
        Transform(2, k=4)
    with pytest.raises(ValueError, match="flip_z"):
        Transform(2, flip_z=True)
    with pytest.raises(ValueError, match="spatial_dims = 3"):
        predict_tta(equivariant_toy, blob_image((8, 8, 8)), transform_set=transforms(2))


def test_median_of_an_even_count_is_the_mean_of_the_middle_values_across_blocks(monkeypatch) -> None:
    import embedseg_service.core.inference.tta as tta

    monkeypatch.setattr(tta, "MEDIAN_BLOCK", 16 * 7)  # 7 pixels per block: several blocks, a short last one
    torch.manual_seed(3)
    values = torch.randn(16, 2, 5, 6)
    expected = 0.5 * (values.kthvalue(8, dim=0).values + values.kthvalue(9, dim=0).values)
    assert torch.equal(tta._median(values), expected)
    odd = values[:15]
    assert torch.equal(tta._median(odd), odd.median(dim=0).values)


@pytest.mark.parametrize("shape", [(5, 7), (3, 5, 7)])
def test_boxes_move_as_the_image_does_and_back(shape) -> None:
    rng = np.random.default_rng(len(shape))
    for t in transforms(len(shape)):
        for _ in range(10):
            box = []
            for n in shape:
                start = int(rng.integers(0, n))
                box.append(slice(start, int(rng.integers(start + 1, n + 1))))
            mask = np.zeros(shape, bool)
            mask[tuple(box)] = True
            moved = t.apply_array(mask)
            np.testing.assert_array_equal(moved, t.apply_image(torch.from_numpy(mask)[None, None])[0, 0].numpy())
            expected = np.zeros_like(moved)
            expected[t.map_box(box, shape)] = True
            np.testing.assert_array_equal(moved, expected, err_msg=str(t))
            assert t.map_box(t.map_box(box, shape), shape, inverse=True) == tuple(box), t
