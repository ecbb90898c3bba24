"""Zipped OME-Zarr volumes through the API: upload (recognised by content), previews and downloads read by
chunks, streamed predict jobs with OME-Zarr labels, and hostile archives answered with a 4xx."""

from __future__ import annotations

import hashlib
import io
import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pytest
import torch
import zarr
from helpers import tiff_bytes, upload
from stream_helpers import same_partition
from zarr.storage import LocalStore

from embedseg_service.core.data.io import read_tiff
from embedseg_service.core.data.ome_zarr import OmeZarrVolume
from embedseg_service.records.orm import Model
from embedseg_service.records.storage import LocalStorage
from embedseg_service.worker.runner import run_job

API = "/api/v1"
V = f"{API}/volumes"


def zip_folder_bytes(folder: Path, prefix: str = "", extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(file, prefix + str(file.relative_to(folder)))
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def ome_zarr(
    data: np.ndarray,
    *,
    axes: str = "zyx",
    scale: list[float] | None = None,
    unit: str = "micrometer",
    chunks: tuple[int, ...] | None = None,
    fmt: int = 2,
    compressors: Any = "auto",
    filters: Any = None,
    prefix: str = "",
    extra: dict[str, bytes] | None = None,
    attrs: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    write: bool = True,
) -> bytes:
    """The bytes of a zipped OME-Zarr store holding ``data`` as level 0 (OME-NGFF 0.4 in Zarr format 2, or 0.5
    in format 3)."""
    kinds = {"t": "time", "c": "channel"}
    multiscale = {
        "version": "0.4" if fmt == 2 else "0.5",
        "axes": [{"name": a, "type": kinds.get(a, "space"), **({} if a in "tc" else {"unit": unit})} for a in axes],
        "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale or [1.0] * len(axes)}]}
        ],
    }
    with tempfile.TemporaryDirectory() as folder:
        group = zarr.open_group(store=LocalStore(folder), mode="w", zarr_format=fmt)
        metadata = {"multiscales": [multiscale]}
        metadata = attrs(metadata) if attrs else metadata
        if fmt == 2:
            group.attrs.update(metadata)
        else:
            group.attrs["ome"] = {"version": "0.5", **metadata}
        options: dict[str, Any] = {"compressors": compressors}
        if filters is not None:
            options["filters"] = filters
        array = group.create_array("0", shape=data.shape, chunks=chunks or data.shape, dtype=data.dtype, **options)
        if write:
            array[...] = data
        return zip_folder_bytes(Path(folder), prefix, extra)


def volume_data() -> np.ndarray:
    rng = np.random.default_rng(3)
    data = rng.integers(100, 400, (12, 40, 56)).astype(np.uint16)
    data[3:8, 10:25, 20:40] += 2000
    return data


def zarr_upload(client: Any, content: bytes, **fields: Any) -> Any:
    return upload(client, content, filename="img.ome.zarr.zip", **fields)


# --------------------------------------------------------------------------- upload, preview, download


def test_upload_preview_and_download_of_an_ome_zarr_volume(client) -> None:  # type: ignore[no-untyped-def]
    data = volume_data()
    content = ome_zarr(data, scale=[2000.0, 500.0, 500.0], unit="nanometer", chunks=(5, 16, 16))
    stored = zarr_upload(client, content)
    assert stored.status_code == 201, stored.text
    body = stored.json()
    tiff = upload(client, tiff_bytes(data), axes="ZYX", voxel_size="2.0,0.5,0.5").json()
    assert body["format"] == "ome-zarr" and tiff["format"] == "tiff" and body["name"] == "img"
    for key in ("shape", "dtype", "axes", "voxel_size"):
        assert body[key] == tiff[key], key
    assert body["shape"] == [12, 40, 56] and body["voxel_size"] == pytest.approx([2.0, 0.5, 0.5])
    assert body["sha256"] == hashlib.sha256(content).hexdigest()

    for params in ({}, {"projection": "max"}, {"z": 3}, {"plane": "xz"}, {"plane": "xz", "y": 5},
                   {"plane": "yz", "x": 10}):  # fmt: skip
        from_zarr = client.get(f"{V}/{body['id']}/preview.png", params=params)
        from_tiff = client.get(f"{V}/{tiff['id']}/preview.png", params=params)
        assert from_zarr.status_code == 200 and from_zarr.headers["content-type"] == "image/png", from_zarr.text
        assert from_zarr.content == from_tiff.content, params
    out_of_range = client.get(f"{V}/{body['id']}/preview.png", params={"z": 12})
    assert out_of_range.status_code == 422
    assert out_of_range.json() == {"detail": "z 12 is out of range; the volume has 12 slices (0..11)"}

    download = client.get(f"{V}/{body['id']}/download")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    assert 'filename="img.ome.zarr.zip"' in download.headers["content-disposition"]
    assert download.content == content


