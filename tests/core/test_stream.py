"""Streamed prediction (docs/method.md §11.5): mirrored reads, whole-volume statistics, the network's raw outputs
with its cell grid in files, and window-by-window labels equal to the whole volume's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from stream_helpers import TinyStagedNet, blob_block, same_partition

from embedseg_service.core.data.normalization import NormalizationSettings, normalize, scale_intensities
from embedseg_service.core.data.stream_stats import channel_scalings
from embedseg_service.core.data.synthetic import perfect_raw, random_labels
from embedseg_service.core.data.volume_source import ArraySource, read_padded
from embedseg_service.core.inference.clustering import cluster, drop_fragments
from embedseg_service.core.inference.padding import pad_to_multiple, padding_before, round_up
from embedseg_service.core.inference.predict import segment
from embedseg_service.core.inference.stream import auto_core, default_margin, segment_streamed
from embedseg_service.core.inference.stream_net import StreamedNetwork
from embedseg_service.core.inference.tiling import NetworkStages, PredictionCancelled, predict_tiled
from embedseg_service.core.metrics import average_precision
from embedseg_service.core.model.embedding import step_for
from embedseg_service.core.model.erfnet import BranchedERFNet


@pytest.mark.parametrize("shape", [(5, 13, 17), (1, 3, 9), (3, 2, 1), (9, 16, 8), (3,), (2,), (11, 6)])
def test_mirrored_reads_equal_the_padding_of_a_whole_prediction(shape) -> None:
    image = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    padded = pad_to_multiple(torch.from_numpy(image)[None, None])[0, 0].numpy()
    before = padding_before(shape)
    whole = read_padded(ArraySource(image), tuple(slice(0, round_up(n)) for n in shape), before)[0]
    np.testing.assert_array_equal(whole, padded)
    part = tuple(slice(1, max(2, round_up(n) - 2)) for n in shape)
    np.testing.assert_array_equal(read_padded(ArraySource(image), part, before)[0], padded[part])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32])
@pytest.mark.parametrize("mode", ["percentile", "meanstd"])
def test_streamed_statistics_normalise_as_the_whole_volume(dtype, mode) -> None:
    rng = np.random.default_rng(7)
    volume = rng.gamma(2.0, 300.0, size=(13, 37, 41))
    if dtype == np.float32:
        volume -= 500.0
    volume = volume.astype(dtype)
    (scaling,) = channel_scalings(ArraySource(volume), NormalizationSettings(mode=mode), slab_voxels=1000)
    assert scaling is not None
    np.testing.assert_array_equal(scale_intensities(volume, *scaling), normalize(volume, mode))


def random_erfnet(spatial_dims: int = 3) -> BranchedERFNet:
    torch.manual_seed(0)
    net = BranchedERFNet(spatial_dims).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    torch.nn.init.normal_(net.decoders[0].output_conv.weight, std=0.1)
    return net


def test_erfnet_context_steps_are_its_context_stage() -> None:
    net = random_erfnet()
    grid = torch.randn(1, 128, 3, 5, 4)
    with torch.inference_mode():
        stepped = grid
        for module, halo in net.context_steps():
            stepped = module(stepped)
            assert halo in (3, 5, 9, 17)
        torch.testing.assert_close(stepped, net.encoder.context(grid))


def build_and_read(streamed: Any, window: tuple[slice, ...]) -> tuple[int, tuple[slice, ...], np.ndarray, np.ndarray]:
    """Build a streamed network's grids, then read one window and every cell; the grids are removed after.
    Returns (ticks of the build, the window's pixels, their raw outputs, the whole volume's raw outputs)."""
    ticks: list[int] = []
    try:
        with torch.inference_mode():
            streamed.build(lambda: ticks.append(1))
            region = streamed.image_region(window)
            part = streamed.raw(window)
            every = streamed.raw(tuple(slice(0, c) for c in streamed.cells))
    finally:
        streamed.close()
    return len(ticks), region, part, every


def test_raw_outputs_with_the_grid_in_files_equal_the_whole_volumes(tmp_path) -> None:
    net = random_erfnet()
    image = np.random.default_rng(1).random((13, 37, 43)).astype(np.float32)
    with torch.inference_mode():
        whole = predict_tiled(net, image[None], tile=None, device="cpu")
    streamed = StreamedNetwork(net, ArraySource(image), [None], block=(1, 3, 4), device=torch.device("cpu"),
                               scratch=tmp_path)  # fmt: skip
    ticks, region, part, every = build_and_read(streamed, (slice(0, 2), slice(1, 4), slice(2, 6)))
    assert ticks == streamed.passes() * streamed.block_count() == 9 * 8
    assert region == (slice(0, 13), slice(7, 31), slice(14, 43)) and part.shape == (7, 13, 24, 29)
    np.testing.assert_allclose(part, whole[(slice(None), *region)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(every, whole, rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.iterdir())  # the grid files are gone


def test_streamed_labels_equal_the_whole_volumes_and_objects_crossing_cores_are_one_label() -> None:
    image = blob_block((32, 256, 256), seed=3)
    net = TinyStagedNet().eval()
    whole = segment(net, normalize(image), step=step_for(3), tile=None, min_size=50, device="cpu")
    out = np.zeros(image.shape, np.uint32)
    options = {"tile": (32, 64, 64), "core": (32, 64, 64), "margin": (24, 24, 24), "device": "cpu"}
    settings = NormalizationSettings()
    result = segment_streamed(net, ArraySource(image), out, step=step_for(3), normalization=settings, min_size=50,
                              **options)  # fmt: skip
    assert result.windows == 16 and result.core == (32, 64, 64) and result.margin == (24, 24, 24)
    assert result.n_objects == int(whole.max()) == 121 and result.cut == 0  # 11 x 11 blobs
    assert average_precision(whole, out.astype(np.int64), [0.5, 0.9]).ap == [1.0, 1.0]
    assert same_partition(whole, out)
    crossing = 0
    for label in range(1, result.n_objects + 1):
        ys, xs = np.nonzero((out == label).any(axis=0))
        crossing += int(ys.min() // 64 != ys.max() // 64 or xs.min() // 64 != xs.max() // 64)
    assert crossing >= 10 and result.duplicates >= 1  # objects on core borders, each kept once
    rows = result.objects.rows()
    assert [r["label"] for r in rows] == list(range(1, 122))
    assert rows[0]["voxel_count"] == int((out == 1).sum())
    zz, yy, xx = np.nonzero(out == 1)
    assert rows[0]["centroid"] == pytest.approx([zz.mean(), yy.mean(), xx.mean()])
    assert rows[0]["bbox_min"] == [zz.min(), yy.min(), xx.min()]
    assert rows[0]["bbox_max"] == [zz.max(), yy.max(), xx.max()]


class RawNet(torch.nn.Module):
    """A network whose input is its raw output (cell of one pixel, no halos): streams precomputed outputs."""

    spatial_dims = 3

    def stages(self) -> NetworkStages:
        def same(x: torch.Tensor) -> torch.Tensor:
            return x

        return NetworkStages(encode=same, context=same, decode=same, cell=1, encode_halo=0, decode_halo=0)

    def context_steps(self) -> list:
        return []


@pytest.mark.parametrize("seed", [0, 1])
def test_window_stitching_keeps_the_objects_of_ideal_embeddings(seed) -> None:
    labels = random_labels((24, 96, 96), 30, radius=((3, 5), (5, 9), (5, 9)), seed=seed, gap=1)
    step = step_for(3)
    raw = perfect_raw(labels, step, offset_noise=0.4, sigma_noise=0.05, seed_noise=0.5, seed=seed)
    whole = drop_fragments(cluster(raw, step=step, min_size=20, device="cpu"), 20)
    out = np.zeros(labels.shape, np.uint32)
    options = {"tile": (24, 32, 32), "core": (24, 32, 32), "margin": (24, 24, 24), "device": "cpu"}
    result = segment_streamed(RawNet(), ArraySource(raw, channels=True), out, step=step, normalization=None,
                              min_size=20, **options)  # fmt: skip
    assert result.n_objects == int(whole.max()) >= 27 and result.windows == 9
    assert same_partition(whole, out)
    assert average_precision(labels, out.astype(np.int64), [0.9]).ap == average_precision(labels, whole, [0.9]).ap


def test_cancelling_stops_the_streamed_prediction(tmp_path) -> None:
    image = blob_block((16, 64, 64), seed=0)
    calls: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> bool:
        calls.append((done, total))
        return done < 3

    with pytest.raises(PredictionCancelled):
        segment_streamed(TinyStagedNet().eval(), ArraySource(image), np.zeros(image.shape, np.uint32), step=step_for(3),
                         normalization=NormalizationSettings(), tile=(16, 32, 32), device="cpu", scratch=tmp_path,
                         progress=progress)  # fmt: skip
    assert [d for d, _ in calls] == [1, 2, 3] and not list(tmp_path.iterdir())


def test_default_margin_and_core() -> None:
    assert default_margin(None, 3) == (32, 32, 32)
    assert default_margin((2.0, 11.0, 11.5), 3) == (16, 24, 24)
    assert auto_core((5, 4000, 4000), (16, 24, 24), window_voxels=5 * 300 * 300) == (5, 248, 248)
    assert auto_core((40, 60, 70), (16, 16, 16)) == (40, 60, 70)  # the whole volume in one window


@pytest.mark.parametrize("shape", [(13, 37, 43), (5, 20, 9), (45, 70)])
def test_tta_raw_outputs_with_the_grids_in_files_equal_the_whole_volumes(tmp_path, shape) -> None:
    from embedseg_service.core.inference.stream_tta import StreamedTTA

    net = random_erfnet(len(shape))
    image = np.random.default_rng(2).random(shape).astype(np.float32)
    with torch.inference_mode():
        whole = predict_tiled(net, image[None], tile=None, device="cpu", tta=True)
        plain = predict_tiled(net, image[None], tile=None, device="cpu")
    streamed = StreamedTTA(net, ArraySource(image), [None], block=(2, 3, 4)[-len(shape) :],
                           device=torch.device("cpu"), scratch=tmp_path)  # fmt: skip
    ticks, region, part, every = build_and_read(streamed, (slice(0, 1), slice(1, 3), slice(0, 2))[-len(shape) :])
    assert ticks == streamed.build_steps() == sum(n.passes() * n.block_count() for n in streamed.nets)
    assert len(streamed.nets) == 2 ** (len(shape) + 1) and part.shape == (
        2 * len(shape) + 1,
        *(r.stop - r.start for r in region),
    )
    np.testing.assert_allclose(part, whole[(slice(None), *region)], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(every, whole, rtol=1e-4, atol=1e-4)
    assert np.abs(every - plain).max() > 1e-2  # the passes were combined, not the identity's alone
    assert not list(tmp_path.iterdir())


def test_streamed_tta_labels_equal_the_whole_volumes_with_tta() -> None:
    image = blob_block((16, 96, 96), seed=4)
    image[:, :, 50:] = np.clip(image[:, :, 50:].astype(np.int32) - 60, 20, 255).astype(np.uint8)  # dimmer half
    net = TinyStagedNet().eval()
    with torch.no_grad():  # a context that leans towards +y and +x: the passes disagree
        net.box.weight[0, 0, 1, 1, 2] += 0.15
        net.box.weight[0, 0, 1, 2, 1] += 0.1
    settings = NormalizationSettings()
    found = {}
    for tta in (False, True):
        whole = segment(net, normalize(image), step=step_for(3), tile=None, min_size=50, device="cpu", tta=tta)
        out = np.zeros(image.shape, np.uint32)
        result = segment_streamed(net, ArraySource(image), out, step=step_for(3), normalization=settings, min_size=50,
                                  tile=(16, 64, 64), core=(16, 48, 48), margin=(24, 24, 24), device="cpu",
                                  tta=tta)  # fmt: skip
        assert result.windows == 4 and result.cut == 0 and result.n_objects == int(whole.max()) >= 12
        assert same_partition(whole, out)
        found[tta] = whole
    assert not np.array_equal(found[False] > 0, found[True] > 0)  # TTA changed the labels it had to match


def test_a_scratch_folder_without_room_for_the_grids_stops_before_writing_them(tmp_path, monkeypatch) -> None:
    import collections
    import shutil

    from embedseg_service.core.inference.stream_net import ScratchSpaceError

    image = blob_block((16, 64, 64), seed=1)
    grid = 4 * 1 * (16 // 4) * (64 // 4) * (64 // 4)  # TinyStagedNet: one channel per 4-pixel cell
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 3 * grid, 3 * grid))
    options = {"step": step_for(3), "normalization": NormalizationSettings(), "tile": (16, 64, 64),
               "device": "cpu", "scratch": tmp_path}  # fmt: skip
    out = np.zeros(image.shape, np.uint32)
    assert segment_streamed(TinyStagedNet().eval(), ArraySource(image), out, **options).n_objects == 9  # 3 x 3 blobs
    with pytest.raises(ScratchSpaceError) as refused:  # 16 passes: one grid each, and two while one builds
        segment_streamed(TinyStagedNet().eval(), ArraySource(image), out, tta=True, **options)
    assert str(refused.value) == (
        f"the cell grids (1 channels of [4, 16, 16] cells) need about {17 * grid} bytes of scratch space in "
        f"{tmp_path}, but {3 * grid} bytes are free; free space there, or predict the volume without test-time "
        "augmentation"
    )
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - grid, grid))
    with pytest.raises(ScratchSpaceError) as refused:  # without TTA: two grids, and no hint about TTA
        segment_streamed(TinyStagedNet().eval(), ArraySource(image), out, **options)
    assert str(refused.value).endswith(
        f"need about {2 * grid} bytes of scratch space in {tmp_path}, but {grid} bytes are free; free space "
        "there, or set TMPDIR to a larger disk"
    )
    assert not list(tmp_path.iterdir())
