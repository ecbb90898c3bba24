"""Batched prediction: images of one shape through the network together give the labels of one-at-a-time
prediction; batch planning; the inference precision option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedseg_service.core.inference.defaults import InferencePrecision
from embedseg_service.core.inference.predict import (
    BATCH_VOXELS,
    images_per_batch,
    plan_batches,
    predict_raw,
    predict_raw_batch,
    segment,
    segment_batch,
)
from embedseg_service.core.inference.tiling import autocast_dtype, predict_tiled, predict_tiled_batch
from embedseg_service.core.model.erfnet import BranchedERFNet


def seeded_net(dims: int) -> BranchedERFNet:
    """A network in eval mode whose outputs vary with the input and whose seed map makes a few dozen objects:
    every weight perturbed, batch-norm running statistics far from 0 / 1, seed logits raised."""
    torch.manual_seed(dims)
    net = BranchedERFNet(dims)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for name, buffer in net.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.2)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
        net.decoders[1].output_conv.bias.fill_(2.0)
    return net.eval()


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
@pytest.mark.parametrize(("dims", "shape"), [(2, (40, 56)), (3, (6, 24, 40))], ids=["2d", "3d"])
@pytest.mark.usefixtures("one_torch_thread")
def test_batched_labels_equal_one_at_a_time(dims: int, shape: tuple[int, ...], tta: bool) -> None:
    net = seeded_net(dims)
    rng = np.random.default_rng(dims)
    images = [rng.random(shape).astype(np.float32) for _ in range(3)]
    assert plan_batches([(1, *shape)] * 3) == [[0, 1, 2]]  # one batch of three
    one = [segment(net, image, tta=tta, min_size=4) for image in images]
    many = segment_batch(net, images, tta=tta, min_size=4)
    assert all(labels.max() >= 10 for labels in one), [int(labels.max()) for labels in one]
    for single, batched in zip(one, many, strict=True):
        assert batched.dtype == np.int32 and batched.shape == shape
        np.testing.assert_array_equal(batched, single)
    raws = predict_raw_batch(net, images, tta=tta)
    for image, raw in zip(images, raws, strict=True):
        np.testing.assert_allclose(raw, predict_raw(net, image, tta=tta), atol=1e-4)
    assert not net.training


@pytest.mark.usefixtures("one_torch_thread")
def test_mixed_shapes_keep_their_order_and_batch_norm_stays_in_eval_mode() -> None:
    net = seeded_net(2)
    rng = np.random.default_rng(5)
    shapes = [(40, 56), (32, 32), (40, 56), (2, 40, 56)]  # the last with a channel axis of 2: not this model's
    images = [rng.random(shape).astype(np.float32) for shape in shapes[:3]]
    net.train()  # segment_batch runs it in eval mode and puts it back
    many = segment_batch(net, images, min_size=4)
    assert net.training and all(m.training for m in net.modules())
    net.eval()
    assert [labels.shape for labels in many] == [(40, 56), (32, 32), (40, 56)]
    for image, batched in zip(images, many, strict=True):
        np.testing.assert_array_equal(batched, segment(net, image, min_size=4))
    with pytest.raises(
        ValueError, match=r"the model expects 1 channel\(s\) \(axis 0\), got an image of shape \(2, 40, 56\)"
    ):
        segment_batch(net, [*images, rng.random(shapes[3]).astype(np.float32)])


@pytest.mark.usefixtures("one_torch_thread")
def test_tiled_batch_equals_whole_batch_and_single_images() -> None:
    net = seeded_net(2)
    images = np.random.default_rng(6).random((3, 1, 96, 80)).astype(np.float32)
    with torch.inference_mode():
        whole = predict_tiled_batch(net, images, tile=None, device="cpu")
        tiled = predict_tiled_batch(net, images, tile=(64, 64), device="cpu", tta=True)
        tiled_single = predict_tiled(net, images[1], tile=(64, 64), device="cpu", tta=True)
        whole_single = predict_tiled(net, images[1], tile=None, device="cpu")
    assert whole.shape == tiled.shape == (3, 5, 96, 80)
    np.testing.assert_allclose(whole[1], whole_single, atol=1e-4)
    np.testing.assert_allclose(tiled[1], tiled_single, atol=1e-4)


def test_plan_batches_groups_one_shape_and_channel_count_within_the_voxel_budget() -> None:
    shapes = [(1, 64, 64), (1, 32, 32), (1, 64, 64), (2, 64, 64), (1, 64, 64), (1, 60, 60)]
    assert plan_batches(shapes, "cpu") == [[0, 2, 4], [1], [3], [5]]
    # 60 x 60 pads to 64 x 64: 4096 voxels; a budget of two such images splits the group
    assert plan_batches(shapes, "cpu", batch_voxels=2 * 4096) == [[0, 2], [1], [3], [4], [5]]
    assert plan_batches(shapes, "cpu", batch_voxels=1) == [[i] for i in range(6)]
    assert images_per_batch((60, 60), "cpu") == BATCH_VOXELS["cpu"] // 4096
    assert images_per_batch((8, 1024, 1024), "cpu") == 1  # more than the budget: one image at a time
    assert plan_batches([]) == []


def test_inference_precision_option() -> None:
    assert InferencePrecision.parse("bf16") is InferencePrecision.bf16 and str(InferencePrecision.fp16) == "fp16"
    with pytest.raises(ValueError, match=r"^unknown inference precision 'fp8'; valid choices: fp32, bf16, fp16$"):
        InferencePrecision.parse("fp8")
    cpu = torch.device("cpu")
    assert autocast_dtype("fp32", cpu) is None and autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match=r"^inference precision fp16 needs a CUDA device, not cpu; use fp32 or bf16$"):
        autocast_dtype(InferencePrecision.fp16, cpu)


@pytest.mark.usefixtures("one_torch_thread")
def test_bf16_runs_the_network_in_bfloat16_and_returns_float32() -> None:
    net = seeded_net(2)
    image = np.random.default_rng(7).random((40, 56)).astype(np.float32)
    fp32 = predict_raw(net, image)
    bf16 = predict_raw(net, image, precision="bf16")
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    difference = np.abs(bf16 - fp32).max()
    assert 1e-4 < difference < 1.0  # rounded to bfloat16's 8 bits of mantissa, not computed in float32