def test_labels_as_ome_zarr_are_drawn_over_their_image(client) -> None:  # type: ignore[no-untyped-def]
    data = volume_data()
    labels = np.zeros(data.shape, np.uint32)
    labels[3:8, 10:25, 20:40] = 7
    labels[0:2, 30:38, 2:9] = 3
    image = zarr_upload(client, ome_zarr(data, chunks=(4, 20, 20))).json()
    linked = zarr_upload(client, ome_zarr(labels, chunks=(6, 8, 8)), kind="labels", image_id=image["id"])
    assert linked.status_code == 201, linked.text
    assert linked.json()["kind"] == "labels" and linked.json()["dtype"] == "uint32"
    tiff_image = upload(client, tiff_bytes(data), axes="ZYX").json()
    upload(client, tiff_bytes(labels.astype(np.uint16)), kind="labels", image_id=tiff_image["id"], axes="ZYX")
    for params in ({}, {"plane": "yz"}, {"projection": "max"}):
        drawn = client.get(f"{V}/{image['id']}/preview.png", params=params)
        assert drawn.status_code == 200
        assert drawn.content == client.get(f"{V}/{tiff_image['id']}/preview.png", params=params).content, params


def test_ome_zarr_variants_read_alike(client) -> None:  # type: ignore[no-untyped-def]
    data = volume_data()
    plain = zarr_upload(client, ome_zarr(data)).json()
    variants = {
        "ngff_0_5_zstd": ome_zarr(data, fmt=3, chunks=(6, 20, 28)),
        "in_a_folder": ome_zarr(data, prefix="img.ome.zarr/"),
        "singleton_t_and_c": ome_zarr(data[None, None], axes="tczyx"),
        "zlib_chunks": ome_zarr(data, chunks=(4, 40, 56), compressors=numcodecs.Zlib(level=1)),
        "uncompressed": ome_zarr(data, chunks=(12, 16, 16), compressors=None),
    }
    reference = client.get(f"{V}/{plain['id']}/preview.png", params={"plane": "xz"}).content
    for name, content in variants.items():
        answer = zarr_upload(client, content)
        assert answer.status_code == 201, (name, answer.text)
        body = answer.json()
        assert body["shape"] == [12, 40, 56] and body["axes"] == "ZYX" and body["dtype"] == "uint16", name
        assert client.get(f"{V}/{body['id']}/preview.png", params={"plane": "xz"}).content == reference, name


# --------------------------------------------------------------------------- streamed predict jobs


def _store_model(session: Any, settings: Any, tmp_path: Path) -> str:
    """An untrained 3D ERF-Net whose seed output is biased up (it finds objects), stored and registered."""
    from embedseg_service.core.model.checkpoint import build_network, save_checkpoint

    torch.manual_seed(5)
    net = build_network(3, 1)
    with torch.no_grad():
        net.decoders[1].output_conv.bias.fill_(2.5)
    path = save_checkpoint(tmp_path / "tiny3d.pt", {"state_dict": net.state_dict(), "spatial_dims": 3, "in_channels": 1,
                                                    "step": [1 / 1023] * 3, "config": {"in_channels": 1},
                                                    "properties": {"min_object_size": 30}})  # fmt: skip
    LocalStorage(settings.storage_path).put_file("models/tiny3d.pt", path)
    model = Model(name="tiny3d", spatial_dims=3, config={"in_channels": 1}, storage_key="models/tiny3d.pt",
                  size_bytes=path.stat().st_size)  # fmt: skip
    session.add(model)
    session.commit()
    return model.id


