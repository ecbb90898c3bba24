"""EmbedSeg loss and oracle IoU (method.md §4, §9).

For object ``k`` with pixels ``S_k`` and centre ``C_k`` (a fixed target, in embedding units):

* bandwidth ``s̄_k`` = mean of the raw sigma over ``S_k`` per axis, precision ``λ_k = exp(10 s̄_k)``;
* score ``φ_k(i) = exp(−Σ_a λ_{k,a} (e_{i,a} − C_{k,a})²)`` for every pixel ``i``;
* IoU term: Lovász hinge of the logits ``2φ_k − 1`` against ``[i ∈ S_k]``;
* variance term: mean over ``S_k`` and axes of ``(s_i − sg s̄_k)²``;
* seed term: ``(1/N) [Σ_bg p² + w_fg Σ_k Σ_{S_k} (p − sg φ_k)²]`` with ``N`` the non-ignored pixels.

Per image ``w_iou · mean_k IoU_k + w_var · mean_k var_k + w_seed · seed`` (seed only without
objects); the batch loss is the mean over images.

All objects of a batch are handled together, with no loop per object or image. The Lovász term
runs on (object, pixel) pairs that can change its value or gradient, which is exact:

* a background pixel whose hinge error is 0 (``2φ − 1`` rounds to ``−1``) sorts last and adds
  nothing;
* a background pixel whose error is below the smallest error ``m_k`` of the object's own pixels
  ranks after all of them, where the Jaccard loss has reached 1 and its weight is 0.

Both need ``t = Σ_a λ_a (e_a − C_a)²`` above a bound, so candidates come from pixel tiles whose
embedding bounding box gets closer than that bound to ``C_k``; they are scored, filtered, and sorted
once per chunk of objects (one stable sort by object and descending error; chunks end at object
boundaries, so memory is bounded by the chunk size). Every pixel of ``S_k`` is kept and ``G = |S_k|``.
The gradient is formed during the forward pass, chunk by chunk, so that no per-pair tensor is kept
for backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from embedseg_service.core.model.embedding import coordinate_map, normalize_step
from embedseg_service.core.training.lovasz import _sort_by_segment_and_error, _weights_of_sorted

DEFAULT_PAIRS_PER_CHUNK = 1 << 22
"""(object, pixel) candidates scored at once; bounds the loss's working memory (~100 bytes each)."""

_BOX_MARGIN = 2.0
"""Extra exponent on top of rounding limits, so that φ computed beyond a bound is far below the limit."""

_T_MARGIN = 0.01
"""Slack on ``t = −ln φ`` thresholds for the rounding of ``t`` and ``exp`` (relative errors ~1e-6)."""


def _zero_error_bound(dtype: torch.dtype) -> float:
    """``B`` such that ``Σ_a λ_a d_a² ≥ B`` makes ``2φ − 1`` round to ``−1`` in ``dtype``.

    ``1 − u`` with ``u ≤ eps/4`` rounds to 1 (``eps`` = machine epsilon), so ``φ ≤ eps/8`` gives a
    background hinge error of exactly 0.
    """
    eps = torch.finfo(dtype).eps
    return -math.log(eps / 8) + _BOX_MARGIN


@dataclass
class _Objects:
    """The objects of a batch, sorted by (image, label id).

    Pixel indices are global: ``b * N + i`` for pixel ``i`` (row-major) of image ``b``.
    """

    spatial_shape: tuple[int, ...]
    batch: int
    n_pixels: int
    step_xyz: torch.Tensor  # (D,) step per embedding channel (x, y[, z]), float64
    fg_pix: torch.Tensor  # (F,) int64, object pixels grouped by object
    fg_obj: torch.Tensor  # (F,) int64, object of each, ascending
    fg_start: torch.Tensor  # (K,) int64, first row of each object in fg_pix
    counts: torch.Tensor  # (K,) int64, |S_k| (non-ignored)
    image: torch.Tensor  # (K,) int64
    ids: torch.Tensor  # (K,) int64 label ids
    centers: torch.Tensor  # (K, D) centres in embedding units, channels x, y[, z]
    owner: torch.Tensor  # (B*N,) int64 object of each pixel, -1 for background, -2 for ignored
    valid: torch.Tensor | None  # (B*N,) bool, False where ignored; None = nothing ignored
    per_image: torch.Tensor  # (B,) int64 number of objects of each image

    @property
    def count(self) -> int:
        return int(self.counts.numel())


