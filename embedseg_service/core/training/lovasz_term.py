"""The Lovász (IoU) term of the EmbedSeg loss, on candidate pairs, with its gradient formed in forward.

Which pairs are scored, and why leaving the others out is exact: module docstring of
:mod:`embedseg_service.core.training.loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from embedseg_service.core.training.batch_objects import BatchObjects
from embedseg_service.core.training.candidates import BOX_MARGIN, PixelTiles, object_chunks, tile_hits, tile_scores
from embedseg_service.core.training.lovasz import sort_by_segment_and_error, weights_of_sorted

_T_MARGIN = 0.01
"""Slack on ``t = −ln φ`` thresholds for the rounding of ``t`` and ``exp`` (relative errors ~1e-6)."""


def _zero_error_bound(dtype: torch.dtype) -> float:
    """``B`` such that ``Σ_a λ_a d_a² ≥ B`` makes ``2φ − 1`` round to ``−1`` in ``dtype``.

    ``1 − u`` with ``u ≤ eps/4`` rounds to 1 (``eps`` = machine epsilon), so ``φ ≤ eps/8`` gives a
    background hinge error of exactly 0.
    """
    eps = torch.finfo(dtype).eps
    return -math.log(eps / 8) + BOX_MARGIN


def _background_bound(phi_own: torch.Tensor, objs: BatchObjects, dtype: torch.dtype) -> torch.Tensor:
    """Per object (K,) float64: background pixels with ``t = Σ_a λ_a d_a²`` at or above it add nothing.

    Pairs worth scoring: ε > 0, and for background ε >= the smallest error m_k of the object's
    own pixels (ranked after the last of those, a background pixel has weight 0). ε = 2φ within
    eps/2 after rounding, so ε >= m_k needs φ >= m_k/2 − eps; ε > 0 needs t < _zero_error_bound.
    """
    zero_bound = _zero_error_bound(dtype)
    err_own = 1 - (phi_own * 2 - 1)
    smallest = torch.full((objs.count,), math.inf, dtype=dtype, device=phi_own.device)
    smallest = smallest.scatter_reduce(0, objs.fg_obj, err_own, "amin").to(torch.float64)
    phi_min = (smallest / 2 - torch.finfo(dtype).eps).clamp_min(0.0)
    return torch.nan_to_num(_T_MARGIN - torch.log(phi_min), nan=zero_bound).clamp_max(zero_bound)


def _chunk_pairs(
    objs: BatchObjects,
    tiles: PixelTiles,
    lam: torch.Tensor,
    phi_own: torch.Tensor,
    hits: tuple[torch.Tensor, torch.Tensor],
    keep_below: torch.Tensor,
    objects: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(object, pixel, φ) of the pairs of the objects ``[k0, k1)`` and how many come first from background.

    Background: pixels of the candidate tiles ``hits`` (object, tile row) that may have ε > 0, minus
    each object's own; then every pixel of the objects (all count in G).
    """
    obj_h, rows = hits
    k0, k1 = objects
    t = tile_scores(tiles, lam, objs.centers, obj_h, rows)
    keep = t < keep_below.index_select(0, obj_h).unsqueeze(1)
    keep &= tiles.owner.index_select(0, rows) != obj_h.to(torch.int32).unsqueeze(1)
    kept = torch.nonzero(keep.view(-1)).squeeze(1)
    row = kept // tiles.size
    obj_bg = obj_h.index_select(0, row)
    pix_bg = tiles.pixel.view(-1).index_select(0, rows.index_select(0, row) * tiles.size + kept % tiles.size)
    t_bg = t.view(-1).index_select(0, kept)
    del t, keep, kept, row
    f0, f1 = int(objs.fg_start[k0]), int(objs.fg_start[k1 - 1] + objs.counts[k1 - 1])
    obj = torch.cat([obj_bg, objs.fg_obj[f0:f1]])
    pix = torch.cat([pix_bg, objs.fg_pix[f0:f1]])
    phi = torch.cat([torch.exp(-t_bg), phi_own[f0:f1]])
    return obj, pix, phi, obj_bg.numel()