@pytest.fixture
def fast(settings: Any) -> Any:
    """The settings with frequent progress writes and heartbeats (short jobs run in the test)."""
    return settings.model_copy(update={"progress_throttle_s": 0.05, "heartbeat_s": 0.2})


@pytest.fixture
def model_id(session: Any, settings: Any, tmp_path: Path) -> str:
    """The id of the registered model of :func:`_store_model`."""
    return _store_model(session, settings, tmp_path)


def _predict(
    client: Any, settings: Any, model_id: str, volume_id: str, gt_id: str | None = None, tta: bool = False
) -> dict[str, Any]:
    spec = {"model_id": model_id, "volume_ids": [volume_id], "tta": tta, **({"gt_ids": [gt_id]} if gt_id else {})}
    job = client.post(f"{API}/jobs/predict", json=spec)
    assert job.status_code == 202, job.text
    body = job.json()
    assert run_job(body["id"], settings=settings) == "succeeded", client.get(f"{API}/jobs/{body['id']}").json()
    return client.get(f"{API}/jobs/{body['id']}").json()


def _labels_of(client: Any, volume_id: str, tmp_path: Path) -> np.ndarray:
    body = client.get(f"{V}/{volume_id}").json()
    content = client.get(f"{V}/{volume_id}/download").content
    if body["format"] == "tiff":
        return read_tiff(io.BytesIO(content)).data
    local = tmp_path / f"{volume_id}.ome.zarr.zip"
    local.write_bytes(content)
    with OmeZarrVolume(local) as volume:
        return volume.read()


def test_a_streamed_predict_job_writes_ome_zarr_labels_equal_to_the_whole_volumes(  # type: ignore[no-untyped-def]
    client, fast, model_id, tmp_path
) -> None:
    data = volume_data()
    zarr_image = zarr_upload(client, ome_zarr(data, scale=[2.0, 0.5, 0.5], chunks=(6, 16, 16))).json()
    tiff_image = upload(client, tiff_bytes(data), axes="ZYX", voxel_size="2.0,0.5,0.5").json()

    whole = _predict(client, fast, model_id, tiff_image["id"])
    streamed = _predict(client, fast, model_id, zarr_image["id"])
    tiff_streamed = _predict(client, fast.model_copy(update={"stream_above_bytes": 0}), model_id, tiff_image["id"])
    assert whole["result"]["label_formats"] == {tiff_image["id"]: "tiff"}
    assert streamed["result"]["label_formats"] == {zarr_image["id"]: "ome-zarr"}
    assert tiff_streamed["result"]["label_formats"] == {tiff_image["id"]: "ome-zarr"}
    (entry,) = streamed["metrics"]["volumes"]
    assert entry["format"] == "ome-zarr" and entry["streamed"]["windows"] >= 1 and entry["streamed"]["cut"] == 0
    assert any("streamed windows" in w for w in streamed["metrics"]["warnings"])

    labels_id = streamed["result"]["labels"][zarr_image["id"]]
    row = client.get(f"{V}/{labels_id}").json()
    assert row["format"] == "ome-zarr" and row["kind"] == "labels" and row["dtype"] == "uint32"
    assert row["shape"] == [12, 40, 56] and row["axes"] == "ZYX" and row["voxel_size"] == pytest.approx([2.0, 0.5, 0.5])
    assert row["image_volume_id"] == zarr_image["id"] and row["source_job_id"] == streamed["id"]
    expected = _labels_of(client, whole["result"]["labels"][tiff_image["id"]], tmp_path)
    for job, image in ((streamed, zarr_image), (tiff_streamed, tiff_image)):
        got = _labels_of(client, job["result"]["labels"][image["id"]], tmp_path)
        assert same_partition(expected, got)  # one object for one object: equal up to their ids
    assert entry["n_objects"] == int(np.unique(expected[expected > 0]).size) > 0
    objects = client.get(f"{API}/jobs/{streamed['id']}/objects", params={"limit": 500}).json()
    assert objects["total"] == entry["n_objects"]
    assert client.get(f"{V}/{labels_id}/preview.png", params={"plane": "xz"}).status_code == 200
    assert client.get(f"{V}/{zarr_image['id']}/preview.png").status_code == 200  # drawn under its labels
    archive = zipfile.ZipFile(io.BytesIO(client.get(f"{API}/jobs/{streamed['id']}/labels.zip").content))
    assert archive.namelist() == ["img.ome.zarr.zip"]


