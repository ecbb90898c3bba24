"""Limits of uploads and training specs: the voxel budget from the TIFF header, a full disk (507), crop and batch
sizes bounded by the data and a voxel budget."""

from __future__ import annotations

import errno
import hashlib
import os
import struct

import numpy as np
import pytest
import tifffile
from helpers import tiff_bytes, upload
from pydantic import ValidationError

from embedseg_service.records.schemas import TrainSpec, check_train_size
from embedseg_service.records.storage import PendingWrite

V = "/api/v1/volumes"
FULL = (
    "the server's storage cannot hold this ({}); nothing was stored and stored data is intact; retry later or ask "
    "the operator to free space"
)


def test_the_voxel_budget_counts_every_axis_and_is_read_from_the_header(client, app, settings) -> None:  # type: ignore[no-untyped-def]
    app.state.settings = settings.model_copy(update={"max_voxels": 1000})
    assert upload(client, tiff_bytes(np.zeros((2, 20, 25), np.uint8))).status_code == 201
    response = upload(client, tiff_bytes(np.zeros((3, 20, 20), np.uint8)))
    assert response.status_code == 413
    assert response.json() == {
        "detail": "the TIFF declares shape (3, 20, 20) = 1200 voxels, more than the limit of 1000 voxels; send a "
        "smaller image, or raise EMBEDSEG_MAX_VOXELS"
    }
    assert client.get(V).json()["total"] == 1


def test_a_stored_volume_over_the_budget_is_not_previewed(client, app, settings) -> None:  # type: ignore[no-untyped-def]
    volume = upload(client, tiff_bytes(np.zeros((40, 40), np.uint16))).json()["id"]
    app.state.settings = settings.model_copy(update={"max_voxels": 1000})
    response = client.get(f"{V}/{volume}/preview.png")
    assert response.status_code == 422
    assert response.json() == {
        "detail": "the TIFF declares shape (40, 40) = 1600 voxels, more than the limit of 1000 voxels; raise "
        "EMBEDSEG_MAX_VOXELS to preview it"
    }


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT])
def test_a_full_disk_answers_507_and_keeps_earlier_volumes(client, settings, monkeypatch, code) -> None:  # type: ignore[no-untyped-def]
    earlier = tiff_bytes(np.arange(64, dtype=np.uint8).reshape(8, 8))
    kept = upload(client, earlier).json()["id"]

    def full(_self, _data: bytes) -> int:  # type: ignore[no-untyped-def]
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(PendingWrite, "write_unhashed", full)
    response = upload(client, tiff_bytes(np.zeros((64, 64), np.uint16)))
    assert response.status_code == 507
    assert response.json() == {"detail": FULL.format(os.strerror(code))}
    monkeypatch.undo()
    assert client.get(V).json()["total"] == 1
    assert hashlib.sha256(client.get(f"{V}/{kept}/download").content).hexdigest() == hashlib.sha256(earlier).hexdigest()
    stored = [p for p in settings.storage_path.rglob("*") if p.is_file()]
    assert [p.name for p in stored] == [f"{kept}.tif"]


def test_a_full_disk_while_rewriting_in_canonical_order_answers_507(client, settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    kept = upload(client, tiff_bytes(np.ones((8, 8), np.uint8))).json()["id"]

    def full(_self, _data: bytes) -> int:  # type: ignore[no-untyped-def]
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(PendingWrite, "write", full)
    response = upload(client, tiff_bytes(np.zeros((3, 2, 8, 8), np.uint8)), axes="ZCYX")
    assert response.status_code == 507
    assert response.json() == {"detail": FULL.format(os.strerror(errno.EFBIG))}
    monkeypatch.undo()
    assert [item["id"] for item in client.get(V).json()["items"]] == [kept]
    assert [p.name for p in settings.storage_path.rglob("*") if p.is_file()] == [f"{kept}.tif"]


def test_an_oversized_crop_and_batch_are_refused_by_the_spec(client) -> None:  # type: ignore[no-untyped-def]
    response = client.post(
        "/api/v1/jobs/train", json={"image_ids": ["a"], "mask_ids": ["b"], "crop_size": 1048576, "batch_size": 1024}
    )
    assert response.status_code == 422
    assert response.json() == {"detail": "crop_size: crop_size must be at most 16384 (or 'auto'), got 1048576"}


def spec(**options) -> TrainSpec:  # type: ignore[no-untyped-def]
    return TrainSpec(image_ids=["a"], mask_ids=["b"], **options)


@pytest.mark.parametrize(
    ("options", "shapes", "message"),
    [
        (
            {"crop_size": 520},
            [[512, 300], [400, 400]],
            "crop_size 520 is larger than the training images need (their largest side is 512); use at most 512, "
            "or 'auto'",
        ),
        (
            {"crop_size": 16384, "batch_size": 1024},
            [[20000, 20000]],
            "batch_size 1024 times a crop of 16384^2 voxels is 274877906944 voxels per batch, more than the limit of "
            "134217728 (EMBEDSEG_MAX_BATCH_VOXELS); use a smaller batch_size or crop_size",
        ),
        (
            {"crop_size": 512, "dims": 3},
            [[600, 600, 600]],
            "batch_size 1 times a crop of 512^3 voxels is 134217728 voxels per batch, more than the limit of "
            "100000000 (EMBEDSEG_MAX_BATCH_VOXELS); use a smaller batch_size or crop_size",
        ),
    ],
)
def test_crop_and_batch_are_bounded_by_the_data_and_the_batch_budget(options, shapes, message) -> None:  # type: ignore[no-untyped-def]
    limit = 100_000_000 if options.get("dims") == 3 else 2**27
    with pytest.raises(ValueError) as raised:
        check_train_size(spec(**options), shapes, max_batch_voxels=limit)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    ("options", "shapes"),
    [
        ({"crop_size": 256, "batch_size": 16}, [[250, 300]]),  # 300 rounds up to 304
        ({"crop_size": 304}, [[250, 300]]),
        ({"crop_size": "auto", "batch_size": 1024}, [[20000, 20000]]),
        ({"crop_size": 128, "dims": 3, "batch_size": 8}, [[60, 512, 512]]),
    ],
)
def test_reasonable_crops_and_batches_pass(options, shapes) -> None:  # type: ignore[no-untyped-def]
    check_train_size(spec(**options), shapes, max_batch_voxels=2**27)


def test_the_spec_refuses_crops_beyond_any_data() -> None:
    with pytest.raises(ValidationError, match="crop_size must be at most 16384"):
        spec(crop_size=1048576, batch_size=1024)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ZeroDivisionError("division by zero"), "division by zero (ZeroDivisionError)"),
        (AssertionError(), "AssertionError"),
        (struct.error("unpack requires a buffer"), "unpack requires a buffer (struct.error)"),
        (ValueError("invalid tag"), "invalid tag"),
    ],
    ids=["ZeroDivisionError", "AssertionError", "struct.error", "ValueError"],
)
def test_a_parser_failure_answers_415_and_stores_nothing(client, settings, monkeypatch, error, reason) -> None:  # type: ignore[no-untyped-def]
    def broken(_self):  # type: ignore[no-untyped-def]
        raise error

    monkeypatch.setattr(tifffile.TiffFile, "series", property(broken))
    response = upload(client, tiff_bytes(np.zeros((8, 8), np.uint8)))
    assert response.status_code == 415
    assert response.json() == {"detail": f"unsupported TIFF: not a readable TIFF file: {reason}"}
    assert not [p for p in settings.storage_path.rglob("*") if p.is_file()]
