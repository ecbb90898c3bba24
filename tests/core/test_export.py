"""``embedseg export`` and :func:`embedseg_service.core.model.export.export_model`: TorchScript and ONNX files that
give the network's raw outputs, and a clear refusal when the ONNX exporter is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from embedseg_service.core import cli
from embedseg_service.core.model.checkpoint import build_network, load_model, save_checkpoint
from embedseg_service.core.model.export import ExportUnavailable, export_model


def model_path(tmp_path: Path) -> Path:
    torch.manual_seed(4)
    net = build_network(2, 2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    payload = {"state_dict": net.state_dict(), "spatial_dims": 2, "in_channels": 2, "step": [1 / 1023, 1 / 1023]}
    return save_checkpoint(tmp_path / "two-channel.pt", payload)


def test_cli_exports_torchscript_and_onnx_of_a_two_channel_model(tmp_path, capsys) -> None:
    path = model_path(tmp_path)
    x = np.random.default_rng(0).standard_normal((3, 2, 40, 56)).astype(np.float32)
    with torch.no_grad():
        expected = load_model(path, device="cpu").net(torch.from_numpy(x)).numpy()

    assert cli.main(["export", str(path), "-o", str(tmp_path / "out" / "net.pt")]) == 0
    assert capsys.readouterr().out.strip() == f"{path} -> {tmp_path / 'out' / 'net.pt'} (torchscript)"
    extra = {"embedseg.json": ""}
    traced = torch.jit.load(str(tmp_path / "out" / "net.pt"), _extra_files=extra)
    with torch.no_grad():
        np.testing.assert_allclose(traced(torch.from_numpy(x)).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert json.loads(extra["embedseg.json"])["in_channels"] == 2

    assert cli.main(["export", str(path), "--format", "onnx", "-o", str(tmp_path / "net.onnx")]) == 0
    (out,) = onnxruntime.InferenceSession(str(tmp_path / "net.onnx")).run(None, {"image": x})
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx", "out", "two-channel.pt"]  # no temporary left


def test_onnx_without_the_onnx_package_is_refused_with_the_reason(tmp_path, capsys, monkeypatch) -> None:
    path = model_path(tmp_path)
    monkeypatch.setitem(sys.modules, "onnx", None)  # as imports see an installation without onnx
    message = "ONNX export needs the 'onnx' package, which is not installed here (pip install onnx)"
    with pytest.raises(ExportUnavailable, match=message.replace("(", r"\(").replace(")", r"\)")):
        export_model(load_model(path, device="cpu"), "onnx", tmp_path / "net.onnx")
    assert cli.main(["export", str(path), "--format", "onnx", "-o", str(tmp_path / "net.onnx")]) == 2
    assert capsys.readouterr().err.strip() == f"embedseg export: error: {message}"
    assert not (tmp_path / "net.onnx").exists()


def test_an_unknown_format_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown export format 'keras'; valid choices: torchscript, onnx"):
        export_model(load_model(model_path(tmp_path), device="cpu"), "keras", tmp_path / "net.keras")
