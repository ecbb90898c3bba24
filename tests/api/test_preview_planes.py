"""XZ and YZ previews of 3D volumes: the plane through a row or column (default the centre), rows along Z
scaled by the voxel size, labels overlaid; the option errors (bounded reads: tests/api/test_preview_bounds.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from helpers import tiff_bytes, upload
from PIL import Image

from embedseg_service.api.preview import label_colours

V = "/api/v1/volumes"


def _png(response) -> np.ndarray:  # type: ignore[no-untyped-def]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def _volume() -> np.ndarray:
    """(5, 16, 24) uint16: 0 or 1000 in a pattern that differs along every axis."""
    z, y, x = np.meshgrid(np.arange(5), np.arange(16), np.arange(24), indexing="ij")
    return np.where((z + 2 * y + 3 * x) % 7 < 3, 1000, 0).astype(np.uint16)


def _labels() -> np.ndarray:
    labels = np.zeros((5, 16, 24), np.uint16)
    labels[1:4, 2:9, 3:10] = 4
    labels[0:2, 10:15, 12:20] = 11
    return labels


def _coloured(labels: np.ndarray) -> np.ndarray:
    """The labels-only preview of a plane: each object in its colour, black background."""
    ids, inverse = np.unique(labels, return_inverse=True)
    rgb = label_colours(ids)[inverse.reshape(labels.shape)]
    rgb[labels == 0] = 0
    return rgb


def test_xz_and_yz_planes_hold_the_rows_and_columns_through_the_volume(client) -> None:  # type: ignore[no-untyped-def]
    data = _volume()
    volume = upload(client, tiff_bytes(data), axes="ZYX").json()["id"]
    xz = _png(client.get(f"{V}/{volume}/preview.png", params={"plane": "xz", "y": 3}))
    assert xz.shape == (5, 24, 3)  # no voxel size: isotropic
    np.testing.assert_array_equal(xz[..., 0], np.where(data[:, 3, :] > 0, 255, 0))
    yz = _png(client.get(f"{V}/{volume}/preview.png", params={"plane": "yz", "x": 17}))
    assert yz.shape == (5, 16, 3)
    np.testing.assert_array_equal(yz[..., 0], np.where(data[:, :, 17] > 0, 255, 0))
    # without an index: through the centre
    np.testing.assert_array_equal(
        _png(client.get(f"{V}/{volume}/preview.png", params={"plane": "xz"}))[..., 0],
        np.where(data[:, 8, :] > 0, 255, 0),
    )
    np.testing.assert_array_equal(
        _png(client.get(f"{V}/{volume}/preview.png", params={"plane": "yz"}))[..., 0],
        np.where(data[:, :, 12] > 0, 255, 0),
    )
    # the XY plane is as before
    assert _png(client.get(f"{V}/{volume}/preview.png", params={"plane": "xy"})).shape == (16, 24, 3)


def test_rows_along_z_are_scaled_by_the_voxel_size(client) -> None:  # type: ignore[no-untyped-def]
    data = _volume()
    volume = upload(client, tiff_bytes(data), axes="ZYX", voxel_size="2.0,0.25,0.5").json()["id"]
    xz = _png(client.get(f"{V}/{volume}/preview.png", params={"plane": "xz", "y": 5}))
    assert xz.shape == (20, 24, 3)  # 5 slices of 2.0 over columns of 0.5
    np.testing.assert_array_equal(xz[..., 0], np.repeat(np.where(data[:, 5, :] > 0, 255, 0), 4, axis=0))
    yz = _png(client.get(f"{V}/{volume}/preview.png", params={"plane": "yz", "x": 2}))
    assert yz.shape == (40, 16, 3)  # 5 slices of 2.0 over columns of 0.25
    np.testing.assert_array_equal(yz[..., 0], np.repeat(np.where(data[:, :, 2] > 0, 255, 0), 8, axis=0))


def test_a_label_volume_is_drawn_over_its_image(client) -> None:  # type: ignore[no-untyped-def]
    labels = _labels()
    only = upload(client, tiff_bytes(labels), kind="labels", voxel_size="1.5,0.5,0.5").json()["id"]
    xz = _png(client.get(f"{V}/{only}/preview.png", params={"plane": "xz", "y": 4}))
    np.testing.assert_array_equal(xz, np.repeat(_coloured(labels[:, 4, :]), 3, axis=0))
    yz = _png(client.get(f"{V}/{only}/preview.png", params={"plane": "yz", "x": 14}))
    np.testing.assert_array_equal(yz, np.repeat(_coloured(labels[:, :, 14]), 3, axis=0))

    image = upload(client, tiff_bytes(np.zeros((5, 16, 24), np.uint8))).json()["id"]
    linked = upload(client, tiff_bytes(labels), kind="labels", image_id=image).json()["id"]
    over = _png(client.get(f"{V}/{linked}/preview.png", params={"plane": "yz", "x": 14}))
    coloured = (over.max(axis=-1).astype(int) - over.min(axis=-1)) > 30
    np.testing.assert_array_equal(coloured, labels[:, :, 14] > 0)
    # the image's own preview shows its latest labels, or none with overlay=false
    under = _png(client.get(f"{V}/{image}/preview.png", params={"plane": "xz", "y": 12}))
    np.testing.assert_array_equal(under.max(axis=-1) > 0, labels[:, 12, :] > 0)
    plain = _png(client.get(f"{V}/{image}/preview.png", params={"plane": "xz", "y": 12, "overlay": "false"}))
    assert not plain.any()


def test_sections_shrink_to_the_preview_size_keeping_their_proportions(client, app) -> None:  # type: ignore[no-untyped-def]
    app.state.settings = app.state.settings.model_copy(update={"preview_max_px": 32})
    data = np.zeros((40, 16, 64), np.uint8)
    data[:20] = 200
    volume = upload(client, tiff_bytes(data), axes="ZYX", voxel_size="2,1,1").json()["id"]
    xz = _png(client.get(f"{V}/{volume}/preview.png", params={"plane": "xz"}))
    # X 64 -> 32 by the XY stride; Z 40 slices of 2 = 80 over columns of 2 -> 40 rows; then both x 32/40
    assert xz.shape == (32, 26, 3)
    assert (xz[:16] == 255).all() and (xz[16:] == 0).all()
    yz = _png(client.get(f"{V}/{volume}/preview.png", params={"plane": "yz"}))
    assert yz.shape == (32, 6, 3)  # Y 16 -> 8; Z -> 40 rows; then both x 32/40


@pytest.mark.parametrize(
    ("shape", "params", "detail"),
    [
        ((16, 16), {"plane": "xz"}, "plane=xz needs a 3D volume; a 2D image has only the XY plane"),
        ((3, 16, 20), {"plane": "xz", "y": 16}, "y 16 is out of range; the volume has 16 rows (0..15)"),
        ((3, 16, 20), {"plane": "yz", "x": -1}, "x -1 is out of range; the volume has 20 columns (0..19)"),
        ((3, 16, 20), {"y": 2}, "y selects the XZ plane; give it with plane=xz"),
        ((3, 16, 20), {"plane": "xz", "x": 2}, "x selects the YZ plane; give it with plane=yz"),
        ((3, 16, 20), {"plane": "yz", "z": 1}, "z selects the XY plane; with plane=xz give y, with plane=yz give x"),
        ((3, 16, 20), {"plane": "yz", "projection": "max"},
         "projection=max applies to plane=xy; leave it out with xz or yz"),
        ((3, 16, 20), {"plane": "zz"}, "query.plane: Input should be 'xy', 'xz' or 'yz'"),
    ],
)  # fmt: skip
def test_section_options_that_do_not_fit_answer_422(client, shape, params, detail) -> None:  # type: ignore[no-untyped-def]
    volume = upload(client, tiff_bytes(np.zeros(shape, np.uint16)), axes="ZYX"[-len(shape) :]).json()["id"]
    response = client.get(f"{V}/{volume}/preview.png", params=params)
    assert response.status_code == 422
    assert response.json() == {"detail": detail}
