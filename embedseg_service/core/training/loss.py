"""EmbedSeg loss (docs/method.md §4); the oracle IoU (§9) is in :mod:`embedseg_service.core.training.oracle`.

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

import torch

from embedseg_service.core.model.embedding import normalize_step
from embedseg_service.core.training.batch_objects import bandwidths, check_labels, check_raw, collect_objects, split_raw
from embedseg_service.core.training.candidates import DEFAULT_PAIRS_PER_CHUNK, pair_scores, tile_batch
from embedseg_service.core.training.lovasz_term import LovaszTerm


class EmbedSegLoss(torch.nn.Module):
    """EmbedSeg loss (docs/method.md §4) for a batch of 2D images or 3D volumes.

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
        check_raw(raw, dims)
        if raw.dtype in (torch.float16, torch.bfloat16):
            raw = raw.float()
        batch, spatial = raw.shape[0], tuple(raw.shape[2:])
        check_labels(labels, batch, spatial)
        labels = labels.to(raw.device)
        objs = collect_objects(labels, centers, center_ids, ignore, self.step, raw.dtype)
        emb, sigma, logit = split_raw(raw, dims, self.step)
        seed = torch.sigmoid(logit)
        n = objs.n_pixels

        # seed term: background towards 0, object pixels towards sg φ of their own object
        background = labels.reshape(-1) == 0
        if objs.valid is not None:
            background &= objs.valid
        bg_sum = (seed * seed * background).view(batch, n).sum(1)
        n_valid = torch.full((batch,), n, device=raw.device) if objs.valid is None else objs.valid.view(batch, n).sum(1)
        if objs.count:
            s_mean, var_obj = bandwidths(sigma, objs)
            lam = torch.exp(10 * s_mean)
            with torch.no_grad():
                phi_own = torch.exp(-pair_scores(emb, lam, objs.centers, objs.fg_obj, objs.fg_pix))
            fg_err = (seed[objs.fg_pix] - phi_own) ** 2
            fg_sum = torch.zeros(batch, dtype=raw.dtype, device=raw.device).index_add(
                0, objs.image[objs.fg_obj], fg_err
            )
            obj_weight = 1.0 / objs.per_image.to(torch.float64)[objs.image]
            need_grad = torch.is_grad_enabled() and (emb.requires_grad or lam.requires_grad)
            tiles = tile_batch(emb, objs)
            iou = LovaszTerm.apply(emb, lam, phi_own, objs, tiles, obj_weight, self.pairs_per_chunk, need_grad)
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
