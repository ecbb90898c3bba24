"""EmbedSeg loss and oracle IoU against a slow per-object loop, plus hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import textbook_lovasz

from embedseg_service.core.data.centers import CenterMode, object_centers
from embedseg_service.core.model.embedding import coordinate_map, normalize_step
from embedseg_service.core.training.loss import EmbedSegLoss
from embedseg_service.core.training.oracle import oracle_ious


def slow_loss(raw, labels, centers, ids, step, ignore=None, fg_weight=10.0, weights=(1.0, 10.0, 1.0)):
    """docs/method.md §4 term by term, one image and one object at a time."""
    dims = raw.dim() - 2
    h = normalize_step(step, dims)
    coords = coordinate_map(raw.shape[2:], h, dtype=raw.dtype)
    h_xyz = torch.tensor(tuple(reversed(h)), dtype=raw.dtype)
    totals = {"iou": 0.0, "var": 0.0, "seed": 0.0}
    loss = 0.0
    for b in range(raw.shape[0]):
        valid = torch.ones(labels.shape[1:], dtype=torch.bool) if ignore is None else ~ignore[b]
        emb = torch.tanh(raw[b, :dims]) + coords
        sigma = raw[b, dims : 2 * dims]
        seed = torch.sigmoid(raw[b, 2 * dims])
        seed_sum = (seed[(labels[b] == 0) & valid] ** 2).sum()
        iou_terms, var_terms = [], []
        for k, c in zip(ids[b].tolist(), centers[b]):
            mask = (labels[b] == k) & valid
            if not mask.any():
                continue
            s_in = sigma[:, mask]
            s_mean = s_in.mean(1)
            var_terms.append(((s_in - s_mean.detach()[:, None]) ** 2).mean())
            lam = torch.exp(10 * s_mean)
            center = torch.as_tensor(c, dtype=raw.dtype).flip(0) * h_xyz
            t = sum(lam[a] * (emb[a] - center[a]) ** 2 for a in range(dims))
            phi = torch.exp(-t)
            iou_terms.append(textbook_lovasz(2 * phi[valid] - 1, mask[valid]))
            seed_sum = seed_sum + fg_weight * ((seed[mask] - phi[mask].detach()) ** 2).sum()
        seed_term = seed_sum / valid.sum()
        iou = torch.stack(iou_terms).mean() if iou_terms else raw.sum() * 0
        var = torch.stack(var_terms).mean() if var_terms else raw.sum() * 0
        loss = loss + weights[0] * iou + weights[1] * var + weights[2] * seed_term
        totals["iou"] += iou / raw.shape[0]
        totals["var"] += var / raw.shape[0]
        totals["seed"] += seed_term / raw.shape[0]
    return loss / raw.shape[0], totals


def slow_oracle_ious(raw, labels, centers, ids, step, ignore=None):
    dims = raw.dim() - 2
    h = normalize_step(step, dims)
    coords = coordinate_map(raw.shape[2:], h, dtype=raw.dtype)
    h_xyz = torch.tensor(tuple(reversed(h)), dtype=raw.dtype)
    out = []
    for b in range(raw.shape[0]):
        valid = torch.ones(labels.shape[1:], dtype=torch.bool) if ignore is None else ~ignore[b]
        emb = torch.tanh(raw[b, :dims]) + coords
        for k, c in sorted(zip(ids[b].tolist(), centers[b]), key=lambda kc: kc[0]):
            mask = (labels[b] == k) & valid
            if not mask.any():
                continue
            lam = torch.exp(10 * raw[b, dims : 2 * dims][:, mask].mean(1))
            center = torch.as_tensor(c, dtype=raw.dtype).flip(0) * h_xyz
            phi = torch.exp(-sum(lam[a] * (emb[a] - center[a]) ** 2 for a in range(dims)))
            pred = (phi > 0.5) & valid
            out.append(float((pred & mask).sum()) / float((pred | mask).sum()))
    return torch.tensor(out, dtype=torch.float64)


def blobs(shape, n_objects, seed, radius=3.5):
    """Random non-overlapping balls (some cut by the border), labels with gaps in their ids."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.int64)
    grids = np.indices(shape)
    for k in range(n_objects):
        centre = [rng.uniform(0, s) for s in shape]
        r = rng.uniform(1.5, radius)
        ball = sum((g - c) ** 2 for g, c in zip(grids, centre)) <= r * r
        labels[ball & (labels == 0)] = 3 * k + 2
    return labels


