"""Batch-norm calibration on whole images: exact running statistics, the network left untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from embedseg_service.core.model.checkpoint import build_network
from embedseg_service.core.training import calibration
from embedseg_service.core.training.calibration import calibrate_batch_norm


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Dropout2d(0.5), nn.ReLU())


def _expected(net: nn.Module, pieces: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over pieces of each piece's channel mean and unbiased variance after the convolution."""
    conv = net[0]
    means, variances = [], []
    with torch.no_grad():
        for piece in pieces:
            y = conv(torch.from_numpy(piece)[None])
            means.append(y.mean(dim=(0, 2, 3)))
            variances.append(y.var(dim=(0, 2, 3), unbiased=True))
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


def test_statistics_are_the_average_over_whole_images_and_the_net_is_unchanged() -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = np.random.default_rng(0)
    images = [rng.random((1, 16, 24), dtype=np.float32) * 3, rng.random((1, 32, 8), dtype=np.float32)]
    calibrated = calibrate_batch_norm(net, images, device=torch.device("cpu"), keep=0.0)
    mean, var = _expected(net, images)
    bn = calibrated[1]
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and not calibrated.training and int(bn.num_batches_tracked) == 2
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert net[1].running_mean.abs().max() == 0  # the original keeps its (fresh) statistics
    # dropout stayed off: the same statistics again
    again = calibrate_batch_norm(net, images, device=torch.device("cpu"), keep=0.0)
    assert torch.equal(again[1].running_var, bn.running_var)


def test_images_larger_than_memory_allows_are_calibrated_in_windows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "auto_tile_shape", lambda *_args, **_kwargs: (16, 16))
    net = _net()
    image = np.random.default_rng(1).random((1, 40, 32), dtype=np.float32)
    calibrated = calibrate_batch_norm(net, [image], device=torch.device("cpu"), keep=0.0)
    # rows start at 0, 16 and 24 (the last window ends at the end), columns at 0 and 16
    pieces = [image[:, y : y + 16, x : x + 16] for y in (0, 16, 24) for x in (0, 16)]
    mean, var = _expected(net, pieces)
    torch.testing.assert_close(calibrated[1].running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(calibrated[1].running_var, var, rtol=1e-5, atol=1e-6)
    capped = calibrate_batch_norm(net, [image], device=torch.device("cpu"), max_windows=2, keep=0.0)
    assert int(capped[1].num_batches_tracked) == 2


def test_default_keeps_half_of_the_training_statistics_as_a_mixture() -> None:
    net = _net()
    with torch.no_grad():  # statistics as training on crops left them
        net[1].running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        net[1].running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    images = [np.random.default_rng(3).random((1, 24, 24), dtype=np.float32)]
    mixed = calibrate_batch_norm(net, images, device=torch.device("cpu"))
    mean, var = _expected(net, images)
    own_mean, own_var = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([4.0, 0.25, 1.0])
    torch.testing.assert_close(mixed[1].running_mean, 0.5 * own_mean + 0.5 * mean, rtol=1e-5, atol=1e-6)
    expected_var = 0.5 * own_var + 0.5 * var + 0.25 * (own_mean - mean) ** 2  # a two-component mixture's
    torch.testing.assert_close(mixed[1].running_var, expected_var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net[1].running_mean, own_mean)  # the original is untouched
    with pytest.raises(ValueError, match="keep must lie in"):
        calibrate_batch_norm(net, images, device=torch.device("cpu"), keep=1.5)


def test_branched_erfnet_calibrates_every_batch_norm_and_predicts() -> None:
    torch.manual_seed(0)
    net = build_network(2, 1)
    image = np.random.default_rng(2).random((1, 50, 70), dtype=np.float32)  # padded to 56 x 72 inside
    calibrated = calibrate_batch_norm(net, [image], device=torch.device("cpu"))
    norms = [m for m in calibrated.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == 1 for m in norms)
    assert all(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    with torch.no_grad():
        out = calibrated(torch.from_numpy(image[:, :48, :64])[None])
    assert out.shape == (1, 5, 48, 64) and torch.isfinite(out).all()
