"""Greedy seed clustering of EmbedSeg raw outputs into instance labels (method.md §6).

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
from embedseg_service.core.model.embedding import normalize_step

_LN2 = math.log(2.0)
_PAIR_BUDGET = 1 << 21  # candidate-pixel pairs scored per block
_MAX_RUNS = 64  # cell runs per candidate box before a full foreground scan is used instead
_MAX_CELLS_PER_AXIS = 1 << 12
_BLOCK_MIN, _BLOCK_START, _BLOCK_MAX = 32, 256, 1024
_SORT_AFTER_BLOCKS = 4


def _logit(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    return math.log(p) - math.log1p(-p)


class _NumpyOps:
    """Array operations on the CPU with numpy."""

    def nonzero(self, mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask)

    def f64(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    def i64(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x).astype(np.int64)

    tanh = staticmethod(np.tanh)
    exp = staticmethod(np.exp)
    sqrt = staticmethod(np.sqrt)
    floor = staticmethod(np.floor)
    minimum = staticmethod(np.minimum)
    maximum = staticmethod(np.maximum)
    where = staticmethod(np.where)
    cumsum = staticmethod(np.cumsum)

    def any_nan(self, x: np.ndarray) -> bool:
        return bool(np.isnan(x).any())

    def arange(self, n: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64)

    def repeat(self, counts: np.ndarray) -> np.ndarray:
        return np.repeat(np.arange(counts.shape[0], dtype=np.int64), counts)

    def repeat_values(self, values: np.ndarray, counts: np.ndarray, total: int) -> np.ndarray:
        return np.repeat(values, counts)

    def unravel(self, index: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
        return np.unravel_index(index, shape)

    def searchsorted(self, a: np.ndarray, v: np.ndarray, right: bool = False) -> np.ndarray:
        return np.searchsorted(a, v, side="right" if right else "left")

    def bincount(self, x: np.ndarray, n: int) -> np.ndarray:
        return np.bincount(x, minlength=n)

    def segment_sum(self, index: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
        return np.bincount(index, weights=values, minlength=n).astype(np.int64)

    def sort_ids(self, ids: np.ndarray, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
        key = ids.astype(np.uint16) if n_cells <= 1 << 16 else ids  # radix sort for small keys
        order = np.argsort(key, kind="stable")
        return ids[order], order

    def median(self, x: np.ndarray) -> float:
        return float(np.median(x))

    def host(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def device(self, x: np.ndarray) -> np.ndarray:
        return x


class _TorchOps:
    """The same operations with torch on one device (used for CUDA)."""

    def __init__(self, device: torch.device) -> None:
        self.dev = device

    def nonzero(self, mask: torch.Tensor) -> torch.Tensor:
        return torch.nonzero(mask).squeeze(1)

    def f64(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float64)

    def i64(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.int64)

    tanh = staticmethod(torch.tanh)
    exp = staticmethod(torch.exp)
    sqrt = staticmethod(torch.sqrt)
    floor = staticmethod(torch.floor)
    where = staticmethod(torch.where)

    def minimum(self, a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
        return torch.minimum(a, b) if isinstance(b, torch.Tensor) else torch.clamp(a, max=b)

    def maximum(self, a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
        return torch.maximum(a, b) if isinstance(b, torch.Tensor) else torch.clamp(a, min=b)

    def cumsum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(x, 0)

    def any_nan(self, x: torch.Tensor) -> bool:
        return bool(torch.isnan(x).any())

    def arange(self, n: int) -> torch.Tensor:
        return torch.arange(n, dtype=torch.int64, device=self.dev)

    def repeat(self, counts: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(counts.shape[0], device=self.dev), counts)

    def repeat_values(self, values: torch.Tensor, counts: torch.Tensor, total: int) -> torch.Tensor:
        return torch.repeat_interleave(values, counts, output_size=total)

    def unravel(self, index: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        return torch.unravel_index(index, shape)

    def searchsorted(self, a: torch.Tensor, v: torch.Tensor, right: bool = False) -> torch.Tensor:
        return torch.searchsorted(a, v, right=right)

    def bincount(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return torch.bincount(x, minlength=n)

    def segment_sum(self, index: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.int64, device=self.dev).index_add_(0, index, values)

    def sort_ids(self, ids: torch.Tensor, n_cells: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sort(ids, stable=True)

    def median(self, x: torch.Tensor) -> float:
        return float(torch.quantile(x[: 1 << 20], 0.5))

    def host(self, x: torch.Tensor) -> np.ndarray:
        return x.cpu().numpy()

    def device(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(self.dev)


def _prepare(raw: np.ndarray | torch.Tensor, device: torch.device | str | None) -> tuple[Any, Any, tuple[int, ...]]:
    """Validate ``raw`` and return (ops, channels as (C, N), spatial shape)."""
    if isinstance(raw, np.ndarray):
        shape = raw.shape
        floating = np.issubdtype(raw.dtype, np.floating)
        dtype = raw.dtype
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
        return _NumpyOps(), np.ascontiguousarray(raw).reshape(shape[0], -1), spatial
    tensor = torch.as_tensor(raw).detach().to(target)
    return _TorchOps(target), tensor.reshape(shape[0], -1), spatial


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
    for name, value in (("min_size", min_size), ("min_mask_sum", min_mask_sum),
                        ("min_unclustered_sum", min_unclustered_sum)):
        if int(value) != value or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value}")
    xp, data, spatial = _prepare(raw, device)
    h = normalize_step(step, len(spatial))
    floor = None if max_radius is None else _sigma_floor(max_radius, h)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        labels = _cluster(xp, data, spatial, h, _logit(fg_thresh), _logit(seed_thresh),
                          int(min_size), int(min_mask_sum), int(min_unclustered_sum), floor)
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
    radius = (float(max_radius),) * len(h) if np.ndim(max_radius) == 0 else tuple(float(r) for r in max_radius)
    if len(radius) != len(h) or any(not (math.isfinite(r) and r > 0.0) for r in radius):
        raise ValueError(f"max_radius must be one positive pixel count or one per spatial axis ({len(h)}), "
                         f"got {max_radius}")  # fmt: skip
    return tuple((math.log(_LN2) - 2.0 * math.log(r * step)) / 10.0 for r, step in zip(radius, h))


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
    found = _foreground_and_candidates(xp, data[2 * dims], sigma, fg_logit, seed_logit,
                                       min_mask_sum, min_unclustered_sum, sigma_floor)
    if found is None:
        return labels
    fg_index, q_fg, cand = found
    index = _CellIndex(xp, data, sigma, spatial, h, fg_index, cand)
    cand_host = xp.host(cand)
    queue = _SeedQueue(cand_host, xp.host(q_fg[cand]).astype(np.float64))
    state = _Greedy(int(fg_index.shape[0]), min_size, min_unclustered_sum)
    block_size = _BLOCK_START
    while not state.done():
        block = queue.next_block(state.unclustered, block_size)
        if block is None:
            break
        centre, lam, r = index.seeds(xp.device(cand_host[block]))
        alive = _first_unclustered(index.seed_distances(centre, lam))
        live = block[alive]
        keep = xp.device(np.flatnonzero(alive))
        take, counts, members = index.gather([v[keep] for v in centre], [v[keep] for v in lam], [v[keep] for v in r])
        state.accept(cand_host[live[:take]], counts, members)
        block_size = _next_block_size(block_size, take, live.size, block.size)
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


class _CellIndex:
    """Float64 embeddings of F and an embedding-space cell index over them, on ``xp``'s device."""

    def __init__(
        self,
        xp: Any,
        data: Any,
        sigma: list[Any],
        spatial: tuple[int, ...],
        h: tuple[float, ...],
        fg_index: Any,
        cand: Any,
    ) -> None:
        dims = len(spatial)
        self.xp, self.sigma, self.fg_index, self.dims = xp, sigma, fg_index, dims
        self.n_fg = int(fg_index.shape[0])
        # embeddings of F per array axis, float64: tanh(offset) + index * h
        index = xp.unravel(fg_index, spatial)
        emb = [xp.tanh(xp.f64(data[dims - 1 - a][fg_index])) + xp.f64(index[a]) * h[a] for a in range(dims)]
        if any(xp.any_nan(e) for e in emb):
            raise ValueError("raw contains NaN offsets on foreground pixels")
        self.emb = emb
        self.e_min = [float(e.min()) for e in emb]
        self.extent = [max(float(e.max()) - m, 0.0) for e, m in zip(emb, self.e_min)]
        n_cand = int(cand.shape[0])
        sample_r = self.seeds(cand[:: max(1, n_cand // 4096)])[2]
        self.cell = [max(xp.median(r), ext / _MAX_CELLS_PER_AXIS, 1e-12) for r, ext in zip(sample_r, self.extent)]
        self.n_cells = [min(int(ext // c) + 1, _MAX_CELLS_PER_AXIS + 1) for ext, c in zip(self.extent, self.cell)]
        self.strides = [1] * dims
        for a in range(dims - 2, -1, -1):
            self.strides[a] = self.strides[a + 1] * self.n_cells[a + 1]
        cell_id = None
        for a in range(dims):
            coord = xp.minimum(xp.maximum(xp.i64(xp.floor((emb[a] - self.e_min[a]) / self.cell[a])), 0),
                               self.n_cells[a] - 1)
            cell_id = coord * self.strides[a] if cell_id is None else cell_id + coord * self.strides[a]
        self.sorted_ids, self.by_cell = xp.sort_ids(cell_id, self.strides[0] * self.n_cells[0])
        self.emb_by_cell = [e[self.by_cell] for e in emb]  # embeddings in cell order: boxes read contiguous runs

    def seeds(self, pos: Any) -> tuple[list[Any], list[Any], list[Any]]:
        """Centres, precisions and box half-widths of seeds at F positions ``pos``."""
        xp = self.xp
        centre = [e[pos] for e in self.emb]
        lam = [xp.exp(xp.f64(s[self.fg_index[pos]]) * 10.0) for s in self.sigma]
        if any(xp.any_nan(v) for v in lam):
            raise ValueError("raw contains NaN sigma on foreground pixels")
        # half-widths of the box holding every pixel with sum_a lam_a d_a^2 < ln 2 (with a safety margin)
        r = [xp.minimum(xp.sqrt(_LN2 / v) * (1.0 + 1e-9) + 1e-12, 2.0 * ext + 1.0) for v, ext in zip(lam, self.extent)]
        return centre, lam, r

    def seed_distances(self, centre: list[Any], lam: list[Any]) -> np.ndarray:
        """``inside[k, i]``: seed i lies in the proposal of seed k (same arithmetic as ``gather``)."""
        d2 = None
        for a in range(self.dims):
            diff = centre[a][None, :] - centre[a][:, None]
            term = lam[a][:, None] * (diff * diff)
            d2 = term if d2 is None else d2 + term
        return self.xp.host(d2 < _LN2)

    def box_runs(self, centre: list[Any], r: list[Any]) -> tuple[Any, Any, Any, Any]:
        """Contiguous runs of the cell-ordered F covering each seed's box (the whole of F for a box with more
        than ``_MAX_RUNS`` runs): (runs per seed, owning seed, start and length of each run)."""
        xp, dims = self.xp, self.dims
        lo, hi, width = [], [], []
        for a in range(dims):
            lo_a = xp.maximum(xp.i64(xp.floor((centre[a] - r[a] - self.e_min[a]) / self.cell[a])), 0)
            hi_a = xp.minimum(xp.i64(xp.floor((centre[a] + r[a] - self.e_min[a]) / self.cell[a])), self.n_cells[a] - 1)
            lo.append(lo_a)
            hi.append(hi_a)
            width.append(hi_a - lo_a + 1)
        rp = width[0]  # cell runs per box: one per cell of the leading axes
        for a in range(1, dims - 1):
            rp = rp * width[a]
        full_scan = rp > _MAX_RUNS
        rp = xp.where(full_scan, rp * 0 + 1, rp)
        run_owner = xp.repeat(rp)
        k = xp.arange(int(run_owner.shape[0])) - (xp.cumsum(rp) - rp)[run_owner]
        base = k * 0
        for a in range(dims - 2, -1, -1):  # unravel k over the leading axes of the box
            w = width[a][run_owner]
            base = base + (lo[a][run_owner] + k % w) * self.strides[a]
            k = k // w
        start = xp.searchsorted(self.sorted_ids, base + lo[dims - 1][run_owner])
        stop = xp.searchsorted(self.sorted_ids, base + hi[dims - 1][run_owner], right=True)
        fs = full_scan[run_owner]
        start = xp.where(fs, start * 0, start)
        stop = xp.where(fs, stop * 0 + self.n_fg, stop)
        return rp, run_owner, start, stop - start

    def gather(self, centre: list[Any], lam: list[Any], r: list[Any]) -> tuple[int, np.ndarray, np.ndarray]:
        """Proposals of the first seeds (given by centre, precision, box half-width) whose boxes fit the
        pair budget: (how many, member counts, member F positions grouped by seed)."""
        xp = self.xp
        nb = int(centre[0].shape[0])
        rp, run_owner, start, length = self.box_runs(centre, r)
        pop = xp.host(xp.segment_sum(run_owner, length, nb))
        take = max(1, int(np.searchsorted(np.cumsum(pop), _PAIR_BUDGET, side="right")))
        if take < nb:
            n_runs = int(xp.host(rp)[:take].sum())
            run_owner, start, length = run_owner[:n_runs], start[:n_runs], length[:n_runs]
        # positions in cell order of every (seed, pixel-in-box) pair, grouped by seed
        n_pairs = int(xp.host(length.sum()))
        pair_pos = xp.arange(n_pairs) + xp.repeat_values(start - (xp.cumsum(length) - length), length, n_pairs)
        owner = xp.repeat_values(run_owner, length, n_pairs)
        d2 = None
        for a in range(self.dims):  # fixed summation order, as in seed_distances
            diff = self.emb_by_cell[a][pair_pos] - xp.repeat_values(centre[a][run_owner], length, n_pairs)
            term = xp.repeat_values(lam[a][run_owner], length, n_pairs) * (diff * diff)
            d2 = term if d2 is None else d2 + term
        inside = d2 < _LN2
        counts = xp.bincount(owner[inside], take)
        return take, xp.host(counts), xp.host(self.by_cell[pair_pos[inside]])


class _SeedQueue:
    """Seed candidates in order (logit descending, raster index ascending), served lazily in blocks."""

    def __init__(self, cand: np.ndarray, q_cand: np.ndarray) -> None:
        self.cand, self.q_cand = cand, q_cand  # F positions and float64 seed logits of the candidates
        self.remaining = np.arange(q_cand.size)  # candidate ids not yet resolved
        self.is_sorted = False
        self.n_blocks = 0

    def next_block(self, unclustered: np.ndarray, block_size: int) -> np.ndarray | None:
        """The next ``block_size`` candidate ids whose pixels are still ``unclustered`` (a mask over F), in
        order; ``None`` when none is left."""
        remaining = self.remaining = self.remaining[unclustered[self.cand[self.remaining]]]
        if remaining.size == 0:
            return None
        q_cand = self.q_cand
        if not self.is_sorted and (remaining.size <= block_size or self.n_blocks >= _SORT_AFTER_BLOCKS):
            remaining = self.remaining = remaining[np.argsort(-q_cand[remaining], kind="stable")]
            self.is_sorted = True
        if self.is_sorted:
            block = remaining[:block_size]
        else:  # top block_size by (q descending, index ascending) without sorting everything
            q_rem = q_cand[remaining]
            kth = np.partition(q_rem, q_rem.size - block_size)[q_rem.size - block_size]
            top = remaining[q_rem >= kth]
            block = top[np.argsort(-q_cand[top], kind="stable")][:block_size]
        self.n_blocks += 1
        return block


def _first_unclustered(inside: np.ndarray) -> np.ndarray:
    """Which seeds of a block are still unclustered on their turn, given ``inside[k, i]`` (seed i lies in
    seed k's proposal): those in no proposal of an earlier such seed."""
    alive = np.ones(inside.shape[0], dtype=bool)
    for k in range(inside.shape[0] - 1):
        if alive[k]:
            alive[k + 1:] &= ~inside[k, k + 1:]
    return alive


def _next_block_size(block_size: int, take: int, n_live: int, n_block: int) -> int:
    """Grow the block when all its live seeds fit one gather and most were live; shrink it when few were."""
    if take == n_live and 2 * n_live > n_block:
        return min(2 * block_size, _BLOCK_MAX)
    if 8 * n_live < n_block:
        return max(block_size // 2, _BLOCK_MIN)
    return block_size


class _Greedy:
    """Host-side state of the greedy pass over F: unclustered pixels, labels, next object id."""

    def __init__(self, n_fg: int, min_size: int, min_unclustered_sum: int) -> None:
        self.min_size, self.min_unclustered_sum = min_size, min_unclustered_sum
        self.unclustered = np.ones(n_fg, dtype=bool)
        self.n_unclustered = n_fg
        self.labels_fg = np.zeros(n_fg, dtype=np.int32)
        self.next_id = 1

    def done(self) -> bool:
        """Whether few enough foreground pixels are unclustered to stop."""
        return self.n_unclustered <= self.min_unclustered_sum

    def accept(self, seeds: np.ndarray, counts: np.ndarray, members: np.ndarray) -> None:
        """Run the accept/reject step, in order, for seeds (F positions) whose proposals are ``members``
        grouped by seed with ``counts`` members each."""
        unclustered = self.unclustered
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for j in range(seeds.size):
            if self.done():
                break
            unclustered[seeds[j]] = False
            self.n_unclustered -= 1
            prop = members[bounds[j]:bounds[j + 1]]
            fresh = int(np.count_nonzero(unclustered[prop]))
            if prop.size > self.min_size and 2 * fresh > prop.size:
                self.labels_fg[prop] = self.next_id
                self.next_id += 1
            unclustered[prop] = False
            self.n_unclustered -= fresh
