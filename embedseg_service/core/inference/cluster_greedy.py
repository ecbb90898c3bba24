"""The greedy pass of the clustering on the host: seed order, blocks of seeds and the accept/reject step."""

from __future__ import annotations

import numpy as np

_BLOCK_MIN, BLOCK_START, _BLOCK_MAX = 32, 256, 1024
_SORT_AFTER_BLOCKS = 4


class SeedQueue:
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


def first_unclustered(inside: np.ndarray) -> np.ndarray:
    """Which seeds of a block are still unclustered on their turn, given ``inside[k, i]`` (seed i lies in
    seed k's proposal): those in no proposal of an earlier such seed."""
    alive = np.ones(inside.shape[0], dtype=bool)
    for k in range(inside.shape[0] - 1):
        if alive[k]:
            alive[k + 1 :] &= ~inside[k, k + 1 :]
    return alive


def next_block_size(block_size: int, take: int, n_live: int, n_block: int) -> int:
    """Grow the block when all its live seeds fit one gather and most were live; shrink it when few were."""
    if take == n_live and 2 * n_live > n_block:
        return min(2 * block_size, _BLOCK_MAX)
    if 8 * n_live < n_block:
        return max(block_size // 2, _BLOCK_MIN)
    return block_size


class Greedy:
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
            prop = members[bounds[j] : bounds[j + 1]]
            fresh = int(np.count_nonzero(unclustered[prop]))
            if prop.size > self.min_size and 2 * fresh > prop.size:
                self.labels_fg[prop] = self.next_id
                self.next_id += 1
            unclustered[prop] = False
            self.n_unclustered -= fresh
