"""Model files: round trip, loading a GPU-written file on the CPU, refusal of foreign files."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from embedseg_service.core.model.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    TrainedModel,
    library_versions,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from embedseg_service.core.model.embedding import step_for
from embedseg_service.core.model.erfnet import BranchedERFNet


def _payload(dims: int = 2, in_channels: int = 1, seed: int = 3) -> tuple[dict, BranchedERFNet]:
    torch.manual_seed(seed)
    net = BranchedERFNet(dims, in_channels=in_channels)
    with torch.no_grad():  # non-default weights everywhere, so a lost tensor would show
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    optimizer = torch.optim.Adam(net.parameters(), lr=5e-4)
    net(torch.randn(2, in_channels, *([16] * dims))).sum().backward()
    optimizer.step()
    payload = {
        "state_dict": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 7,
        "config": {"spatial_dims": dims, "epochs": 20, "seed": seed},
        "spatial_dims": dims,
        "in_channels": in_channels,
        "step": list(step_for(dims, 2.0)),
        "properties": {"min_object_size": 12, "normalization": "percentile", "p_low": 1.0, "p_high": 99.8},
        "metrics": {"val_ap": 0.75},
        "history": [{"epoch": 1, "loss": 1.5}],
        "seed": seed,
    }
    return payload, net


def test_round_trip_restores_weights_and_metadata(tmp_path: Path) -> None:
    payload, net = _payload(dims=3, in_channels=2)
    path = save_checkpoint(tmp_path / "sub" / "model.pt", payload)
    assert path == tmp_path / "sub" / "model.pt"
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary file left behind

    data = load_checkpoint(path)
    assert data["format"] == FORMAT_NAME and data["format_version"] == FORMAT_VERSION
    assert data["versions"] == library_versions()
    assert set(data["versions"]) == {"python", "numpy", "torch", "embedseg-service"}
    assert data["epoch"] == 7 and data["history"] == [{"epoch": 1, "loss": 1.5}]
    assert data["optimizer"]["state"][0]["exp_avg"].shape == next(net.parameters()).shape

    model = load_model(path, device="cpu")
    assert isinstance(model, TrainedModel)
    assert model.spatial_dims == 3 and model.in_channels == 2
    assert model.step == pytest.approx((2.0 / 1023, 1 / 1023, 1 / 1023))
    assert model.epoch == 7 and model.seed == 3
    assert model.metrics == {"val_ap": 0.75}
    assert model.min_object_size == 12
    assert model.device == torch.device("cpu")
    assert not model.net.training
    for key, value in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key
    x = torch.randn(1, 2, 8, 16, 16)
    net.eval()
    with torch.no_grad():
        assert torch.equal(model.net(x), net(x))


def test_min_object_size_falls_back_to_36(tmp_path: Path) -> None:
    payload, _ = _payload()
    payload["properties"] = {}
    model = load_model(save_checkpoint(tmp_path / "m.pt", payload), device="cpu")
    assert model.min_object_size == 36


def _as_cuda_file(path: Path) -> bytes:
    """The bytes of ``path`` with every tensor marked as stored on cuda:0 (as a GPU run writes them)."""
    src = zipfile.ZipFile(path)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("data.pkl"):  # pickle protocol 2: 'X' + 4-byte length + text
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            dst.writestr(item, data)
    return out.getvalue()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_gpu_written_checkpoint_loads_on_cpu(tmp_path: Path) -> None:
    payload, net = _payload()
    cpu_file = save_checkpoint(tmp_path / "cpu.pt", payload)
    gpu_file = tmp_path / "gpu.pt"
    gpu_file.write_bytes(_as_cuda_file(cpu_file))
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does with it
        torch.load(gpu_file, weights_only=True)
    model = load_model(gpu_file, device="auto")
    assert model.device == torch.device("cpu")
    for key, value in net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key


def test_refuses_foreign_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="is not an EmbedSeg model file"):
        load_model(text)

    plain = tmp_path / "weights.pt"
    torch.save(BranchedERFNet(2).state_dict(), plain)  # a bare state dict: no format mark
    with pytest.raises(ValueError, match="no 'embedseg-service-model' format mark"):
        load_model(plain)

    payload, _ = _payload()
    good = save_checkpoint(tmp_path / "good.pt", payload)
    data = torch.load(good, weights_only=True)
    data["format_version"] = FORMAT_VERSION + 1
    torch.save(data, tmp_path / "future.pt")
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}"):
        load_model(tmp_path / "future.pt")

    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_model(tmp_path / "missing.pt")


class _Foreign:
    """Any class: a file that would need it to load is refused (it could run code)."""


def test_refuses_a_pickle_with_code(tmp_path: Path) -> None:
    path = tmp_path / "code.pt"
    torch.save({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "obj": _Foreign()}, path)
    with pytest.raises(ValueError, match="is not an EmbedSeg model file"):
        load_checkpoint(path)


def test_refuses_weights_of_another_network(tmp_path: Path) -> None:
    payload, _ = _payload(dims=2)
    payload["spatial_dims"] = 3
    payload["step"] = list(step_for(3))
    path = save_checkpoint(tmp_path / "m.pt", payload)
    with pytest.raises(ValueError, match="do not fit a 3D network"):
        load_model(path, device="cpu")


def test_prepare_checks_channels_and_normalises() -> None:
    payload, net = _payload()
    model = TrainedModel(
        net=net, spatial_dims=2, in_channels=1, step=step_for(2), device=torch.device("cpu"),
        properties=payload["properties"],
    )  # fmt: skip
    image = np.arange(64, dtype=np.uint16).reshape(8, 8) + 100
    out = model.prepare(image)
    assert out.shape == (1, 8, 8) and out.dtype == np.float32
    lo, hi = np.percentile(image, (1.0, 99.8))
    np.testing.assert_allclose(out[0], (image - lo) / (hi - lo), rtol=1e-5)
    with pytest.raises(ValueError, match="expects 1 channel"):
        model.prepare(np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="2 spatial axes"):
        model.prepare(np.zeros((2, 2, 8, 8)))


def test_segment_passes_the_tiling_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import embedseg_service.core.inference.predict

    payload, net = _payload()
    seen: list[object] = []
    sizes: list[object] = []
    radii: list[object] = []

    def fake_segment(_net, images, *, tile, min_size, max_radius, **_kwargs):  # records what segment_batch() receives
        seen.append(tile)
        sizes.append(min_size)
        radii.append(max_radius)
        return [np.zeros(image.shape[1:], dtype=np.int32) for image in images]

    monkeypatch.setattr(embedseg_service.core.inference.predict, "segment_batch", fake_segment)
    props = dict(payload["properties"], crop_shape=[24, 32], n_objects=5, extent_mean=[6.0, 8.0], extent_std=[1.0, 2.0])
    model = TrainedModel(net=net, spatial_dims=2, in_channels=1, step=step_for(2), device=torch.device("cpu"),
                         properties=props)  # fmt: skip
    image = np.zeros((100, 120), dtype=np.float32)
    model.segment(image, tta=False)
    model.segment(image, tta=False, tile=(16, 16))
    model.segment(image, tta=False, tile=None, min_size=7)
    # "auto" is the whole image where memory allows (as the batch-norm statistics were estimated)
    assert seen == ["auto", (16, 16), None]
    # the model's own minimum object size unless the caller gives one
    assert sizes == [props["min_object_size"]] * 2 + [7]
    # the seed radius limit from the training objects' extents (mean + 5 std per axis)
    assert radii == [(11.0, 18.0)] * 3
    older = TrainedModel(net=net, spatial_dims=2, in_channels=1, step=step_for(2), device=torch.device("cpu"),
                         properties=payload["properties"])  # fmt: skip
    older.segment(image, tta=False)
    assert radii[-1] is None  # a checkpoint without extent statistics clusters as the reference does
