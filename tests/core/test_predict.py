"""Whole-image prediction and segmentation: shapes, padding, eval mode, normalisation, labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from embedseg_service.core.inference.padding import crop_padding, pad_to_multiple
from embedseg_service.core.inference.predict import predict_raw, prepare_image, segment
from embedseg_service.core.inference.tiling import PredictionCancelled
from embedseg_service.core.model.embedding import coordinate_map, step_for
from embedseg_service.core.model.erfnet import BranchedERFNet


@pytest.fixture(scope="module")
def net2d() -> BranchedERFNet:
    torch.manual_seed(0)
    net = BranchedERFNet(2)
    with torch.no_grad():  # make every head depend on the input
        for p in net.decoders[0].output_conv.parameters():
            p.normal_(0, 0.1)
    return net


def test_predict_raw_matches_padded_forward(net2d):
    image = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    raw = predict_raw(net2d, image, device="cpu", tile=None)
    assert raw.shape == (5, 20, 30) and raw.dtype == np.float32
    net2d.eval()
    with torch.no_grad():
        padded = pad_to_multiple(torch.from_numpy(image)[None, None])
        assert padded.shape == (1, 1, 24, 32)
        expected = crop_padding(net2d(padded)[0].numpy(), (20, 30))  # the image is centred: rows 2-21
    np.testing.assert_allclose(raw, expected, atol=1e-5)
    # the channel axis is optional
    np.testing.assert_array_equal(predict_raw(net2d, image[None], device="cpu", tile=None), raw)
    # "auto" (the default) picks one window for an image this small
    np.testing.assert_array_equal(predict_raw(net2d, image, device="cpu"), raw)


def test_predict_raw_uses_eval_mode_and_restores_it(net2d):
    image = np.random.default_rng(1).random((16, 16)).astype(np.float32)
    net2d.train()
    first = predict_raw(net2d, image, device="cpu", tile=None)
    assert net2d.training
    second = predict_raw(net2d, image, device="cpu", tile=None)  # dropout off, BN running stats
    np.testing.assert_array_equal(first, second)
    assert all(p.grad is None for p in net2d.parameters())
    net2d.eval()


def test_predict_raw_3d_two_channels():
    torch.manual_seed(1)
    net = BranchedERFNet(3, in_channels=2)
    image = np.random.default_rng(2).random((2, 5, 12, 9)).astype(np.float32)
    raw = predict_raw(net, image, device="cpu", tile=(8, 8, 8))
    assert raw.shape == (7, 5, 12, 9)
    np.testing.assert_allclose(raw[:3], 0.0)
    np.testing.assert_allclose(raw[3:6], 1.0)
    with pytest.raises(ValueError, match=r"expects 2 channel\(s\)"):
        predict_raw(net, image[:1], device="cpu")
    with pytest.raises(ValueError, match=r"must be \(Z, Y, X\)"):
        predict_raw(net, image[0, 0], device="cpu")


class Pointwise(nn.Module):
    """A 1x1 'network': tiles, padding and TTA leave its output unchanged (offsets are 0)."""

    spatial_dims = 2
    in_channels = 1

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] % 8 == 0 and x.shape[-2] % 8 == 0
        zeros = torch.zeros_like(x)
        return torch.cat([zeros, zeros, x * self.scale, x * self.scale, x - 0.5], dim=1)


def test_tiles_and_tta_agree_with_whole_image_for_pointwise_model():
    model = Pointwise()
    image = np.random.default_rng(3).random((45, 70)).astype(np.float32)
    whole = predict_raw(model, image, device="cpu", tile=None)
    np.testing.assert_allclose(whole[2], 2 * image, rtol=1e-6)
    tiled = predict_raw(model, image, device="cpu", tile=(16, 24), tta=True, tta_batch_size=3)
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    with pytest.raises(PredictionCancelled):
        predict_raw(model, image, device="cpu", tile=(16, 16), progress=lambda _done, _total: False)


def test_normalization_options():
    image = (np.arange(16 * 16).reshape(16, 16) % 200 + 100).astype(np.uint16)
    with pytest.raises(ValueError, match="not normalised; pass normalization"):
        prepare_image(image, 2)
    scaled = prepare_image(image, 2, normalization=lambda a: a / 1000.0)
    np.testing.assert_allclose(scaled[0], image / 1000.0, rtol=1e-6)
    pct = prepare_image(image, 2, normalization="percentile")
    assert pct.dtype == np.float32 and pct.shape == (1, 16, 16)
    low, high = np.percentile(image, [1, 99.8])
    np.testing.assert_allclose(pct[0], (image - low) / (high - low), rtol=1e-4, atol=1e-5)
    via_kwargs = prepare_image(image, 2, normalization={"mode": "percentile", "p_low": 1.0, "p_high": 99.8})
    np.testing.assert_array_equal(via_kwargs, pct)
    raw = predict_raw(Pointwise(), image, device="cpu", tile=None, normalization=lambda a: a / 1000.0)
    np.testing.assert_allclose(raw[4], image / 1000.0 - 0.5, atol=1e-6)


class StoredRaw(nn.Module):
    """Returns a fixed raw output (padded like the input): a perfect prediction of known objects."""

    in_channels = 1

    def __init__(self, raw: torch.Tensor) -> None:
        super().__init__()
        self.spatial_dims = raw.dim() - 1
        self.register_buffer("raw", raw)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        region = tuple(slice(0, s) for s in x.shape[2:])
        return pad_to_multiple(self.raw[None])[(slice(None), slice(None), *region)] + 0 * self.dummy


def perfect_raw(labels: np.ndarray, step: tuple[float, ...]) -> torch.Tensor:
    coords = coordinate_map(labels.shape, step, dtype=torch.float64)  # (D, *S), channels x, y[, z]
    offsets = torch.zeros_like(coords)
    for k in np.unique(labels)[1:]:
        mask = torch.from_numpy(labels == k)
        centre = coords[:, mask].mean(dim=1)
        offsets[:, mask] = torch.atanh(centre[:, None] - coords[:, mask])
    sigma = torch.ones_like(coords)  # lambda = e^10: objects a few pixels apart stay apart
    seed = torch.where(torch.from_numpy(labels > 0), 10.0, -10.0).to(torch.float64)[None]
    return torch.cat([offsets, sigma, seed]).float()


def test_segment_recovers_objects_of_a_perfect_prediction():
    labels = np.zeros((40, 52), dtype=np.int32)
    labels[3:15, 4:20] = 1
    labels[20:37, 30:45] = 2
    labels[25:30, 5:12] = 3
    step = step_for(2)
    model = StoredRaw(perfect_raw(labels, step))
    pred = segment(model, np.zeros((40, 52), np.float32), step=step, tile=None, device="cpu", min_size=10)
    assert pred.dtype == np.int32 and pred.shape == labels.shape
    assert set(np.unique(pred)) == {0, 1, 2, 3}
    for k in (1, 2, 3):  # a one-to-one match of every object
        ids = np.unique(pred[labels == k])
        assert len(ids) == 1 and ids[0] > 0
        np.testing.assert_array_equal(pred == ids[0], labels == k)


def test_segment_3d_perfect_prediction_with_anisotropic_step():
    labels = np.zeros((9, 30, 26), dtype=np.int32)
    labels[1:5, 2:12, 3:12] = 4
    labels[4:9, 15:28, 10:24] = 9
    step = step_for(3, anisotropy=2.0)
    model = StoredRaw(perfect_raw(labels, step))
    pred = segment(model, np.zeros(labels.shape, np.float32), step=step, tile=None, device="cpu", min_size=20)
    assert pred.dtype == np.int32 and pred.shape == labels.shape
    assert len(np.unique(pred)) == 3
    for k in (4, 9):
        ids = np.unique(pred[labels == k])
        assert len(ids) == 1 and ids[0] > 0
        np.testing.assert_array_equal(pred == ids[0], labels == k)
