"""One rule for the axes of a volume: database rows and TIFF readers agree on spatial shape and channels."""

from __future__ import annotations

import numpy as np
import pytest

from embedseg_service.core.data.io import TiffInfo
from embedseg_service.records.orm import Volume

LAYOUTS = [
    # shape, axes, spatial shape, channels
    ((64, 48), "YX", [64, 48], 1),
    ((7, 64, 48), "ZYX", [7, 64, 48], 1),
    ((2, 64, 48), "CYX", [64, 48], 2),
    ((3, 7, 64, 48), "CZYX", [7, 64, 48], 3),
    ((1, 7, 64, 48), "CZYX", [7, 64, 48], 1),
]


@pytest.mark.parametrize(("shape", "axes", "spatial", "channels"), LAYOUTS)
def test_volume_row_and_tiff_info_share_the_axis_rule(
    shape: tuple[int, ...], axes: str, spatial: list[int], channels: int
) -> None:
    row = Volume(
        name="v",
        sha256="0" * 64,
        shape=list(shape),
        dtype="uint16",
        axes=axes,
        size_bytes=1,
        storage_key="volumes/v.tif",
    )
    info = TiffInfo(shape=shape, axes=axes, dtype=np.dtype("uint16"), voxel_size=None)
    assert row.spatial_shape == spatial and row.n_channels == channels
    assert list(info.spatial_shape) == spatial and info.n_channels == channels
    assert info.spatial_dims == len(spatial)