def make_case(dims, batch=2, n_objects=6, dtype=torch.float64, seed=0, shape=None, empty_image=None):
    shape = shape or ((24, 28) if dims == 2 else (6, 14, 16))
    labels = np.stack([blobs(shape, n_objects, seed + b) for b in range(batch)])
    if empty_image is not None:
        labels[empty_image] = 0
    centers, ids = [], []
    for lab in labels:
        k_ids, k_centers = object_centers(lab, CenterMode.medoid, 2.0 if dims == 3 else 1.0)
        ids.append(torch.as_tensor(k_ids))
        centers.append(torch.as_tensor(k_centers))
    gen = torch.Generator().manual_seed(seed)
    raw = torch.empty((batch, 2 * dims + 1, *shape), dtype=dtype)
    raw[:, :dims] = torch.randn((batch, dims, *shape), generator=gen, dtype=dtype) * 0.05
    raw[:, dims : 2 * dims] = 0.45 + 0.05 * torch.randn((batch, dims, *shape), generator=gen, dtype=dtype)
    raw[:, 2 * dims] = torch.randn((batch, *shape), generator=gen, dtype=dtype)
    return raw, torch.from_numpy(labels), centers, ids


STEP_2D = (0.05, 0.04)
STEP_3D = (0.1, 0.05, 0.05)


def _compare(raw, labels, centers, ids, step, ignore=None, tol=1e-9, **options):
    dims = raw.dim() - 2
    weights = (options.get("w_iou", 1.0), options.get("w_var", 10.0), options.get("w_seed", 1.0))
    loss_fn = EmbedSegLoss(dims, step, **options)
    x1 = raw.clone().requires_grad_()
    ours, terms = loss_fn(x1, labels, centers, ids, ignore, return_terms=True)
    (g_ours,) = torch.autograd.grad(ours, x1)
    x2 = raw.clone().requires_grad_()
    expected, exp_terms = slow_loss(
        x2, labels, centers, ids, step, ignore, options.get("foreground_weight", 10.0), weights
    )
    (g_exp,) = torch.autograd.grad(expected, x2)
    assert ours.item() == pytest.approx(expected.item(), rel=tol, abs=tol)
    for name in ("iou", "var", "seed"):
        assert terms[name].item() == pytest.approx(float(exp_terms[name].detach()), rel=tol, abs=tol)
    torch.testing.assert_close(g_ours, g_exp, rtol=tol, atol=tol * float(g_exp.abs().max()))
    return ours, g_ours


@pytest.mark.parametrize("dims,step", [(2, STEP_2D), (3, STEP_3D)])
def test_matches_slow_loop_float64(dims, step):
    raw, labels, centers, ids = make_case(dims)
    assert all(len(i) >= 3 for i in ids)
    _compare(raw, labels, centers, ids, step, tol=1e-9)


@pytest.mark.parametrize("dims,step", [(2, STEP_2D), (3, STEP_3D)])
def test_matches_slow_loop_float32(dims, step):
    raw, labels, centers, ids = make_case(dims, dtype=torch.float32, seed=4)
    _compare(raw, labels, centers, ids, step, tol=1e-5)


@pytest.mark.parametrize("dims,step", [(2, STEP_2D), (3, STEP_3D)])
def test_ignore_mask_and_an_image_without_objects(dims, step):
    raw, labels, centers, ids = make_case(dims, batch=3, seed=7, empty_image=1)
    gen = torch.Generator().manual_seed(1)
    ignore = torch.rand(labels.shape, generator=gen) < 0.2
    ignore[2] |= labels[2] == int(ids[2][0])  # a whole object ignored: it leaves the loss
    assert len(ids[1]) == 0
    _compare(raw, labels, centers, ids, step, ignore=ignore, tol=1e-9)


