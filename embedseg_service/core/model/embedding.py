"""Coordinate map and pixel embeddings (docs/method.md §3).

The embedding of pixel i is ``e_i = tanh(o_i) + c(i)`` where ``c(i)_a = index_a(i) * h_a``.
``h`` (the *step*) is the embedding length of one pixel step per axis.

Conventions used everywhere in :mod:`core`:

* ``step`` is given in **array axis order**: ``(h_y, h_x)`` in 2D, ``(h_z, h_y, h_x)`` in 3D
  (a scalar means the same step on every axis).
* vector channels of the network output (offsets, sigma, embeddings, centres in embedding
  space) run **x, y[, z]**, the reverse of array order, as in the reference implementation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

DEFAULT_STEP = 1.0 / 1023.0
"""Step of the Y and X axes: the reference's default grid of 1024 on a 1-unit extent."""


def normalize_step(step: float | Sequence[float], spatial_dims: int) -> tuple[float, ...]:
    """Return ``step`` as a tuple of ``spatial_dims`` positive floats in array order."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if isinstance(step, (int, float)):
        values = (float(step),) * spatial_dims
    else:
        values = tuple(float(s) for s in step)
        if len(values) != spatial_dims:
            raise ValueError(f"step needs {spatial_dims} values (one per array axis), got {len(values)}: {values}")
    if any(not (v > 0) for v in values):
        raise ValueError(f"step values must be positive, got {values}")
    return values


def step_for(spatial_dims: int, anisotropy: float = 1.0) -> tuple[float, ...]:
    """Default step in array order: ``h_y = h_x = 1/1023`` and ``h_z = anisotropy * h_x``."""
    if spatial_dims == 2:
        return (DEFAULT_STEP, DEFAULT_STEP)
    return (anisotropy * DEFAULT_STEP, DEFAULT_STEP, DEFAULT_STEP)


def step_from_reference(grid: Sequence[int], pixel: Sequence[float]) -> tuple[float, ...]:
    """Convert the reference's ``grid``/``pixel`` settings (x, y[, z] order) to a step in array order."""
    if len(grid) != len(pixel):
        raise ValueError("grid and pixel need the same number of axes")
    xyz = [float(p) / (int(g) - 1) for g, p in zip(grid, pixel)]
    return tuple(reversed(xyz))


def coordinate_map(
    spatial_shape: Sequence[int],
    step: float | Sequence[float],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Coordinates of every pixel, shape ``(D, *spatial_shape)``, channels x, y[, z].

    ``c[a][i] = index_a(i) * h_a``; index 0 is the first pixel of ``spatial_shape``.
    """
    dims = len(spatial_shape)
    h = normalize_step(step, dims)
    axes = [torch.arange(n, device=device, dtype=dtype) * h[a] for a, n in enumerate(spatial_shape)]
    grids = torch.meshgrid(*axes, indexing="ij")  # array order
    return torch.stack(list(reversed(grids)), dim=0)


def pixel_embeddings(offsets: torch.Tensor, step: float | Sequence[float]) -> torch.Tensor:
    """Embeddings ``tanh(offsets) + c`` for raw offsets of shape ``(B, D, *S)``, channels x, y[, z]."""
    dims = offsets.shape[1]
    if offsets.dim() != dims + 2:
        raise ValueError(f"offsets must have shape (B, D, *spatial) with D spatial axes, got {tuple(offsets.shape)}")
    coords = coordinate_map(offsets.shape[2:], step, device=offsets.device, dtype=offsets.dtype)
    return torch.tanh(offsets) + coords.unsqueeze(0)
