"""Greedy seed clustering of EmbedSeg raw outputs into instance labels (docs/method.md §6).

The procedure is the reference's ``Cluster.cluster`` / ``Cluster_3d.cluster``:

1. foreground ``F`` = pixels whose seed probability exceeds ``fg_thresh``; nothing is clustered
   unless ``|F| > min_mask_sum``;
2. while more than ``min_unclustered_sum`` foreground pixels are unclustered, the unclustered pixel
   with the highest seed score is the next seed; clustering stops when that score is below
   ``seed_thresh``;
3. the seed leaves the unclustered set; its proposal is every foreground pixel (clustered or not)
   whose embedding lies inside the seed's Gaussian at level 0.5, with the seed's own embedding as
   centre and the seed's own sigma as bandwidth;
4. the proposal becomes a new object (overwriting earlier labels of its pixels) when it has more than
   ``min_size`` pixels and more than half of them are still unclustered (the seed itself no longer
   counts as unclustered); accepted or not, its pixels leave the unclustered set.

One guard is added, off by default: with ``max_radius``, a pixel whose Gaussian reaches farther than
that many pixels from its centre along some axis (``sqrt(ln 2 / lambda_a) / step_a > max_radius_a``)
is no seed; it stays foreground and may join another seed's proposal. Sigma is supervised only inside
objects, and a network can emit a near-zero precision on a spurious foreground pixel (seen at image
borders and in blank background after short trainings); as the first seed, such a pixel's proposal
holds the whole foreground and the image comes out as one object.

Instead of rescanning the whole foreground for every seed:

* seed candidates (logit >= logit(seed_thresh)) are ordered by (logit descending, raster index), lazily:
  a top-k selection per block, a full sort once several blocks were needed;
* an embedding-space cell index over ``F`` limits each proposal to the seed's bounding box
  ``|e_a - c_a| < sqrt(ln 2 / lambda_a)``, which contains every pixel of the proposal;
* candidates are handled in blocks: which of them are still unclustered when their turn comes is decided
  from their mutual distances, only those proposals are gathered and scored (one transfer per block),
  and the accept/reject pass runs in order on the host over the gathered members.

Distances are float64 and thresholds are applied to logits and to ``sum_a lambda_a d_a^2 < ln 2``, so
the CPU (numpy) and CUDA (torch) paths give the same labels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from embedseg_service.core.device import resolve_device
from embedseg_service.core.inference.cluster_backends import NumpyOps, TorchOps
from embedseg_service.core.inference.cluster_greedy import (
    BLOCK_START,
    Greedy,
    SeedQueue,
    first_unclustered,
    next_block_size,
)
from embedseg_service.core.inference.cluster_index import LN2, CellIndex
from embedseg_service.core.model.embedding import normalize_step


def _logit(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    return math.log(p) - math.log1p(-p)


def _prepare(raw: np.ndarray | torch.Tensor, device: torch.device | str | None) -> tuple[Any, Any, tuple[int, ...]]:
    """Validate ``raw`` and return (ops, channels as (C, N), spatial shape)."""
    if isinstance(raw, np.ndarray):
        shape = raw.shape
        floating = np.issubdtype(raw.dtype, np.floating)
        dtype: np.dtype[Any] | torch.dtype = raw.dtype
    elif isinstance(raw, torch.Tensor):
        shape = tuple(raw.shape)
        floating = raw.is_floating_point()
        dtype = raw.dtype
    else:
        raise ValueError(f"raw must be a numpy array or a torch tensor, got {type(raw).__name__}")
    if not floating:
        raise ValueError(f"raw must hold floating-point values, got dtype {dtype}")
    if len(shape) in (4, 5) and shape[0] == 1 and shape[1] == 2 * (len(shape) - 2) + 1:
        raw = raw[0]
        shape = shape[1:]
    dims = len(shape) - 1
    if dims not in (2, 3) or shape[0] != 2 * dims + 1:
        raise ValueError(
            "raw must have shape (C, *spatial) or (1, C, *spatial) with 2 or 3 spatial axes and "
            f"C = 2 * spatial_dims + 1 (5 in 2D, 7 in 3D), got {tuple(shape)}"
        )
    spatial = tuple(int(n) for n in shape[1:])
    if any(n == 0 for n in spatial):
        raise ValueError(f"raw has an empty spatial axis: {tuple(shape)}")

    if device is not None:
        target = resolve_device(device)
    elif isinstance(raw, torch.Tensor):
        target = raw.device
    else:
        target = resolve_device("auto")
    if target.type == "cpu":
        if isinstance(raw, torch.Tensor):
            tensor = raw.detach().cpu()
            if tensor.dtype not in (torch.float16, torch.float32, torch.float64):
                tensor = tensor.to(torch.float32)
            raw = tensor.numpy()
        return NumpyOps(), np.ascontiguousarray(raw).reshape(shape[0], -1), spatial
    tensor = torch.as_tensor(raw).detach().to(target)
    return TorchOps(target), tensor.reshape(shape[0], -1), spatial


def cluster(
    raw: np.ndarray | torch.Tensor,
    *,
    step: float | Sequence[float],
    fg_thresh: float = 0.5,
    seed_thresh: float = 0.9,
    min_size: int = 36,
    min_mask_sum: int = 0,
    min_unclustered_sum: int = 0,
    max_radius: float | Sequence[float] | None = None,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Cluster a raw network output into instance labels.

    ``raw``: float array or tensor ``(C, *S)`` or ``(1, C, *S)`` with ``S = (Y, X)`` (C = 5) or
    ``(Z, Y, X)`` (C = 7); channels offsets x, y[, z], sigma x, y[, z], seed logit (the reference's
    layout and units). ``step``: embedding length of one pixel step per array axis (array order) or a
    scalar (the reference's ``pixel / (grid - 1)``). ``min_size``: a proposal needs more than this many
    pixels. ``min_mask_sum``: cluster only when the foreground has more pixels than this;
    ``min_unclustered_sum``: stop once this many or fewer foreground pixels are unclustered.
    ``max_radius``: pixels per array axis (or one for all); seeds whose Gaussian reaches farther are
    skipped (module docstring); ``None`` keeps the reference's procedure exactly.
    ``device``: where to compute (default: the input tensor's device; for numpy input CUDA when present).
    Returns int32 labels of shape ``S`` (0 = background, objects 1..K in order of discovery).
    Raises ``ValueError`` for a bad shape, dtype, threshold, or NaN offsets/sigma on the foreground.
    """
    if not 0.0 <= fg_thresh < 1.0:
        raise ValueError(f"fg_thresh must be in [0, 1), got {fg_thresh}")
    if not 0.0 <= seed_thresh < 1.0:
        raise ValueError(f"seed_thresh must be in [0, 1), got {seed_thresh}")
    for name, value in (
        ("min_size", min_size),
        ("min_mask_sum", min_mask_sum),
        ("min_unclustered_sum", min_unclustered_sum),
    ):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value}")
    xp, data, spatial = _prepare(raw, device)
    h = normalize_step(step, len(spatial))
    floor = None if max_radius is None else _sigma_floor(max_radius, h)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        labels = _cluster(
            xp,
            data,
            spatial,
            h,
            _logit(fg_thresh),
            _logit(seed_thresh),
            int(min_size),
            int(min_mask_sum),
            int(min_unclustered_sum),
            floor,
        )
    return labels.reshape(spatial)


