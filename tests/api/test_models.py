"""``/models`` routes on SQLite and PostgreSQL: upload (checked against the network), list, get, download, delete."""

from __future__ import annotations

import functools
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiff_bytes, upload

from embedseg_service.api.checkpoints import CheckpointInvalid, read_checkpoint_summary
from embedseg_service.core.model.checkpoint import build_network, save_checkpoint
from embedseg_service.records.orm import Model

M = "/api/v1/models"


@functools.cache
def network_weights(spatial_dims: int = 2, in_channels: int = 1) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a fresh network (what a model file must hold)."""
    return build_network(spatial_dims, in_channels).state_dict()


@pytest.fixture
def settings(settings):  # type: ignore[no-untyped-def]
    """The API's settings with room for a real network's weights (9 MB in 2D)."""
    return settings.model_copy(update={"max_upload_bytes": 24 * 1024 * 1024})


def checkpoint_bytes(tmp_path: Path, **overrides) -> bytes:  # type: ignore[no-untyped-def]
    """A model file as written by embedseg_service.core.model.checkpoint, with a fresh 2D network's weights."""
    payload = {
        "state_dict": network_weights(),
        "spatial_dims": 2,
        "in_channels": 1,
        "step": [1 / 1023, 1 / 1023],
        "config": {"spatial_dims": 2, "epochs": 7, "in_channels": 1},
        "properties": {"min_object_size": 25, "foreground_weight": 10.0},
        "metrics": {"val_ap": 0.8},
    }
    payload.update(overrides)
    path = save_checkpoint(tmp_path / "model.pt", payload)
    return path.read_bytes()


def post_model(client, content: bytes, filename: str = "nuclei.pt", **fields):  # type: ignore[no-untyped-def]
    return client.post(
        M, files={"file": (filename, content, "application/octet-stream")}, data={k: str(v) for k, v in fields.items()}
    )


