"""EmbedSeg loss and oracle IoU (method.md §4, §9).

For object ``k`` with pixels ``S_k`` and centre ``C_k`` (a fixed target, in embedding units):

* bandwidth ``s̄_k`` = mean of the raw sigma over ``S_k`` per axis, precision ``λ_k = exp(10 s̄_k)``;
* score ``φ_k(i) = exp(−Σ_a λ_{k,a} (e_{i,a} − C_{k,a})²)`` for every pixel ``i``;
* IoU term: Lovász hinge of the logits ``2φ_k − 1`` against ``[i ∈ S_k]``;
* variance term: mean over ``S_k`` and axes of ``(s_i − sg s̄_k)²``;
* seed term: ``(1/N) [Σ_bg p² + w_fg Σ_k Σ_{S_k} (p − sg φ_k)²]`` with ``N`` the non-ignored pixels.

Per image ``w_iou · mean_k IoU_k + w_var · mean_k var_k + w_seed · seed`` (seed only without
objects); the batch loss is the mean over images.

All objects of a batch are handled together. The Lovász term runs on (object, pixel) pairs
``S_k ∪ {ε_k > 0}`` only: a background pixel whose score is so small that ``2φ − 1`` rounds to
``−1`` has hinge error exactly 0 and adds nothing to the value or the gradient. Such pixels lie
outside a box around ``C_k`` of half-width ``sqrt(B / λ_{k,a})`` per axis, which bounds, through
the largest offset of the image, a box of pixel indices; candidates are enumerated from those
boxes, scored, filtered, and sorted once per chunk of objects (chunks end at object boundaries, so
memory is bounded by the chunk size). Its gradient is formed during the forward pass, chunk by
chunk, so that no per-pair tensor is kept for backward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from core.embedding import coordinate_map, normalize_step
from core.lovasz import _descending_order, _weights_of_sorted

DEFAULT_PAIRS_PER_CHUNK = 1 << 22
"""(object, pixel) candidates scored at once; bounds the loss's working memory (~100 bytes each)."""

_BOX_MARGIN = 2.0
"""Extra exponent on top of the rounding limit, so that φ computed outside the box is far below it."""


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
    owner: torch.Tensor  # (B*N,) int64 object of each pixel, -1 for background and ignored
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
    from core.centers import CenterMode, object_centers

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