def _check_labels(labels: torch.Tensor, batch: int, spatial: tuple[int, ...]) -> None:
    if tuple(labels.shape) != (batch, *spatial):
        raise ValueError(f"labels must have shape {(batch, *spatial)} (B, *spatial), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")


def _centers_from_labels(
    labels: torch.Tensor, ignore: torch.Tensor | None, step: tuple[float, ...]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Medoid centres of every object of every image (ignored pixels left out)."""
    from embedseg_service.core.data.centers import CenterMode, object_centers

    anisotropy = step[0] / step[-1] if len(step) == 3 else 1.0
    centers, ids = [], []
    lab = labels.detach().cpu().numpy()
    ign = ignore.detach().cpu().numpy() if ignore is not None else None
    for b in range(lab.shape[0]):
        image = lab[b] if ign is None else np.where(ign[b], 0, lab[b])
        obj_ids, obj_centers = object_centers(image, mode=CenterMode.medoid, anisotropy=anisotropy)
        ids.append(torch.as_tensor(obj_ids, dtype=torch.int64))
        centers.append(torch.as_tensor(obj_centers))
    return centers, ids


def _collect_objects(
    labels: torch.Tensor,
    centers: Sequence[torch.Tensor] | None,
    center_ids: Sequence[torch.Tensor] | None,
    ignore: torch.Tensor | None,
    step: tuple[float, ...],
    dtype: torch.dtype,
) -> _Objects:
    device = labels.device
    batch, spatial = labels.shape[0], tuple(labels.shape[1:])
    dims = len(spatial)
    n_pixels = math.prod(spatial)
    if ignore is not None:
        if tuple(ignore.shape) != tuple(labels.shape):
            raise ValueError(f"ignore must have the shape of labels {tuple(labels.shape)}, got {tuple(ignore.shape)}")
        ignore = ignore.to(device=device, dtype=torch.bool)
    if (centers is None) != (center_ids is None):
        raise ValueError("give both centers and center_ids, or neither (then medoids are computed from labels)")
    if centers is None:
        centers, center_ids = _centers_from_labels(labels, ignore, step)
    if len(centers) != batch or len(center_ids) != batch:
        raise ValueError(
            f"centers and center_ids need one entry per image ({batch}), got {len(centers)} and {len(center_ids)}"
        )
    flat = labels.reshape(-1).to(torch.int64)
    if flat.numel() and int(flat.min()) < 0:
        raise ValueError("labels must be >= 0 (0 = background)")
    valid = None if ignore is None else ~ignore.reshape(-1)
    fg = flat > 0 if valid is None else (flat > 0) & valid
    fg_pix = torch.nonzero(fg).squeeze(1)
    radix = int(flat.max()) + 1 if flat.numel() else 1
    keys = fg_pix // n_pixels * radix + flat[fg_pix]
    keys, order = torch.sort(keys, stable=True)
    fg_pix = fg_pix[order]
    uniq, fg_obj, counts = torch.unique_consecutive(keys, return_inverse=True, return_counts=True)
    n_obj = uniq.numel()

    # match the given centres to the objects present
    c_keys, c_rows = [], []
    for b in range(batch):
        c, i = torch.as_tensor(centers[b]), torch.as_tensor(center_ids[b])
        if c.dim() != 2 or c.shape[1] != dims or i.dim() != 1 or i.shape[0] != c.shape[0]:
            raise ValueError(
                f"image {b}: centers must be (K, {dims}) and center_ids (K,), got {tuple(c.shape)} and {tuple(i.shape)}"
            )
        if i.is_floating_point():
            raise ValueError(f"image {b}: center_ids must be integers, got {i.dtype}")
        i = i.to(device=device, dtype=torch.int64)
        if i.numel() != torch.unique(i).numel():
            raise ValueError(f"image {b}: center_ids has repeated ids")
        c_keys.append(torch.where((i > 0) & (i < radix), b * radix + i, -1))
        c_rows.append(c.to(device=device, dtype=torch.float64))
    c_keys_t = torch.cat(c_keys) if c_keys else torch.zeros(0, dtype=torch.int64, device=device)
    c_rows_t = torch.cat(c_rows) if c_rows else torch.zeros((0, dims), dtype=torch.float64, device=device)
    obj_centers = torch.full((n_obj, dims), float("nan"), dtype=torch.float64, device=device)
    if n_obj:
        pos = torch.searchsorted(uniq, c_keys_t).clamp_max(n_obj - 1)
        found = uniq[pos] == c_keys_t
        obj_centers[pos[found]] = c_rows_t[found]
        missing = torch.isnan(obj_centers[:, 0])
        if bool(missing.any()):
            miss = uniq[missing][:10].tolist()
            text = ", ".join(f"image {k // radix} id {k % radix}" for k in miss)
            raise ValueError(
                f"objects without a centre ({int(missing.sum())}): {text}; give a centre for every label id"
            )
    step_xyz = torch.tensor(tuple(reversed(step)), dtype=torch.float64, device=device)
    image = uniq // radix
    owner = torch.full((batch * n_pixels,), -1, dtype=torch.int64, device=device)
    if valid is not None:
        owner[~valid] = -2
    owner[fg_pix] = fg_obj
    return _Objects(
        spatial_shape=spatial,
        batch=batch,
        n_pixels=n_pixels,
        step_xyz=step_xyz,
        fg_pix=fg_pix,
        fg_obj=fg_obj,
        fg_start=torch.cumsum(counts, 0) - counts,
        counts=counts,
        image=image,
        ids=uniq % radix,
        centers=(obj_centers.flip(1) * step_xyz).to(dtype),
        owner=owner,
        valid=valid,
        per_image=torch.bincount(image, minlength=batch),
    )


_TILE = {2: (8, 8), 3: (4, 8, 8)}
"""Pixel tiles (array order) whose embedding bounding boxes limit the candidate pairs."""

_HIT_BLOCK = 1 << 22
"""(object, tile) tests done at once."""


@dataclass
class _Tiles:
    """The batch cut into pixel tiles, laid out tile by tile, with each tile's embedding bounding box.

    Rows are (image, tile) = ``b * T + tile``; columns the ``P_tile`` pixels of a tile. Pixels past
    the border (when a size is not a multiple of the tile) and ignored pixels embed at +inf; those
    past the border have pixel index -1, and both count as ignored (-2) in ``owner``.
    """

    emb: torch.Tensor  # (D, B*T, P_tile) embeddings, channels x, y[, z]
    pixel: torch.Tensor  # (B*T, P_tile) int64 global pixel index b * N + i, -1 past the border
    owner: torch.Tensor  # (B*T, P_tile) int32 object index, -1 background, -2 ignored or past the border
    low: torch.Tensor  # (D, B, T) smallest embedding of the tile per channel
    high: torch.Tensor  # (D, B, T) largest

    @property
    def count(self) -> int:
        return self.low.shape[2]

    @property
    def size(self) -> int:
        return self.pixel.shape[1]


def _tile_major(x: torch.Tensor, tile: tuple[int, ...], fill: float) -> torch.Tensor:
    """(C, *S) → (C, T, P_tile), padding the border tiles with ``fill``."""
    dims = len(tile)
    spatial = x.shape[1:]
    grid = [-(-n // t) for n, t in zip(spatial, tile)]
    pad: list[int] = []
    for n, t, g in zip(reversed(spatial), reversed(tile), reversed(grid)):
        pad += [0, g * t - n]
    if any(pad):
        x = torch.nn.functional.pad(x, pad, value=fill)
    shape = [x.shape[0]]
    for g, t in zip(grid, tile):
        shape += [g, t]
    perm = [0] + [1 + 2 * a for a in range(dims)] + [2 + 2 * a for a in range(dims)]
    return x.reshape(shape).permute(perm).reshape(x.shape[0], math.prod(grid), math.prod(tile))


def _tiles(emb: torch.Tensor, objs: _Objects) -> _Tiles:
    """Tiles of ``emb`` (D, B*N) for the batch of ``objs``; computed without gradient.

    Ignored pixels embed at +inf there: they score ``φ = 0`` and leave the tiles' bounding boxes.
    """
    spatial, batch = objs.spatial_shape, objs.batch
    dims = len(spatial)
    tile = tuple(min(t, n) for t, n in zip(_TILE[dims], spatial))
    x = emb.detach()
    if objs.valid is not None:
        x = torch.where(objs.valid, x, math.inf)
    tiled = _tile_major(x.reshape(dims * batch, *spatial), tile, math.inf)
    n_tiles = tiled.shape[1]
    low = tiled.amin(2)
    high = torch.where(torch.isinf(tiled), -math.inf, tiled).amax(2)
    index = torch.arange(batch * objs.n_pixels, device=emb.device).reshape(batch, *spatial)
    owner = objs.owner.to(torch.int32).reshape(batch, *spatial)
    return _Tiles(
        emb=tiled.reshape(dims, batch * n_tiles, -1),
        pixel=_tile_major(index, tile, -1).reshape(batch * n_tiles, -1),
        owner=_tile_major(owner, tile, -2).reshape(batch * n_tiles, -1),
        low=low.reshape(dims, batch, n_tiles),
        high=high.reshape(dims, batch, n_tiles),
    )


def _tile_hits(
    objs: _Objects, tiles: _Tiles, lam: torch.Tensor, bound: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(object, tile) pairs where some point of the tile's embedding box has ``Σ_a λ_a (e_a − C_a)² < bound``.

    ``bound`` is a number or one per object (K,).
    The smallest value over the box is ``Σ_a λ_a dist(C_a, [low_a, high_a])²``, a lower bound for every
    pixel of the tile. Returns ``obj`` (H,) int64, sorted, and the tile rows ``b * T + tile`` (H,).
    """
    n_tiles = tiles.count
    lam64 = torch.nan_to_num(lam.detach().to(torch.float64), nan=0.0).T.unsqueeze(2)  # (D, K, 1)
    center = objs.centers.to(torch.float64).T.unsqueeze(2)
    block = max(1, _HIT_BLOCK // max(n_tiles, 1))
    if not isinstance(bound, torch.Tensor):
        bound = torch.full((objs.count,), float(bound), dtype=torch.float64, device=lam.device)
    bound = bound.to(torch.float64).unsqueeze(1)
    objs_out, rows_out = [], []
    for k0 in range(0, objs.count, block):
        k1 = min(objs.count, k0 + block)
        img = objs.image[k0:k1]
        c = center[:, k0:k1]
        gap = torch.clamp_min(torch.maximum(tiles.low[:, img] - c, c - tiles.high[:, img]), 0.0)
        t_min = torch.nan_to_num((lam64[:, k0:k1] * gap * gap).sum(0), nan=0.0)
        obj, tile = torch.nonzero(t_min < bound[k0:k1], as_tuple=True)
        obj = obj + k0
        objs_out.append(obj)
        rows_out.append(objs.image[obj] * n_tiles + tile)
    return torch.cat(objs_out), torch.cat(rows_out)


def _tile_scores(
    tiles: _Tiles, lam: torch.Tensor, centers: torch.Tensor, obj: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """``t = Σ_a λ_{k,a} (e_{i,a} − C_{k,a})²`` (H, P_tile) for pixels ``i`` of tile row ``rows[h]``, ``k = obj[h]``."""
    t = None
    for a in range(tiles.emb.shape[0]):
        d = tiles.emb[a].index_select(0, rows)
        d.sub_(centers[:, a].index_select(0, obj).unsqueeze(1))
        term = d.mul_(d).mul_(lam[:, a].index_select(0, obj).unsqueeze(1))
        t = term if t is None else t.add_(term)
    return t


def _chunks(sizes: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """Split objects into runs ``[k0, k1)`` whose summed sizes stay within ``budget`` (≥ 1 object each)."""
    ends: list[tuple[int, int]] = []
    cum = torch.cumsum(sizes, 0).cpu().numpy()
    n, k0, base = len(cum), 0, 0
    while k0 < n:
        k1 = int(np.searchsorted(cum, base + budget, side="right"))
        k1 = max(k1, k0 + 1)
        ends.append((k0, k1))
        base = int(cum[k1 - 1])
        k0 = k1
    return ends


def _pair_scores(emb: torch.Tensor, lam: torch.Tensor, centers: torch.Tensor, obj: torch.Tensor, pix: torch.Tensor):
    """``t = Σ_a λ_{k,a} (e_{i,a} − C_{k,a})²`` (P,) for pairs (k, i) = (obj, pix); ``emb`` is (D, B*N)."""
    t = None
    for a in range(emb.shape[0]):
        d = emb[a].index_select(0, pix) - centers[:, a].index_select(0, obj)
        term = d * d * lam[:, a].index_select(0, obj)
        t = term if t is None else t + term
    return t


class _LovaszTerm(torch.autograd.Function):
    """Per-image mean over objects of the Lovász hinge of ``2φ_k − 1``; gradients formed in forward."""

    @staticmethod
    def forward(ctx, emb, lam, phi_own, objs, tiles, obj_weight, pairs_per_chunk, need_grad):  # noqa: D102
        n_obj, dims = lam.shape
        dtype, device = emb.dtype, emb.device
        # Pairs worth scoring: ε > 0, and for background ε >= the smallest error m_k of the object's
        # own pixels (ranked after the last of those, a background pixel has weight 0). ε = 2φ within
        # eps/2 after rounding, so ε >= m_k needs φ >= m_k/2 − eps; ε > 0 needs t < _zero_error_bound.
        zero_bound = _zero_error_bound(dtype)
        err_own = 1 - (phi_own * 2 - 1)
        smallest = torch.full((n_obj,), math.inf, dtype=dtype, device=device)
        smallest = smallest.scatter_reduce(0, objs.fg_obj, err_own, "amin").to(torch.float64)
        phi_min = (smallest / 2 - torch.finfo(dtype).eps).clamp_min(0.0)
        bound = torch.nan_to_num(_T_MARGIN - torch.log(phi_min), nan=zero_bound).clamp_max(zero_bound)
        hit_obj, hit_row = _tile_hits(objs, tiles, lam, bound)
        hit_start = torch.searchsorted(hit_obj, torch.arange(n_obj + 1, device=device)).tolist()
        sizes = torch.bincount(hit_obj, minlength=n_obj) * tiles.size + objs.counts
        per_obj = torch.zeros(n_obj, dtype=torch.float64, device=device)
        grad_emb = torch.zeros_like(emb) if need_grad else None
        grad_lam = torch.zeros((n_obj, dims), dtype=torch.float64, device=device) if need_grad else None
        keep_below = bound.to(dtype)
        for k0, k1 in _chunks(sizes, pairs_per_chunk):
            # background: pixels of the candidate tiles that may have ε > 0, minus each object's own
            h0, h1 = hit_start[k0], hit_start[k1]
            obj_h, rows = hit_obj[h0:h1], hit_row[h0:h1]
            t = _tile_scores(tiles, lam, objs.centers, obj_h, rows)
            keep = t < keep_below.index_select(0, obj_h).unsqueeze(1)
            keep &= tiles.owner.index_select(0, rows) != obj_h.to(torch.int32).unsqueeze(1)
            kept = torch.nonzero(keep.view(-1)).squeeze(1)
            row = kept // tiles.size
            obj_bg = obj_h.index_select(0, row)
            pix_bg = tiles.pixel.view(-1).index_select(0, rows.index_select(0, row) * tiles.size + kept % tiles.size)
            t_bg = t.view(-1).index_select(0, kept)
            del t, keep, kept, row
            # objects: all their pixels (all count in G)
            f0, f1 = int(objs.fg_start[k0]), int(objs.fg_start[k1 - 1] + objs.counts[k1 - 1])
            obj_fg, pix_fg = objs.fg_obj[f0:f1], objs.fg_pix[f0:f1]
            n_bg = obj_bg.numel()
            obj = torch.cat([obj_bg, obj_fg])
            pix = torch.cat([pix_bg, pix_fg])
            phi = torch.cat([torch.exp(-t_bg), phi_own[f0:f1]])
            signs = torch.ones(obj.numel(), dtype=dtype, device=device)
            signs[:n_bg] = -1
            errors = 1 - (phi * 2 - 1) * signs
            # background with ε < m_k gets a zero weight; elements with ε = 0 are zeroed below
            errors_s, local_s, order = _sort_by_segment_and_error(errors, obj - k0)
            obj_s = local_s + k0
            positive = order >= n_bg
            n_sorted = torch.bincount(local_s, minlength=k1 - k0)
            starts = torch.cumsum(n_sorted, 0) - n_sorted
            g = _weights_of_sorted(positive, starts.index_select(0, local_s), objs.counts.index_select(0, obj_s), dtype)
            g = torch.where(errors_s > 0, g, 0)
            per_obj.index_add_(0, obj_s, (errors_s * g).to(torch.float64))
            if need_grad:
                # t = Σ λ d²: dL/dφ = −2 g on object pixels, +2 g elsewhere; dφ/dt = −φ
                coef_s = (
                    torch.where(positive, 2.0, -2.0)
                    .to(g.dtype)
                    .mul_(g)
                    .mul_(obj_weight.to(g.dtype).index_select(0, obj_s))
                )
                coef = torch.empty_like(coef_s).index_copy_(0, order, coef_s).to(dtype).mul_(phi)
                del coef_s, g, errors_s, obj_s, positive, order
                for a in range(dims):
                    d = emb[a].index_select(0, pix).sub_(objs.centers[:, a].index_select(0, obj))
                    cd = d * coef
                    grad_lam[:, a].index_add_(0, obj, d.mul_(cd).to(torch.float64))
                    grad_emb[a].index_add_(0, pix, cd.mul_(2 * lam[:, a].index_select(0, obj)))
        per_image = torch.zeros(objs.batch, dtype=torch.float64, device=device)
        per_image.index_add_(0, objs.image, per_obj * obj_weight)
        if need_grad:
            ctx.save_for_backward(grad_emb, grad_lam.to(lam.dtype))
        ctx.objs = objs
        ctx.need_grad = need_grad
        return per_image.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        if not ctx.need_grad:
            return (None,) * 9
        grad_emb, grad_lam = ctx.saved_tensors
        objs = ctx.objs
        dims = grad_emb.shape[0]
        g_emb = (grad_emb.view(dims, objs.batch, objs.n_pixels) * grad_out.view(1, -1, 1)).view(dims, -1)
        g_lam = grad_lam * grad_out[objs.image].unsqueeze(1)
        return (g_emb, g_lam) + (None,) * 7


def _split_raw(raw: torch.Tensor, dims: int, step: tuple[float, ...]):
    """Embeddings (D, B*N), sigma (D, B*N) and seed logit (B*N,), channels x, y[, z]."""
    batch, spatial = raw.shape[0], raw.shape[2:]
    n = math.prod(spatial)
    offsets = torch.tanh(raw[:, :dims].reshape(batch, dims, n))
    coords = coordinate_map(spatial, step, device=raw.device, dtype=raw.dtype).reshape(1, dims, n)
    emb = (offsets + coords).transpose(0, 1).reshape(dims, batch * n)
    sigma = raw[:, dims : 2 * dims].reshape(batch, dims, n).transpose(0, 1).reshape(dims, batch * n)
    logit = raw[:, 2 * dims].reshape(batch * n)
    return emb, sigma, logit


def _check_raw(raw: torch.Tensor, dims: int) -> None:
    if raw.dim() != dims + 2 or raw.shape[1] != 2 * dims + 1:
        raise ValueError(
            f"raw must have shape (B, {2 * dims + 1}, *spatial) with {dims} spatial axes, got {tuple(raw.shape)}"
        )
    if not raw.is_floating_point():
        raise ValueError(f"raw must be a floating point tensor, got {raw.dtype}")
    if raw.shape[0] == 0:
        raise ValueError("raw must hold at least one image")


def _bandwidths(sigma: torch.Tensor, objs: _Objects) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sigma per object ``s̄`` (K, D) and per-object variance term (K,) (float64 sums)."""
    dims = sigma.shape[0]
    sig_fg = sigma[:, objs.fg_pix].to(torch.float64)
    sums = torch.zeros((dims, objs.count), dtype=torch.float64, device=sigma.device).index_add(1, objs.fg_obj, sig_fg)
    mean = sums / objs.counts
    sq = ((sig_fg - mean.detach()[:, objs.fg_obj]) ** 2).sum(0)
    var = torch.zeros(objs.count, dtype=torch.float64, device=sigma.device).index_add(0, objs.fg_obj, sq)
    return mean.T.to(sigma.dtype), var / (objs.counts * dims)


class EmbedSegLoss(torch.nn.Module):
    """EmbedSeg loss (method.md §4) for a batch of 2D images or 3D volumes.

    Args:
        spatial_dims: 2 or 3.
        step: embedding length of one pixel step, per array axis (array order) or a scalar.
        foreground_weight: ``w_fg`` of the seed term on object pixels (10 in 2D; data-derived in 3D).
        w_iou, w_var, w_seed: weights of the Lovász, variance and seed terms.
        pairs_per_chunk: (object, pixel) candidates processed at once (bounds memory).
    """

    def __init__(
        self,
        spatial_dims: int,
        step: float | Sequence[float],
        *,
        foreground_weight: float = 10.0,
        w_iou: float = 1.0,
        w_var: float = 10.0,
        w_seed: float = 1.0,
        pairs_per_chunk: int = DEFAULT_PAIRS_PER_CHUNK,
    ) -> None:
        super().__init__()
        self.spatial_dims = int(spatial_dims)
        self.step = normalize_step(step, self.spatial_dims)
        for name, value in (
            ("foreground_weight", foreground_weight),
            ("w_iou", w_iou),
            ("w_var", w_var),
            ("w_seed", w_seed),
        ):
            if not (math.isfinite(float(value)) and float(value) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if int(pairs_per_chunk) < 1:
            raise ValueError(f"pairs_per_chunk must be >= 1, got {pairs_per_chunk}")
        self.foreground_weight = float(foreground_weight)
        self.w_iou, self.w_var, self.w_seed = float(w_iou), float(w_var), float(w_seed)
        self.pairs_per_chunk = int(pairs_per_chunk)

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, step={self.step}, foreground_weight={self.foreground_weight}, "
            f"w_iou={self.w_iou}, w_var={self.w_var}, w_seed={self.w_seed}"
        )

    def forward(
        self,
        raw: torch.Tensor,
        labels: torch.Tensor,
        centers: Sequence[torch.Tensor] | None = None,
        center_ids: Sequence[torch.Tensor] | None = None,
        ignore: torch.Tensor | None = None,
        return_terms: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of raw network outputs against instance labels.

        Args:
            raw: (B, 2D+1, *S) float: offsets (x, y[, z]), sigma (x, y[, z]), seed logit.
            labels: (B, *S) int instance ids, 0 = background.
            centers: per image a (K_b, D) float tensor of object centres, array-order pixel
                coordinates; ``None`` computes medoids from ``labels``.
            center_ids: per image the (K_b,) int64 label ids of ``centers``. Every id present in
                ``labels`` needs a centre; centres of absent ids are not used.
            ignore: (B, *S) bool, True where pixels take no part in any term.
            return_terms: also return the batch means of the ``iou``, ``var`` and ``seed`` terms.

        Returns:
            Scalar loss (and a dict of the unweighted terms when ``return_terms``).
        """
        dims = self.spatial_dims
        _check_raw(raw, dims)
        if raw.dtype in (torch.float16, torch.bfloat16):
            raw = raw.float()
        batch, spatial = raw.shape[0], tuple(raw.shape[2:])
        _check_labels(labels, batch, spatial)
        labels = labels.to(raw.device)
        objs = _collect_objects(labels, centers, center_ids, ignore, self.step, raw.dtype)
        emb, sigma, logit = _split_raw(raw, dims, self.step)
        seed = torch.sigmoid(logit)
        n = objs.n_pixels

        # seed term: background towards 0, object pixels towards sg φ of their own object
        background = labels.reshape(-1) == 0
        if objs.valid is not None:
            background &= objs.valid
        bg_sum = (seed * seed * background).view(batch, n).sum(1)
        n_valid = torch.full((batch,), n, device=raw.device) if objs.valid is None else objs.valid.view(batch, n).sum(1)
        if objs.count:
            s_mean, var_obj = _bandwidths(sigma, objs)
            lam = torch.exp(10 * s_mean)
            with torch.no_grad():
                phi_own = torch.exp(-_pair_scores(emb, lam, objs.centers, objs.fg_obj, objs.fg_pix))
            fg_err = (seed[objs.fg_pix] - phi_own) ** 2
            fg_sum = torch.zeros(batch, dtype=raw.dtype, device=raw.device).index_add(
                0, objs.image[objs.fg_obj], fg_err
            )
            obj_weight = 1.0 / objs.per_image.to(torch.float64)[objs.image]
            need_grad = torch.is_grad_enabled() and (emb.requires_grad or lam.requires_grad)
            tiles = _tiles(emb, objs)
            iou = _LovaszTerm.apply(emb, lam, phi_own, objs, tiles, obj_weight, self.pairs_per_chunk, need_grad)
            var = (
                torch.zeros(batch, dtype=torch.float64, device=raw.device)
                .index_add(0, objs.image, var_obj * obj_weight)
                .to(raw.dtype)
            )
        else:
            fg_sum = torch.zeros(batch, dtype=raw.dtype, device=raw.device)
            iou = torch.zeros(batch, dtype=raw.dtype, device=raw.device)
            var = torch.zeros(batch, dtype=raw.dtype, device=raw.device)
        seed_term = (bg_sum + self.foreground_weight * fg_sum) / n_valid.clamp_min(1).to(raw.dtype)
        per_image = self.w_iou * iou + self.w_var * var + self.w_seed * seed_term
        loss = per_image.mean()
        if return_terms:
            return loss, {"iou": iou.mean(), "var": var.mean(), "seed": seed_term.mean()}
        return loss


def oracle_ious(
    raw: torch.Tensor,
    labels: torch.Tensor,
    centers: Sequence[torch.Tensor] | None,
    center_ids: Sequence[torch.Tensor] | None,
    step: float | Sequence[float],
    *,
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """IoU of ``{φ_k > 0.5}`` with ``S_k`` for every object of the batch (method.md §9).

    ``φ_k`` uses the object's given centre, its bandwidth averaged over ``S_k`` and the predicted
    embeddings: the quality of the embeddings given perfect seeds. Arguments as for
    :meth:`EmbedSegLoss.forward`. Returns (K,) float64, objects ordered by (image, label id).
    """
    dims = raw.dim() - 2
    if dims not in (2, 3):
        raise ValueError(f"raw must have shape (B, C, *spatial) with 2 or 3 spatial axes, got {tuple(raw.shape)}")
    _check_raw(raw, dims)
    step_t = normalize_step(step, dims)
    raw = raw.detach()
    if raw.dtype in (torch.float16, torch.bfloat16):
        raw = raw.float()
    batch, spatial = raw.shape[0], tuple(raw.shape[2:])
    _check_labels(labels, batch, spatial)
    objs = _collect_objects(labels.to(raw.device), centers, center_ids, ignore, step_t, raw.dtype)
    if objs.count == 0:
        return torch.zeros(0, dtype=torch.float64, device=raw.device)
    emb, sigma, _ = _split_raw(raw, dims, step_t)
    s_mean, _ = _bandwidths(sigma, objs)
    lam = torch.exp(10 * s_mean)
    tiles = _tiles(emb, objs)
    hit_obj, hit_row = _tile_hits(objs, tiles, lam, math.log(2.0) + _BOX_MARGIN)
    hit_start = torch.searchsorted(hit_obj, torch.arange(objs.count + 1, device=raw.device)).tolist()
    sizes = torch.bincount(hit_obj, minlength=objs.count) * tiles.size
    inter = torch.zeros(objs.count, dtype=torch.int64, device=raw.device)
    pred = torch.zeros(objs.count, dtype=torch.int64, device=raw.device)
    for k0, k1 in _chunks(sizes, DEFAULT_PAIRS_PER_CHUNK):
        obj, rows = hit_obj[hit_start[k0] : hit_start[k1]], hit_row[hit_start[k0] : hit_start[k1]]
        code = tiles.owner.index_select(0, rows)
        hit = (torch.exp(-_tile_scores(tiles, lam, objs.centers, obj, rows)) > 0.5) & (code != -2)
        pred.index_add_(0, obj, hit.sum(1))
        inter.index_add_(0, obj, (hit & (code == obj.unsqueeze(1))).sum(1))
    union = pred + objs.counts - inter
    return inter.to(torch.float64) / union.to(torch.float64)


def oracle_iou(
    raw: torch.Tensor,
    labels: torch.Tensor,
    centers: Sequence[torch.Tensor] | None,
    center_ids: Sequence[torch.Tensor] | None,
    step: float | Sequence[float],
    *,
    ignore: torch.Tensor | None = None,
) -> float:
    """Mean over all objects of the batch of :func:`oracle_ious`; NaN when there is no object."""
    ious = oracle_ious(raw, labels, centers, center_ids, step, ignore=ignore)
    return float(ious.mean()) if ious.numel() else float("nan")