def drop_fragments(labels: np.ndarray, min_size: int) -> np.ndarray:
    """``labels`` with every object of ``min_size`` pixels or fewer set to background (in place).

    :func:`cluster` checks a proposal's size when it is accepted, but a later proposal may overwrite
    most of an earlier object: the few pixels left of it are no object, and whether a pixel is
    overwritten can turn on float rounding, so such remnants would make labels differ between
    numerically equal predictions.
    """
    sizes = np.bincount(labels.ravel())
    small = np.flatnonzero((sizes > 0) & (sizes <= int(min_size)))
    small = small[small > 0]
    if small.size:
        labels[np.isin(labels, small)] = 0
    return labels


def _sigma_floor(max_radius: float | Sequence[float], h: tuple[float, ...]) -> tuple[float, ...]:
    """Smallest raw sigma per array axis whose radius ``sqrt(ln 2 / exp(10 sigma)) / h`` fits ``max_radius``."""
    given = tuple(float(r) for r in np.ravel(max_radius))
    radius = given * len(h) if np.ndim(max_radius) == 0 else given
    if len(radius) != len(h) or any(not (math.isfinite(r) and r > 0.0) for r in radius):
        raise ValueError(f"max_radius must be one positive pixel count or one per spatial axis ({len(h)}), "
                         f"got {max_radius}")  # fmt: skip
    return tuple((math.log(LN2) - 2.0 * math.log(r * step)) / 10.0 for r, step in zip(radius, h))


