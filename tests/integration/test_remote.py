"""``embedseg remote`` against a live server: ``embedseg serve`` as a subprocess on the embedded default
(SQLite, local storage, the local worker) in a temporary data directory, the CLI as further subprocesses.

A folder of 3 images is predicted in one job and one label TIFF per input comes back with its shape;
``--json`` output parses; a cancelled job makes ``wait`` exit 1, a refused request (422) exits 2 with
the server's detail, an unreachable server exits 3.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
from helpers import service_missing

API = "/api/v1"
SHAPES = [(64, 64), (64, 48), (48, 64)]
"""The shapes of the three images predicted in one job (their labels must keep them)."""


def embedseg() -> list[str]:
    """The installed ``embedseg`` script of this interpreter (it finds the ``remote`` plug-in)."""
    script = Path(sys.executable).with_name("embedseg")
    found = str(script) if script.exists() else shutil.which("embedseg")
    names = {ep.name for ep in metadata.entry_points(group="embedseg.commands")}
    if not found or "remote" not in names:
        service_missing("the embedseg script with its 'remote' command is not installed; run: pip install -e .")
    return [str(found)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDSEG_")}
    env.update(values, PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The root URL of ``embedseg serve`` on a free port with a fresh data directory."""
    command = embedseg()
    root = tmp_path_factory.mktemp("remote-server")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = (root / "serve.log").open("wb")
    env = clean_env(EMBEDSEG_DATA_DIR=str(root / "data"), EMBEDSEG_PROGRESS_THROTTLE_S="0.2")
    proc = subprocess.Popen(
        [*command, "serve", "--port", str(port)], env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (root / "serve.log").read_text(errors="replace")
            try:
                if httpx.get(f"{base}{API}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (root / "serve.log").read_text(errors="replace")
            time.sleep(0.3)
        yield base
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


def remote(server: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``embedseg remote --server SERVER --poll 0.3 ARGS`` (standard output and error captured: no TTY)."""
    return subprocess.run(
        [*embedseg(), "remote", "--server", server, "--poll", "0.3", *args],
        capture_output=True, text=True, timeout=120, env=env or clean_env(),
    )  # fmt: skip


def blobs(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An image of a few bright discs on noise and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint16)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for index in range(1, 5):
        cy, cx = rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = index
    image = (rng.normal(20, 5, shape) + 200 * (labels > 0)).clip(0, 255).astype(np.uint8)
    return image, labels


def model_file(tmp_path: Path) -> Path:
    """A 2D model file as training writes it (a fresh network's weights)."""
    from embedseg_service.core.model.checkpoint import build_network, save_checkpoint

    payload = {
        "state_dict": build_network(2, 1).state_dict(),
        "spatial_dims": 2,
        "in_channels": 1,
        "step": [1 / 1023, 1 / 1023],
        "config": {"spatial_dims": 2, "epochs": 1, "in_channels": 1},
        "properties": {"min_object_size": 5, "foreground_weight": 10.0},
        "metrics": {},
    }
    return save_checkpoint(tmp_path / "tiny.pt", payload)


def upload_model(server: str, path: Path) -> str:
    with path.open("rb") as handle:
        sent = httpx.post(f"{server}{API}/models", files={"file": ("tiny.pt", handle)}, timeout=60)
    assert sent.status_code == 201, sent.text
    return str(sent.json()["id"])


def run_json(result: subprocess.CompletedProcess[str], code: int = 0) -> Any:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    return json.loads(result.stdout)


def test_predict_a_folder_in_one_job_writes_one_label_tiff_per_input(server: str, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for index, shape in enumerate(SHAPES):
        tifffile.imwrite(images / f"cell_{index}.tif", blobs(shape, index)[0], photometric="minisblack")
    model_id = upload_model(server, model_file(tmp_path))

    uploaded = run_json(remote(server, "upload", str(images), "--json"))
    assert [row["name"] for row in uploaded] == ["cell_0", "cell_1", "cell_2"]
    assert [tuple(row["shape"]) for row in uploaded] == SHAPES and {row["kind"] for row in uploaded} == {"image"}

    out = tmp_path / "labels"
    result = remote(server, "predict", model_id, str(images / "*.tif"), "--out", str(out), "--json")
    body = run_json(result)
    assert "%|" not in result.stderr  # no progress bar without a terminal
    job = body["job"]
    assert job["kind"] == "predict" and job["status"] == "succeeded" and len(job["spec"]["volume_ids"]) == 3
    assert [Path(item["path"]).name for item in body["outputs"]] == ["cell_0.tif", "cell_1.tif", "cell_2.tif"]
    for item, shape in zip(body["outputs"], SHAPES):
        labels = tifffile.imread(item["path"])
        assert labels.shape == shape and np.issubdtype(labels.dtype, np.integer)
        assert job["result"]["labels"][item["volume_id"]] == item["labels_volume_id"]

    listed = run_json(remote(server, "models", "--json"))
    assert model_id in [row["id"] for row in listed]
    status = run_json(remote(server, "status", job["id"], "--json"))
    assert status["id"] == job["id"] and status["status"] == "succeeded"
    again = run_json(remote(server, "wait", job["id"], "--json"))  # a finished job answers at once
    assert again["status"] == "succeeded"
    first = body["outputs"][0]
    copy = run_json(remote(server, "download", first["labels_volume_id"], str(tmp_path / "copy.tif"), "--json"))
    assert np.array_equal(tifffile.imread(copy["path"]), tifffile.imread(first["path"]))

    human = remote(server, "status", job["id"])
    assert human.returncode == 0 and f"job {job['id']} (predict): succeeded" in human.stdout

    # a prediction of another shape than its ground truth is refused before any job exists
    gt_file = tmp_path / "gt.tif"
    tifffile.imwrite(gt_file, blobs((32, 32), 7)[1], photometric="minisblack")
    (gt,) = run_json(remote(server, "upload", str(gt_file), "--kind", "labels", "--json"))
    refused = remote(server, "evaluate", "--gt", gt["id"], "--pred", first["labels_volume_id"])
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "422" in refused.stderr and "shape" in refused.stderr and refused.stdout == ""


def test_a_cancelled_job_makes_wait_exit_1(server: str, tmp_path: Path) -> None:
    image, labels = blobs((96, 96), 3)
    tifffile.imwrite(tmp_path / "img.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "mask.tif", labels, photometric="minisblack")
    (img,) = run_json(remote(server, "upload", str(tmp_path / "img.tif"), "--json"))
    (mask,) = run_json(remote(server, "upload", str(tmp_path / "mask.tif"), "--kind", "labels", "--json"))

    job = run_json(remote(server, "--json", "train", "--images", img["id"], "--masks", mask["id"], "--epochs", "10000"))
    assert job["kind"] == "train" and job["status"] in ("queued", "running")
    cancelled = httpx.post(f"{server}{API}/jobs/{job['id']}/cancel", timeout=30)
    assert cancelled.status_code == 200, cancelled.text

    waited = remote(server, "wait", job["id"], "--timeout", "90", "--json")
    final = run_json(waited, code=1)
    assert final["id"] == job["id"] and final["status"] == "cancelled"
    assert f"job {job['id']} (train) ended cancelled" in waited.stderr


def test_usage_and_connection_errors_have_their_exit_codes(server: str, tmp_path: Path) -> None:
    missing = remote(server, "status", "no-such-job")
    assert missing.returncode == 2 and "404" in missing.stderr
    mismatched = remote(server, "evaluate", "--gt", "a,b", "--pred", "c")
    assert mismatched.returncode == 2 and "2 --gt ids but 1 --pred ids" in mismatched.stderr
    nothing = remote(server, "upload", str(tmp_path / "absent"))
    assert nothing.returncode == 2 and "does not exist" in nothing.stderr
    usage = remote(server, "predict", "model-id")
    assert usage.returncode == 2 and "--out" in usage.stderr

    down = remote(f"http://127.0.0.1:{free_port()}", "--retries", "0", "models")
    assert down.returncode == 3 and "cannot reach the server" in down.stderr