def test_options_and_many_small_chunks_give_the_same_result():
    raw, labels, centers, ids = make_case(2, seed=11)
    options = {"foreground_weight": 3.0, "w_iou": 0.5, "w_var": 2.0, "w_seed": 4.0}
    loss, grad = _compare(raw, labels, centers, ids, STEP_2D, tol=1e-9, **options)
    chunked = EmbedSegLoss(2, STEP_2D, pairs_per_chunk=50, **options)
    x = raw.clone().requires_grad_()
    value = chunked(x, labels, centers, ids)
    (g,) = torch.autograd.grad(value, x)
    assert value.item() == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(g, grad, rtol=1e-10, atol=1e-14)


def test_unused_centres_and_relabelling_do_not_change_the_loss():
    raw, labels, centers, ids = make_case(2, seed=2)
    loss_fn = EmbedSegLoss(2, STEP_2D)
    base = loss_fn(raw, labels, centers, ids)
    extra_c = [torch.cat([c, torch.tensor([[1.0, 1.0]], dtype=c.dtype)]) for c in centers]
    extra_i = [torch.cat([i, torch.tensor([999])]) for i in ids]
    assert loss_fn(raw, labels, extra_c, extra_i).item() == pytest.approx(base.item(), rel=1e-12)
    perm_labels = torch.where(labels > 0, 1000 - labels, 0)
    perm_ids = [1000 - i for i in ids]
    assert loss_fn(raw, perm_labels, centers, perm_ids).item() == pytest.approx(base.item(), rel=1e-12)


def test_centres_default_to_medoids_of_the_labels():
    raw, labels, centers, ids = make_case(3, seed=5)
    loss_fn = EmbedSegLoss(3, STEP_3D)  # anisotropy h_z / h_x = 2, as the centres of make_case
    assert loss_fn(raw, labels).item() == pytest.approx(loss_fn(raw, labels, centers, ids).item(), rel=1e-12)
    ignore = torch.zeros(labels.shape, dtype=torch.bool)
    ignore[:, :, :5] = True
    c_ign, i_ign = [], []
    for lab, ign in zip(labels.numpy(), ignore.numpy()):
        k_ids, k_centers = object_centers(np.where(ign, 0, lab), CenterMode.medoid, 2.0)
        i_ign.append(torch.as_tensor(k_ids))
        c_ign.append(torch.as_tensor(k_centers))
    with_ignore = loss_fn(raw, labels, ignore=ignore)
    assert with_ignore.item() == pytest.approx(loss_fn(raw, labels, c_ign, i_ign, ignore).item(), rel=1e-12)


def _line_raw(sigma_x: list[float], sigma_y: list[float], logit: float = 0.0) -> torch.Tensor:
    """Raw output of a 1x4 image: zero offsets, given sigma, constant seed logit."""
    raw = torch.zeros((1, 5, 1, 4), dtype=torch.float64)
    raw[0, 2, 0] = torch.tensor(sigma_x, dtype=torch.float64)
    raw[0, 3, 0] = torch.tensor(sigma_y, dtype=torch.float64)
    raw[0, 4] = logit
    return raw


