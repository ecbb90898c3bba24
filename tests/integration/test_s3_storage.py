"""Storage on a real S3 server (SeaweedFS, the ``s3_server`` fixture of ``tests/s3_server.py``).

Checked on the store itself: a write goes out in multipart parts while it is written and is visible
only once committed, abort and ``clean_temp`` leave no unfinished upload (one still in progress
stays), the local cache fetches a copy once, detects a corrupted copy by its SHA-256 and a replaced
object by its ETag, evicts the least recently used copies, and is shared safely by processes on one
host; errors (credentials, bucket, endpoint, a full store) read as what they are.

Checked through the service: the API on the object store (upload, streamed download, preview,
delete); then ``embedseg serve`` and ``embedseg worker`` as separate processes on PostgreSQL and
Redis, each with its own empty cache folder and no storage folder at all: a 20 MB upload is sent in
parts while the API's peak memory stays far below the file's size, a model is trained, predicts and
its labels are downloaded, and a worker restarted with an empty cache runs a job again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from botocore.exceptions import ClientError
from helpers import (
    API,
    production_services_problem,
    production_settings,
    service_missing,
    tiff_bytes,
    upload,
    wait_job,
)
from s3_server import S3Server, free_ports

from embedseg_service.core.data.synthetic import random_labels, render_image
from embedseg_service.records.object_storage import S3Storage, storage_error
from embedseg_service.records.settings import Settings
from embedseg_service.records.storage import STALE_TEMP_S, StorageError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

PART = 5 * 1024 * 1024
"""Part size of every store here (the S3 minimum), so that a few MiB make a multipart upload."""
WAIT_S = 240.0


def some_bytes(size: int, seed: bytes = b"seed") -> bytes:
    return (hashlib.sha256(seed).digest() * (size // 32 + 1))[:size]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(s3_server: S3Server, tmp_path: Path) -> S3Storage:
    """A store under a prefix of its own, its cache in ``tmp_path/cache-a``."""
    return s3_server.storage(tmp_path / "cache-a", part_bytes=PART)


def unfinished_uploads(s3_server: S3Server, prefix: str) -> list[dict[str, Any]]:
    answer = s3_server.client().list_multipart_uploads(Bucket=s3_server.bucket, Prefix=f"{prefix}/")
    return list(answer.get("Uploads", []))


def count_calls(storage: S3Storage, operation: str) -> list[int]:
    """A list that grows by one at each ``operation`` request of ``storage``'s client (botocore's event hooks)."""
    calls: list[int] = []
    storage.client.meta.events.register(f"before-call.s3.{operation}", lambda **_: calls.append(1))
    return calls


# --------------------------------------------------------------------------- writes


def test_a_write_goes_out_in_parts_while_written_and_shows_only_once_committed(s3_server, store) -> None:  # type: ignore[no-untyped-def]
    client, key = s3_server.client(), "volumes/big.tif"
    data = some_bytes(2 * PART + 1000)
    pending = store.begin_write(key)
    for start in range(0, len(data), 64 * 1024):
        pending.write(data[start : start + 64 * 1024])
    (upload_,) = unfinished_uploads(s3_server, store.prefix)
    assert upload_["Key"] == store.object_name(key)
    parts = client.list_parts(Bucket=s3_server.bucket, Key=upload_["Key"], UploadId=upload_["UploadId"])["Parts"]
    assert [(part["PartNumber"], part["Size"]) for part in parts] == [(1, PART), (2, PART)]
    assert not store.exists(key)
    pending.commit()
    head = client.head_object(Bucket=s3_server.bucket, Key=store.object_name(key), PartNumber=1)
    assert head["PartsCount"] == 3
    assert unfinished_uploads(s3_server, store.prefix) == []
    assert (pending.size, pending.sha256) == (len(data), sha256(data))
    with store.open_read(key) as handle:
        assert sha256(handle.read()) == sha256(data)
    # the committed temporary file is the local copy: reading it back sends no request for the bytes
    gets = count_calls(store, "GetObject")
    assert store.path_for(key).read_bytes() == data and gets == []


def test_a_write_smaller_than_a_part_is_one_request_and_abort_leaves_no_upload(s3_server, store) -> None:  # type: ignore[no-untyped-def]
    store.put("models/small.pt", [b"small"])
    head = s3_server.client().head_object(Bucket=s3_server.bucket, Key=store.object_name("models/small.pt"))
    assert head["ETag"].strip('"') == hashlib.md5(b"small").hexdigest()  # one PutObject, no parts
    pending = store.begin_write("models/big.pt")
    pending.write(some_bytes(PART + 1))
    assert len(unfinished_uploads(s3_server, store.prefix)) == 1
    pending.abort()
    assert unfinished_uploads(s3_server, store.prefix) == [] and not store.exists("models/big.pt")
    assert list((store.cache.root / ".tmp").iterdir()) == []


def test_clean_temp_aborts_abandoned_uploads_of_its_prefix_only(s3_server, store) -> None:  # type: ignore[no-untyped-def]
    client, bucket = s3_server.client(), s3_server.bucket
    mine = client.create_multipart_upload(Bucket=bucket, Key=store.object_name("volumes/v.tif"))
    other_prefix = s3_server.new_prefix()
    other = client.create_multipart_upload(Bucket=bucket, Key=f"{other_prefix}/volumes/v.tif")
    try:
        assert store.clean_temp(older_than_s=STALE_TEMP_S) == 0  # started just now: in progress
        assert [u["UploadId"] for u in unfinished_uploads(s3_server, store.prefix)] == [mine["UploadId"]]
        assert store.clean_temp() == 1
        assert unfinished_uploads(s3_server, store.prefix) == []
        assert [u["UploadId"] for u in unfinished_uploads(s3_server, other_prefix)] == [other["UploadId"]]
    finally:
        client.abort_multipart_upload(Bucket=bucket, Key=f"{other_prefix}/volumes/v.tif", UploadId=other["UploadId"])


# --------------------------------------------------------------------------- the local cache


def test_an_empty_cache_fetches_a_verified_copy_once(s3_server, store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = some_bytes(PART + 77)
    store.put("volumes/v.tif", [data])
    reader = s3_server.storage(tmp_path / "cache-b", prefix=store.prefix, part_bytes=PART)
    gets = count_calls(reader, "GetObject")
    path = reader.path_for("volumes/v.tif")
    assert path == tmp_path / "cache-b" / "data" / "volumes" / "v.tif" and path.read_bytes() == data
    record = json.loads((tmp_path / "cache-b" / "meta" / "volumes" / "v.tif.json").read_text())
    assert (record["sha256"], record["size"]) == (sha256(data), len(data))
    assert reader.path_for("volumes/v.tif") == path and len(gets) == 1
    assert list((tmp_path / "cache-b" / ".tmp").iterdir()) == []


def test_a_corrupted_copy_is_detected_by_its_checksum_and_fetched_again(s3_server, store, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    data = some_bytes(100_000)
    store.put("volumes/v.tif", [data])
    reader = s3_server.storage(tmp_path / "cache-b", prefix=store.prefix)
    gets = count_calls(reader, "GetObject")
    path = reader.path_for("volumes/v.tif")
    with open(path, "r+b") as handle:  # same size, other bytes
        handle.seek(5000)
        handle.write(b"\x00" * 16)
    assert path.read_bytes() != data
    with caplog.at_level(logging.WARNING, logger="embedseg_service.records.file_cache"):
        assert reader.path_for("volumes/v.tif").read_bytes() == data
    assert len(gets) == 2
    assert "the cached copy of 'volumes/v.tif' does not match its SHA-256; fetching it again" in caplog.text
    assert reader.path_for("volumes/v.tif").read_bytes() == data and len(gets) == 2


def test_a_replaced_object_is_fetched_again(s3_server, store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store.put("jobs/j/a1/last.pt", [b"epoch 1"])
    reader = s3_server.storage(tmp_path / "cache-b", prefix=store.prefix)
    assert reader.path_for("jobs/j/a1/last.pt").read_bytes() == b"epoch 1"
    store.put("jobs/j/a1/last.pt", [b"epoch 2"])  # same size, new ETag
    assert reader.path_for("jobs/j/a1/last.pt").read_bytes() == b"epoch 2"
    assert reader.delete("jobs/j/a1/last.pt") is True
    assert not reader.cache.data_path("jobs/j/a1/last.pt").exists()
    with pytest.raises(StorageError, match="no stored file under key 'jobs/j/a1/last.pt'"):
        store.path_for("jobs/j/a1/last.pt")  # the writer's own copy is no answer for a deleted object


def test_least_recently_used_copies_are_evicted(s3_server, store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in "abc":
        store.put(f"volumes/{name}.tif", [some_bytes(1000, name.encode())])
    reader = s3_server.storage(tmp_path / "cache-b", prefix=store.prefix, max_bytes=2500, keep_recent_s=0)
    for name in "aba":  # b is now the least recently used
        reader.path_for(f"volumes/{name}.tif")
    reader.path_for("volumes/c.tif")
    cached = sorted(path.name for path in (tmp_path / "cache-b" / "data" / "volumes").iterdir())
    assert cached == ["a.tif", "c.tif"] and reader.cache.size_bytes() == 2000
    assert reader.path_for("volumes/b.tif").read_bytes() == some_bytes(1000, b"b")  # fetched again
    assert reader.cache.size_bytes() <= 2500


def test_copies_just_used_stay_past_the_bound(s3_server, store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    for name in "abc":
        store.put(f"volumes/{name}.tif", [some_bytes(1000, name.encode())])
    reader = s3_server.storage(tmp_path / "cache-b", prefix=store.prefix, max_bytes=2500)  # keeps the last minute's
    paths = [reader.path_for(f"volumes/{name}.tif") for name in "abc"]
    assert all(path.is_file() for path in paths) and reader.cache.size_bytes() == 3000


def test_processes_sharing_a_cache_folder_make_one_copy(s3_server, store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = some_bytes(3 * 1024 * 1024)
    store.put("volumes/shared.tif", [data])
    cache = tmp_path / "shared-cache"
    env = {**os.environ, **s3_server.settings_env(store.prefix, cache)}
    script = (
        "import hashlib; from embedseg_service.records.settings import Settings; "
        "from embedseg_service.records.stores import get_storage; "
        "path = get_storage(Settings(_env_file=None)).path_for('volumes/shared.tif'); "
        "print(path, hashlib.sha256(path.read_bytes()).hexdigest())"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [process.communicate(timeout=120)[0].split() for process in processes]
    assert [process.returncode for process in processes] == [0] * 4
    assert outputs == [[str(cache / "data" / "volumes" / "shared.tif"), sha256(data)]] * 4
    assert [path.name for path in (cache / "data" / "volumes").iterdir()] == ["shared.tif"]
    assert list((cache / ".tmp").iterdir()) == []


# --------------------------------------------------------------------------- errors


def test_bad_credentials_bucket_or_endpoint_say_so(s3_server, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    prefix = s3_server.new_prefix()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    refused = s3_server.storage(tmp_path / "c1", prefix=prefix)
    where = f"s3://{s3_server.bucket}/{prefix} at {s3_server.endpoint}"
    assert refused.reachable() == (
        f"the object store {where} refused the credentials (SignatureDoesNotMatch); check AWS_ACCESS_KEY_ID "
        "and AWS_SECRET_ACCESS_KEY"
    )
    with pytest.raises(StorageError, match=r"^reading 'volumes/v.tif': the object store .* refused the credentials"):
        refused.open_read("volumes/v.tif")
    monkeypatch.undo()
    missing = S3Storage("no-such-bucket", prefix, cache=refused.cache, endpoint_url=s3_server.endpoint)
    assert missing.reachable() == (
        f"the bucket of s3://no-such-bucket/{prefix} at {s3_server.endpoint} does not exist; create it or fix "
        "EMBEDSEG_STORAGE_URL"
    )
    (port,) = free_ports(1)
    closed = S3Storage(s3_server.bucket, prefix, cache=refused.cache, endpoint_url=f"http://127.0.0.1:{port}")
    assert closed.reachable().startswith(
        f"the object store s3://{s3_server.bucket}/{prefix} at http://127.0.0.1:{port} is unreachable: "
    )
    with pytest.raises(StorageError, match="is unreachable"):
        closed.put("volumes/v.tif", [b"x"])


def test_a_full_store_reads_as_a_full_disk() -> None:
    full = ClientError(
        {
            "Error": {"Code": "XMinioStorageFull", "Message": "drive threshold reached"},
            "ResponseMetadata": {"HTTPStatusCode": 507},
        },
        "UploadPart",
    )
    error = storage_error(full, "sending part 1 of 'volumes/v.tif'", "s3://bucket")
    assert error.errno == errno.ENOSPC  # the API answers 507, as for a full disk
    assert error.strerror == (
        "sending part 1 of 'volumes/v.tif': the object store s3://bucket is full (XMinioStorageFull: drive threshold "
        "reached)"
    )


# --------------------------------------------------------------------------- the API on the object store


def synthetic_pair(size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A generated image of 4 objects and its labels (uint16)."""
    labels = random_labels((size, size), 4, radius=(4.0, 7.0), seed=1).astype(np.uint16)
    image = (render_image(labels, seed=1) * 1000).clip(0, None).astype(np.uint16)
    return image, labels


