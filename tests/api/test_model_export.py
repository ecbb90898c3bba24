"""``GET /models/{id}/export`` on SQLite and PostgreSQL: TorchScript and ONNX files that reproduce the network's
raw outputs on inputs of other sizes than the one traced, kept in storage after the first request; the
provenance of uploaded and trained models; the client's and ``embedseg remote``'s export."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from helpers import RecordingDispatcher, disks, tiff_bytes, upload

from embedseg_service.client import Client
from embedseg_service.client.remote import do_export
from embedseg_service.core.model.checkpoint import build_network, library_versions, load_model, save_checkpoint
from embedseg_service.records.keys import create_key

M = "/api/v1/models"
SHAPES = {2: [(1, 1, 48, 64), (2, 1, 80, 40)], 3: [(1, 1, 16, 24, 32), (2, 1, 8, 16, 16)]}
"""Two input shapes per dimensionality, neither that of the example the export traces (64² and 16×32²)."""


@pytest.fixture
def settings(settings):  # type: ignore[no-untyped-def]
    """Room for a real 3D network's weights."""
    return settings.model_copy(update={"max_upload_bytes": 48 * 1024 * 1024})


def model_file(tmp_path: Path, dims: int, seed: int = 0) -> Path:
    """A checkpoint of a fresh network whose weights and batch-norm statistics are all perturbed (a lost or
    misplaced tensor would show in the outputs)."""
    torch.manual_seed(seed)
    net = build_network(dims, 1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for name, buffer in net.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn_like(buffer) * 0.1)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    payload = {
        "state_dict": net.state_dict(),
        "spatial_dims": dims,
        "in_channels": 1,
        "step": [1 / 1023] * dims,
        "properties": {"min_object_size": 9, "normalization": "percentile", "p_low": 2.0, "p_high": 99.5},
        "seed": seed,
    }
    return save_checkpoint(tmp_path / f"model{dims}d.pt", payload)


