"""Axis-aligned training augmentation (docs/method.md §9): rot90 in YX × Y flip (× Z flip in 3D).

A :class:`Transform` acts on arrays whose last ``D`` axes are spatial (any leading axes, e.g.
channels, are left alone) and on points in array-order pixel coordinates, so that an image,
its labels, its ignore mask and its object centres move together. The forward order is: rotate
``k`` quarter turns in the (Y, X) plane (as ``numpy.rot90(a, k, axes=(-2, -1))``), then flip Y,
then flip Z (3D). Z never moves into YX.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Transform:
    """``k`` quarter turns in YX, then optional flips of Y and (3D) Z."""

    k: int = 0
    flip_y: bool = False
    flip_z: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", int(self.k) % 4)

    def spatial_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape after the transform of an array of spatial ``shape``."""
        shape = tuple(int(s) for s in shape)
        if self.k % 2:
            return shape[:-2] + (shape[-1], shape[-2])
        return shape

    def apply(self, array: np.ndarray, spatial_dims: int) -> np.ndarray:
        """Transform ``array`` whose last ``spatial_dims`` axes are (Z,) Y, X; returns a contiguous copy."""
        if spatial_dims not in (2, 3) or array.ndim < spatial_dims:
            raise ValueError(f"cannot transform an array of shape {array.shape} with {spatial_dims} spatial axes")
        out = np.rot90(array, self.k, axes=(-2, -1)) if self.k else array
        if self.flip_y:
            out = np.flip(out, axis=-2)
        if self.flip_z and spatial_dims == 3:
            out = np.flip(out, axis=-3)
        return np.ascontiguousarray(out)

    def apply_points(self, points: np.ndarray, spatial_shape: Sequence[int]) -> np.ndarray:
        """Move points (K, D) (array-order pixel coordinates in an image of ``spatial_shape``) with the image."""
        pts = np.array(points, dtype=np.float64, copy=True).reshape(-1, len(spatial_shape))
        height, width = int(spatial_shape[-2]), int(spatial_shape[-1])
        for _ in range(self.k):  # one quarter turn: (y, x) -> (W - 1 - x, y), shape (H, W) -> (W, H)
            y, x = pts[:, -2].copy(), pts[:, -1].copy()
            pts[:, -2], pts[:, -1] = width - 1 - x, y
            height, width = width, height
        if self.flip_y:
            pts[:, -2] = height - 1 - pts[:, -2]
        if self.flip_z and len(spatial_shape) == 3:
            pts[:, 0] = int(spatial_shape[0]) - 1 - pts[:, 0]
        return pts


def all_transforms(spatial_dims: int) -> list[Transform]:
    """The 8 (2D) or 16 (3D) transforms of the group."""
    z_flips = (False, True) if spatial_dims == 3 else (False,)
    return [Transform(k, fy, fz) for fz in z_flips for fy in (False, True) for k in range(4)]


def random_transform(rng: np.random.Generator, spatial_dims: int, *, square: bool = True) -> Transform:
    """A uniformly drawn transform; ``square=False`` (Y and X of different length) keeps ``k`` even
    so that crops of one batch keep their shape."""
    k = int(rng.integers(4)) if square else 2 * int(rng.integers(2))
    flip_y = bool(rng.integers(2))
    flip_z = bool(rng.integers(2)) if spatial_dims == 3 else False
    return Transform(k, flip_y, flip_z)