def test_the_api_stores_streams_previews_and_deletes_on_the_object_store(s3_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    prefix = s3_server.new_prefix()
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path / "data",
        broker_url=None,
        storage_url=s3_server.url(prefix),
        s3_endpoint_url=s3_server.endpoint,
        cache_dir=tmp_path / "api-cache",
        s3_part_bytes=PART,
    )
    from embedseg_service.api.app import create_app

    image, labels = synthetic_pair()
    with TestClient(create_app(settings, migrate=True)) as client:
        assert client.get(f"{API}/ready").json()["storage"] == "s3"
        content = tiff_bytes(image)
        body = upload(client, content, "cells.tif").json()
        key = f"{prefix}/volumes/{body['id']}.tif"
        stored = s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
        assert sha256(stored) == body["sha256"] == sha256(content)
        download = client.get(f"{API}/volumes/{body['id']}/download")
        assert download.status_code == 200 and download.content == content
        assert download.headers["content-length"] == str(len(content))
        assert download.headers["content-disposition"] == 'attachment; filename="cells.tif"'
        # stored in canonical axis order (CZYX): a second write, from the rewritten file
        rewritten = upload(client, tiff_bytes(np.stack([image, image])[:, None]), axes="ZCYX").json()
        assert rewritten["axes"] == "CZYX" and rewritten["shape"] == [1, 2, 64, 64]
        key = f"{prefix}/volumes/{rewritten['id']}.tif"
        stored = s3_server.client().get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
        assert sha256(stored) == rewritten["sha256"]
        mask = upload(client, tiff_bytes(labels), kind="labels", image_id=body["id"]).json()
        preview = client.get(f"{API}/volumes/{mask['id']}/preview.png")
        assert preview.status_code == 200 and preview.content.startswith(b"\x89PNG")
        assert (tmp_path / "api-cache" / "data" / "volumes" / f"{body['id']}.tif").is_file()
        assert client.delete(f"{API}/volumes/{mask['id']}").status_code == 204
        assert not s3_server.storage(tmp_path / "other-cache", prefix).exists(f"volumes/{mask['id']}.tif")
        assert not (tmp_path / "api-cache" / "data" / "volumes" / f"{mask['id']}.tif").exists()
    assert not (tmp_path / "data" / "storage").exists()


