"""Tiled prediction: raw outputs equal to the whole image's for any tile, memory bounds, cancel, padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedseg_service.core.inference.padding import crop_padding, pad_to_multiple, padding_before, reflect_pad_end
from embedseg_service.core.inference.predict import predict_raw
from embedseg_service.core.inference.tile_size import auto_tile_shape, available_memory, axis_starts
from embedseg_service.core.inference.tiling import PredictionCancelled, predict_tiled
from embedseg_service.core.model.erfnet import DECODE_HALO, ENCODE_HALO, BranchedERFNet


def random_network(dims: int, seed: int = 0) -> BranchedERFNet:
    """An ERF-Net in eval mode whose every layer matters: random weights, batch-norm statistics and output layer."""
    torch.manual_seed(seed)
    net = BranchedERFNet(dims).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    torch.nn.init.normal_(net.decoders[0].output_conv.weight, std=0.1)
    return net


def whole_forward(net: BranchedERFNet, image: np.ndarray) -> np.ndarray:
    """The network's forward pass on the whole image, reflect-padded to multiples of 8 and cropped back."""
    with torch.inference_mode():
        out = net(pad_to_multiple(torch.from_numpy(image)[None]))[0]
    return crop_padding(out.numpy(), image.shape[1:])


CASES = [
    (2, (150, 203), (64, 72)),  # blocks far smaller than the receptive field, sizes not multiples of 8
    (2, (150, 203), (150, 203)),
    (2, (37, 53), (100, 100)),  # tile larger than the image
    (3, (13, 70, 61), (8, 24, 16)),
    (3, (5, 40, 48), (16, 16, 16)),  # fewer slices than one cell grid step needs: padded like the whole
]


