"""Candidate (object, pixel) pairs of the Lovász term and the oracle IoU.

The batch is cut into pixel tiles, each with the bounding box of its embeddings; an object is tested
only against the tiles whose box gets close enough to its centre, and the pairs are scored chunk by
chunk of objects (module docstring of :mod:`embedseg_service.core.training.loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from embedseg_service.core.training.batch_objects import BatchObjects

DEFAULT_PAIRS_PER_CHUNK = 1 << 22
"""(object, pixel) candidates scored at once; bounds the loss's working memory (~100 bytes each)."""


BOX_MARGIN = 2.0
"""Extra exponent on top of rounding limits, so that φ computed beyond a bound is far below the limit."""

_TILE = {2: (8, 8), 3: (4, 8, 8)}
"""Pixel tiles (array order) whose embedding bounding boxes limit the candidate pairs."""

_HIT_BLOCK = 1 << 22
"""(object, tile) tests done at once."""


@dataclass
class PixelTiles:
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


def tile_batch(emb: torch.Tensor, objs: BatchObjects) -> PixelTiles:
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
    return PixelTiles(
        emb=tiled.reshape(dims, batch * n_tiles, -1),
        pixel=_tile_major(index, tile, -1).reshape(batch * n_tiles, -1),
        owner=_tile_major(owner, tile, -2).reshape(batch * n_tiles, -1),
        low=low.reshape(dims, batch, n_tiles),
        high=high.reshape(dims, batch, n_tiles),
    )


def tile_hits(
    objs: BatchObjects, tiles: PixelTiles, lam: torch.Tensor, bound: float | torch.Tensor
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


def tile_scores(
    tiles: PixelTiles, lam: torch.Tensor, centers: torch.Tensor, obj: torch.Tensor, rows: torch.Tensor
) -> torch.Tensor:
    """``t = Σ_a λ_{k,a} (e_{i,a} − C_{k,a})²`` (H, P_tile) for pixels ``i`` of tile row ``rows[h]``, ``k = obj[h]``."""

    def term(a: int) -> torch.Tensor:
        d = tiles.emb[a].index_select(0, rows)
        d.sub_(centers[:, a].index_select(0, obj).unsqueeze(1))
        return d.mul_(d).mul_(lam[:, a].index_select(0, obj).unsqueeze(1))

    t = term(0)
    for a in range(1, tiles.emb.shape[0]):
        t.add_(term(a))
    return t


def object_chunks(sizes: torch.Tensor, budget: int) -> list[tuple[int, int]]:
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


def pair_scores(
    emb: torch.Tensor, lam: torch.Tensor, centers: torch.Tensor, obj: torch.Tensor, pix: torch.Tensor
) -> torch.Tensor:
    """``t = Σ_a λ_{k,a} (e_{i,a} − C_{k,a})²`` (P,) for pairs (k, i) = (obj, pix); ``emb`` is (D, B*N)."""

    def term(a: int) -> torch.Tensor:
        d = emb[a].index_select(0, pix) - centers[:, a].index_select(0, obj)
        return d * d * lam[:, a].index_select(0, obj)

    t = term(0)
    for a in range(1, emb.shape[0]):
        t = t + term(a)
    return t
