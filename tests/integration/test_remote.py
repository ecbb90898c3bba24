"""``embedseg remote`` against a live server: ``embedseg serve`` as a subprocess on the embedded default
(SQLite, local storage, the local worker) in a temporary data directory, the CLI as further subprocesses.

A folder of 3 images is predicted in one job and one label TIFF per input comes back with its shape;
``--json`` output parses; a cancelled job makes ``wait`` exit 1, a refused request (422) exits 2 with
the server's detail, an unreachable server exits 3. Jobs submitted with a callback URL (the Python
client's ``callback_url``, the CLI's ``--callback-url``) reach a receiver on 127.0.0.1, signed. A wait
(the Python client's and ``embedseg remote wait``) goes through :class:`DroppingProxy`, a TCP proxy in
the test: when it drops every connection and turns new ones away mid-wait, the wait recovers through
the client's retries and ends with the job's final state (exit 0); when it stays closed past the
retries, the wait ends with :class:`~embedseg_service.client.WaitInterrupted` (exit 3).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
from helpers import WebhookReceiver, service_missing

from embedseg_service.client import Client, JobFailed, WaitInterrupted
from embedseg_service.records.orm import JobStatus
from embedseg_service.records.webhooks import verify_signature

API = "/api/v1"
SECRET = "remote-webhook-secret-0123456789"
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
    env = clean_env(
        EMBEDSEG_DATA_DIR=str(root / "data"), EMBEDSEG_PROGRESS_THROTTLE_S="0.2", EMBEDSEG_WEBHOOK_SECRET=SECRET,
        EMBEDSEG_WEBHOOK_ALLOWED_NETWORKS='["127.0.0.1/32"]',
    )  # fmt: skip
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


# --------------------------------------------------------------------------- webhooks


def until(condition: Callable[[], Any], what: str, timeout: float = 120.0) -> Any:
    """Poll ``condition`` until it is truthy and return its value; fail saying ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)
    return value


def delivered(receiver: WebhookReceiver, job_id: str) -> dict[str, Any]:
    """The body of the webhook ``receiver`` got for ``job_id``, after checking its headers and signature."""
    path, headers, body = until(
        lambda: next((hit for hit in receiver.received if json.loads(hit[2])["id"] == job_id), None),
        f"the webhook of job {job_id}",
    )
    assert path == "/hook?lab=a" and headers["X-EmbedSeg-Event"] == "job.succeeded"
    assert verify_signature(SECRET, headers["X-EmbedSeg-Signature"], body)
    assert not verify_signature("another-secret-0123456789", headers["X-EmbedSeg-Signature"], body)
    return dict(json.loads(body))


def test_jobs_with_a_callback_url_reach_the_receiver(server: str, tmp_path: Path) -> None:
    receiver = WebhookReceiver([(200, {})])
    try:
        with Client(server, api_key="") as api:
            model_id = upload_model(server, model_file(tmp_path))
            image = api.upload(blobs((32, 32), 1)[0])
            predicted = api.wait(api.predict(model_id, [image], tta=False, callback_url=receiver.url), poll_s=0.2)
            body = delivered(receiver, predicted.id)
            assert body["status"] == "succeeded" and body["kind"] == "predict" and body["callback"] is None
            assert predicted.result is not None and body["result"]["labels"] == predicted.result["labels"]
            assert body["spec"]["callback_url"] == receiver.url

            gt = api.upload(blobs((32, 32), 2)[1], kind="labels")
            cli = remote(server, "evaluate", "--gt", gt.id, "--pred", gt.id, "--thresholds", "0.5",
                         "--callback-url", receiver.url, "--wait", "--json")  # fmt: skip
            evaluated = run_json(cli)
            body = delivered(receiver, evaluated["id"])
            assert body["kind"] == "evaluate" and body["metrics"]["ap"] == evaluated["metrics"]["ap"]
            assert until(lambda: api.job(evaluated["id"]).callback, "the delivery record").state == "delivered"
    finally:
        receiver.close()


# --------------------------------------------------------------------------- a dropped connection mid-wait


