"""Seed clustering: recovery of ideal predictions, stop rules, backends and input forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from embedseg_service.core.data.synthetic import perfect_raw, random_labels
from embedseg_service.core.inference.cluster_backends import NumpyOps, TorchOps
from embedseg_service.core.inference.clustering import _cluster, _sigma_floor, cluster
from embedseg_service.core.metrics import average_precision

H = 1.0 / 1023.0


def naive_cluster(
    raw, step, fg_thresh=0.5, seed_thresh=0.9, min_size=36, min_mask_sum=0, min_unclustered_sum=0, max_radius=None
):
    """The procedure written out one seed at a time over the whole foreground (float64)."""
    dims = raw.ndim - 1
    shape = raw.shape[1:]
    q = raw[2 * dims].astype(np.float64).ravel()
    fg = np.flatnonzero(q > math.log(fg_thresh / (1 - fg_thresh)))
    labels = np.zeros(q.size, dtype=np.int32)
    if fg.size <= min_mask_sum:
        return labels.reshape(shape)
    coords = np.unravel_index(fg, shape)
    emb = np.stack(
        [np.tanh(raw[dims - 1 - a].astype(np.float64).ravel()[fg]) + coords[a] * step[a] for a in range(dims)]
    )
    lam = np.stack([np.exp(10 * raw[2 * dims - 1 - a].astype(np.float64).ravel()[fg]) for a in range(dims)])
    qf = q[fg]
    unclustered = np.ones(fg.size, dtype=bool)
    out = np.zeros(fg.size, dtype=np.int32)
    next_id = 1
    seed_logit = math.log(seed_thresh / (1 - seed_thresh))
    order = np.argsort(-qf, kind="stable")
    if max_radius is not None:  # seeds whose 0.5-level radius exceeds max_radius pixels on some axis never seed
        reach = np.sqrt(math.log(2) / lam) / np.asarray(step, dtype=np.float64)[:, None]
        order = order[(reach[:, order] <= np.asarray(max_radius, dtype=np.float64)[:, None]).all(axis=0)]
    while unclustered.sum() > min_unclustered_sum:
        free = order[unclustered[order]]
        if free.size == 0:
            break
        seed = free[0]
        if qf[seed] < seed_logit:
            break
        unclustered[seed] = False
        d2 = None
        for a in range(dims):
            diff = emb[a] - emb[a, seed]
            term = lam[a, seed] * (diff * diff)
            d2 = term if d2 is None else d2 + term
        prop = d2 < math.log(2)
        if prop.sum() > min_size and 2 * unclustered[prop].sum() > prop.sum():
            out[prop] = next_id
            next_id += 1
        unclustered[prop] = False
    labels[fg] = out
    return labels.reshape(shape)


def random_raw(shape, seed, sigma_range=(0.4, 1.2)):
    """A disordered raw output: random offsets, bandwidths and seed logits (many overlapping proposals)."""
    rng = np.random.default_rng(seed)
    dims = len(shape)
    raw = np.empty((2 * dims + 1, *shape), dtype=np.float32)
    raw[:dims] = rng.normal(0, 0.01, size=(dims, *shape))
    raw[dims : 2 * dims] = rng.uniform(*sigma_range, size=(dims, *shape))
    raw[2 * dims] = rng.normal(1.5, 2.0, size=shape)
    return raw


def same_up_to_relabelling(a: np.ndarray, b: np.ndarray) -> bool:
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return np.unique(pairs[0]).size == pairs.shape[1] == np.unique(pairs[1]).size


def test_recovers_every_object_2d():
    labels = random_labels((128, 160), 14, (5, 12), seed=0)
    out = cluster(perfect_raw(labels, H), step=H)
    assert out.dtype == np.int32 and out.shape == labels.shape
    res = average_precision(labels, out, thresholds=[0.5, 0.9])
    assert res.ap == [1.0, 1.0]
    assert same_up_to_relabelling(labels, out)


def test_recovers_every_object_3d_anisotropic():
    step = (3.0 * H, H, H)
    labels = random_labels((24, 64, 72), 10, [(2, 4), (5, 9), (5, 9)], seed=1)
    raw = perfect_raw(labels, step, offset_noise=0.3, seed=1)
    out = cluster(raw, step=step)
    res = average_precision(labels, out, thresholds=[0.5, 0.9])
    assert res.ap == [1.0, 1.0]
    assert same_up_to_relabelling(labels, out)
    # the same raw output read with an isotropic step merges nothing but misplaces every embedding
    wrong = cluster(raw, step=H)
    assert not same_up_to_relabelling(labels, wrong)


def test_labels_numbered_in_seed_order():
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[2:12, 2:12] = 1
    labels[20:32, 20:32] = 2
    raw = perfect_raw(labels, H)
    raw[4][labels == 2] += 1.0  # object 2 has the highest seed: found first
    out = cluster(raw, step=H)
    assert out[25, 25] == 1 and out[5, 5] == 2


def test_min_size_is_strict():
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[2:8, 2:8] = 1  # 36 pixels
    labels[20:30, 20:30] = 2  # 100 pixels
    raw = perfect_raw(labels, H)
    out = cluster(raw, step=H, min_size=36)  # needs more than 36 pixels
    assert np.all(out[labels == 1] == 0) and out.max() == 1 and np.all(out[labels == 2] == 1)
    out = cluster(raw, step=H, min_size=35)
    assert same_up_to_relabelling(labels, out)
    out = cluster(raw, step=H, min_size=100)
    assert out.max() == 0


def test_seed_threshold():
    labels = np.zeros((48, 48), dtype=np.int32)
    labels[4:16, 4:16] = 1
    labels[28:44, 28:44] = 2
    raw = perfect_raw(labels, H)
    # object 1: seed probabilities at most sigmoid(2.0) = 0.881
    raw[4][labels == 1] = np.minimum(raw[4][labels == 1], 2.0)
    out = cluster(raw, step=H, seed_thresh=0.9)
    assert np.all(out[labels == 1] == 0) and np.all(out[labels == 2] == 1)
    out = cluster(raw, step=H, seed_thresh=0.88)
    assert same_up_to_relabelling(labels, out)


def test_fg_threshold_limits_the_objects():
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[5:25, 5:25] = 1
    raw = perfect_raw(labels, H, seed_max=6.0, seed_edge=1.0)
    out = cluster(raw, step=H, fg_thresh=0.5)
    assert np.array_equal(out > 0, labels > 0)
    strict = cluster(raw, step=H, fg_thresh=0.95)  # logit 2.94: the outer ring leaves the foreground
    assert 0 < (strict > 0).sum() < (labels > 0).sum()
    assert np.array_equal(strict > 0, raw[4] > math.log(0.95 / 0.05))


def test_min_mask_sum_and_min_unclustered_sum():
    labels = np.zeros((40, 40), dtype=np.int32)
    labels[2:12, 2:12] = 1
    labels[20:30, 20:30] = 2
    raw = perfect_raw(labels, H)
    assert cluster(raw, step=H, min_mask_sum=200).max() == 0  # 200 foreground pixels: not more than 200
    assert cluster(raw, step=H, min_mask_sum=199).max() == 2
    # after the first object 100 pixels stay unclustered: stop when at most 100 remain
    assert cluster(raw, step=H, min_unclustered_sum=100).max() == 1
    assert cluster(raw, step=H, min_unclustered_sum=99).max() == 2


def test_rejects_proposal_mostly_clustered_and_overwrites_accepted():
    # two seeds whose embeddings coincide: the second proposal is fully clustered and rejected
    labels = np.zeros((30, 30), dtype=np.int32)
    labels[5:15, 5:15] = 1
    raw = perfect_raw(labels, H)
    out = cluster(raw, step=H, min_size=10)
    assert out.max() == 1
    assert np.array_equal(out, naive_cluster(raw, (H, H), min_size=10))


@pytest.mark.parametrize("dims, seed", [(2, 0), (2, 1), (2, 2), (3, 3), (3, 4)])
def test_matches_the_procedure_one_seed_at_a_time(dims, seed):
    shape = (40, 48) if dims == 2 else (10, 20, 24)
    step = (H, H) if dims == 2 else (2 * H, H, H)
    raw = random_raw(shape, seed)
    for kwargs in ({"min_size": 5}, {"min_size": 0, "min_unclustered_sum": 30}, {"min_size": 12, "seed_thresh": 0.6}):
        expected = naive_cluster(raw, step, **kwargs)
        got = cluster(raw, step=step, **kwargs)
        assert expected.max() > 3
        np.testing.assert_array_equal(got, expected)


def test_wide_and_narrow_bandwidths_match_the_procedure():
    # mostly boxes of a few pixels (a fine cell index) and some seeds whose box spans the whole volume
    rng = np.random.default_rng(8)
    raw = random_raw((10, 28, 28), 8)
    narrow = rng.uniform(1.1, 1.5, size=raw.shape[1:])
    wide = rng.uniform(-0.5, 0.4, size=raw.shape[1:])
    is_wide = rng.random(raw.shape[1:]) < 0.05
    raw[3:6] = np.where(is_wide, wide, narrow)[None]
    raw[6][is_wide] -= 1.0  # wide seeds tend to come later
    for min_size in (0, 8):
        for kwargs in ({}, {"seed_thresh": 0.7}):
            np.testing.assert_array_equal(
                cluster(raw, step=H, min_size=min_size, **kwargs),
                naive_cluster(raw, (H, H, H), min_size=min_size, **kwargs),
            )


def test_max_radius_keeps_a_spurious_wide_seed_from_swallowing_the_image():
    labels = random_labels((128, 160), 14, (5, 12), seed=0)
    raw = perfect_raw(labels, H)
    spot = tuple(int(i[0]) for i in np.nonzero(labels == 0))
    raw[4][spot] = 9.0  # the strongest seed of the image, on background ...
    raw[2:4, spot[0], spot[1]] = -3.0  # ... with a near-zero precision: its Gaussian covers everything
    swallowed = cluster(raw, step=H)
    assert np.unique(swallowed).size == 2  # background and one object over the whole foreground
    guarded = cluster(raw, step=H, max_radius=40)
    assert guarded[spot] == 0  # foreground without a seed of its own, far from every object
    guarded[spot] = 0
    assert average_precision(labels, guarded, thresholds=[0.5, 0.9]).ap == [1.0, 1.0]
    # objects whose Gaussians fit the limit are untouched by it
    assert np.array_equal(cluster(perfect_raw(labels, H), step=H, max_radius=(40, 40)),
                          cluster(perfect_raw(labels, H), step=H))  # fmt: skip
    # a limit tighter than the objects' own reach leaves them without seeds
    assert not cluster(perfect_raw(labels, H), step=H, max_radius=1.0).any()


@pytest.mark.parametrize("dims, seed", [(2, 5), (3, 6)])
def test_max_radius_matches_the_procedure(dims, seed):
    shape = (40, 48) if dims == 2 else (10, 20, 24)
    step = (H, H) if dims == 2 else (2 * H, H, H)
    raw = random_raw(shape, seed, sigma_range=(-0.2, 1.2))
    limit = (6.0, 6.0) if dims == 2 else (5.0, 10.0, 10.0)  # z steps are twice as long
    expected = naive_cluster(raw, step, min_size=5, max_radius=limit)
    assert expected.max() > 3
    assert not np.array_equal(expected, naive_cluster(raw, step, min_size=5))  # the limit changes the result
    np.testing.assert_array_equal(cluster(raw, step=step, min_size=5, max_radius=limit), expected)
    np.testing.assert_array_equal(
        cluster(torch.from_numpy(raw), step=step, min_size=5, max_radius=limit, device="cpu"), expected
    )
    ops = TorchOps(torch.device("cpu"))
    data = torch.from_numpy(raw).reshape(raw.shape[0], -1)
    floor = _sigma_floor(limit, step)
    got = _cluster(ops, data, shape, step, 0.0, math.log(9.0), 5, 0, 0, floor)
    np.testing.assert_array_equal(got.reshape(shape), expected)


@pytest.mark.parametrize("dims", [2, 3])
def test_torch_path_equals_numpy_path(dims):
    """The torch code path (used on CUDA) gives the same labels as the numpy path, here on the CPU."""
    if dims == 2:
        labels = random_labels((96, 96), 10, (4, 10), seed=2)
        step = (H, H)
    else:
        labels = random_labels((16, 48, 48), 6, [(2, 4), (4, 8), (4, 8)], seed=2)
        step = (2 * H, H, H)
    raw = perfect_raw(
        labels,
        step,
        offset_noise=1.0,
        sigma_noise=0.05,
        seed_noise=1.0,
        seed_background=-2.0,
        background_seed_noise=2.0,
        seed=4,
    )
    spatial = labels.shape
    args = (spatial, step, 0.0, math.log(9.0), 10, 0, 0)
    ours = _cluster(NumpyOps(), raw.reshape(raw.shape[0], -1), *args)
    via_torch = _cluster(TorchOps(torch.device("cpu")), torch.from_numpy(raw).reshape(raw.shape[0], -1), *args)
    assert ours.max() > 3
    np.testing.assert_array_equal(ours, via_torch)
    np.testing.assert_array_equal(ours.reshape(spatial), cluster(raw, step=step, min_size=10))


def test_input_forms_agree_and_are_deterministic():
    labels = random_labels((64, 64), 6, (4, 8), seed=5)
    raw = perfect_raw(labels, H, offset_noise=0.5, seed_noise=0.5, seed=5)
    base = cluster(raw, step=H)
    assert base.max() == 6
    np.testing.assert_array_equal(base, cluster(raw[None], step=H))
    np.testing.assert_array_equal(base, cluster(torch.from_numpy(raw), step=H))
    np.testing.assert_array_equal(base, cluster(torch.from_numpy(raw)[None], step=H))
    np.testing.assert_array_equal(base, cluster(raw, step=[H, H], device="cpu"))
    np.testing.assert_array_equal(base, cluster(raw.astype(np.float64), step=H))
    np.testing.assert_array_equal(base, cluster(raw, step=H))


def test_empty_inputs_give_zeros():
    for shape in [(5, 32, 32), (7, 8, 16, 16)]:
        raw = np.zeros(shape, dtype=np.float32)
        raw[-1] = -5.0
        out = cluster(raw, step=H)
        assert out.shape == shape[1:] and out.dtype == np.int32 and not out.any()
    raw = np.zeros((5, 16, 16), dtype=np.float32)
    raw[-1] = 1.0  # foreground everywhere, no seed reaches 0.9
    assert not cluster(raw, step=H).any()


@pytest.mark.parametrize(
    "raw, kwargs, message",
    [
        (np.zeros((4, 8, 8), np.float32), {}, r"C = 2 \* spatial_dims \+ 1 \(5 in 2D, 7 in 3D\), got \(4, 8, 8\)"),
        (np.zeros((5, 8, 8, 8), np.float32), {}, r"got \(5, 8, 8, 8\)"),
        (np.zeros((2, 5, 8, 8), np.float32), {}, r"got \(2, 5, 8, 8\)"),
        (np.zeros((5, 8), np.float32), {}, r"got \(5, 8\)"),
        (np.zeros((5, 0, 8), np.float32), {}, "empty spatial axis"),
        (np.zeros((5, 8, 8), np.int32), {}, "floating-point"),
        ([[0.0]], {}, "numpy array or a torch tensor"),
        (np.zeros((5, 8, 8), np.float32), {"step": (H, H, H)}, "step needs 2 values"),
        (np.zeros((5, 8, 8), np.float32), {"fg_thresh": 1.0}, r"fg_thresh must be in \[0, 1\)"),
        (np.zeros((5, 8, 8), np.float32), {"seed_thresh": -0.1}, r"seed_thresh must be in \[0, 1\)"),
        (np.zeros((5, 8, 8), np.float32), {"min_size": -1}, "min_size must be an integer >= 0"),
        (np.zeros((5, 8, 8), np.float32), {"max_radius": 0}, "max_radius must be one positive pixel count"),
        (np.zeros((5, 8, 8), np.float32), {"max_radius": (4, 4, 4)}, r"or one per spatial axis \(2\)"),
    ],
)
def test_bad_inputs_raise(raw, kwargs, message):
    kwargs = {"step": H, **kwargs}
    with pytest.raises(ValueError, match=message):
        cluster(raw, **kwargs)


def test_nan_on_foreground_raises():
    raw = np.zeros((5, 8, 8), np.float32)
    raw[4] = 5.0
    raw[0, 3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN offsets"):
        cluster(raw, step=H)
    raw[0, 3, 3] = 0.0
    raw[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN sigma"):
        cluster(raw, step=H)


def test_tied_seed_scores_resolved_by_lowest_index():
    raw = random_raw((40, 40), 11)
    raw[4] = np.round(raw[4] * 2) / 2  # many equal logits
    for min_size in (0, 6):
        np.testing.assert_array_equal(
            cluster(raw, step=H, min_size=min_size), naive_cluster(raw, (H, H), min_size=min_size)
        )


def test_drop_fragments_removes_objects_at_or_below_the_minimum_size() -> None:
    from embedseg_service.core.inference.clustering import drop_fragments

    labels = np.zeros((6, 8), dtype=np.int32)
    labels[0:3, 0:3] = 1  # 9 px
    labels[4:6, 0:2] = 2  # 4 px: a remnant
    labels[3:6, 4:8] = 4  # 12 px
    out = drop_fragments(labels.copy(), 4)
    assert sorted(np.unique(out).tolist()) == [0, 1, 4]
    assert (out[4:6, 0:2] == 0).all() and (out[0:3, 0:3] == 1).all() and (out == 4).sum() == 12
    np.testing.assert_array_equal(drop_fragments(labels.copy(), 3), labels)