def test_hand_computed_line_image():
    # step 1, centre at pixel 0, λ_x = ln 2: φ = 2^(−i²) = [1, 1/2, 1/16, 1/512]; object = pixels {0, 1}.
    # Errors: object 1 − m = [0, 1]; background 1 + m = [1/8, 1/256]. Sorted: 1 (obj), 1/8, 1/256, 0.
    # J = 1/2, 2/3, 3/4 → Lovász = 1·1/2 + 1/8·1/6 + 1/256·1/12.
    s0 = math.log(math.log(2.0)) / 10
    delta = 0.01
    raw = _line_raw([s0 - delta, s0 + delta, 0.3, -0.2], [s0, s0, 0.0, 0.0])
    labels = torch.tensor([[[4, 4, 0, 0]]])
    centers, ids = [torch.tensor([[0.0, 0.0]])], [torch.tensor([4])]
    loss_fn = EmbedSegLoss(2, 1.0)
    loss, terms = loss_fn(raw, labels, centers, ids, return_terms=True)
    lovasz = 0.5 + (1 / 8) / 6 + (1 / 256) / 12
    # seed p = 1/2 everywhere: (1/4)[2 · 1/4 + 10 · ((1/2 − 1)² + (1/2 − 1/2)²)] = 0.75
    seed = 0.75
    var = delta**2 / 2  # (δ² + δ² + 0 + 0) / 4
    assert terms["iou"].item() == pytest.approx(lovasz, abs=1e-12)
    assert terms["seed"].item() == pytest.approx(seed, abs=1e-12)
    assert terms["var"].item() == pytest.approx(var, abs=1e-12)
    assert loss.item() == pytest.approx(lovasz + 10 * var + seed, abs=1e-12)


def test_hand_computed_seed_term_with_ignore_and_no_object():
    raw = _line_raw([0.0] * 4, [0.0] * 4, logit=math.log(3.0))  # p = 3/4
    labels = torch.zeros((1, 1, 4), dtype=torch.int64)
    ignore = torch.tensor([[[False, True, False, False]]])
    no_ids = [torch.zeros(0, dtype=torch.int64)]
    loss, terms = EmbedSegLoss(2, 1.0)(raw, labels, [torch.zeros(0, 2)], no_ids, ignore, return_terms=True)
    assert terms["iou"].item() == 0.0 and terms["var"].item() == 0.0
    assert loss.item() == pytest.approx(3 * (9 / 16) / 3, abs=1e-12)  # mean of p² over the 3 kept pixels


def test_seed_target_is_a_detached_score():
    raw, labels, centers, ids = make_case(2, seed=9)
    seed_only = EmbedSegLoss(2, STEP_2D, w_iou=0.0, w_var=0.0)
    x = raw.clone().requires_grad_()
    (grad,) = torch.autograd.grad(seed_only(x, labels, centers, ids), x)
    assert torch.count_nonzero(grad[:, :4]) == 0  # no gradient into offsets or sigma
    assert torch.count_nonzero(grad[:, 4]) == grad[:, 4].numel()
    # and the target on object pixels is φ (not 1): with p set to φ there the object part vanishes
    full = EmbedSegLoss(2, STEP_2D, w_iou=0.0, w_var=0.0, foreground_weight=1.0)
    _, terms = full(raw, labels, centers, ids, return_terms=True)
    _, slow_terms = slow_loss(raw, labels, centers, ids, STEP_2D, fg_weight=1.0)
    assert terms["seed"].item() == pytest.approx(float(slow_terms["seed"]), rel=1e-12)
    fg_target_one = []
    for b in range(raw.shape[0]):
        p = torch.sigmoid(raw[b, 4])
        fg = labels[b] > 0
        fg_target_one.append(((p[~fg] ** 2).sum() + ((p[fg] - 1) ** 2).sum()) / p.numel())
    assert abs(terms["seed"].item() - float(torch.stack(fg_target_one).mean())) > 1e-3


def test_no_gradient_work_under_no_grad_and_half_precision_input():
    raw, labels, centers, ids = make_case(2, dtype=torch.float32, seed=3)
    loss_fn = EmbedSegLoss(2, STEP_2D)
    with torch.no_grad():
        value = loss_fn(raw, labels, centers, ids)
    assert value.item() == pytest.approx(loss_fn(raw, labels, centers, ids).item(), rel=1e-6)
    half = loss_fn(raw.to(torch.bfloat16), labels, centers, ids)
    assert half.dtype == torch.float32 and math.isfinite(half.item())


