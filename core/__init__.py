"""EmbedSeg instance segmentation (2D and 3D) in numpy + torch.

Importing :mod:`core` is cheap: torch is only imported when a torch-backed name is used,
so the HTTP front end can use :mod:`core.io` without loading torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["cluster"]


def __getattr__(name: str) -> Any:
    if name == "cluster":
        from core.clustering import cluster

        return cluster
    raise AttributeError(f"module 'core' has no attribute {name!r}")
