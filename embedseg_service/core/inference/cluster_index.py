"""Embedding-space cell index over the foreground, for the proposals of the greedy clustering.

A seed's proposal lies inside its box ``|e_a - c_a| < sqrt(ln 2 / lambda_a)``; the index sorts the
foreground by cell so that each box is read as a few contiguous runs (module docstring of
:mod:`embedseg_service.core.inference.clustering`).
"""

from __future__ import annotations

import math
import operator
from functools import reduce
from typing import Any

import numpy as np

LN2 = math.log(2.0)
_PAIR_BUDGET = 1 << 21  # candidate-pixel pairs scored per block
_MAX_RUNS = 64  # cell runs per candidate box before a full foreground scan is used instead
_MAX_CELLS_PER_AXIS = 1 << 12


class CellIndex:
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
            coord = xp.minimum(
                xp.maximum(xp.i64(xp.floor((emb[a] - self.e_min[a]) / self.cell[a])), 0), self.n_cells[a] - 1
            )
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
        r = [xp.minimum(xp.sqrt(LN2 / v) * (1.0 + 1e-9) + 1e-12, 2.0 * ext + 1.0) for v, ext in zip(lam, self.extent)]
        return centre, lam, r

    def seed_distances(self, centre: list[Any], lam: list[Any]) -> np.ndarray:
        """``inside[k, i]``: seed i lies in the proposal of seed k (same arithmetic as ``gather``)."""

        def term(a: int) -> Any:
            diff = centre[a][None, :] - centre[a][:, None]
            return lam[a][:, None] * (diff * diff)

        d2 = reduce(operator.add, (term(a) for a in range(self.dims)))  # axes summed in order
        return self.xp.host(d2 < LN2)

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

        def term(a: int) -> Any:
            diff = self.emb_by_cell[a][pair_pos] - xp.repeat_values(centre[a][run_owner], length, n_pairs)
            return xp.repeat_values(lam[a][run_owner], length, n_pairs) * (diff * diff)

        d2 = reduce(operator.add, (term(a) for a in range(self.dims)))  # same order as seed_distances
        inside = d2 < LN2
        counts = xp.bincount(owner[inside], take)
        return take, xp.host(counts), xp.host(self.by_cell[pair_pos[inside]])
