"""Outputs that open in napari and Fiji: label TIFFs keep their axes and voxel size when read back with
tifffile, and ``GET /jobs/{id}/labels.zip`` holds every label volume of a predict job (SQLite and
PostgreSQL), named after the images they segment; 409 before it succeeded, 404 for another owner."""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from embedseg_service.api.app import API_PREFIX
from embedseg_service.api.label_zip import unique_names
from embedseg_service.core.data.tiff_write import write_labels
from embedseg_service.records import jobs, keys
from embedseg_service.records.orm import JobKind, JobStatus, Volume


def _voxel_size(tif: tifffile.TiffFile) -> tuple[str, list[float]]:
    """The axes and physical voxel size (array order) a reader finds: ImageJ tags or OME metadata."""
    axes = tif.series[0].axes
    if tif.is_imagej:
        page = tif.pages.first
        x_res, y_res = (page.tags[name].value for name in ("XResolution", "YResolution"))
        sizes = [y_res[1] / y_res[0], x_res[1] / x_res[0]]
        if "Z" in axes:
            sizes.insert(0, float(tif.imagej_metadata["spacing"]))
        assert tif.imagej_metadata["unit"] in ("um", "µm", "micron")
        return axes, sizes
    ome = tif.ome_metadata or ""
    sizes = [float(re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', ome).group(1)) for axis in axes]  # type: ignore[union-attr]
    for axis in axes:
        assert re.search(rf'PhysicalSize{axis}Unit="µm"', ome), ome
    return axes, sizes


@pytest.mark.parametrize(
    ("shape", "max_id", "voxel", "stored"),
    [
        ((24, 32), 7, (0.5, 0.25), "uint16"),
        ((5, 24, 32), 7, (2.0, 0.5, 0.25), "uint16"),
        ((5, 24, 32), 70_000, (2.0, 0.5, 0.25), "int32"),
    ],
)
def test_label_tiffs_keep_axes_and_voxel_size(
    tmp_path: Path, shape: tuple[int, ...], max_id: int, voxel: tuple[float, ...], stored: str
) -> None:
    labels = np.zeros(shape, np.int64)
    labels[..., 2:6, 3:9] = 1
    labels[..., 10:14, 20:30] = max_id
    path = tmp_path / "labels.tif"
    write_labels(path, labels, voxel_size=voxel)
    with tifffile.TiffFile(path) as tif:
        axes, sizes = _voxel_size(tif)
        data = tif.asarray()
    assert axes == ("YX" if len(shape) == 2 else "ZYX")
    assert sizes == pytest.approx(list(voxel), rel=1e-6)
    assert data.dtype == np.dtype(stored)
    np.testing.assert_array_equal(data, labels)


def test_entry_names_are_unique_and_safe() -> None:
    assert unique_names(["t012", "T012", "t012", "a/b", "..", "c\\d:e"]) == [
        "t012.tif", "T012-2.tif", "t012-3.tif", "a_b.tif", "labels.tif", "c_d_e.tif",
    ]  # fmt: skip


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _upload(client: Any, secret: str, content: bytes, **fields: str) -> dict[str, Any]:
    response = client.post(
        f"{API_PREFIX}/volumes", files={"file": ("x.tif", content, "image/tiff")}, data=fields, headers=_bearer(secret)
    )
    assert response.status_code == 201, response.text
    return response.json()


def _labels_file(tmp_path: Path, shape: tuple[int, ...], voxel: tuple[float, ...], seed: int) -> bytes:
    labels = np.zeros(shape, np.uint16)
    labels[..., seed : seed + 4, 2:8] = seed + 1
    path = tmp_path / f"labels-{seed}.tif"
    write_labels(path, labels, voxel_size=voxel)
    return path.read_bytes()


@pytest.fixture
def predicted(client: Any, session: Any, tmp_path: Path) -> dict[str, Any]:
    """Owner A's predict job (succeeded) over three images, two of them named alike, one 3D; and B's key."""
    secrets = {owner: keys.create_key(session, owner).secret for owner in ("lab-a", "lab-b")}
    a = secrets["lab-a"]
    specs = [("t012", (16, 20), (0.5, 0.5)), ("t012", (16, 20), (0.5, 0.5)), ("stack", (3, 16, 20), (2.0, 0.5, 0.5))]
    images, labels = [], []
    for index, (name, shape, voxel) in enumerate(specs):
        image = _upload(client, a, _labels_file(tmp_path, shape, voxel, index), name=name)
        images.append(image)
        labels.append(
            _upload(
                client,
                a,
                _labels_file(tmp_path, shape, voxel, index + 5),
                kind="labels",
                image_id=image["id"],
                name=f"{name}-labels",
            )  # fmt: skip
        )
    job = jobs.create_job(session, JobKind.predict, {"volume_ids": [i["id"] for i in images]}, owner="lab-a",
                          volumes=[(i["id"], "input") for i in images])  # fmt: skip
    assert jobs.claim(session, job.id, "test-worker") == 1
    result = {"label_volume_ids": [row["id"] for row in labels]}
    assert jobs.finish_job(session, job.id, JobStatus.succeeded, result=result, attempt=1)
    return {"job": job.id, "labels": labels, "voxels": [v for _, _, v in specs], "keys": secrets}


def test_the_zip_holds_every_label_volume(client: Any, app: Any, session: Any, predicted: dict[str, Any]) -> None:
    job_id = predicted["job"]
    response = client.get(f"{API_PREFIX}/jobs/{job_id}/labels.zip", headers=_bearer(predicted["keys"]["lab-a"]))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert response.headers["content-disposition"] == f'attachment; filename="{job_id[:8]}-labels.zip"'
    assert int(response.headers["content-length"]) == len(response.content)
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.testzip() is None
    assert archive.namelist() == ["t012.tif", "t012-2.tif", "stack.tif"]
    storage = app.state.storage
    for name, label, voxel in zip(archive.namelist(), predicted["labels"], predicted["voxels"]):
        content = archive.read(name)
        row = session.get(Volume, label["id"])
        stored = storage.path_for(row.storage_key).read_bytes()
        assert hashlib.sha256(content).hexdigest() == hashlib.sha256(stored).hexdigest() == row.sha256
        with tifffile.TiffFile(io.BytesIO(content)) as tif:
            axes, sizes = _voxel_size(tif)
        assert axes == ("YX" if len(voxel) == 2 else "ZYX")
        assert sizes == pytest.approx(list(voxel), rel=1e-6)


def test_the_zip_is_refused_for_another_owner_and_unfinished_jobs(
    client: Any, session: Any, predicted: dict[str, Any]
) -> None:
    a, b = predicted["keys"]["lab-a"], predicted["keys"]["lab-b"]
    job_id = predicted["job"]
    response = client.get(f"{API_PREFIX}/jobs/{job_id}/labels.zip", headers=_bearer(b))
    assert (response.status_code, response.json()) == (404, {"detail": f"Job {job_id} not found"})

    image_ids = [label["image_volume_id"] for label in predicted["labels"]]
    queued = jobs.create_job(session, JobKind.predict, {"volume_ids": image_ids}, owner="lab-a")
    response = client.get(f"{API_PREFIX}/jobs/{queued.id}/labels.zip", headers=_bearer(a))
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Job {queued.id} is queued; its labels can be downloaded once it has succeeded"
    }
    evaluate = jobs.create_job(session, JobKind.evaluate, {}, owner="lab-a")
    response = client.get(f"{API_PREFIX}/jobs/{evaluate.id}/labels.zip", headers=_bearer(a))
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Job {evaluate.id} is an evaluate job; only predict jobs produce label volumes"
    }


def test_the_zip_names_a_deleted_label_volume(client: Any, predicted: dict[str, Any]) -> None:
    a = predicted["keys"]["lab-a"]
    gone = predicted["labels"][1]["id"]
    assert client.delete(f"{API_PREFIX}/volumes/{gone}", headers=_bearer(a)).status_code == 204
    response = client.get(f"{API_PREFIX}/jobs/{predicted['job']}/labels.zip", headers=_bearer(a))
    assert response.status_code == 409
    assert response.json()["detail"].startswith(f"label volume {gone} of job {predicted['job']} has been deleted")
