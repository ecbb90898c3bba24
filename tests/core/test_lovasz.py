"""Lovász hinge: hand-computed values, gradients, and the segmented form against a per-problem loop."""

from __future__ import annotations

import pytest
import torch
from helpers import textbook_lovasz

from embedseg_service.core.training.lovasz import (
    hinge_errors,
    lovasz_hinge,
    segmented_lovasz_hinge,
    segmented_lovasz_weights,
)


def test_hand_computed_value_and_gradient():
    # errors 1 - m(2y-1) = [0.5, 0.5, 1.2, 2.0]; sorted: 2.0 (pos), 1.2 (neg), then the two 0.5
    # J = 1/2, 2/3, then 1 after both ties: L = 2.0 * 1/2 + 1.2 * 1/6 + 0.5 * 1/3
    logits = torch.tensor([0.5, -0.5, 0.2, -1.0], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([True, False, False, True])
    loss = lovasz_hinge(logits, labels)
    assert loss.item() == pytest.approx(1.0 + 0.2 + 0.5 / 3, abs=1e-12)
    (grad,) = torch.autograd.grad(loss, logits)
    # dL/dm = -(2y-1) g: the positive at 2.0 has g = 1/2, the negative at 1.2 has g = 1/6; of the tied
    # pair the lower index (the positive) ranks first: g = 1/(G + c-) = 1/3, then the negative: 0
    torch.testing.assert_close(grad, torch.tensor([-1 / 3, 0.0, 1 / 6, -0.5], dtype=torch.float64))


def test_no_positives_takes_the_largest_error():
    logits = torch.tensor([0.3, -0.2, 0.9])
    labels = torch.zeros(3, dtype=torch.bool)
    assert lovasz_hinge(logits, labels).item() == pytest.approx(1.9)


def test_all_correct_is_zero_and_empty_is_zero():
    logits = torch.tensor([2.0, -3.0, 1.0], requires_grad=True)
    labels = torch.tensor([1, 0, 1])
    loss = lovasz_hinge(logits, labels)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad, torch.zeros(3))
    assert lovasz_hinge(torch.zeros(0), torch.zeros(0, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("positives", [0, 1, 7, 60])
def test_matches_textbook_form(dtype, positives):
    gen = torch.Generator().manual_seed(positives)
    n = 300
    labels = torch.zeros(n, dtype=torch.bool)
    labels[torch.randperm(n, generator=gen)[:positives]] = True
    logits = (torch.rand(n, generator=gen, dtype=dtype) * 3 - 1.5).requires_grad_()
    ours = lovasz_hinge(logits, labels)
    textbook = textbook_lovasz(logits, labels)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert ours.item() == pytest.approx(textbook.item(), rel=tol, abs=tol)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_text,) = torch.autograd.grad(textbook, logits)
    torch.testing.assert_close(g_ours, g_text, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segmented_matches_a_loop_over_problems(dtype):
    gen = torch.Generator().manual_seed(3)
    sizes = [1, 50, 0, 200, 17]
    segments = torch.cat([torch.full((s,), i, dtype=torch.int64) for i, s in enumerate(sizes)])
    order = torch.randperm(segments.numel(), generator=gen)
    segments = segments[order]  # problems interleaved
    labels = torch.rand(segments.numel(), generator=gen) < 0.3
    logits = (torch.randn(segments.numel(), generator=gen, dtype=dtype) * 2).requires_grad_()
    out = segmented_lovasz_hinge(logits, labels, segments, len(sizes))
    assert out.shape == (len(sizes),)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    expected = []
    for i in range(len(sizes)):
        sel = segments == i
        expected.append(textbook_lovasz(logits[sel], labels[sel]) if sel.any() else logits.sum() * 0)
    expected = torch.stack(expected)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    weights = torch.arange(1, len(sizes) + 1, dtype=dtype)
    (g_out,) = torch.autograd.grad((out * weights).sum(), logits)
    (g_exp,) = torch.autograd.grad((expected * weights).sum(), logits)
    torch.testing.assert_close(g_out, g_exp, rtol=tol, atol=tol)


def test_dropping_zero_errors_keeps_the_value_when_positives_still_count():
    gen = torch.Generator().manual_seed(5)
    n = 120
    labels = torch.rand(n, generator=gen) < 0.25
    logits = torch.randn(n, generator=gen, dtype=torch.float64)
    logits[~labels & (torch.rand(n, generator=gen) < 0.5)] = -1.0  # negatives with error exactly 0
    full = lovasz_hinge(logits, labels)
    errors = hinge_errors(logits, labels)
    kept = errors > 0
    segments = torch.zeros(int(kept.sum()), dtype=torch.int64)
    weights = segmented_lovasz_weights(
        errors[kept], labels[kept], segments, 1, fg_counts=torch.tensor([int(labels.sum())])
    )
    assert (weights * errors[kept]).sum().item() == pytest.approx(full.item(), abs=1e-12)


def test_negatives_after_the_last_positive_have_zero_weight():
    # errors: positives 1.0, 0.5; negatives 0.8, 0.3, 0.1 → sorted 1.0+ 0.8- 0.5+ 0.3- 0.1-
    errors = torch.tensor([1.0, 0.5, 0.8, 0.3, 0.1], dtype=torch.float64)
    labels = torch.tensor([True, True, False, False, False])
    weights = segmented_lovasz_weights(errors, labels, torch.zeros(5, dtype=torch.int64), 1)
    # J = 1/2, 2/3, 1, 1, 1
    torch.testing.assert_close(weights, torch.tensor([0.5, 1 / 3, 1 / 6, 0.0, 0.0], dtype=torch.float64))
    logits = (1 - errors) * (2 * labels.double() - 1)
    assert (weights * errors).sum().item() == pytest.approx(textbook_lovasz(logits, labels).item(), abs=1e-12)
    # without positives only the largest error counts; with a positive given but left out (error <= 0),
    # every negative with a positive error keeps its weight
    none = segmented_lovasz_weights(errors[2:], labels[2:], torch.zeros(3, dtype=torch.int64), 1)
    torch.testing.assert_close(none, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    left_out = segmented_lovasz_weights(
        errors[1:], labels[1:], torch.zeros(4, dtype=torch.int64), 1, fg_counts=torch.tensor([2])
    )
    assert bool((left_out[1:] > 0).all())


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="1-D of the same length"):
        lovasz_hinge(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="1-D of the same length"):
        lovasz_hinge(torch.zeros(3), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="floating point"):
        lovasz_hinge(torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="segments must have shape"):
        segmented_lovasz_hinge(torch.zeros(3), torch.zeros(3, dtype=torch.bool), torch.zeros(2, dtype=torch.int64), 1)