def test_a_streamed_job_scores_its_labels_against_ground_truth_as_the_whole_volume_job_does(  # type: ignore[no-untyped-def]
    client, fast, model_id, tmp_path
) -> None:
    data = volume_data()
    tiff_image = upload(client, tiff_bytes(data), axes="ZYX").json()
    zarr_image = zarr_upload(client, ome_zarr(data, chunks=(6, 16, 16))).json()
    # ground truth from the whole volume's own labels: one object dropped, one cut in half, one made up
    whole = _predict(client, fast, model_id, tiff_image["id"])
    gt = _labels_of(client, whole["result"]["labels"][tiff_image["id"]], tmp_path).astype(np.uint16)
    ids = np.unique(gt[gt > 0])
    assert ids.size >= 3
    gt[gt == ids[0]] = 0
    gt[(gt == ids[1]) & (np.indices(gt.shape)[2] < np.median(np.nonzero(gt == ids[1])[2]))] = 900
    gt[0:2, 0:6, 0:6] = 901
    tiff_gt = upload(client, tiff_bytes(gt), axes="ZYX", kind="labels").json()
    zarr_gt = zarr_upload(client, ome_zarr(gt, chunks=(5, 24, 24)), kind="labels").json()

    scored = _predict(client, fast, model_id, tiff_image["id"], tiff_gt["id"])
    jobs = [_predict(client, fast.model_copy(update={"stream_above_bytes": 0}), model_id, tiff_image["id"],
                     tiff_gt["id"]),
            _predict(client, fast, model_id, zarr_image["id"], zarr_gt["id"])]  # fmt: skip
    (expected,) = scored["metrics"]["volumes"]
    assert 0 < expected["ap"][0] < 1 and expected["n_gt"] == ids.size + 1
    tables = [client.get(f"{API}/jobs/{job['id']}/objects", params={"limit": 500}).json() for job in [scored, *jobs]]
    for job, table in zip(jobs, tables[1:]):
        assert job["result"]["label_formats"] == {job["spec"]["volume_ids"][0]: "ome-zarr"}
        (entry,) = job["metrics"]["volumes"]
        assert entry["gt_id"] == job["spec"]["gt_ids"][0]
        assert (entry["n_gt"], entry["n_pred"], entry["thresholds"]) == (expected["n_gt"], expected["n_pred"],
                                                                         expected["thresholds"])  # fmt: skip
        assert entry["ap"] == pytest.approx(expected["ap"])
        assert job["metrics"]["ap"]["ap"] == pytest.approx(scored["metrics"]["ap"]["ap"])
        assert not any("ground truth" in w for w in job["metrics"].get("warnings", []))
        # the objects' matches: the same (GT label, IoU) pairs, whatever the labels are numbered
        found = sorted((o["gt_label"] or 0, round(o["iou"], 9)) for o in table["items"])
        assert found == sorted((o["gt_label"] or 0, round(o["iou"], 9)) for o in tables[0]["items"])
        assert any(o["gt_label"] is None for o in table["items"])


