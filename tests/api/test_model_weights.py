"""Model uploads are loaded with ``torch.load(weights_only=True)`` and checked against the network's keys and
shapes; dimensions and channels come from the weights."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import pytest
import torch

from embedseg_service.core.model.checkpoint import build_network, save_checkpoint
from embedseg_service.core.model.checkpoint_format import FORMAT_KEY, FORMAT_NAME, FORMAT_VERSION, VERSION_KEY

M = "/api/v1/models"


@pytest.fixture
def settings(settings):  # type: ignore[no-untyped-def]
    """Room for a real network's weights (9 MB in 2D)."""
    return settings.model_copy(update={"max_upload_bytes": 24 * 1024 * 1024})


@functools.cache
def weights(spatial_dims: int, in_channels: int) -> dict[str, torch.Tensor]:
    return build_network(spatial_dims, in_channels).state_dict()


def model_file(tmp_path: Path, state: dict[str, torch.Tensor], dims: int = 2, channels: int = 1) -> bytes:
    path = save_checkpoint(
        tmp_path / "m.pt",
        {
            "state_dict": state,
            "spatial_dims": dims,
            "in_channels": channels,
            "step": [0.001] * dims,
        },
    )
    return path.read_bytes()


def post(client, content: bytes):  # type: ignore[no-untyped-def]
    return client.post(M, files={"file": ("m.pt", content, "application/octet-stream")})


def test_a_tiny_checkpoint_with_one_4x4_tensor_is_refused(client) -> None:  # type: ignore[no-untyped-def]
    buffer = io.BytesIO()
    torch.save(
        {
            FORMAT_KEY: FORMAT_NAME,
            VERSION_KEY: FORMAT_VERSION,
            "state_dict": {"w": torch.zeros(4, 4)},
            "spatial_dims": 2,
            "in_channels": 1,
            "step": [0.001, 0.001],
        },
        buffer,
    )
    assert len(buffer.getvalue()) < 2048
    response = post(client, buffer.getvalue())
    assert response.status_code == 422
    assert response.json() == {
        "detail": "not a usable model file: its weights are not those of this service's network (no 2D or 3D "
        "convolution weight 'encoder.initial.conv.weight')"
    }
    assert client.get(M).json()["total"] == 0


def test_weights_of_another_network_are_refused(client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    state = dict(weights(2, 1))
    key = "encoder.initial.bn.weight"
    state[key] = torch.zeros(17)
    response = post(client, model_file(tmp_path, state))
    assert response.status_code == 422
    assert response.json() == {
        "detail": "not a usable model file: its weights do not fit this service's 2D network with 1 input "
        f"channel(s): {len(state)} tensors, 1 of another shape or type (e.g. '{key}')"
    }
    del state[key]
    state["extra.weight"] = torch.zeros(1)
    response = post(client, model_file(tmp_path, state))
    assert response.status_code == 422
    assert response.json()["detail"].endswith(
        "1 missing (e.g. 'encoder.initial.bn.weight'); 1 unexpected (e.g. 'extra.weight')"
    )


def test_declared_dims_and_channels_must_be_those_of_the_weights(client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    response = post(client, model_file(tmp_path, weights(2, 2), dims=2, channels=1))
    assert response.status_code == 422
    assert response.json() == {
        "detail": "not a usable model file: it declares spatial_dims=2, in_channels=1 but its weights are those of "
        "a 2D network with 2 input channel(s)"
    }


def test_a_real_network_is_accepted_with_dims_and_channels_from_its_weights(client, tmp_path) -> None:  # type: ignore[no-untyped-def]
    response = post(client, model_file(tmp_path, weights(2, 3), dims=2, channels=3))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["spatial_dims"] == 2
    assert body["config"] == {"spatial_dims": 2, "in_channels": 3}