def _kill(sock: socket.socket) -> None:
    """Close ``sock`` at once with a reset (waking a thread blocked on it)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class DroppingProxy:
    """A TCP proxy on 127.0.0.1 (real sockets, a thread per direction) in front of the port ``target``.

    :meth:`drop` kills every connection and turns new ones away (accepted, then reset; counted in
    ``turned_away``); :meth:`restore` lets them through again; :meth:`close` stops listening, so
    connections are refused. ``polls`` counts the requests starting with ``watched`` it forwarded.
    """

    def __init__(self, target: int, watched: bytes) -> None:
        self.target, self.watched = target, watched
        self.polls = self.turned_away = 0
        self.down = self.closed = False
        self.lock = threading.Lock()
        self.open: set[socket.socket] = set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self.lock:
                if self.down:
                    self.turned_away += 1
                    _kill(conn)
                    continue
                upstream = socket.create_connection(("127.0.0.1", self.target))
                self.open |= {conn, upstream}
            threading.Thread(target=self._pump, args=(conn, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, conn, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if from_client:
                    with self.lock:
                        self.polls += chunk.count(self.watched)
                sink.sendall(chunk)
        except OSError:
            pass
        with self.lock:
            self.open -= {source, sink}
        _kill(source)
        _kill(sink)

    def drop(self) -> None:
        """Kill every connection; turn new ones away until :meth:`restore`."""
        with self.lock:
            self.down = True
            victims, self.open = self.open, set()
        for sock in victims:
            _kill(sock)

    def restore(self) -> None:
        with self.lock:
            self.down = False

    def close(self) -> None:
        """Kill every connection and stop listening: new ones are refused."""
        self.drop()
        self.closed = True
        self.listener.close()


def remote_wait(proxy: DroppingProxy, job_id: str, *options: str) -> subprocess.Popen[str]:
    """``embedseg remote wait JOB --json`` through ``proxy``, running."""
    command = [*embedseg(), "remote", "--server", proxy.url, "--poll", "0.3", *options, "wait", job_id, "--json"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())


def client_wait(proxy: DroppingProxy, job_id: str, **options: Any) -> Any:
    """``Client.wait`` on the job through ``proxy`` (polling every 0.3 s)."""
    with Client(proxy.url, api_key="", **options) as api:
        return api.wait(job_id, poll_s=0.3, progress=False)


def finished_with(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


def _blocker(api: Client) -> str:
    """A long training job that keeps the service's one local worker busy until it is cancelled."""
    image, labels = blobs((96, 96), 3)
    img, mask = api.upload(image), api.upload(labels, kind="labels")
    return api.train([img], [mask], epochs=10000).id


def _cancel(server: str, job_id: str) -> None:
    response = httpx.post(f"{server}{API}/jobs/{job_id}/cancel", timeout=30)
    assert response.status_code == 200, response.text


def test_a_dropped_connection_mid_wait_recovers(server: str) -> None:
    """The job waited on stays queued behind a blocker while the proxies drop every connection and turn
    the clients away twice each, then let them through; the blocker is cancelled only then."""
    with Client(server, api_key="") as api, ThreadPoolExecutor(1) as pool:
        blocker = _blocker(api)
        gt = api.upload(blobs((32, 32), 4)[1], kind="labels")
        job = api.evaluate([(gt, gt)], thresholds=[0.5])
        watched = f"GET {API}/jobs/{job.id}".encode()
        port = int(server.rsplit(":", 1)[1])
        for_cli, for_client = DroppingProxy(port, watched), DroppingProxy(port, watched)
        try:
            cli = remote_wait(for_cli, job.id)
            waiting: Future[Any] = pool.submit(client_wait, for_client, job.id)
            proxies = (for_cli, for_client)
            until(lambda: all(proxy.polls >= 2 for proxy in proxies), "both waits to poll")
            assert api.job(job).status is JobStatus.queued and cli.poll() is None and not waiting.done()
            for proxy in proxies:
                proxy.drop()
            for proxy in proxies:
                until(lambda: proxy.turned_away >= 2, "the client to be turned away twice")  # noqa: B023
                before = proxy.polls
                proxy.restore()
                until(lambda: proxy.polls > before, "a poll after the proxy let it through")  # noqa: B023
            assert cli.poll() is None and not waiting.done()
            _cancel(server, blocker)

            code, out, err = finished_with(cli)
            assert code == 0, (out, err)
            final = json.loads(out)
            assert final["id"] == job.id and final["status"] == "succeeded" and final["metrics"]["ap"]["ap"] == [1.0]
            done = waiting.result(timeout=120)
            assert done.status is JobStatus.succeeded and done.metrics == final["metrics"]
        finally:
            for proxy in (for_cli, for_client):
                proxy.close()


def test_a_wait_whose_server_stays_unreachable_ends_with_exit_3(server: str) -> None:
    """The proxies stop listening mid-wait for longer than 2 retries: the wait says it lost the server
    and which job (still running, for all the client knows) to wait on again."""
    with Client(server, api_key="") as api, ThreadPoolExecutor(1) as pool:
        blocker = _blocker(api)
        port = int(server.rsplit(":", 1)[1])
        watched = f"GET {API}/jobs/{blocker}".encode()
        for_cli, for_client = DroppingProxy(port, watched), DroppingProxy(port, watched)
        try:
            cli = remote_wait(for_cli, blocker, "--retries", "2")
            waiting: Future[Any] = pool.submit(client_wait, for_client, blocker, retries=2)
            until(lambda: for_cli.polls >= 2 and for_client.polls >= 2, "both waits to poll")
            for_cli.close()
            for_client.close()

            code, out, err = finished_with(cli)
            assert code == 3, (out, err)
            assert err.startswith(
                f"embedseg remote wait: error: cannot reach the server: lost the server while waiting for job {blocker}"
            )
            assert "ConnectError" in err and "(after 2 retries over" in err
            assert err.rstrip().endswith("the job may still run: wait on it again to resume")
            assert json.loads(out)["id"] == blocker  # --json: the last state seen
            with pytest.raises(WaitInterrupted, match=f"lost the server while waiting for job {blocker}") as lost:
                waiting.result(timeout=120)
            assert lost.value.job.id == blocker and lost.value.job.status in (JobStatus.queued, JobStatus.running)
        finally:
            for_cli.close()
            for_client.close()
            _cancel(server, blocker)
        with pytest.raises(JobFailed, match="ended cancelled"):  # waiting again, on the server itself, resumes
            api.wait(blocker, poll_s=0.2)