@pytest.mark.parametrize(("dims", "spatial", "tile"), CASES)
def test_tiled_outputs_equal_the_whole_image(dims, spatial, tile):
    net = random_network(dims)
    image = np.random.default_rng(1).random((1, *spatial)).astype(np.float32)
    seen: list[tuple[int, int]] = []
    with torch.inference_mode():
        out = predict_tiled(net, image, tile=tile, device="cpu", progress=lambda d, t: seen.append((d, t)))
    assert out.dtype == np.float32 and out.shape == (2 * dims + 1, *spatial)
    np.testing.assert_allclose(out, whole_forward(net, image), rtol=1e-5, atol=1e-5)
    cells = [-(-n // 8) for n in spatial]
    blocks = int(np.prod([-(-c // max(-(-t // 8), 8)) for c, t in zip(cells, tile)]))
    assert seen == [(i, 2 * blocks) for i in range(1, 2 * blocks + 1)]  # one call per block and stage


@pytest.mark.parametrize(("dims", "spatial", "tile"), [(2, (75, 150), (24, 40)), (3, (13, 37, 85), (8, 16, 16))])
def test_tiled_tta_equals_whole_image_tta(dims, spatial, tile):
    net = random_network(dims, seed=3)
    image = np.random.default_rng(2).random((1, *spatial)).astype(np.float32)
    with torch.inference_mode():
        whole = predict_tiled(net, image, tile=None, device="cpu", tta=True)
        tiled = predict_tiled(net, image, tile=tile, device="cpu", tta=True, tta_options={"batch_size": 3})
    np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5)
    plain = whole_forward(net, image)
    assert np.abs(whole - plain).max() > 1e-3  # the passes of a random network disagree: TTA did something


@pytest.mark.parametrize("dims", [2, 3])
def test_halos_cover_the_receptive_fields(dims):
    """The gradient of one cell (one output pixel) reaches no farther than the declared halos."""
    net = random_network(dims)
    k = 20 if dims == 2 else 14
    c = k // 2
    x = torch.randn(1, 1, *([8 * k] * dims), requires_grad=True)
    net.encoder.local(x)[(0, slice(None), *([c] * dims))].sum().backward()
    reach = torch.nonzero(x.grad[0, 0] != 0)
    assert reach.min().item() >= 8 * (c - ENCODE_HALO) and reach.max().item() < 8 * (c + 1 + ENCODE_HALO)
    assert reach.min().item() < 8 * (c - ENCODE_HALO + 1)  # the halo is no wider than needed
    for pixel in (8 * c, 8 * c + 7):  # first and last pixel of cell c
        grid = torch.randn(1, 128, *([k] * dims), requires_grad=True)
        net.decode(grid)[(0, slice(None), *([pixel] * dims))].sum().backward()
        reach = torch.nonzero(grid.grad[0].abs().sum(0) != 0)
        assert reach.min().item() >= c - DECODE_HALO and reach.max().item() <= c + DECODE_HALO


def test_blocks_bound_the_full_resolution_work():
    """The local stages never see more than a block and its halos, whatever the volume's size."""
    net = random_network(3)
    shapes: list[tuple[int, ...]] = []
    local = net.encoder.local

    def recording(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape[2:]))
        return local(x)

    net.encoder.local = recording  # type: ignore[method-assign]
    with torch.inference_mode():
        predict_tiled(net, np.zeros((1, 8, 190, 190), np.float32), tile=(8, 8, 64), device="cpu")
    assert len(shapes) == 3 * 3  # 24 cells per side in blocks of 8 (the smallest block side)
    assert max(s[1] for s in shapes) == max(s[2] for s in shapes) == 8 * (8 + 2 * ENCODE_HALO)
    assert max(s[0] for s in shapes) == 8


def test_progress_can_cancel():
    net = random_network(2)
    calls = []

    def stop_after_two(done: int, _total: int) -> bool:
        calls.append(done)
        return done < 2

    with torch.inference_mode(), pytest.raises(PredictionCancelled, match="after 2 of 8 tiles"):
        predict_tiled(net, np.zeros((1, 80, 80), np.float32), tile=(64, 64), device="cpu", progress=stop_after_two)
    assert calls == [1, 2]

    def boom(_done: int, _total: int) -> None:
        raise KeyboardInterrupt

    with torch.inference_mode(), pytest.raises(KeyboardInterrupt):
        predict_tiled(net, np.zeros((1, 80, 80), np.float32), tile=(64, 64), device="cpu", progress=boom)


def test_tensor_input_and_a_network_without_stages_runs_whole():
    class Shapes(torch.nn.Module):
        spatial_dims = 2

        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[int, ...]] = []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.append(tuple(x.shape))
            return torch.cat([x + 1, 2 * x], dim=1)

    image = torch.arange(20 * 12, dtype=torch.float32).view(1, 20, 12)
    net = Shapes()
    out = predict_tiled(net, image, tile=(8, 8), device="cpu")
    assert net.seen == [(1, 1, 24, 16)]  # one pass over the padded image: its outputs cannot be tiled exactly
    np.testing.assert_allclose(out[0], image[0].numpy() + 1)


def test_segment_labels_do_not_depend_on_the_tile():
    """Through predict_raw (normalisation, eval mode): tiled raw outputs equal the whole image's."""
    net = random_network(2, seed=5)
    image = np.random.default_rng(4).integers(0, 255, (90, 120)).astype(np.uint8)
    whole = predict_raw(net, image, device="cpu", tile=None, normalization="percentile")
    for tile in [(64, 64), (8, 120), "auto"]:
        tiled = predict_raw(net, image, device="cpu", tile=tile, normalization="percentile")
        np.testing.assert_allclose(tiled, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("size", "tile"), [(37, 16), (100, 64), (64, 64), (9, 8), (61, 16), (20, 13)])
def test_axis_windows_are_aligned_and_cover_the_axis(size, tile):
    starts = axis_starts(size, tile, 0.0)
    assert starts[0] == 0 and starts == sorted(set(starts))
    if tile % 8 == 0:  # on the network's sampling grid, the last window reaching the end (within 7 px)
        assert all(s % 8 == 0 for s in starts)
        assert size - 8 < starts[-1] + tile if tile < size else starts == [0]
    else:
        assert starts[-1] + tile >= size
    for a, b in zip(starts, starts[1:]):
        assert b - a <= tile


def test_auto_tile_shape():
    assert auto_tile_shape((60, 100, 100), free_bytes=8 << 30) == (60, 100, 100)
    tile = auto_tile_shape((60, 2048, 2048), free_bytes=2 << 30)
    assert tile[0] == 60 and tile[1] == tile[2] and tile[1] % 8 == 0
    assert 64 * tile[1] ** 2 * 256 <= 1 << 30  # Z is padded to 64
    assert 64 * (tile[1] + 8) ** 2 * 256 > 1 << 30
    smaller = auto_tile_shape((60, 2048, 2048), free_bytes=2 << 30, batch=8)
    assert smaller[1] < tile[1]
    assert all(t % 8 == 0 for t in auto_tile_shape((5000, 7000), free_bytes=1 << 30))
    assert available_memory("cpu") > 0
    assert len(auto_tile_shape((37, 53), device="cpu")) == 2


def test_bad_arguments_raise():
    net = random_network(2)
    image = np.zeros((1, 16, 16), np.float32)
    with pytest.raises(ValueError, match="tile needs 2 sizes"):
        predict_tiled(net, image, tile=(8, 8, 8), device="cpu")
    with pytest.raises(ValueError, match="tile must be 'auto'"):
        predict_tiled(net, image, tile="big", device="cpu")
    with pytest.raises(ValueError, match="tile sizes must be positive"):
        predict_tiled(net, image, tile=(0, 8), device="cpu")
    with pytest.raises(ValueError, match="image must be"):
        predict_tiled(net, np.zeros((16, 16), np.float32), device="cpu")


def test_reflect_pad_matches_numpy():
    for n, target in [(5, 8), (3, 16), (1, 8), (8, 8), (2, 7)]:
        x = torch.arange(n, dtype=torch.float32).view(1, 1, n)
        x2 = x.view(1, 1, n, 1).expand(1, 1, n, 3)
        got = reflect_pad_end(x2, (target, 8))
        if n > 1:
            expected = np.pad(np.arange(n), (0, target - n), mode="reflect")
        else:
            expected = np.zeros(target)
        assert got.shape == (1, 1, target, 8)
        np.testing.assert_array_equal(got[0, 0, :, 0].numpy(), expected)
    assert pad_to_multiple(torch.zeros(2, 3, 9, 16, 1)).shape == (2, 3, 16, 16, 8)


def test_padding_centres_the_image_as_training_crops_do() -> None:
    # a 5-slice stack sits between 1 mirrored slice before and 2 after, as in an 8-slice training crop
    assert padding_before((5, 20, 30)) == (1, 2, 1)
    volume = np.arange(5 * 3 * 2, dtype=np.float32).reshape(5, 3, 2)
    padded = pad_to_multiple(torch.from_numpy(volume)[None, None])[0, 0].numpy()
    expected = np.pad(volume, ((1, 2), (2, 3), (3, 3)), mode="reflect")
    np.testing.assert_array_equal(padded, expected)
    np.testing.assert_array_equal(crop_padding(padded[None], volume.shape)[0], volume)