def test_bad_options_raise():
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        EmbedSegLoss(4, 0.1)
    with pytest.raises(ValueError, match="step needs 3 values"):
        EmbedSegLoss(3, (0.1, 0.1))
    with pytest.raises(ValueError, match="foreground_weight must be a finite number >= 0"):
        EmbedSegLoss(2, 0.1, foreground_weight=-1.0)
    with pytest.raises(ValueError, match="w_var must be a finite number >= 0"):
        EmbedSegLoss(2, 0.1, w_var=float("nan"))
    with pytest.raises(ValueError, match="pairs_per_chunk must be >= 1"):
        EmbedSegLoss(2, 0.1, pairs_per_chunk=0)


def test_bad_inputs_raise():
    raw, labels, centers, ids = make_case(2, seed=1)
    loss_fn = EmbedSegLoss(2, STEP_2D)
    with pytest.raises(ValueError, match=r"raw must have shape \(B, 5, \*spatial\)"):
        loss_fn(raw[:, :4], labels, centers, ids)
    with pytest.raises(ValueError, match="labels must have shape"):
        loss_fn(raw, labels[:, :-1], centers, ids)
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        loss_fn(raw, labels.double(), centers, ids)
    with pytest.raises(ValueError, match="labels must be >= 0"):
        loss_fn(raw, -labels, centers, ids)
    with pytest.raises(ValueError, match="give both centers and center_ids"):
        loss_fn(raw, labels, centers, None)
    with pytest.raises(ValueError, match="one entry per image"):
        loss_fn(raw, labels, centers[:1], ids[:1])
    with pytest.raises(ValueError, match=r"image 0: centers must be \(K, 2\)"):
        loss_fn(raw, labels, [centers[0][:, :1], centers[1]], ids)
    with pytest.raises(ValueError, match="image 1: center_ids has repeated ids"):
        loss_fn(raw, labels, [centers[0], centers[1][[0, 0]]], [ids[0], ids[1][[0, 0]]])
    missing = int(ids[1][0])
    with pytest.raises(ValueError, match=f"objects without a centre \\(1\\): image 1 id {missing}; give a centre"):
        loss_fn(raw, labels, [centers[0], centers[1][1:]], [ids[0], ids[1][1:]])
    with pytest.raises(ValueError, match="ignore must have the shape of labels"):
        loss_fn(raw, labels, centers, ids, torch.zeros(labels.shape[1:], dtype=torch.bool))


@pytest.mark.parametrize("dims,step", [(2, STEP_2D), (3, STEP_3D)])
def test_oracle_iou_matches_slow_loop(dims, step):
    raw, labels, centers, ids = make_case(dims, seed=13, dtype=torch.float32)
    ignore = torch.rand(labels.shape, generator=torch.Generator().manual_seed(2)) < 0.1
    for ign in (None, ignore):
        ious = oracle_ious(raw, labels, centers, ids, step, ignore=ign)
        expected = slow_oracle_ious(raw, labels, centers, ids, step, ign)
        assert ious.shape == expected.shape and ious.numel() >= 6
        torch.testing.assert_close(ious, expected, rtol=0, atol=1e-12)
        assert 0.0 < float(ious.max()) <= 1.0


def test_oracle_iou_hand_computed():
    # 1x6 image, step 1/4, object {0, 1, 2} with centre pixel 1; λ = 4: φ(1 px) = e^-1/4 > 1/2 > φ(2 px) = e^-1.
    # Pixel 3 embeds onto the centre (tanh offset −1/2): predicted {0, 1, 2, 3} → IoU 3/4.
    raw = torch.zeros((1, 5, 1, 6), dtype=torch.float64)
    raw[0, 2:4] = math.log(4.0) / 10
    labels = torch.tensor([[[1, 1, 1, 0, 0, 0]]])
    centers, ids = [torch.tensor([[0.0, 1.0]])], [torch.tensor([1])]
    assert oracle_ious(raw, labels, centers, ids, 0.25).tolist() == pytest.approx([1.0])
    raw[0, 0, 0, 3] = math.atanh(-0.5)
    assert oracle_ious(raw, labels, centers, ids, 0.25).tolist() == pytest.approx([0.75])
    empty = torch.zeros_like(labels)
    assert oracle_ious(raw, empty, [torch.zeros(0, 2)], [torch.zeros(0, dtype=torch.int64)], 0.25).numel() == 0