def post_model(client: Any, path: Path, name: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = client.post(
        M, files={"file": ("m.pt", path.read_bytes(), "application/octet-stream")}, data={"name": name}, headers=headers
    )
    assert response.status_code == 201, response.text
    return response.json()


def reference(path: Path, x: np.ndarray) -> np.ndarray:
    """The raw outputs of the model as the service loads it (eval mode, CPU)."""
    with torch.no_grad():
        return load_model(path, device="cpu").net(torch.from_numpy(x)).numpy()


def inputs(dims: int) -> list[np.ndarray]:
    rng = np.random.default_rng(dims)
    return [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES[dims]]


@pytest.mark.parametrize("dims", [2, 3])
def test_torchscript_export_reproduces_the_network_at_other_sizes(client, app, tmp_path, dims) -> None:
    path = model_file(tmp_path, dims)
    model = post_model(client, path, f"nuclei {dims}d")
    response = client.get(f"{M}/{model['id']}/export", params={"format": "torchscript"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert f'filename="nuclei_{dims}d.pt"' in response.headers["content-disposition"]
    extra = {"embedseg.json": ""}
    network = torch.jit.load(io.BytesIO(response.content), map_location="cpu", _extra_files=extra)
    for x in inputs(dims):
        with torch.no_grad():
            out = network(torch.from_numpy(x)).numpy()
        assert out.shape == (x.shape[0], 2 * dims + 1, *x.shape[2:])
        np.testing.assert_allclose(out, reference(path, x), rtol=1e-5, atol=1e-5)
    description = json.loads(extra["embedseg.json"])
    assert description["spatial_dims"] == dims and description["in_channels"] == 1
    assert description["step"] == [1 / 1023] * dims and description["min_object_size"] == 9
    assert description["normalization"] == {"mode": "percentile", "p_low": 2.0, "p_high": 99.5}
    assert description["output_channels"][-1] == "seed_logit" and len(description["output_channels"]) == 2 * dims + 1

    # kept in storage under the model's folder; a later request sends the stored file as it is
    storage = app.state.storage
    key = f"models/{model['id']}/network.pt"
    assert storage.path_for(key).read_bytes() == response.content
    storage.put(key, iter([b"the stored export"]))
    again = client.get(f"{M}/{model['id']}/export")  # torchscript is the default
    assert again.status_code == 200 and again.content == b"the stored export"

    assert client.delete(f"{M}/{model['id']}").status_code == 204
    assert storage.list_keys(f"models/{model['id']}") == []


@pytest.mark.parametrize("dims", [2, 3])
def test_onnx_export_reproduces_the_network_at_other_sizes(client, tmp_path, dims) -> None:
    path = model_file(tmp_path, dims, seed=1)
    model = post_model(client, path, "cells")
    response = client.get(f"{M}/{model['id']}/export", params={"format": "onnx"})
    assert response.status_code == 200, response.text
    assert 'filename="cells.onnx"' in response.headers["content-disposition"]
    graph = onnx.load_from_string(response.content)
    description = json.loads({p.key: p.value for p in graph.metadata_props}["embedseg.json"])
    assert description["spatial_dims"] == dims and description["versions"] == library_versions()
    session = onnxruntime.InferenceSession(response.content, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and [o.name for o in session.get_outputs()] == ["raw"]
    for x in inputs(dims):
        (out,) = session.run(None, {"image": x})
        assert out.shape == (x.shape[0], 2 * dims + 1, *x.shape[2:]) and out.dtype == np.float32
        np.testing.assert_allclose(out, reference(path, x), rtol=1e-5, atol=1e-5)


def test_onnx_export_without_the_onnx_package_answers_501(client, tmp_path, monkeypatch) -> None:
    model = post_model(client, model_file(tmp_path, 2), "m")
    monkeypatch.setitem(sys.modules, "onnx", None)  # what an installation without onnx looks like to imports
    response = client.get(f"{M}/{model['id']}/export", params={"format": "onnx"})
    assert response.status_code == 501
    assert response.json() == {
        "detail": "ONNX export needs the 'onnx' package, which is not installed here (pip install onnx); "
        "the torchscript format is available"
    }
    assert client.get(f"{M}/{model['id']}/export").status_code == 200


def test_an_unknown_format_is_refused(client, tmp_path) -> None:
    model = post_model(client, model_file(tmp_path, 2), "m")
    response = client.get(f"{M}/{model['id']}/export", params={"format": "keras"})
    assert response.status_code == 422
    assert response.json() == {"detail": "query.format: Input should be 'torchscript' or 'onnx'"}


def test_another_owners_model_answers_404_like_an_unknown_one(client, session, tmp_path) -> None:
    a = {"Authorization": f"Bearer {create_key(session, 'lab-a').secret}"}
    b = {"Authorization": f"Bearer {create_key(session, 'lab-b').secret}"}
    model = post_model(client, model_file(tmp_path, 2), "mine", headers=a)
    for fmt in ("torchscript", "onnx"):
        theirs = client.get(f"{M}/{model['id']}/export", params={"format": fmt}, headers=b)
        assert theirs.status_code == 404
        assert theirs.json() == {"detail": f"Model {model['id']} not found"}
        unknown = client.get(f"{M}/{'0' * 36}/export", params={"format": fmt}, headers=b)
        assert unknown.json() == {"detail": f"Model {'0' * 36} not found"}
    assert client.get(f"{M}/{model['id']}/export", headers=a).status_code == 200


def test_exports_count_in_their_owners_stored_bytes(client, session, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from embedseg_service.records.usage import stored_bytes

    a = {"Authorization": f"Bearer {create_key(session, 'lab-a').secret}"}
    model = post_model(client, model_file(tmp_path, 2), "m", headers=a)
    assert stored_bytes(session, ["lab-a"]) == {("lab-a", "models"): model["size_bytes"]}
    sizes: dict[str, int] = {}
    for fmt in ("torchscript", "onnx", "torchscript"):  # the second torchscript request is sent from storage
        response = client.get(f"{M}/{model['id']}/export", params={"format": fmt}, headers=a)
        assert response.status_code == 200, response.text
        sizes[fmt] = len(response.content)
        session.expire_all()
        assert stored_bytes(session, ["lab-a"]) == {("lab-a", "models"): model["size_bytes"] + sum(sizes.values())}
    total = float(model["size_bytes"] + sum(sizes.values()))
    admin = {"Authorization": f"Bearer {create_key(session, 'core', admin=True).secret}"}
    lines = client.get("/metrics", headers=admin).text.splitlines()
    (line,) = [line for line in lines if line.startswith('embedseg_stored_bytes{owner="lab-a",what="models"} ')]
    assert float(line.split()[-1]) == total


def test_an_export_past_the_owners_quota_answers_413_and_makes_nothing(settings, session, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from embedseg_service.api.app import create_app

    path = model_file(tmp_path, 2)
    size = path.stat().st_size
    app = create_app(settings.model_copy(update={"quota_stored_bytes": size + size // 2}), migrate=False)
    a = {"Authorization": f"Bearer {create_key(session, 'lab-a').secret}"}
    with TestClient(app) as client:
        model = post_model(client, path, "m", headers=a)
        refused = client.get(f"{M}/{model['id']}/export", headers=a)
        assert refused.status_code == 413
        assert refused.json() == {
            "detail": f"storage quota exceeded: owner 'lab-a' store {size} bytes and this export adds about {size}; "
            f"the limit is {size + size // 2} bytes (EMBEDSEG_QUOTA_STORED_BYTES); delete volumes or models first"
        }
        assert app.state.storage.list_keys(f"models/{model['id']}") == []
        assert client.get(f"{M}/{model['id']}/download", headers=a).content == path.read_bytes()
        assert client.get(f"{M}/{model['id']}", headers=a).json()["size_bytes"] == size


def test_client_and_remote_export(app, client, tmp_path) -> None:
    app.state.dispatcher = RecordingDispatcher()
    path = model_file(tmp_path, 2)
    model = post_model(client, path, "nuclei")
    folder = tmp_path / "exports"
    folder.mkdir()
    with Client("http://testserver", api_key="", http=client) as api:
        written = api.export_model(model["id"], folder)
        result = do_export(api, argparse.Namespace(model_id=model["id"], path=str(folder), format="onnx"))
    assert written == folder / "nuclei.pt"
    assert result == {"model_id": model["id"], "format": "onnx", "path": str(folder / "nuclei.onnx")}
    x = inputs(2)[0]
    with torch.no_grad():
        out = torch.jit.load(str(written))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, reference(path, x), rtol=1e-5, atol=1e-5)
    (onnx_out,) = onnxruntime.InferenceSession(str(folder / "nuclei.onnx")).run(None, {"image": x})
    np.testing.assert_allclose(onnx_out, out, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- provenance


def test_an_uploaded_model_records_its_sha256_and_the_versions_its_file_states(client, tmp_path) -> None:
    path = model_file(tmp_path, 2, seed=5)
    body = post_model(client, path, "uploaded")
    provenance = body["provenance"]
    uploaded_at = provenance.pop("uploaded_at")
    assert provenance == {
        "origin": "uploaded",
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "filename": "m.pt",
        "versions": library_versions(),
        "seed": 5,
        "device": None,
        "epoch": None,
    }
    assert datetime.fromisoformat(uploaded_at).tzinfo is not None
    assert client.get(f"{M}/{body['id']}").json()["provenance"]["uploaded_at"] == uploaded_at


@pytest.mark.slow
def test_a_trained_model_records_its_volumes_versions_seed_device_and_job(client, settings) -> None:
    from embedseg_service.worker.runner import run_job

    volumes: dict[str, list[dict[str, Any]]] = {"images": [], "masks": [], "val_images": [], "val_masks": []}
    for role, shift in (("", 0), ("val_", 9)):
        labels = np.roll(disks(), shift, axis=1)
        image = upload(client, tiff_bytes((20 + 150 * (labels > 0)).astype(np.uint8)), f"{role}img.tif").json()
        mask = upload(client, tiff_bytes(labels), f"{role}mask.tif", kind="labels", image_id=image["id"]).json()
        volumes[f"{role}images"].append(image)
        volumes[f"{role}masks"].append(mask)
    spec = {
        "image_ids": [v["id"] for v in volumes["images"]],
        "mask_ids": [v["id"] for v in volumes["masks"]],
        "val_image_ids": [v["id"] for v in volumes["val_images"]],
        "val_mask_ids": [v["id"] for v in volumes["val_masks"]],
        "epochs": 1,
        "crop_size": 32,
        "batch_size": 2,
        "max_time_minutes": 0.2,
        "seed": 11,
    }
    job = client.post("/api/v1/jobs/train", json=spec).json()
    fast = settings.model_copy(update={"progress_throttle_s": 0.05, "heartbeat_s": 0.2})
    assert run_job(job["id"], settings=fast) == "succeeded", client.get(f"/api/v1/jobs/{job['id']}").json()["error"]
    model_id = client.get(f"/api/v1/jobs/{job['id']}").json()["result"]["model_id"]
    model = client.get(f"{M}/{model_id}").json()
    provenance = model["provenance"]
    assert provenance["origin"] == "trained" and provenance["job_id"] == job["id"] == model["source_job_id"]
    assert provenance["versions"] == library_versions()
    assert set(provenance["versions"]) == {"python", "numpy", "torch", "embedseg-service"}
    assert provenance["seed"] == 11 == model["config"]["seed"]
    assert provenance["device"] == "cpu"
    assert datetime.fromisoformat(provenance["created_at"]).tzinfo is not None
    expected = {role: [{"id": v["id"], "name": v["name"], "sha256": v["sha256"]} for v in rows]
                for role, rows in volumes.items()}  # fmt: skip
    assert provenance["volumes"] == expected
    for role, rows in volumes.items():  # the sha256 the upload answered is that of the bytes sent
        content = client.get(f"/api/v1/volumes/{rows[0]['id']}/download").content
        assert provenance["volumes"][role][0]["sha256"] == hashlib.sha256(content).hexdigest()
    # the model file records the device and versions too: uploaded elsewhere, it still says how it was made
    content = client.get(f"{M}/{model_id}/download").content
    again = client.post(M, files={"file": ("trained.pt", content, "application/octet-stream")}).json()["provenance"]
    assert again["origin"] == "uploaded" and again["sha256"] == hashlib.sha256(content).hexdigest()
    assert (again["versions"], again["seed"], again["device"]) == (library_versions(), 11, "cpu")
    assert (
        again["epoch"]
        == torch.load(io.BytesIO(content), weights_only=True)["epoch"]
        == model["metrics"]["epochs_completed"]
    )
