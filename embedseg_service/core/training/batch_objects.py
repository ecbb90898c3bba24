"""The objects of a batch as the EmbedSeg loss sees them, and the raw output split by head.

Objects are gathered once per batch from the label images, the ignored pixels and the given (or
medoid) centres; every term of the loss (:mod:`embedseg_service.core.training.loss`) works on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from embedseg_service.core.model.embedding import coordinate_map


@dataclass
class BatchObjects:
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


def check_labels(labels: torch.Tensor, batch: int, spatial: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``labels`` is an integer tensor of shape ``(batch, *spatial)``."""
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


def collect_objects(
    labels: torch.Tensor,
    centers: Sequence[torch.Tensor] | None,
    center_ids: Sequence[torch.Tensor] | None,
    ignore: torch.Tensor | None,
    step: tuple[float, ...],
    dtype: torch.dtype,
) -> BatchObjects:
    """The objects of ``labels`` (B, *S) with their centres (given per image, or medoids when ``None``).

    Arguments as for :meth:`embedseg_service.core.training.loss.EmbedSegLoss.forward`; centres come out in
    embedding units and ``dtype``. Raises ``ValueError`` for bad shapes, ids or a missing centre.
    """
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
    if centers is None or center_ids is None:  # both None (checked above)
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
    return BatchObjects(
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


def split_raw(raw: torch.Tensor, dims: int, step: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings (D, B*N), sigma (D, B*N) and seed logit (B*N,), channels x, y[, z]."""
    batch, spatial = raw.shape[0], raw.shape[2:]
    n = math.prod(spatial)
    offsets = torch.tanh(raw[:, :dims].reshape(batch, dims, n))
    coords = coordinate_map(spatial, step, device=raw.device, dtype=raw.dtype).reshape(1, dims, n)
    emb = (offsets + coords).transpose(0, 1).reshape(dims, batch * n)
    sigma = raw[:, dims : 2 * dims].reshape(batch, dims, n).transpose(0, 1).reshape(dims, batch * n)
    logit = raw[:, 2 * dims].reshape(batch * n)
    return emb, sigma, logit


def check_raw(raw: torch.Tensor, dims: int) -> None:
    """Raise ``ValueError`` unless ``raw`` is a float tensor ``(B, 2 * dims + 1, *S)`` with ``B >= 1``."""
    if raw.dim() != dims + 2 or raw.shape[1] != 2 * dims + 1:
        raise ValueError(
            f"raw must have shape (B, {2 * dims + 1}, *spatial) with {dims} spatial axes, got {tuple(raw.shape)}"
        )
    if not raw.is_floating_point():
        raise ValueError(f"raw must be a floating point tensor, got {raw.dtype}")
    if raw.shape[0] == 0:
        raise ValueError("raw must hold at least one image")


def bandwidths(sigma: torch.Tensor, objs: BatchObjects) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean sigma per object ``s̄`` (K, D) and per-object variance term (K,) (float64 sums)."""
    dims = sigma.shape[0]
    sig_fg = sigma[:, objs.fg_pix].to(torch.float64)
    sums = torch.zeros((dims, objs.count), dtype=torch.float64, device=sigma.device).index_add(1, objs.fg_obj, sig_fg)
    mean = sums / objs.counts
    sq = ((sig_fg - mean.detach()[:, objs.fg_obj]) ** 2).sum(0)
    var = torch.zeros(objs.count, dtype=torch.float64, device=sigma.device).index_add(0, objs.fg_obj, sq)
    return mean.T.to(sigma.dtype), var / (objs.counts * dims)
