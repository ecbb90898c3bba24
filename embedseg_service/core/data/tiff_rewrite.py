"""Rewrite a TIFF in canonical axis order in bounded memory (torch-free).

Used when the axes a file is read with (given explicitly) differ from those its own metadata
declares: the copy records the canonical axes, so it reads back the same without a hint.

Rule: a file whose pages are Y-X planes (in either order) is copied one plane at a time, so
memory holds one plane; any other stored order (Y and X before another axis) needs the whole
image in memory and is rewritten only up to :data:`WHOLE_REWRITE_BYTES`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from embedseg_service.core.data.io import open_tiff, read_tiff
from embedseg_service.core.data.tiff_errors import TiffUnsupported
from embedseg_service.core.data.tiff_pixels import plane_page, read_plane
from embedseg_service.core.data.tiff_write import write_tiff, write_tiff_planes

WHOLE_REWRITE_BYTES = 256 * 1024**2
"""Largest image (decoded bytes) rewritten in memory when its pages are not Y-X planes."""


def rewrite_canonical(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    axes: str,
    voxel_size: Sequence[float] | None = None,
    max_voxels: int | None = None,
) -> None:
    """Write the image of ``source``, whose stored axes are ``axes``, to ``target`` in canonical order with
    ``voxel_size`` (see the module docstring for memory). Raises a
    :class:`~embedseg_service.core.data.tiff_errors.TiffError` saying what is wrong."""
    with open_tiff(source, axes=axes, max_voxels=max_voxels) as (tif, layout):
        if plane_page(layout, 0, 0) is not None:
            canonical = layout.canonical
            shape = layout.canonical_shape
            write_tiff_planes(
                target,
                lambda c, z: read_plane(tif, layout, c, z),
                shape=shape,
                dtype=layout.dtype,
                axes=canonical,
                voxel_size=voxel_size,
            )
            return
        size = math.prod(layout.shape) * np.dtype(layout.dtype).itemsize
    if size > WHOLE_REWRITE_BYTES:
        raise TiffUnsupported(
            f"axes {axes.upper()} put Y and X before another stored axis; such a file is reordered only up to "
            f"{WHOLE_REWRITE_BYTES // 1024**2} MiB ({size} bytes here): save it with Y and X as its last axes"
        )
    volume = read_tiff(source, axes=axes, max_voxels=max_voxels)
    write_tiff(target, volume.data, axes=volume.axes, voxel_size=voxel_size)
