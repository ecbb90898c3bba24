"""Array operations of the greedy clustering, on the CPU with numpy or on a torch device.

Both backends offer the same methods, so the cell index
(:mod:`embedseg_service.core.inference.cluster_index`) runs unchanged on either; distances are formed
in float64 on both, so they give the same labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class NumpyOps:
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

    def repeat_values(self, values: np.ndarray, counts: np.ndarray, total: int) -> np.ndarray:  # noqa: ARG002 - backends share a signature
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


class TorchOps:
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

    def sort_ids(self, ids: torch.Tensor, n_cells: int) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ARG002 - backends share a signature
        return torch.sort(ids, stable=True)

    def median(self, x: torch.Tensor) -> float:
        return float(torch.quantile(x[: 1 << 20], 0.5))

    def host(self, x: torch.Tensor) -> np.ndarray:
        return x.cpu().numpy()

    def device(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).to(self.dev)