def _candidate_boxes(
    objs: _Objects, lam: torch.Tensor, reach: torch.Tensor, bound: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per object, the box of pixel indices that can hold a pixel with ``Σ_a λ_a d_a² < bound``.

    ``reach`` (B, D) is the largest ``|e − c|`` of each image per channel. Returns ``lo`` and ``ext``
    (K, D) int64 in array order (extents may be 0).
    """
    shape = torch.tensor(objs.spatial_shape, dtype=torch.float64, device=lam.device)
    lam64 = lam.detach().to(torch.float64)
    half = torch.sqrt(bound / lam64) + reach.to(torch.float64)[objs.image]  # (K, D) x, y[, z]
    half = torch.nan_to_num(half, nan=math.inf) / objs.step_xyz
    center = objs.centers.to(torch.float64) / objs.step_xyz
    lo = torch.clamp(center - half, -1.0, float(max(objs.spatial_shape)) + 1).floor() - 1
    hi = torch.clamp(center + half, -1.0, float(max(objs.spatial_shape)) + 1).floor() + 2
    lo = torch.minimum(lo.flip(1).clamp_min(0), shape)
    hi = torch.minimum(hi.flip(1).clamp_min(0), shape)
    lo = lo.to(torch.int64)
    return lo, (hi.to(torch.int64) - lo).clamp_min(0)


def _enumerate_boxes(
    objs: _Objects, lo: torch.Tensor, ext: torch.Tensor, obj: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """All (object, global pixel index) pairs of the boxes of objects ``obj`` (ascending)."""
    device = lo.device
    n_box = ext[obj].prod(1)
    owner_rows = torch.repeat_interleave(obj, n_box)
    first = torch.cumsum(n_box, 0) - n_box
    rest = torch.arange(int(n_box.sum()), device=device) - torch.repeat_interleave(first, n_box)
    pix = objs.image[owner_rows] * objs.n_pixels
    stride = 1
    for ax in range(len(objs.spatial_shape) - 1, -1, -1):
        e = ext[owner_rows, ax]
        pix = pix + (rest % e + lo[owner_rows, ax]) * stride
        rest = rest // e
        stride *= objs.spatial_shape[ax]
    return owner_rows, pix


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


def _scores(emb: torch.Tensor, lam: torch.Tensor, centers: torch.Tensor, obj: torch.Tensor, pix: torch.Tensor):
    """``d`` (D, P) = e − C and ``φ`` (P,) for pairs (obj, pix); ``emb`` is (D, B*N)."""
    d = emb[:, pix] - centers[obj].T
    lam_p = lam[obj].T
    t = d[0] * d[0] * lam_p[0]
    for a in range(1, d.shape[0]):
        t = t + d[a] * d[a] * lam_p[a]
    return d, torch.exp(-t)


class _LovaszTerm(torch.autograd.Function):
    """Per-image mean over objects of the Lovász hinge of ``2φ_k − 1``; gradients formed in forward."""

    @staticmethod
    def forward(ctx, emb, lam, objs, reach, obj_weight, pairs_per_chunk, need_grad):  # noqa: D102
        n_obj, dims = lam.shape
        dtype = emb.dtype
        bound = _zero_error_bound(dtype)
        lo, ext = _candidate_boxes(objs, lam, reach, bound)
        sizes = ext.prod(1) + objs.counts
        per_obj = torch.zeros(n_obj, dtype=torch.float64, device=emb.device)
        grad_emb = torch.zeros_like(emb) if need_grad else None
        grad_lam = torch.zeros((n_obj, dims), dtype=torch.float64, device=emb.device) if need_grad else None
        for k0, k1 in _chunks(sizes, pairs_per_chunk):
            obj_range = torch.arange(k0, k1, device=emb.device)
            # background candidates in the boxes, then every pixel of the objects
            obj_bg, pix_bg = _enumerate_boxes(objs, lo, ext, obj_range)
            keep = objs.owner[pix_bg] != obj_bg
            if objs.valid is not None:
                keep &= objs.valid[pix_bg]
            obj_bg, pix_bg = obj_bg[keep], pix_bg[keep]
            f0, f1 = int(objs.fg_start[k0]), int(objs.fg_start[k1 - 1] + objs.counts[k1 - 1])
            obj = torch.cat([obj_bg, objs.fg_obj[f0:f1]])
            pix = torch.cat([pix_bg, objs.fg_pix[f0:f1]])
            positive = torch.zeros(obj.numel(), dtype=torch.bool, device=emb.device)
            positive[obj_bg.numel() :] = True
            d, phi = _scores(emb, lam, objs.centers, obj, pix)
            signs = positive.to(dtype) * 2 - 1
            errors = 1 - (phi * 2 - 1) * signs
            kept = torch.nonzero(errors > 0).squeeze(1)
            order = kept[_descending_order(errors[kept], obj[kept])]
            obj_s = obj[order]
            n_sorted = torch.bincount(obj_s - k0, minlength=k1 - k0)
            starts = torch.cumsum(n_sorted, 0) - n_sorted
            g = _weights_of_sorted(positive[order], starts[obj_s - k0], objs.counts[obj_s])
            per_obj.index_add_(0, obj_s, errors[order].to(torch.float64) * g)
            if need_grad:
                # dL/dt with t = Σ λ d²: dL/dφ = ±2 g (− on objects), dφ/dt = −φ
                coef = (g * (2.0 * signs[order].to(torch.float64)) * obj_weight[obj_s]).to(dtype) * phi[order]
                d_s = d[:, order]
                pix_s = pix[order]
                lam_s = lam[obj_s].T
                grad_emb.index_add_(1, pix_s, (2 * coef) * lam_s * d_s)
                grad_lam.index_add_(0, obj_s, (coef * d_s * d_s).T.to(torch.float64))
        per_image = torch.zeros(objs.batch, dtype=torch.float64, device=emb.device)
        per_image.index_add_(0, objs.image, per_obj * obj_weight)
        if need_grad:
            ctx.save_for_backward(grad_emb, grad_lam.to(lam.dtype))
        ctx.objs = objs
        ctx.need_grad = need_grad
        return per_image.to(dtype)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        if not ctx.need_grad:
            return None, None, None, None, None, None, None
        grad_emb, grad_lam = ctx.saved_tensors
        objs = ctx.objs
        dims = grad_emb.shape[0]
        g_emb = (grad_emb.view(dims, objs.batch, objs.n_pixels) * grad_out.view(1, -1, 1)).view(dims, -1)
        g_lam = grad_lam * grad_out[objs.image].unsqueeze(1)
        return g_emb, g_lam, None, None, None, None, None


def _split_raw(raw: torch.Tensor, dims: int, step: tuple[float, ...]):
    """Embeddings (D, B*N), sigma (D, B*N), seed logit (B*N,), largest |tanh(offset)| (B, D)."""
    batch, spatial = raw.shape[0], raw.shape[2:]
    n = math.prod(spatial)
    offsets = torch.tanh(raw[:, :dims].reshape(batch, dims, n))
    coords = coordinate_map(spatial, step, device=raw.device, dtype=raw.dtype).reshape(1, dims, n)
    emb = (offsets + coords).transpose(0, 1).reshape(dims, batch * n)
    sigma = raw[:, dims : 2 * dims].reshape(batch, dims, n).transpose(0, 1).reshape(dims, batch * n)
    logit = raw[:, 2 * dims].reshape(batch * n)
    with torch.no_grad():
        reach = offsets.abs().amax(dim=2) if n else torch.zeros(batch, dims, device=raw.device, dtype=raw.dtype)
    return emb, sigma, logit, reach


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
        emb, sigma, logit, reach = _split_raw(raw, dims, self.step)
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
                _, phi_own = _scores(emb, lam, objs.centers, objs.fg_obj, objs.fg_pix)
            fg_err = (seed[objs.fg_pix] - phi_own) ** 2
            fg_sum = torch.zeros(batch, dtype=raw.dtype, device=raw.device).index_add(
                0, objs.image[objs.fg_obj], fg_err
            )
            obj_weight = 1.0 / objs.per_image.to(torch.float64)[objs.image]
            need_grad = torch.is_grad_enabled() and (emb.requires_grad or lam.requires_grad)
            iou = _LovaszTerm.apply(emb, lam, objs, reach, obj_weight, self.pairs_per_chunk, need_grad)
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
    emb, sigma, _, reach = _split_raw(raw, dims, step_t)
    s_mean, _ = _bandwidths(sigma, objs)
    lam = torch.exp(10 * s_mean)
    lo, ext = _candidate_boxes(objs, lam, reach, math.log(2.0) + _BOX_MARGIN)
    inter = torch.zeros(objs.count, dtype=torch.int64, device=raw.device)
    pred = torch.zeros(objs.count, dtype=torch.int64, device=raw.device)
    for k0, k1 in _chunks(ext.prod(1), DEFAULT_PAIRS_PER_CHUNK):
        obj, pix = _enumerate_boxes(objs, lo, ext, torch.arange(k0, k1, device=raw.device))
        if objs.valid is not None:
            keep = objs.valid[pix]
            obj, pix = obj[keep], pix[keep]
        _, phi = _scores(emb, lam, objs.centers, obj, pix)
        hit = phi > 0.5
        pred.index_add_(0, obj, hit.to(torch.int64))
        inter.index_add_(0, obj, (hit & (objs.owner[pix] == obj)).to(torch.int64))
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
