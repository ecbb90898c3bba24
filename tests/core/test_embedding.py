import pytest
import torch

from embedseg_service.core.model.embedding import (
    DEFAULT_STEP,
    coordinate_map,
    normalize_step,
    pixel_embeddings,
    step_for,
    step_from_reference,
)


def test_coordinate_map_2d_channels_are_x_then_y():
    c = coordinate_map((3, 4), (0.5, 0.25))
    assert c.shape == (2, 3, 4)
    assert torch.allclose(c[0, 2, :], torch.tensor([0.0, 0.25, 0.5, 0.75]))  # x along columns
    assert torch.allclose(c[1, :, 1], torch.tensor([0.0, 0.5, 1.0]))  # y along rows


def test_coordinate_map_3d_z_last_channel():
    c = coordinate_map((2, 3, 4), (2.0, 1.0, 1.0))
    assert c.shape == (3, 2, 3, 4)
    assert c[2, 1, 0, 0] == 2.0 and c[1, 0, 2, 0] == 2.0 and c[0, 0, 0, 3] == 3.0


def test_step_helpers():
    assert step_for(2) == (DEFAULT_STEP, DEFAULT_STEP)
    assert step_for(3, anisotropy=2.0)[0] == pytest.approx(2 * DEFAULT_STEP)
    assert step_from_reference((1024, 1024), (1.0, 1.0)) == pytest.approx((DEFAULT_STEP,) * 2)
    # reference order is x, y, z; ours is z, y, x
    assert step_from_reference((1024, 1024, 512), (1.0, 1.0, 2.0))[0] == pytest.approx(2.0 / 511)
    with pytest.raises(ValueError, match="needs 3 values"):
        normalize_step((1.0, 1.0), 3)
    with pytest.raises(ValueError, match="positive"):
        normalize_step(0.0, 2)


def test_pixel_embeddings_adds_tanh_offsets():
    off = torch.zeros(1, 2, 2, 2)
    off[0, 0, 1, 1] = 10.0
    e = pixel_embeddings(off, 0.1)
    assert e[0, 0, 1, 1] == pytest.approx(0.1 + 1.0, abs=1e-6)
    assert e[0, 1, 1, 0] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        pixel_embeddings(torch.zeros(2, 4, 4), 0.1)
