"""Oracle IoU: the quality of predicted embeddings given perfect seeds (docs/method.md §9)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from embedseg_service.core.model.embedding import normalize_step
from embedseg_service.core.training.batch_objects import bandwidths, check_labels, check_raw, collect_objects, split_raw
from embedseg_service.core.training.candidates import (
    BOX_MARGIN,
    DEFAULT_PAIRS_PER_CHUNK,
    object_chunks,
    tile_batch,
    tile_hits,
    tile_scores,
)


def oracle_ious(
    raw: torch.Tensor,
    labels: torch.Tensor,
    centers: Sequence[torch.Tensor] | None,
    center_ids: Sequence[torch.Tensor] | None,
    step: float | Sequence[float],
    *,
    ignore: torch.Tensor | None = None,
) -> torch.Tensor:
    """IoU of ``{φ_k > 0.5}`` with ``S_k`` for every object of the batch (docs/method.md §9).

    ``φ_k`` uses the object's given centre, its bandwidth averaged over ``S_k`` and the predicted
    embeddings: the quality of the embeddings given perfect seeds. Arguments as for
    :meth:`EmbedSegLoss.forward`. Returns (K,) float64, objects ordered by (image, label id).
    """
    dims = raw.dim() - 2
    if dims not in (2, 3):
        raise ValueError(f"raw must have shape (B, C, *spatial) with 2 or 3 spatial axes, got {tuple(raw.shape)}")
    check_raw(raw, dims)
    step_t = normalize_step(step, dims)
    raw = raw.detach()
    if raw.dtype in (torch.float16, torch.bfloat16):
        raw = raw.float()
    batch, spatial = raw.shape[0], tuple(raw.shape[2:])
    check_labels(labels, batch, spatial)
    objs = collect_objects(labels.to(raw.device), centers, center_ids, ignore, step_t, raw.dtype)
    if objs.count == 0:
        return torch.zeros(0, dtype=torch.float64, device=raw.device)
    emb, sigma, _ = split_raw(raw, dims, step_t)
    s_mean, _ = bandwidths(sigma, objs)
    lam = torch.exp(10 * s_mean)
    tiles = tile_batch(emb, objs)
    hit_obj, hit_row = tile_hits(objs, tiles, lam, math.log(2.0) + BOX_MARGIN)
    hit_start = torch.searchsorted(hit_obj, torch.arange(objs.count + 1, device=raw.device)).tolist()
    sizes = torch.bincount(hit_obj, minlength=objs.count) * tiles.size
    inter = torch.zeros(objs.count, dtype=torch.int64, device=raw.device)
    pred = torch.zeros(objs.count, dtype=torch.int64, device=raw.device)
    for k0, k1 in object_chunks(sizes, DEFAULT_PAIRS_PER_CHUNK):
        obj, rows = hit_obj[hit_start[k0] : hit_start[k1]], hit_row[hit_start[k0] : hit_start[k1]]
        code = tiles.owner.index_select(0, rows)
        hit = (torch.exp(-tile_scores(tiles, lam, objs.centers, obj, rows)) > 0.5) & (code != -2)
        pred.index_add_(0, obj, hit.sum(1))
        inter.index_add_(0, obj, (hit & (code == obj.unsqueeze(1))).sum(1))
    union = pred + objs.counts - inter
    return inter.to(torch.float64) / union.to(torch.float64)