def _cluster(
    xp: Any,
    data: Any,
    spatial: tuple[int, ...],
    h: tuple[float, ...],
    fg_logit: float,
    seed_logit: float,
    min_size: int,
    min_mask_sum: int,
    min_unclustered_sum: int,
    sigma_floor: tuple[float, ...] | None = None,
) -> np.ndarray:
    """Flat int32 labels of ``prod(spatial)`` pixels from channels ``data`` (C, N) on ``xp``'s device."""
    dims = len(spatial)
    labels = np.zeros(int(np.prod(spatial)), dtype=np.int32)
    sigma = [data[2 * dims - 1 - a] for a in range(dims)]  # sigma channel of array axis a
    found = _foreground_and_candidates(
        xp, data[2 * dims], sigma, fg_logit, seed_logit, min_mask_sum, min_unclustered_sum, sigma_floor
    )
    if found is None:
        return labels
    fg_index, q_fg, cand = found
    index = CellIndex(xp, data, sigma, spatial, h, fg_index, cand)
    cand_host = xp.host(cand)
    queue = SeedQueue(cand_host, xp.host(q_fg[cand]).astype(np.float64))
    state = Greedy(int(fg_index.shape[0]), min_size, min_unclustered_sum)
    block_size = BLOCK_START
    while not state.done():
        block = queue.next_block(state.unclustered, block_size)
        if block is None:
            break
        centre, lam, r = index.seeds(xp.device(cand_host[block]))
        alive = first_unclustered(index.seed_distances(centre, lam))
        live = block[alive]
        keep = xp.device(np.flatnonzero(alive))
        take, counts, members = index.gather([v[keep] for v in centre], [v[keep] for v in lam], [v[keep] for v in r])
        state.accept(cand_host[live[:take]], counts, members)
        block_size = next_block_size(block_size, take, live.size, block.size)
    labels[xp.host(fg_index)] = state.labels_fg
    return labels


def _foreground_and_candidates(
    xp: Any,
    q_all: Any,
    sigma: list[Any],
    fg_logit: float,
    seed_logit: float,
    min_mask_sum: int,
    min_unclustered_sum: int,
    sigma_floor: tuple[float, ...] | None,
) -> tuple[Any, Any, Any] | None:
    """(F raster indices, seed logits on F, seed candidates as ascending F positions), or ``None`` when
    nothing is clustered: ``|F|`` at most ``min_mask_sum`` or ``min_unclustered_sum``, or no candidate."""
    fg_index = xp.nonzero(q_all > fg_logit)  # raster order
    n_fg = int(fg_index.shape[0])
    if n_fg <= min_mask_sum or n_fg <= min_unclustered_sum:
        return None
    q_fg = q_all[fg_index]
    cand = xp.nonzero(q_fg >= seed_logit)  # positions in F, ascending
    if sigma_floor is not None and int(cand.shape[0]):
        at = fg_index[cand]
        keep = None
        for s, low in zip(sigma, sigma_floor):
            ok = xp.f64(s[at]) >= low
            keep = ok if keep is None else keep & ok
        cand = cand[keep]
    if int(cand.shape[0]) == 0:
        return None
    return fg_index, q_fg, cand
