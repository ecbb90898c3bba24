"""/api/v1/volumes: streamed upload, list, get, download, delete and preview, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import post_in_chunks, tiff_bytes, upload
from PIL import Image

from embedseg_service.api import preview
from embedseg_service.core.data.io import read_tiff
from embedseg_service.records import jobs
from embedseg_service.records.orm import JobStatus, Volume
from embedseg_service.records.storage import PendingWrite

V = "/api/v1/volumes"


def image2d(seed: int = 0, shape: tuple[int, ...] = (64, 48), dtype=np.uint16) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.random.default_rng(seed).integers(0, 1000, size=shape).astype(dtype)


def labels2d(shape: tuple[int, int] = (64, 48)) -> np.ndarray:
    labels = np.zeros(shape, np.uint16)
    labels[5:20, 5:20] = 1
    labels[30:50, 10:40] = 7
    return labels


def stored_files(settings) -> list[Path]:  # type: ignore[no-untyped-def]
    """Every file under the storage folder (temporary files included)."""
    return sorted(p for p in Path(settings.storage_path).rglob("*") if p.is_file())


# --------------------------------------------------------------------------- upload


def test_upload_2d_answers_201_with_layout_and_sha256(client, settings) -> None:  # type: ignore[no-untyped-def]
    content = tiff_bytes(image2d())
    response = upload(client, content, filename="cells.tif")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["shape"] == [64, 48]
    assert body["dtype"] == "uint16"
    assert body["axes"] == "YX"
    assert body["kind"] == "image"
    assert body["name"] == "cells"
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["size_bytes"] == len(content)
    assert body["voxel_size"] is None
    assert body["owner"] is None
    assert response.headers["location"] == f"{V}/{body['id']}"
    files = stored_files(settings)
    assert [p.name for p in files] == [f"{body['id']}.tif"]
    assert files[0].read_bytes() == content


def test_upload_3d_reads_voxel_size_from_imagej_metadata(client) -> None:  # type: ignore[no-untyped-def]
    data = image2d(shape=(6, 32, 40))
    metadata = {"spacing": 1.5, "unit": "um", "axes": "ZYX"}
    content = tiff_bytes(data, imagej=True, resolution=(2.0, 2.0), metadata=metadata)
    body = upload(client, content).json()
    assert body["shape"] == [6, 32, 40]
    assert body["axes"] == "ZYX"
    assert body["voxel_size"] == [1.5, 0.5, 0.5]


def test_form_fields_override_name_kind_and_voxel_size(client) -> None:  # type: ignore[no-untyped-def]
    content = tiff_bytes(image2d(shape=(4, 16, 16)))
    response = upload(client, content, name="embryo", voxel_size="2, 0.25,0.25")
    assert response.status_code == 201
    body = response.json()
    assert (body["name"], body["voxel_size"], body["axes"]) == ("embryo", [2.0, 0.25, 0.25], "ZYX")


def test_upload_float32_and_uint8_and_channel_axis(client) -> None:  # type: ignore[no-untyped-def]
    assert upload(client, tiff_bytes(np.ones((8, 8), np.float32))).json()["dtype"] == "float32"
    body = upload(client, tiff_bytes(np.zeros((2, 5, 8, 8), np.uint8))).json()
    assert (body["dtype"], body["axes"], body["shape"]) == ("uint8", "CZYX", [2, 5, 8, 8])


def test_explicit_axes_are_stored_in_canonical_order(client) -> None:  # type: ignore[no-untyped-def]
    data = np.arange(4 * 5 * 8 * 8, dtype=np.uint8).reshape(4, 5, 8, 8)  # stored as Z, C, Y, X
    response = upload(client, tiff_bytes(data), axes="zcyx")
    assert response.status_code == 201
    body = response.json()
    assert (body["axes"], body["shape"]) == ("CZYX", [5, 4, 8, 8])
    download = client.get(f"{V}/{body['id']}/download")
    assert hashlib.sha256(download.content).hexdigest() == body["sha256"]
    back = read_tiff(io.BytesIO(download.content))  # reads back as recorded, without an axes hint
    assert back.axes == "CZYX"
    np.testing.assert_array_equal(back.data, np.moveaxis(data, 1, 0))


def test_upload_labels_linked_to_image(client) -> None:  # type: ignore[no-untyped-def]
    image = upload(client, tiff_bytes(image2d())).json()
    response = upload(client, tiff_bytes(labels2d()), kind="labels", image_id=image["id"])
    assert response.status_code == 201
    assert response.json()["image_volume_id"] == image["id"]
    assert response.json()["kind"] == "labels"


def test_upload_real_2d_image_and_mask(client, data_dir) -> None:  # type: ignore[no-untyped-def]
    folder = data_dir / "nuclei2d_dsb"
    image_path = next((folder / "images").glob("*.tif"))
    mask_path = folder / "masks" / image_path.name
    image = upload(client, image_path.read_bytes(), filename=image_path.name).json()
    mask = upload(client, mask_path.read_bytes(), filename=mask_path.name, kind="labels", image_id=image["id"]).json()
    assert (image["shape"], image["dtype"], image["axes"]) == ([512, 512], "uint16", "YX")
    assert (mask["shape"], mask["kind"]) == ([512, 512], "labels")
    png = client.get(f"{V}/{image['id']}/preview.png")
    assert png.status_code == 200
    assert Image.open(io.BytesIO(png.content)).size == (512, 512)


def test_upload_real_3d_volume(client, data_dir) -> None:  # type: ignore[no-untyped-def]
    path = next((data_dir / "nuclei3d_synthetic" / "images").glob("*.tif"))
    body = upload(client, path.read_bytes(), filename=path.name).json()
    assert (body["shape"], body["axes"], body["dtype"]) == ([31, 61, 57], "ZYX", "uint16")


# --------------------------------------------------------------------------- rejected uploads


def _data_end(content: bytes) -> int:
    with tifffile.TiffFile(io.BytesIO(content)) as tif:
        return tif.series[0].dataoffset + tif.series[0].nbytes


REJECTIONS = [
    (
        "not_tiff",
        lambda: b"plain text, no image",
        {},
        415,
        "the uploaded file is neither a TIFF (no TIFF header) nor a ZIP archive; send a .tif/.tiff file or a zipped "
        "OME-Zarr store (.ome.zarr.zip)",
    ),
    ("empty", lambda: b"", {}, 415, "the uploaded file is empty; send a TIFF file or a zipped OME-Zarr store"),
    ("no_image", lambda: b"II*\x00" + b"\x00" * 20, {}, 422, "unsupported TIFF: the TIFF file contains no image"),
    (
        "garbled_tiff",
        lambda: b"II*\x00\x08\x00\x00\x00\x01\x00" + b"\x00" * 4,
        {},
        415,
        "unsupported TIFF: not a readable TIFF file: corrupted IFD structure",
    ),
    (
        "rgb",
        lambda: tiff_bytes(np.zeros((16, 16, 3), np.uint8), photometric="rgb"),
        {},
        422,
        "unsupported TIFF: colour (RGB/RGBA) images are not supported (shape (16, 16, 3), 3 samples per pixel); "
        "save a single-channel grayscale image, or the channels as separate planes",
    ),
    (
        "time_series",
        lambda: tiff_bytes(np.zeros((3, 4, 16, 16), np.uint8), imagej=True, metadata={"axes": "TZYX"}),
        {},
        422,
        "unsupported TIFF: time series are not supported (3 time points, shape (3, 4, 16, 16)); save one time point",
    ),
    (
        "five_dims",
        lambda: tiff_bytes(np.zeros((2, 2, 2, 8, 8), np.uint8)),
        {},
        422,
        "unsupported TIFF: image of shape (2, 2, 2, 8, 8) has more than 4 dimensions (C, Z, Y, X); "
        "this is not supported",
    ),
    (
        "int8",
        lambda: tiff_bytes(np.zeros((8, 8), np.int8)),
        {},
        422,
        "unsupported TIFF: pixel type int8 is not supported; use one of uint8, uint16, int16, int32, uint32, float32",
    ),
    (
        "int32_image",
        lambda: tiff_bytes(np.zeros((8, 8), np.int32)),
        {},
        422,
        "pixel type int32 is not supported for images; use uint8, uint16 or float32 "
        "(or send kind=labels for a label image)",
    ),
    (
        "float_labels",
        lambda: tiff_bytes(np.zeros((8, 8), np.float32)),
        {"kind": "labels"},
        422,
        "a label image must hold integers (0 = background), got float32",
    ),
    (
        "labels_with_channels",
        lambda: tiff_bytes(np.zeros((2, 4, 8, 8), np.uint16)),
        {"kind": "labels"},
        422,
        "a label image has no channel axis, got axes CZYX",
    ),
    (
        "truncated",
        lambda: tiff_bytes(np.ones((64, 64), np.uint16))[:3000],
        {},
        422,
        lambda: (
            f"the TIFF is truncated: its pixel data ends at byte {_data_end(tiff_bytes(np.ones((64, 64), np.uint16)))}"
            " but the file has 3000 bytes; upload the complete file"
        ),
    ),
    (
        "bad_kind",
        lambda: tiff_bytes(np.zeros((8, 8), np.uint8)),
        {"kind": "mask"},
        422,
        "kind 'mask' is not valid; use image or labels",
    ),
    (
        "bad_voxel_size",
        lambda: tiff_bytes(np.zeros((8, 8), np.uint8)),
        {"voxel_size": "a,b"},
        422,
        "voxel_size 'a,b' must be comma-separated numbers in array order, e.g. '2.0,0.5,0.5'",
    ),
    (
        "negative_voxel_size",
        lambda: tiff_bytes(np.zeros((8, 8), np.uint8)),
        {"voxel_size": "1,-1"},
        422,
        "voxel_size '1,-1' must be positive numbers",
    ),
    (
        "voxel_size_dims",
        lambda: tiff_bytes(np.zeros((8, 8), np.uint8)),
        {"voxel_size": "1,1,1"},
        422,
        "voxel_size has 3 values but the volume has 2 spatial axes (YX)",
    ),
    (
        "bad_axes",
        lambda: tiff_bytes(np.zeros((4, 8, 8), np.uint8)),
        {"axes": "YX"},
        422,
        "unsupported TIFF: axes 'YX' has 2 letters but the image has 3 dimensions (4, 8, 8)",
    ),
    (
        "unknown_field",
        lambda: tiff_bytes(np.zeros((8, 8), np.uint8)),
        {"colour": "red"},
        422,
        "unknown form field 'colour'; use file, name, kind, axes, voxel_size, image_id",
    ),
    (
        "image_id_unknown",
        lambda: tiff_bytes(np.zeros((8, 8), np.uint16)),
        {"kind": "labels", "image_id": "nope"},
        422,
        "image_id: Volume nope not found",
    ),
    (
        "image_id_on_image",
        lambda: tiff_bytes(np.zeros((8, 8), np.uint16)),
        {"image_id": "nope"},
        422,
        "image_id links a label image to its image; send it with kind=labels",
    ),
    (
        "too_big",
        lambda: tiff_bytes(np.zeros((1100, 1000), np.uint32)),
        {},
        413,
        "upload exceeds the limit of 4194304 bytes (4.0 MiB); send a smaller file or raise EMBEDSEG_MAX_UPLOAD_BYTES",
    ),
]


@pytest.mark.parametrize(
    ("make", "fields", "status", "detail"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS]
)
def test_rejected_upload_leaves_other_volumes_intact(
    client,
    settings,
    make,
    fields,
    status,
    detail,  # type: ignore[no-untyped-def]
) -> None:
    keep = tiff_bytes(image2d(3))
    kept = upload(client, keep).json()
    before = stored_files(settings)

    response = upload(client, make(), **fields)

    assert response.status_code == status, response.text
    assert response.json() == {"detail": detail() if callable(detail) else detail}
    assert stored_files(settings) == before  # no partial or temporary file left
    listing = client.get(V).json()
    assert listing["total"] == 1
    assert listing["items"][0]["id"] == kept["id"]
    assert client.get(f"{V}/{kept['id']}/download").content == keep


def test_upload_needs_multipart(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post(V, content=b"II*\x00", headers={"content-type": "image/tiff"})
    assert response.status_code == 415
    assert response.json() == {"detail": "send the TIFF as multipart/form-data with the file in the form field 'file'"}


def test_upload_needs_the_file_field(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post(V, files={"image": ("a.tif", tiff_bytes(np.zeros((8, 8), np.uint8)))})
    assert response.status_code == 422
    assert response.json() == {
        "detail": "no file in the form field 'file'; send the TIFF as multipart/form-data in 'file'"
    }


def test_upload_refuses_two_files(client, settings) -> None:  # type: ignore[no-untyped-def]
    content = tiff_bytes(np.zeros((8, 8), np.uint8))
    response = client.post(V, files=[("file", ("a.tif", content)), ("file", ("b.tif", content))])
    assert response.status_code == 422
    assert response.json() == {"detail": "send exactly one file per request in the form field 'file'"}
    assert stored_files(settings) == []


def test_upload_refuses_malformed_multipart(client, settings) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        V,
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nII*\x00',
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert response.status_code == 400
    assert response.json() == {"detail": "the multipart body ended early (no closing boundary); resend the request"}
    assert stored_files(settings) == []


def test_declared_content_length_over_limit_is_refused_before_reading(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        V,
        content=b"x" * 16,
        headers={"content-type": "multipart/form-data; boundary=xyz", "content-length": str(64 * 1024 * 1024)},
    )
    assert response.status_code == 413


def test_upload_is_streamed_in_chunks_not_held_in_memory(client, app, settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    data = np.random.default_rng(1).integers(0, 65535, size=(1500, 1200), dtype=np.uint16)  # 3.6 MB
    content = tiff_bytes(data)
    boundary = "embedsegboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.tif"\r\n'
            f"Content-Type: image/tiff\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    writes: list[int] = []
    original = PendingWrite.write_unhashed

    def recording_write(self, chunk: bytes) -> int:  # type: ignore[no-untyped-def]
        writes.append(len(chunk))
        return original(self, chunk)

    monkeypatch.setattr(PendingWrite, "write_unhashed", recording_write)
    tracemalloc.start()
    try:
        status, _, _ = asyncio.run(post_in_chunks(app, V, body, boundary, 16 * 1024))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 201
    assert sum(writes) == len(content)
    assert len(writes) >= len(content) // (settings.upload_chunk_bytes + 16 * 1024)
    assert max(writes) < settings.upload_chunk_bytes + 16 * 1024
    assert peak < len(content) / 3  # never the whole body in memory
    listed = client.get(V).json()["items"][0]
    assert listed["sha256"] == hashlib.sha256(content).hexdigest()


# --------------------------------------------------------------------------- list / get / download


def test_list_is_paginated_newest_first(client) -> None:  # type: ignore[no-untyped-def]
    ids = [upload(client, tiff_bytes(image2d(i)), name=f"v{i}").json()["id"] for i in range(3)]
    labels = upload(client, tiff_bytes(labels2d()), kind="labels").json()["id"]
    page = client.get(V, params={"limit": 2, "offset": 0}).json()
    assert (page["total"], page["limit"], page["offset"]) == (4, 2, 0)
    assert [item["id"] for item in page["items"]] == [labels, ids[2]]
    page = client.get(V, params={"limit": 2, "offset": 2}).json()
    assert [item["id"] for item in page["items"]] == [ids[1], ids[0]]
    page = client.get(V, params={"kind": "labels"}).json()
    assert (page["total"], [item["id"] for item in page["items"]]) == (1, [labels])
    assert client.get(V, params={"offset": 10}).json()["items"] == []


@pytest.mark.parametrize(
    ("params", "detail"),
    [
        ({"limit": 0}, "query.limit: Input should be greater than or equal to 1"),
        ({"limit": 501}, "query.limit: must be at most 500"),
        ({"offset": -1}, "query.offset: Input should be greater than or equal to 0"),
        ({"kind": "mask"}, "query.kind: Input should be 'image' or 'labels'"),
    ],
)
def test_list_rejects_bad_query(client, params, detail) -> None:  # type: ignore[no-untyped-def]
    response = client.get(V, params=params)
    assert response.status_code == 422
    assert response.json() == {"detail": detail}


def test_get_one_volume_and_404(client) -> None:  # type: ignore[no-untyped-def]
    created = upload(client, tiff_bytes(image2d())).json()
    assert client.get(f"{V}/{created['id']}").json() == created
    response = client.get(f"{V}/nope")
    assert response.status_code == 404
    assert response.json() == {"detail": "Volume nope not found"}


def test_download_returns_the_uploaded_tiff(client) -> None:  # type: ignore[no-untyped-def]
    content = tiff_bytes(image2d())
    created = upload(client, content, name="my image").json()
    response = client.get(f"{V}/{created['id']}/download")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/tiff"
    assert response.headers["content-disposition"] == "attachment; filename*=utf-8''my%20image.tif"
    assert response.content == content
    assert client.get(f"{V}/nope/download").json() == {"detail": "Volume nope not found"}


# --------------------------------------------------------------------------- delete


def test_delete_removes_row_and_file(client, settings) -> None:  # type: ignore[no-untyped-def]
    created = upload(client, tiff_bytes(image2d())).json()
    other = upload(client, tiff_bytes(image2d(1))).json()
    response = client.delete(f"{V}/{created['id']}")
    assert response.status_code == 204
    assert client.get(f"{V}/{created['id']}").status_code == 404
    assert [p.name for p in stored_files(settings)] == [f"{other['id']}.tif"]
    response = client.delete(f"{V}/{created['id']}")
    assert response.status_code == 404
    assert response.json() == {"detail": f"Volume {created['id']} not found"}


@pytest.mark.parametrize("running", [False, True])
def test_delete_refused_while_a_job_uses_the_volume(client, session, running) -> None:  # type: ignore[no-untyped-def]
    image = upload(client, tiff_bytes(image2d())).json()["id"]
    mask = upload(client, tiff_bytes(labels2d()), kind="labels").json()["id"]
    job = jobs.create_job(
        session, "train", {"image_ids": [image], "mask_ids": [mask]}, volumes=[(image, "image"), (mask, "mask")]
    )
    if running:
        assert jobs.claim_job(session, job.id, "worker-1")
    response = client.delete(f"{V}/{mask}")
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Volume {mask} is used by queued or running job(s) {job.id}; cancel them or wait until they finish"
    }
    assert client.get(f"{V}/{mask}").status_code == 200
    if running:
        assert jobs.finish_job(session, job.id, JobStatus.failed, error="stopped")
    else:
        jobs.request_cancel(session, job.id)
    assert client.delete(f"{V}/{mask}").status_code == 204
    assert jobs.get_job(session, job.id).status in ("failed", "cancelled")


def test_delete_image_unlinks_its_labels(client) -> None:  # type: ignore[no-untyped-def]
    image = upload(client, tiff_bytes(image2d())).json()["id"]
    labels = upload(client, tiff_bytes(labels2d()), kind="labels", image_id=image).json()["id"]
    assert client.delete(f"{V}/{image}").status_code == 204
    assert client.get(f"{V}/{labels}").json()["image_volume_id"] is None


# --------------------------------------------------------------------------- preview


def _png(response) -> np.ndarray:  # type: ignore[no-untyped-def]
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def _coloured(rgb: np.ndarray) -> np.ndarray:
    return (rgb.max(axis=-1).astype(int) - rgb.min(axis=-1)) > 30


def test_preview_of_image_is_gray(client) -> None:  # type: ignore[no-untyped-def]
    created = upload(client, tiff_bytes(image2d())).json()
    rgb = _png(client.get(f"{V}/{created['id']}/preview.png"))
    assert rgb.shape == (64, 48, 3)
    assert not _coloured(rgb).any()
    assert rgb.min() == 0 and rgb.max() == 255


def test_preview_of_labels_is_coloured_on_black(client) -> None:  # type: ignore[no-untyped-def]
    created = upload(client, tiff_bytes(labels2d()), kind="labels").json()
    rgb = _png(client.get(f"{V}/{created['id']}/preview.png"))
    expected = labels2d() > 0
    np.testing.assert_array_equal(_coloured(rgb), expected)
    assert (rgb[~expected] == 0).all()
    assert not np.array_equal(rgb[10, 10], rgb[40, 20])  # two objects, two colours


def test_preview_overlays_prediction_on_image(client) -> None:  # type: ignore[no-untyped-def]
    image = upload(client, tiff_bytes(image2d())).json()["id"]
    assert not _coloured(_png(client.get(f"{V}/{image}/preview.png"))).any()
    upload(client, tiff_bytes(labels2d()), kind="labels", image_id=image)
    rgb = _png(client.get(f"{V}/{image}/preview.png"))
    np.testing.assert_array_equal(_coloured(rgb), labels2d() > 0)
    plain = _png(client.get(f"{V}/{image}/preview.png", params={"overlay": "false"}))
    assert not _coloured(plain).any()


def test_preview_3d_middle_slice_z_and_max_projection(client) -> None:  # type: ignore[no-untyped-def]
    data = np.zeros((5, 16, 16), np.uint16)
    data[2, 4:8, 4:8] = 100  # middle slice
    data[0, 10:14, 10:14] = 200
    volume = upload(client, tiff_bytes(data)).json()["id"]
    middle = _png(client.get(f"{V}/{volume}/preview.png"))[..., 0]
    assert middle[5, 5] == 255 and middle[11, 11] == 0
    first = _png(client.get(f"{V}/{volume}/preview.png", params={"z": 0}))[..., 0]
    assert first[11, 11] == 255 and first[5, 5] == 0
    projection = _png(client.get(f"{V}/{volume}/preview.png", params={"projection": "max"}))[..., 0]
    assert projection[11, 11] == 255 and 0 < projection[5, 5] < 255


def test_preview_subsamples_large_planes(client, app) -> None:  # type: ignore[no-untyped-def]
    app.state.settings = app.state.settings.model_copy(update={"preview_max_px": 32})
    volume = upload(client, tiff_bytes(image2d(shape=(100, 60)))).json()["id"]
    assert _png(client.get(f"{V}/{volume}/preview.png")).shape == (25, 15, 3)


@pytest.mark.parametrize(
    ("shape", "params", "detail"),
    [
        ((16, 16), {"z": 1}, "z applies to 3D volumes only; leave it out for a 2D image"),
        ((3, 16, 16), {"z": 3}, "z 3 is out of range; the volume has 3 slices (0..2)"),
        ((3, 16, 16), {"z": 1, "projection": "max"}, "z selects a slice; leave it out with projection=max"),
        ((2, 16, 16), {"channel": 2}, "channel 2 is out of range; the volume has 1 channel(s) (0..0)"),
        ((16, 16), {"projection": "sum"}, "query.projection: Input should be 'middle' or 'max'"),
    ],
)
def test_preview_rejects_bad_options(client, shape, params, detail) -> None:  # type: ignore[no-untyped-def]
    volume = upload(client, tiff_bytes(np.zeros(shape, np.uint16))).json()["id"]
    response = client.get(f"{V}/{volume}/preview.png", params=params)
    assert response.status_code == 422
    assert response.json() == {"detail": detail}


def test_preview_404(client) -> None:  # type: ignore[no-untyped-def]
    response = client.get(f"{V}/nope/preview.png")
    assert response.status_code == 404
    assert response.json() == {"detail": "Volume nope not found"}


def test_rows_match_files(client, session, settings) -> None:  # type: ignore[no-untyped-def]
    created = upload(client, tiff_bytes(image2d())).json()
    row = session.get(Volume, created["id"])
    assert row.storage_key == f"volumes/{created['id']}.tif"
    assert (Path(settings.storage_path) / row.storage_key).stat().st_size == row.size_bytes


def _multipart(content: bytes, boundary: str = "embedsegboundary") -> bytes:
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.tif"\r\n\r\n'.encode()
    return head + content + f"\r\n--{boundary}--\r\n".encode()


def test_disk_error_while_writing_leaves_no_file(client, app, settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    kept = upload(client, tiff_bytes(image2d())).json()
    before = stored_files(settings)
    calls = []

    def failing_write(_self, chunk: bytes) -> int:  # type: ignore[no-untyped-def]
        calls.append(len(chunk))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PendingWrite, "write_unhashed", failing_write)
    content = tiff_bytes(image2d(shape=(600, 500)))
    status, body, _ = asyncio.run(post_in_chunks(app, V, _multipart(content), "embedsegboundary", 16 * 1024))
    assert status == 507
    assert json.loads(body) == {
        "detail": "the server's storage cannot hold this (No space left on device); nothing was stored and stored "
        "data is intact; retry later or ask the operator to free space"
    }
    assert calls
    assert stored_files(settings) == before
    assert client.get(V).json()["total"] == 1 and client.get(f"{V}/{kept['id']}").status_code == 200


def test_client_disconnect_mid_upload_leaves_no_file(app, settings) -> None:  # type: ignore[no-untyped-def]
    body = _multipart(tiff_bytes(image2d(shape=(600, 500))))
    state = {"sent": 0}

    async def receive() -> dict:
        if state["sent"] < 4:
            piece = body[state["sent"] * 16384 : (state["sent"] + 1) * 16384]
            state["sent"] += 1
            return {"type": "http.request", "body": piece, "more_body": True}
        return {"type": "http.disconnect"}

    messages: list[dict] = []

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": V,
        "raw_path": V.encode(),
        "root_path": "",
        "query_string": b"",
        "server": ("test", 80),
        "client": ("test", 1),
        "app": app,
        "headers": [(b"host", b"testserver"), (b"content-type", b"multipart/form-data; boundary=embedsegboundary")],
    }

    async def run() -> None:
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    asyncio.run(run())
    assert messages[0]["status"] == 400
    assert messages[1]["body"] == (
        b'{"detail":"the client disconnected before the end of the upload; resend the file"}'
    )
    assert stored_files(settings) == []


@pytest.mark.parametrize("imagej", [False, True])
def test_3d_preview_reads_one_page_at_a_time(tmp_path, monkeypatch, imagej) -> None:  # type: ignore[no-untyped-def]
    data = np.random.default_rng(2).integers(0, 5000, size=(7, 20, 24)).astype(np.uint16)
    path = tmp_path / "v.tif"
    if imagej:
        tifffile.imwrite(path, data, imagej=True, metadata={"axes": "ZYX"}, compression="zlib")
    else:
        tifffile.imwrite(path, data, photometric="minisblack")

    def whole_read(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the whole volume was read")

    monkeypatch.setattr(preview, "read_tiff", whole_read)
    np.testing.assert_array_equal(preview.load_plane(path, preview.Projection.middle, None, 0), data[3])
    np.testing.assert_array_equal(preview.load_plane(path, preview.Projection.middle, 6, 0), data[6])
    np.testing.assert_array_equal(preview.load_plane(path, preview.Projection.max, None, 0), data.max(axis=0))


def test_preview_of_channels_picks_the_channel(client) -> None:  # type: ignore[no-untyped-def]
    data = np.zeros((2, 3, 16, 16), np.uint16)  # C, Z, Y, X
    data[0, 1, 2:6, 2:6] = 50
    data[1, 1, 10:14, 10:14] = 50
    volume = upload(client, tiff_bytes(data)).json()
    assert volume["axes"] == "CZYX"
    first = _png(client.get(f"{V}/{volume['id']}/preview.png"))[..., 0]
    second = _png(client.get(f"{V}/{volume['id']}/preview.png", params={"channel": 1}))[..., 0]
    assert first[3, 3] == 255 and first[11, 11] == 0
    assert second[11, 11] == 255 and second[3, 3] == 0


def test_labels_must_match_their_image_shape(client, settings) -> None:  # type: ignore[no-untyped-def]
    image = upload(client, tiff_bytes(image2d())).json()["id"]
    before = stored_files(settings)
    response = upload(client, tiff_bytes(np.zeros((32, 32), np.uint16)), kind="labels", image_id=image)
    assert response.status_code == 422
    assert response.json() == {"detail": "image_id: the labels' shape [32, 32] differs from the image's [64, 48]"}
    assert stored_files(settings) == before