@dataclass
class _Gradients:
    """Gradients of the per-object hinges, weighted per image: in the embeddings (D, B*N) and in the
    precisions (K, D) float64."""

    emb: torch.Tensor
    lam: torch.Tensor

    def add(
        self,
        emb: torch.Tensor,
        lam: torch.Tensor,
        centers: torch.Tensor,
        obj: torch.Tensor,
        pix: torch.Tensor,
        coef: torch.Tensor,
    ) -> None:
        """Add the pairs (obj, pix) with ``coef`` = dL/dt (per pair) for ``t = Σ_a λ_a (e_a − C_a)²``."""
        for a in range(emb.shape[0]):
            d = emb[a].index_select(0, pix).sub_(centers[:, a].index_select(0, obj))
            cd = d * coef
            self.lam[:, a].index_add_(0, obj, d.mul_(cd).to(torch.float64))
            self.emb[a].index_add_(0, pix, cd.mul_(2 * lam[:, a].index_select(0, obj)))


class LovaszTerm(torch.autograd.Function):
    """Per-image mean over objects of the Lovász hinge of ``2φ_k − 1``; gradients formed in forward."""

    @staticmethod
    def forward(
        ctx: Any,
        emb: torch.Tensor,
        lam: torch.Tensor,
        phi_own: torch.Tensor,
        objs: BatchObjects,
        tiles: PixelTiles,
        obj_weight: torch.Tensor,
        pairs_per_chunk: int,
        need_grad: bool,
    ) -> torch.Tensor:
        n_obj, dims = lam.shape
        dtype, device = emb.dtype, emb.device
        bound = _background_bound(phi_own, objs, dtype)
        hit_obj, hit_row = tile_hits(objs, tiles, lam, bound)
        hit_start = torch.searchsorted(hit_obj, torch.arange(n_obj + 1, device=device)).tolist()
        sizes = torch.bincount(hit_obj, minlength=n_obj) * tiles.size + objs.counts
        per_obj = torch.zeros(n_obj, dtype=torch.float64, device=device)
        grads = None
        if need_grad:
            grads = _Gradients(torch.zeros_like(emb), torch.zeros((n_obj, dims), dtype=torch.float64, device=device))
        keep_below = bound.to(dtype)
        for k0, k1 in object_chunks(sizes, pairs_per_chunk):
            h0, h1 = hit_start[k0], hit_start[k1]
            obj, pix, phi, n_bg = _chunk_pairs(
                objs, tiles, lam, phi_own, (hit_obj[h0:h1], hit_row[h0:h1]), keep_below, (k0, k1)
            )
            signs = torch.ones(obj.numel(), dtype=dtype, device=device)
            signs[:n_bg] = -1
            errors = 1 - (phi * 2 - 1) * signs
            # background with ε < m_k gets a zero weight; elements with ε = 0 are zeroed below
            errors_s, local_s, order = sort_by_segment_and_error(errors, obj - k0)
            obj_s = local_s + k0
            positive = order >= n_bg
            n_sorted = torch.bincount(local_s, minlength=k1 - k0)
            starts = torch.cumsum(n_sorted, 0) - n_sorted
            g = weights_of_sorted(positive, starts.index_select(0, local_s), objs.counts.index_select(0, obj_s), dtype)
            g = torch.where(errors_s > 0, g, 0)
            per_obj.index_add_(0, obj_s, (errors_s * g).to(torch.float64))
            if grads is not None:
                # t = Σ λ d²: dL/dφ = −2 g on object pixels, +2 g elsewhere; dφ/dt = −φ
                coef_s = (
                    torch.where(positive, 2.0, -2.0)
                    .to(g.dtype)
                    .mul_(g)
                    .mul_(obj_weight.to(g.dtype).index_select(0, obj_s))
                )
                coef = torch.empty_like(coef_s).index_copy_(0, order, coef_s).to(dtype).mul_(phi)
                del coef_s, g, errors_s, obj_s, positive, order
                grads.add(emb, lam, objs.centers, obj, pix, coef)
        per_image = torch.zeros(objs.batch, dtype=torch.float64, device=device)
        per_image.index_add_(0, objs.image, per_obj * obj_weight)
        if grads is not None:
            ctx.save_for_backward(grads.emb, grads.lam.to(lam.dtype))
        ctx.objs = objs
        ctx.need_grad = need_grad
        return per_image.to(dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.need_grad:
            return (None,) * 9
        grad_emb, grad_lam = ctx.saved_tensors
        objs = ctx.objs
        dims = grad_emb.shape[0]
        g_emb = (grad_emb.view(dims, objs.batch, objs.n_pixels) * grad_out.view(1, -1, 1)).view(dims, -1)
        g_lam = grad_lam * grad_out[objs.image].unsqueeze(1)
        return (g_emb, g_lam) + (None,) * 7