def test_a_streamed_job_with_tta_gives_the_whole_volume_jobs_tta_labels(  # type: ignore[no-untyped-def]
    client, fast, model_id, tmp_path
) -> None:
    data = volume_data()
    zarr_image = zarr_upload(client, ome_zarr(data, chunks=(6, 16, 16))).json()
    tiff_image = upload(client, tiff_bytes(data), axes="ZYX").json()
    labels = {}
    for tta in (False, True):
        whole = _predict(client, fast, model_id, tiff_image["id"], tta=tta)
        streamed = _predict(client, fast, model_id, zarr_image["id"], tta=tta)
        assert streamed["metrics"]["tta"] is tta
        assert streamed["result"]["label_formats"] == {zarr_image["id"]: "ome-zarr"}
        assert not any("augmentation" in w for w in streamed["metrics"]["warnings"])
        expected = _labels_of(client, whole["result"]["labels"][tiff_image["id"]], tmp_path)
        labels_id = streamed["result"]["labels"][zarr_image["id"]]
        got = _labels_of(client, labels_id, tmp_path)
        assert same_partition(expected, got) and np.unique(expected).size > 2
        assert client.get(f"{V}/{labels_id}").json()["name"].endswith("-tta") is tta
        labels[tta] = expected
    assert not np.array_equal(labels[False] > 0, labels[True] > 0)


# --------------------------------------------------------------------------- hostile archives


def _zip(entries: dict[str, bytes], method: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _with_entries(count: int) -> bytes:
    """A small archive whose (ZIP64) end record declares ``count`` entries."""
    data = _zip({"a.txt": b"x"})
    at = data.rfind(b"PK\x05\x06")
    size, offset = struct.unpack("<II", data[at + 12 : at + 20])
    zip64 = b"PK\x06\x06" + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, count, count, size, offset)
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, at, 1)
    end = data[at : at + 8] + struct.pack("<HH", 0xFFFF, 0xFFFF) + data[at + 12 :]
    return data[:at] + zip64 + locator + end


def _declaring(size: int) -> bytes:
    """An archive whose one stored entry of 10 bytes declares ``size`` bytes in the central directory."""
    data = bytearray(_zip({"0/0.0.0": bytes(10)}))
    at = data.rfind(b"PK\x01\x02")
    data[at + 24 : at + 28] = struct.pack("<I", size)
    return bytes(data)


def _small_array(chunk: bytes, compressors: Any = None, method: int = zipfile.ZIP_STORED) -> bytes:
    """A (16, 16, 16) uint8 image whose one chunk is ``chunk`` (for the given compressor)."""
    with tempfile.TemporaryDirectory() as folder:
        content = ome_zarr(np.zeros((16, 16, 16), np.uint8), compressors=compressors, write=False)
        source = zipfile.ZipFile(io.BytesIO(content))
        entries = {name: source.read(name) for name in source.namelist()}
    del folder
    entries["0/0.0.0"] = chunk
    return _zip(entries, method)


def _float(value: float) -> bytes:
    data = np.zeros((4, 8, 8), np.float32)
    data[1, 2, 3] = value
    return ome_zarr(data)