def zip_with_pickle(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", data)
    return buffer.getvalue()


EVAL_PICKLE = b"\x80\x02cbuiltins\neval\nX\x03\x00\x00\x001+1\x85R."
"""A pickle that would call eval("1+1") if it were loaded with the standard unpickler."""


def torch_saved(tmp_path: Path, data: dict) -> bytes:
    path = tmp_path / "saved.pt"
    torch.save(data, path)
    return path.read_bytes()


def test_upload_get_list_download_delete(client, tmp_path) -> None:
    content = checkpoint_bytes(tmp_path)
    response = post_model(client, content)
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"{M}/{body['id']}"
    assert body["name"] == "nuclei"
    assert body["spatial_dims"] == 2
    assert body["config"] == {"spatial_dims": 2, "epochs": 7, "in_channels": 1}
    assert body["data_properties"] == {"min_object_size": 25, "foreground_weight": 10.0}
    assert body["metrics"] == {"val_ap": 0.8}
    assert body["size_bytes"] == len(content)
    assert body["source_job_id"] is None and body["owner"] is None

    assert client.get(f"{M}/{body['id']}").json() == body
    named = post_model(client, content, name="second")
    assert named.status_code == 201 and named.json()["name"] == "second"
    listing = client.get(M).json()
    assert listing["total"] == 2 and [m["id"] for m in listing["items"]] == [named.json()["id"], body["id"]]
    assert client.get(M, params={"spatial_dims": 3}).json()["total"] == 0
    assert client.get(M, params={"limit": 1, "offset": 1}).json()["items"][0]["id"] == body["id"]

    download = client.get(f"{M}/{body['id']}/download")
    assert download.status_code == 200
    assert download.content == content
    assert download.headers["content-type"] == "application/octet-stream"
    assert 'filename="nuclei.pt"' in download.headers["content-disposition"]

    assert client.delete(f"{M}/{body['id']}").status_code == 204
    assert client.get(f"{M}/{body['id']}").json() == {"detail": f"Model {body['id']} not found"}
    assert client.get(M).json()["total"] == 1


def test_upload_without_a_config_records_dims_and_channels(client, tmp_path) -> None:
    response = post_model(client, checkpoint_bytes(tmp_path, config=None, metrics=None, properties=None))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["config"] == {"spatial_dims": 2, "in_channels": 1}
    assert body["data_properties"] is None and body["metrics"] is None


@pytest.mark.parametrize(
    ("make", "detail"),
    [
        (lambda _tmp: b"not a zip at all", "it is not a model file written by this service (not a torch zip archive)"),
        (
            lambda _tmp: zip_with_pickle(pickle.dumps({"a": 1}, protocol=2)),
            "it is not a model file written by this service (no 'embedseg-service-model' format mark)",
        ),
        (lambda _tmp: zip_with_pickle(EVAL_PICKLE), "it refers to builtins.eval, which a model file never contains"),
        (lambda _tmp: zip_with_pickle(b"\x80\x02garbage"), "its contents cannot be read (UnpicklingError)"),
        (
            lambda tmp: torch_saved(tmp, {"format": "embedseg-service-model", "format_version": 99}),
            "it has format version 99; this service reads version 1",
        ),
        (lambda tmp: checkpoint_bytes(tmp, step=[0.001]), "its embedding step [0.001] does not have 2 numbers"),
        (
            lambda tmp: checkpoint_bytes(tmp, spatial_dims=4),
            "it describes an invalid network (spatial_dims=4, in_channels=1)",
        ),
        (lambda tmp: checkpoint_bytes(tmp, state_dict={}), "its state_dict holds no network weights"),
    ],
)
def test_upload_refuses_what_is_not_a_model_file(client, tmp_path, make, detail) -> None:  # type: ignore[no-untyped-def]
    response = post_model(client, make(tmp_path))
    assert response.status_code == 422
    assert response.json() == {"detail": f"not a usable model file: {detail}"}
    assert client.get(M).json()["total"] == 0
    assert not list((tmp_path / "storage").rglob("models/*"))


def test_incomplete_checkpoint_is_refused(client, tmp_path) -> None:
    content = torch_saved(tmp_path, {"format": "embedseg-service-model", "format_version": 1, "spatial_dims": 2})
    response = post_model(client, content)
    assert response.status_code == 422
    assert response.json() == {
        "detail": "not a usable model file: it is incomplete (missing state_dict, in_channels, step)"
    }


def test_upload_form_refusals(client, tmp_path, settings) -> None:
    content = checkpoint_bytes(tmp_path)
    response = client.post(M, content=content, headers={"content-type": "application/octet-stream"})
    assert response.status_code == 415
    assert response.json() == {
        "detail": "send the checkpoint as multipart/form-data with the file in the form field 'file'"
    }
    response = post_model(client, b"")
    assert response.status_code == 422
    assert response.json() == {"detail": "the uploaded file is empty; send a model file (.pt)"}
    response = post_model(client, content, colour="red")
    assert response.status_code == 422
    assert response.json() == {"detail": "unknown form field 'colour'; use file, name"}
    response = post_model(client, content, name="x" * 256)
    assert response.status_code == 422
    assert response.json() == {"detail": "name is longer than 255 characters"}
    response = post_model(client, b"\0" * (settings.max_upload_bytes + 1))
    assert response.status_code == 413
    assert response.json() == {
        "detail": f"upload exceeds the limit of {settings.max_upload_bytes} bytes (24.0 MiB); send a smaller file or "
        "raise EMBEDSEG_MAX_UPLOAD_BYTES"
    }
    response = client.post(M, files={"other": ("m.pt", content)})
    assert response.status_code == 422
    assert client.get(M).json()["total"] == 0


def test_unknown_model_is_404_everywhere(client) -> None:
    for method, path in (("get", f"{M}/nope"), ("get", f"{M}/nope/download"), ("delete", f"{M}/nope")):
        response = getattr(client, method)(path)
        assert response.status_code == 404
        assert response.json() == {"detail": "Model nope not found"}


def test_list_refusals(client) -> None:
    response = client.get(M, params={"limit": 501})
    assert response.status_code == 422
    assert response.json() == {"detail": "query.limit: must be at most 500"}
    response = client.get(M, params={"spatial_dims": 4})
    assert response.status_code == 422
    assert response.json() == {"detail": "query.spatial_dims: Input should be less than or equal to 3"}


def test_delete_is_refused_while_a_job_uses_the_model(client, tmp_path) -> None:
    model = post_model(client, checkpoint_bytes(tmp_path)).json()
    image = upload(client, tiff_bytes(np.zeros((32, 32), np.uint8))).json()["id"]
    job = client.post("/api/v1/jobs/predict", json={"model_id": model["id"], "volume_ids": [image]})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    response = client.delete(f"{M}/{model['id']}")
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Model {model['id']} is used by queued or running job(s) {job_id}; cancel them or wait until "
        "they finish"
    }
    assert client.post(f"/api/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    assert client.delete(f"{M}/{model['id']}").status_code == 204


def test_trained_model_rows_show_their_source_job(client, session) -> None:
    job = client.post(
        "/api/v1/jobs/evaluate",
        json={
            "pairs": [
                {
                    "gt_id": (gt := upload(client, tiff_bytes(np.ones((8, 8), np.uint16)), kind="labels").json()["id"]),
                    "pred_id": gt,
                }
            ]
        },
    ).json()
    session.add(
        Model(
            id="m1",
            name="trained",
            spatial_dims=3,
            config={"epochs": 1},
            storage_key="jobs/x/model.pt",
            size_bytes=3,
            source_job_id=job["id"],
            metrics={"best_epoch": 1},
        )
    )
    session.commit()
    body = client.get(f"{M}/m1").json()
    assert body["source_job_id"] == job["id"] and body["spatial_dims"] == 3 and body["metrics"] == {"best_epoch": 1}


def test_summary_reads_a_real_network_checkpoint(tmp_path) -> None:
    net = build_network(3, 2)
    path = save_checkpoint(
        tmp_path / "net.pt",
        {
            "state_dict": net.state_dict(),
            "spatial_dims": 3,
            "in_channels": 2,
            "step": [0.002, 0.001, 0.001],
        },
    )
    summary = read_checkpoint_summary(path)
    assert (summary.spatial_dims, summary.in_channels, summary.step) == (3, 2, [0.002, 0.001, 0.001])
    assert summary.n_tensors == len(net.state_dict())
    with pytest.raises(CheckpointInvalid, match="not a torch zip archive"):
        read_checkpoint_summary(tmp_path / "missing.pt")