# --------------------------------------------------------------------------- API and worker processes, no shared folder


class Process:
    """``embedseg <args>`` as a process of its own session, its output in ``<root>/<name>.log``."""

    def __init__(self, root: Path, name: str, env: dict[str, str], args: list[str]) -> None:
        self.name, self.log = name, root / f"{name}.log"
        command = [sys.executable, "-c", "import sys; from embedseg_service.core.cli import main; sys.exit(main())"]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [*command, *args], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, ready: Callable[[], bool]) -> Process:
        deadline = time.monotonic() + WAIT_S
        while not ready():
            assert self.process.poll() is None, f"{self.name} exited:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"{self.name} not ready:\n{self.text()[-3000:]}"
            time.sleep(0.2)
        return self

    def peak_rss(self) -> int:
        """The process's peak resident memory so far (bytes)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM in /proc/<pid>/status")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)


@dataclass
class Stack:
    root: Path
    s3: S3Server
    prefix: str
    env: Callable[[str], dict[str, str]]
    api: Process
    http: httpx.Client
    workers: list[Process]

    def start_worker(self, name: str) -> Process:
        """A worker process with an empty cache folder of its own."""
        args = [
            "worker",
            "--queues",
            self.env("x")["EMBEDSEG_GPU_QUEUE"],
            "--concurrency",
            "1",
            "--hostname",
            f"{name}@%h",
        ]
        worker = Process(self.root, name, self.env(name), args)
        self.workers.append(worker)
        return worker.wait_for(lambda: " ready." in worker.text())


@pytest.fixture(scope="module")
def stack(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """``embedseg serve`` and one ``embedseg worker`` on PostgreSQL, Redis and the object store; each process has
    its own data and cache folders (``<root>/<name>-data``, ``<root>/<name>-cache``), all empty at the start."""
    problem = production_services_problem()
    if problem:
        service_missing(problem)
    root = tmp_path_factory.mktemp("s3-stack")
    prefix = s3_server.new_prefix()
    with production_settings(root, prefix="s3stack") as settings:
        common = {key: value for key, value in os.environ.items() if not key.startswith("EMBEDSEG_")}
        common.update(
            {
                "EMBEDSEG_DATABASE_URL": str(settings.database_url),
                "EMBEDSEG_BROKER_URL": str(settings.broker_url),
                "EMBEDSEG_GPU_QUEUE": settings.gpu_queue,
                "EMBEDSEG_HEARTBEAT_S": "0.5",
                "EMBEDSEG_PROGRESS_THROTTLE_S": "0.2",
                "EMBEDSEG_S3_PART_BYTES": str(PART),
                "EMBEDSEG_MAX_UPLOAD_BYTES": str(64 * 1024**2),
                "MALLOC_ARENA_MAX": "2",  # fewer per-thread malloc arenas: peak memory measures buffers, not arenas
                "OMP_NUM_THREADS": "1",
            }
        )

        def env(name: str) -> dict[str, str]:
            return {
                **common,
                **s3_server.settings_env(prefix, root / f"{name}-cache"),
                "EMBEDSEG_DATA_DIR": str(root / f"{name}-data"),
            }

        (port,) = free_ports(1)
        api = Process(root, "api", env("api"), ["serve", "--host", "127.0.0.1", "--port", str(port)])
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)

        def answers() -> bool:
            try:
                return http.get(f"{API}/health").status_code == 200
            except httpx.HTTPError:
                return False

        result = Stack(root, s3_server, prefix, env, api.wait_for(answers), http, [])
        try:
            result.start_worker("worker-1")
            yield result
        finally:
            http.close()
            for process in [*result.workers, api]:
                process.stop()


def stored_object(stack: Stack, key: str, **options: Any) -> dict[str, Any]:
    """HeadObject of ``key`` (``PartNumber=1`` adds ``PartsCount``, and gives the first part's length)."""
    return stack.s3.client().head_object(Bucket=stack.s3.bucket, Key=f"{stack.prefix}/{key}", **options)


def big_upload(stack: Stack, slices: int) -> tuple[bytes, dict[str, Any]]:
    """Upload a ``slices`` x 1024 x 1024 uint16 volume (2 MiB a slice); returns its bytes and the new volume."""
    volume = np.random.default_rng(slices).integers(0, 4000, size=(slices, 1024, 1024), dtype=np.uint16)
    content = tiff_bytes(volume, metadata={"axes": "ZYX"})
    response = upload(stack.http, content, "big.tif")
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["shape"], body["sha256"]) == ([slices, 1024, 1024], sha256(content))
    head = stored_object(stack, f"volumes/{body['id']}.tif", PartNumber=1)
    assert head["PartsCount"] == -(-len(content) // PART)  # sent in parts of EMBEDSEG_S3_PART_BYTES
    return content, body


@pytest.mark.redis
@pytest.mark.postgres
def test_a_20_mb_upload_goes_in_parts_and_the_api_memory_stays_bounded(stack) -> None:  # type: ignore[no-untyped-def]
    content, first = big_upload(stack, 10)  # 20 MiB: 5 parts; also sets up what every upload allocates once
    assert (
        len(content) > 20 * 1024**2
        and stored_object(stack, f"volumes/{first['id']}.tif", PartNumber=1)["PartsCount"] == 5
    )
    download = stack.http.get(f"{API}/volumes/{first['id']}/download")
    assert download.status_code == 200 and sha256(download.content) == sha256(content)
    before = stack.api.peak_rss()
    content, second = big_upload(stack, 20)  # 40 MiB, 9 parts: the peak memory of the API hardly moves
    assert stack.api.peak_rss() - before < len(content) // 4, "the API held much of the body in memory"
    for body in (first, second):
        assert stack.http.delete(f"{API}/volumes/{body['id']}").status_code == 204


@pytest.fixture(scope="module")
def trained(stack: Stack) -> dict[str, str]:
    """An uploaded image and mask and the model a short train job made of them on the worker."""
    image, labels = synthetic_pair()
    ids = {}
    for name, data, kind in (("image", image, "image"), ("mask", labels, "labels")):
        response = upload(stack.http, tiff_bytes(data), kind=kind)
        assert response.status_code == 201, response.text
        ids[name] = response.json()["id"]
    response = stack.http.post(
        f"{API}/jobs/train",
        json={
            "image_ids": [ids["image"]],
            "mask_ids": [ids["mask"]],
            "epochs": 2,
            "crop_size": 32,
            "batch_size": 1,
            "max_time_minutes": 10,
            "name": "on-s3",
        },
    )
    assert response.status_code == 202, response.text
    job = wait_job(stack.http, response.json()["id"], timeout=WAIT_S)
    assert job["status"] == "succeeded", job["error"]
    ids["model"] = job["result"]["model_id"]
    reader = stack.s3.storage(stack.root / "test-cache", stack.prefix)
    (ids["model_key"],) = [key for key in reader.list_keys(f"jobs/{job['id']}") if key.endswith(".pt")]
    return ids


def predict(stack: Stack, trained: dict[str, str]) -> dict[str, Any]:
    response = stack.http.post(
        f"{API}/jobs/predict",
        json={
            "model_id": trained["model"],
            "volume_ids": [trained["image"]],
            "gt_ids": [trained["mask"]],
            "tta": False,
        },
    )
    assert response.status_code == 202, response.text
    job = wait_job(stack.http, response.json()["id"], timeout=WAIT_S)
    assert job["status"] == "succeeded", job["error"]
    return job


def cached_keys(cache: Path) -> list[str]:
    data = cache / "data"
    return sorted(path.relative_to(data).as_posix() for path in data.rglob("*") if path.is_file())


@pytest.mark.redis
@pytest.mark.postgres
def test_train_predict_and_download_with_no_shared_folder(stack, trained) -> None:  # type: ignore[no-untyped-def]
    model = stack.http.get(f"{API}/models/{trained['model']}").json()
    assert (
        model["name"] == "on-s3" and stored_object(stack, trained["model_key"])["ContentLength"] == model["size_bytes"]
    )
    job = predict(stack, trained)
    (labels_id,) = job["result"]["label_volume_ids"]
    row = stack.http.get(f"{API}/volumes/{labels_id}").json()
    download = stack.http.get(f"{API}/volumes/{labels_id}/download")
    assert download.status_code == 200 and sha256(download.content) == row["sha256"] and row["shape"] == [64, 64]
    preview = stack.http.get(f"{API}/volumes/{labels_id}/preview.png")
    assert preview.status_code == 200 and preview.content.startswith(b"\x89PNG")
    # the worker read its inputs through its own cache; the API keeps copies of what it previewed (and uploaded)
    worker_cache = cached_keys(stack.root / "worker-1-cache")
    assert {f"volumes/{trained['image']}.tif", f"volumes/{trained['mask']}.tif"} <= set(worker_cache)
    reader = stack.s3.storage(stack.root / "test-cache", stack.prefix)
    (labels_key,) = [key for key in reader.list_keys(f"jobs/{job['id']}") if "/labels-" in key]
    assert labels_key in cached_keys(stack.root / "api-cache")
    assert not [path for path in stack.root.rglob("storage") if path.is_dir()], "no process made a storage folder"


@pytest.mark.redis
@pytest.mark.postgres
def test_a_worker_restarted_with_an_empty_cache_runs_a_job(stack, trained) -> None:  # type: ignore[no-untyped-def]
    for worker in stack.workers:
        worker.stop()
    fresh = stack.start_worker("worker-2")
    assert cached_keys(stack.root / "worker-2-cache") == []
    assert all(worker.process.poll() is not None for worker in stack.workers if worker is not fresh)
    predict(stack, trained)
    assert trained["model_key"] in cached_keys(stack.root / "worker-2-cache")
    assert fresh.process.poll() is None