HOSTILE: list[tuple[str, Callable[[], bytes], dict[str, str], int, str]] = [
    ("zip_header_only", lambda: b"PK\x03\x04" + bytes(100), {}, 415,
     "not a zipped OME-Zarr store: not a readable ZIP archive: no end of central directory record"),
    ("no_image", lambda: _zip({"notes.txt": b"hello"}), {}, 415,
     "not a zipped OME-Zarr store: no OME-Zarr image in the store: no group has 'multiscales' metadata (.zattrs or "
     "zarr.json)"),
    ("250000_entries", lambda: _with_entries(250_000), {}, 413,
     "the ZIP archive declares 250000 entries, more than the limit of 200000; write the store with larger chunks"),
    ("entry_outside_the_store", lambda: _zip({"../evil": b"x"}), {}, 415,
     "not a zipped OME-Zarr store: the ZIP archive holds an entry named '../evil'; entries need plain relative names"),
    ("entry_declares_more_than_it_holds", lambda: _declaring(10**9), {}, 415,
     "not a zipped OME-Zarr store: the ZIP entry '0/0.0.0' declares 1000000000 bytes from 10, more than its "
     "compression can produce"),
    ("deflate_bomb_chunk", lambda: _small_array(bytes(4 * 1024**2), method=zipfile.ZIP_DEFLATED), {}, 422,
     "the chunk '0/0.0.0' is larger than its decoded size allows"),
    ("blosc_bomb_chunk", lambda: _small_array(numcodecs.blosc.compress(bytes(1024**2), b"lz4", 5, 1),
                                              numcodecs.Blosc()), {}, 422,
     "a chunk of level 0 cannot be decoded or inflates beyond its 4096 bytes: destination buffer too small; "
     "expected at least 1048576, got 4096"),
    ("wrong_size_uncompressed_chunk", lambda: _small_array(bytes(100)), {}, 422,
     "a chunk of level 0 decodes to 100 bytes where its shape holds 4096"),
    ("declares_10_billion_voxels", lambda: ome_zarr(np.zeros((100000, 100000), np.uint8), axes="yx",
                                                    chunks=(1000, 1000), write=False), {}, 413,
     "the OME-Zarr image has shape (100000, 100000) = 10000000000 voxels, more than the limit of 2147483648 voxels; "
     "send a smaller image, or raise EMBEDSEG_MAX_VOXELS"),
    ("axes_out_of_order", lambda: ome_zarr(np.zeros((4, 8, 8), np.uint8), axes="yzx"), {}, 422,
     "unsupported OME-Zarr: axes ['y', 'z', 'x'] are not supported; use t, c, z, y, x in this order (y and x always)"),
    ("time_series", lambda: ome_zarr(np.zeros((3, 4, 8, 8), np.uint8), axes="tzyx"), {}, 422,
     "unsupported OME-Zarr: the image has 3 time points; send one"),
    ("float64", lambda: ome_zarr(np.zeros((4, 8, 8), np.float64)), {}, 422,
     "unsupported OME-Zarr: pixel type float64 is not supported; use one of uint8, uint16, int16, int32, uint32, "
     "float32"),
    ("int16_image", lambda: ome_zarr(np.zeros((4, 8, 8), np.int16)), {}, 422,
     "pixel type int16 is not supported for images; use uint8, uint16 or float32 (or send kind=labels for a label "
     "image)"),
    ("nan", lambda: _float(np.nan), {}, 422,
     "the image holds 1 NaN and 0 infinite value(s); replace them with finite numbers (e.g. 0) and upload it again"),
    ("broken_metadata", lambda: _zip({".zattrs": b"{", ".zgroup": b'{"zarr_format": 2}'}), {}, 422,
     "unsupported OME-Zarr: the metadata file '.zattrs' is not valid JSON"),
    ("filters", lambda: ome_zarr(np.zeros((4, 8, 8), np.uint8), filters=[numcodecs.Delta(dtype="u1")]), {}, 422,
     "unsupported OME-Zarr: level 0 uses Zarr filters; write it without filters"),
    ("float_labels", lambda: _float(0.5), {"kind": "labels"}, 422,
     "a label image must hold integers (0 = background), got float32"),
    ("axes_field", lambda: ome_zarr(np.zeros((4, 8, 8), np.uint8)), {"axes": "ZYX"}, 422,
     "axes applies to TIFF files; an OME-Zarr store names its axes in its metadata"),
    ("valid", lambda: ome_zarr(np.ones((4, 8, 8), np.uint8)), {}, 201, "img"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "fields", "status", "detail"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_archives_get_a_4xx(client, settings, make, fields, status, detail) -> None:  # type: ignore[no-untyped-def]
    answer = zarr_upload(client, make(), **fields)
    assert answer.status_code == status, answer.text
    if status == 201:
        assert answer.json()["name"] == detail
    else:
        assert answer.json() == {"detail": detail}
    listing = client.get(V).json()
    assert listing["total"] == (1 if status == 201 else 0)
    stored = [p for p in Path(settings.storage_path).rglob("*") if p.is_file()]
    assert len(stored) == listing["total"]  # nothing partial or temporary is left behind
