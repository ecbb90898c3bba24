"""Branched ERF-Net: shapes, parameter counts, output initialisation, reference weight import."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from embedseg_service.core.model.erfnet import BranchedERFNet, load_reference_state_dict
from embedseg_service.core.model.layers import Down, NonBottleneck1d, Up, axis_conv


@pytest.fixture(scope="module")
def nets() -> dict[tuple[int, int], BranchedERFNet]:
    torch.manual_seed(0)
    return {(d, c): BranchedERFNet(d, c).eval() for d in (2, 3) for c in (1, 2)}


@pytest.mark.parametrize(
    ("dims", "in_channels", "spatial"),
    [
        (2, 1, (8, 8)),
        (2, 1, (64, 48)),
        (2, 2, (16, 40)),
        (2, 2, (32, 32)),
        (3, 1, (8, 8, 8)),
        (3, 1, (16, 24, 32)),
        (3, 2, (8, 32, 16)),
    ],
)
def test_output_shape(nets, dims, in_channels, spatial):
    x = torch.randn(2, in_channels, *spatial)
    with torch.no_grad():
        y = nets[(dims, in_channels)](x)
    assert y.shape == (2, 2 * dims + 1, *spatial)
    assert y.dtype == torch.float32


@pytest.mark.parametrize(("dims", "expected"), [(2, 2_251_979), (3, 3_689_243)])
def test_parameter_count(dims, expected):
    assert sum(p.numel() for p in BranchedERFNet(dims).parameters()) == expected


def test_parameter_count_grows_with_input_channels():
    one = sum(p.numel() for p in BranchedERFNet(2, 1).parameters())
    two = sum(p.numel() for p in BranchedERFNet(2, 2).parameters())
    # the first Down's conv makes 16 - C_in filters of C_in * 3 * 3 weights plus a bias each
    assert two - one == (14 * 2 * 9 + 14) - (15 * 1 * 9 + 15)


@pytest.mark.parametrize("dims", [2, 3])
def test_initial_offsets_zero_sigma_one(nets, dims):
    net = nets[(dims, 1)]
    spatial = (16,) * dims
    for x in (torch.randn(1, 1, *spatial), 5 * torch.rand(1, 1, *spatial) - 2):
        with torch.no_grad():
            y = net(x)
        assert torch.equal(y[:, :dims], torch.zeros_like(y[:, :dims]))
        assert torch.equal(y[:, dims : 2 * dims], torch.ones_like(y[:, dims : 2 * dims]))
        assert y[:, 2 * dims].std() > 0  # the seed branch keeps its random initialisation


@pytest.mark.parametrize(
    ("dims", "shape", "message"),
    [
        (2, (1, 1, 12, 16), "multiple of 8"),
        (2, (1, 1, 15, 16), "multiple of 8"),
        (3, (1, 1, 5, 16, 16), "multiple of 8"),
        (2, (1, 2, 16, 16), "expected 1 input channel"),
        (3, (1, 1, 16, 16), "3 spatial axes"),
    ],
)
def test_bad_input_raises(nets, dims, shape, message):
    with pytest.raises(ValueError, match=message):
        nets[(dims, 1)](torch.zeros(shape))


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        BranchedERFNet(4)
    with pytest.raises(ValueError, match="in_channels"):
        BranchedERFNet(2, 0)


def test_non_bottleneck_axis_convs():
    block = NonBottleneck1d(3, 4, 0.0, 8)
    assert [c.kernel_size for c in block.convs1] == [(3, 1, 1), (1, 3, 1), (1, 1, 3)]
    assert [c.dilation for c in block.convs2] == [(8, 1, 1), (1, 8, 1), (1, 1, 8)]
    assert axis_conv(2, 3, 1, 4).padding == (0, 4)
    assert block(torch.randn(1, 4, 8, 8, 8)).shape == (1, 4, 8, 8, 8)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_3d_axis_conv_equals_the_plain_3d_convolution(axis: int, dilation: int) -> None:
    torch.manual_seed(axis * 10 + dilation)
    conv = axis_conv(3, 6, axis, dilation)
    x = torch.randn(2, 6, 5, 9, 11, requires_grad=True)
    out = conv(x)
    plain = F.conv3d(x, conv.weight, conv.bias, padding=conv.padding, dilation=conv.dilation)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad((out * plain.detach()).sum(), (x, conv.weight, conv.bias))
    plain_grads = torch.autograd.grad((plain * plain.detach()).sum(), (x, conv.weight, conv.bias))
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    strided = x.detach().transpose(3, 4).contiguous().transpose(3, 4)  # not contiguous: the plain path
    torch.testing.assert_close(conv(strided), plain.detach(), rtol=1e-5, atol=1e-5)


def _to_reference_key(key: str, dims: int) -> str:
    key = key.replace("encoder.initial.", "encoder.initial_block.")

    def conv_name(match: re.Match) -> str:
        half, axis = int(match.group(1)), int(match.group(2))
        return ".conv" + "x".join("3" if a == axis else "1" for a in range(dims)) + f"_{half}."

    return re.sub(r"\.convs(\d)\.(\d)\.", conv_name, key)


def _reference_style(net: BranchedERFNet, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ref = {}
    for key, value in net.state_dict().items():
        new = torch.randn(value.shape, generator=gen) if value.is_floating_point() else value.clone() + 3
        if key.endswith("running_var"):
            new = new.abs() + 0.5
        ref[_to_reference_key(key, net.spatial_dims)] = new
    return ref


@pytest.mark.parametrize("dims", [2, 3])
def test_load_reference_state_dict(dims):
    net = BranchedERFNet(dims)
    ref = _reference_style(net, seed=dims)
    if dims == 2:
        assert ref["encoder.layers.1.conv3x1_1.weight"].shape == (64, 64, 3, 1)
        assert ref["decoders.0.layers.1.conv1x3_2.weight"].shape == (64, 64, 1, 3)
    else:
        assert ref["encoder.layers.1.conv1x1x3_2.weight"].shape == (64, 64, 1, 1, 3)
    head = {
        "encoder.output_conv.weight": torch.zeros(2 * dims + 1, 128, *(1,) * dims),
        "encoder.output_conv.bias": torch.zeros(2 * dims + 1),
    }
    load_reference_state_dict(net, {"module." + k: v for k, v in {**ref, **head}.items()})
    for key, value in net.state_dict().items():
        assert torch.equal(value, ref[_to_reference_key(key, dims)]), key


def test_load_reference_state_dict_is_strict():
    net = BranchedERFNet(2)
    ref = _reference_style(net, seed=0)
    extra = dict(ref, **{"encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        load_reference_state_dict(net, extra)
    missing = {k: v for k, v in ref.items() if k != "encoder.initial_block.bn.running_mean"}
    with pytest.raises(ValueError, match=r"missing \['encoder.initial_block.bn.running_mean'\]"):
        load_reference_state_dict(net, missing)
    with pytest.raises(ValueError, match="missing"):
        load_reference_state_dict(BranchedERFNet(3), ref)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_reference_state_dict(BranchedERFNet(2, in_channels=2), ref)


def _randomise_bn(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, buf in module.named_buffers():
        if name.endswith("running_mean"):
            buf.copy_(torch.randn(buf.shape, generator=gen) * 0.2)
        elif name.endswith("running_var"):
            buf.copy_(torch.rand(buf.shape, generator=gen) + 0.5)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bn" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if name.endswith("weight") else 0.0))


def _plain_chain(convs, x):
    for i, conv in enumerate(convs):
        x = conv(F.relu(x) if i else x)
    return x


@pytest.mark.parametrize("dims", [2, 3])
def test_eval_mode_folding_equals_the_plain_chain(dims):
    torch.manual_seed(dims)
    down, block, up = Down(dims, 16, 64), NonBottleneck1d(dims, 16, 0.3, 2), Up(dims, 16, 8)
    for i, m in enumerate((down, block, up)):
        _randomise_bn(m, i)
        m.eval()
    x = torch.randn(2, 16, *(8,) * dims)
    with torch.no_grad():
        expected = F.relu(down.bn(torch.cat([down.conv(x), down.pool(x)], dim=1)))
        torch.testing.assert_close(down(x), expected, rtol=1e-5, atol=1e-5)
        half = F.relu(block.bn1(_plain_chain(block.convs1, x)))
        expected = F.relu(block.bn2(_plain_chain(block.convs2, half)) + x)
        x_before = x.clone()
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(x, x_before)  # the residual input is left untouched
        torch.testing.assert_close(up(x), F.relu(up.bn(up.conv(x))), rtol=1e-5, atol=1e-5)


def test_training_mode_backward():
    torch.manual_seed(0)
    net = BranchedERFNet(2).train()
    y = net(torch.randn(2, 1, 16, 16))
    y.square().mean().backward()
    assert net.encoder.initial.conv.weight.grad is not None
    assert net.decoders[1].output_conv.weight.grad.abs().sum() > 0
