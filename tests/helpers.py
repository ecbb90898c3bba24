"""Helpers shared by the tests: the DSB image and the split of the session's trained model, the trivial
segmentation baseline, seeds from the environment, TIFF uploads, the textbook Lovász hinge, jobs over
HTTP, the services (the embedded default; PostgreSQL, Redis, a Celery worker and ``embedseg worker`` processes), and
a webhook receiver.

Importable as ``helpers`` from every test module (pytest puts ``tests/`` on ``sys.path`` for its
``conftest.py``). Heavy libraries are imported inside the helpers that need them.
"""

from __future__ import annotations

import io
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest
from scipy import ndimage

from embedseg_service.core.metrics import average_precision

DATA_DIR = Path(__file__).parent / "data"
DSB_SPLIT_ROW = 384
"""Rows ``0:DSB_SPLIT_ROW`` of the DSB image train the session's ``dsb_model``; the rows below are held out."""
DSB_MODEL_EPOCHS = 24
DSB_MODEL_SEED = 0


def dsb_image() -> tuple[np.ndarray, np.ndarray]:
    """``(image, mask)`` of the real 2D nuclei image ``tests/data/nuclei2d_dsb`` (512 x 512, 125 nuclei)."""
    from embedseg_service.core.data.io import read_tiff

    name = "dsb2018_img2d.tif"
    folder = DATA_DIR / "nuclei2d_dsb"
    return read_tiff(folder / "images" / name).data, read_tiff(folder / "masks" / name).data


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block on ``count`` torch CPU threads, then restore the previous number."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- Otsu + connected components

BINS = 256


def otsu_threshold(image: np.ndarray) -> float:
    """Otsu's threshold of ``image`` (any dtype; 256 bins between its minimum and maximum)."""
    values = np.asarray(image, dtype=np.float64).ravel()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return low
    hist, edges = np.histogram(values, bins=BINS, range=(low, high))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - (m0[-1] - m0) / w1) ** 2
    return float(edges[int(np.nanargmax(between)) + 1])


def otsu_labels(image: np.ndarray, min_size: int = 0) -> np.ndarray:
    """Connected components (faces only) of the pixels above Otsu's threshold with more than
    ``min_size`` pixels, int32 (0 = background)."""
    labels, count = ndimage.label(np.asarray(image) > otsu_threshold(image))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes > min_size
    keep[0] = False
    ids = np.zeros(count + 1, dtype=np.int32)
    ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return ids[labels]


def smallest_object(labels: np.ndarray) -> int:
    """Pixel count of the smallest object of ``labels`` (the baseline's size filter: learnt from training labels)."""
    sizes = np.bincount(np.asarray(labels).ravel())[1:]
    return int(sizes[sizes > 0].min())


def baseline_ap(
    image: np.ndarray, truth: np.ndarray, thresholds: tuple[float, ...] = (0.5,), min_size: int = 0
) -> list[float]:
    """AP of :func:`otsu_labels` (components of more than ``min_size`` pixels) against ``truth`` per IoU threshold."""
    return [float(a) for a in average_precision(truth, otsu_labels(image, min_size), thresholds).ap]


# --------------------------------------------------------------------------- seeds


def seeds_from_env(default: tuple[int, ...] = (0,), variable: str = "EMBEDSEG_TEST_SEEDS") -> list[int]:
    """Training seeds of a parametrised test: the comma-separated integers of ``variable``, else ``default``."""
    value = os.environ.get(variable, "").strip()
    return [int(part) for part in value.split(",") if part.strip()] if value else list(default)


# --------------------------------------------------------------------------- files and uploads


def tiff_bytes(data: np.ndarray, **kwargs: Any) -> bytes:
    """The bytes of a TIFF file holding ``data`` (tifffile.imwrite keyword arguments pass through)."""
    import tifffile

    buffer = io.BytesIO()
    if not kwargs.get("imagej"):
        kwargs.setdefault("photometric", "minisblack")
    tifffile.imwrite(buffer, data, **kwargs)
    return buffer.getvalue()


def upload(
    client: Any, content: bytes, filename: str = "img.tif", *, headers: dict[str, str] | None = None, **fields: Any
) -> Any:
    """POST a file (and form fields, and ``headers``) to /api/v1/volumes with ``client`` (a test client or an
    httpx client)."""
    return client.post(
        "/api/v1/volumes",
        files={"file": (filename, content, "image/tiff")},
        data={k: str(v) for k, v in fields.items()},
        headers=headers,
    )


class RecordingDispatcher:
    """A job dispatcher for an app under test: records the job ids it is given (and their queues); the jobs stay
    queued."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.queues: list[str | None] = []

    def submit(self, job_id: str, queue: str | None = None) -> None:
        self.submitted.append(job_id)
        self.queues.append(queue)


# --------------------------------------------------------------------------- Lovász oracle


def textbook_lovasz(logits: Any, labels: Any) -> Any:
    """Lovász hinge as in docs/method.md §4, the oracle of the Lovász and loss tests: sort the hinge
    errors, take the Jaccard loss of each prefix, weight the errors by its differences (torch tensors)."""
    import torch

    y = labels.to(logits.dtype)
    errors = 1 - logits * (2 * y - 1)
    errors_sorted, perm = torch.sort(errors, descending=True)
    y_sorted = y[perm]
    total = y.sum()
    jaccard = 1 - (total - torch.cumsum(y_sorted, 0)) / (total + torch.cumsum(1 - y_sorted, 0))
    grad = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return torch.dot(torch.relu(errors_sorted), grad)


# --------------------------------------------------------------------------- jobs over HTTP

API = "/api/v1"
FINISHED = ("succeeded", "failed", "cancelled")


def finished(body: dict) -> bool:
    """Whether a job body is in a final state."""
    return body["status"] in FINISHED


def wait_job(
    client: Any, job_id: str, done: Callable[[dict], bool] = finished, timeout: float = 300.0, poll_s: float = 0.2
) -> dict:
    """Poll ``GET /api/v1/jobs/{job_id}`` until ``done(body)``; raises ``AssertionError`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"{API}/jobs/{job_id}").json()
        if done(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} did not get there in {timeout} s: {body}")
        time.sleep(poll_s)


def download_labels(client: Any, volume_id: str) -> np.ndarray:
    """The pixels of a stored volume, downloaded over HTTP."""
    from embedseg_service.core.data.io import read_tiff

    response = client.get(f"{API}/volumes/{volume_id}/download")
    assert response.status_code == 200, response.text
    return read_tiff(io.BytesIO(response.content)).data


# --------------------------------------------------------------------------- production services

POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/15"


def service_missing(problem: str) -> NoReturn:
    """Skip a test whose real service (PostgreSQL, Redis) is down, or fail it where the services are
    required (``EMBEDSEG_REQUIRE_SERVICES=1``, as ``.ci/run`` sets): CI must not pass by skipping them."""
    if os.environ.get("EMBEDSEG_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{problem} (EMBEDSEG_REQUIRE_SERVICES=1)")
    pytest.skip(problem)


def production_services_problem() -> str | None:
    """Why Redis (127.0.0.1:6379) or PostgreSQL (127.0.0.1:5432, database ``test``) cannot be used, else ``None``."""
    import redis
    import sqlalchemy as sa

    from embedseg_service.records.db import make_engine

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError:
        return "Redis is not reachable at 127.0.0.1:6379"
    try:
        engine = make_engine(POSTGRES_URL)
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
        engine.dispose()
    except sa.exc.OperationalError:
        return "PostgreSQL is not reachable at 127.0.0.1:5432 (database test)"
    return None


@contextmanager
def production_settings(root: Path, prefix: str = "celery") -> Iterator[Any]:
    """Settings of the production path in ``root``: a fresh PostgreSQL schema made by the migrations,
    Redis as the broker and a queue of its own; the schema and the queue are removed on exit."""
    import redis
    import sqlalchemy as sa

    from embedseg_service.records.db import dispose_engines, make_engine, run_migrations
    from embedseg_service.records.settings import Settings

    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    queue = f"gpu-test-{uuid.uuid4().hex[:8]}"
    try:
        run_migrations(url)
        yield Settings(_env_file=None, data_dir=root, database_url=url, broker_url=REDIS_URL,
                       storage_dir=root / "storage", gpu_queue=queue, progress_throttle_s=0.2,
                       heartbeat_s=0.5)  # fmt: skip
    finally:
        dispose_engines()
        redis.Redis.from_url(REDIS_URL).delete(queue)
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def celery_worker(settings: Any) -> Iterator[Any]:
    """An embedded Celery worker (solo pool, in this process) consuming ``settings.gpu_queue``; yields its app."""
    from celery.contrib.testing.worker import start_worker

    from embedseg_service.worker.celery_app import create_celery

    app = create_celery(settings)
    with start_worker(app, pool="solo", concurrency=1, perform_ping_check=False, queues=[settings.gpu_queue],
                      shutdown_timeout=60):  # fmt: skip
        yield app


WORKER_WAIT_S = 240.0
"""Longest wait for an ``embedseg worker`` process to be ready."""


class WorkerProcess:
    """An ``embedseg worker`` process on ``settings`` (its own session, so ``kill -9`` of its process group reaches
    its pool processes, and with ``--gpus`` its children, too), logging to ``<root>/<name>.log``.

    ``args`` are further options (``--gpus 0,1``), ``env`` further environment variables; ``nodes`` is how many
    Celery nodes it starts (one per GPU with ``--gpus``), each logging ``<node> ready.``.
    """

    def __init__(
        self, settings: Any, root: Path, name: str, *, args: Sequence[str] = (), env: dict[str, str] | None = None,
        nodes: int = 1,
    ) -> None:  # fmt: skip
        import subprocess
        import sys

        self.name = name
        self.nodes = nodes
        self.log = root / f"{name}.log"
        environment = {key: value for key, value in os.environ.items() if not key.startswith("EMBEDSEG_")}
        environment.update(
            {
                "EMBEDSEG_DATABASE_URL": str(settings.database_url),
                "EMBEDSEG_BROKER_URL": str(settings.broker_url),
                "EMBEDSEG_DATA_DIR": str(settings.data_dir),
                "EMBEDSEG_STORAGE_DIR": str(settings.storage_path),
                "EMBEDSEG_GPU_QUEUE": settings.gpu_queue,
                "EMBEDSEG_HEARTBEAT_S": str(settings.heartbeat_s),
                "EMBEDSEG_PROGRESS_THROTTLE_S": str(settings.progress_throttle_s),
                "EMBEDSEG_REQUEUE_AFTER_S": str(settings.requeue_after_s),
                "OMP_NUM_THREADS": "1",
                **(env or {}),
            }
        )
        command = [
            sys.executable, "-c", "import sys; from embedseg_service.core.cli import main; sys.exit(main())",
            "worker", "--queues", settings.gpu_queue, "--concurrency", "1", "--hostname", f"{name}@%h",
            "--loglevel", "info", *args,
        ]  # fmt: skip
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, cwd=root, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = WORKER_WAIT_S) -> WorkerProcess:
        """Wait until each of its Celery nodes logged ``ready.``."""
        deadline = time.monotonic() + timeout
        while self.text().count(" ready.") < self.nodes:
            assert self.process.poll() is None, f"worker {self.name} exited:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"worker {self.name} not ready:\n{self.text()[-3000:]}"
            time.sleep(0.2)
        return self

    def kill9(self) -> None:
        """``kill -9`` the worker and every process of its session."""
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(30)

    def sigterm(self) -> None:
        """SIGTERM to the worker's main process only, as ``docker compose stop`` sends it."""
        import signal

        self.process.send_signal(signal.SIGTERM)


@contextmanager
def worker_processes(settings: Any, root: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """A factory of ready :class:`WorkerProcess` es (``start(name, **options)``); every one still running is
    killed on exit."""
    started: list[WorkerProcess] = []

    def start(name: str, **options: Any) -> WorkerProcess:
        started.append(WorkerProcess(settings, root, name, **options))
        return started[-1].wait_ready()

    try:
        yield start
    finally:
        for worker in started:
            if worker.process.poll() is None:
                worker.kill9()


def register_tiny_model(client: Any, settings: Any, tmp_path: Path) -> str:
    """An untrained 2D network stored in ``settings``' storage folder and registered like a trained model; its id."""
    from embedseg_service.core.model.checkpoint import build_network, save_checkpoint
    from embedseg_service.records.orm import Model
    from embedseg_service.records.storage import LocalStorage

    path = save_checkpoint(
        tmp_path / "tiny.pt",
        {
            "state_dict": build_network(2, 1).state_dict(),
            "spatial_dims": 2,
            "in_channels": 1,
            "step": [1 / 1023, 1 / 1023],
            "config": {"in_channels": 1},
            "properties": {"min_object_size": 4},
        },
    )
    LocalStorage(settings.storage_path).put_file("models/tiny.pt", path)
    with client.app.state.sessionmaker() as session:
        model = Model(
            name="tiny",
            spatial_dims=2,
            config={"in_channels": 1},
            storage_key="models/tiny.pt",
            size_bytes=path.stat().st_size,
        )
        session.add(model)
        session.commit()
        return model.id


@contextmanager
def embedded_service(root: Path, **overrides: Any) -> Iterator[Any]:
    """A test client of the embedded default in ``root``: SQLite made by the migrations, local storage,
    and the local worker's processes polling the database (``overrides``: further settings)."""
    import warnings

    from embedseg_service.api.app import create_app
    from embedseg_service.records.settings import Settings
    from embedseg_service.worker.local import LocalWorker

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    settings = Settings(_env_file=None, data_dir=root, broker_url=None, progress_throttle_s=0.2, **overrides)
    workers: list[LocalWorker] = []

    def start(app: Any) -> None:
        workers.append(LocalWorker(settings, poll_s=0.5).start())
        app.state.dispatcher = workers[0]

    def stop(_app: Any) -> None:
        for worker in workers:
            worker.stop()

    with TestClient(create_app(settings, migrate=True, on_startup=[start], on_shutdown=[stop])) as client:
        yield client


async def post_in_chunks(
    app: Any, path: str, body: bytes, boundary: str, chunk: int, *, content_length: bool = True
) -> tuple[int, bytes, int]:
    """POST a multipart ``body`` to the ASGI ``app`` in ``chunk``-byte messages, as a server does;
    returns (status, response body, messages the app read)."""
    position = 0
    reads = 0
    sent: list[dict] = []

    async def receive() -> dict:
        nonlocal position, reads
        reads += 1
        if position < len(body):
            piece = body[position : position + chunk]
            position += len(piece)
            return {"type": "http.request", "body": piece, "more_body": position < len(body)}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    headers = [(b"host", b"testserver"), (b"content-type", f"multipart/form-data; boundary={boundary}".encode())]
    if content_length:
        headers.append((b"content-length", str(len(body)).encode()))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "server": ("test", 80),
        "client": ("test", 1), "app": app, "headers": headers,
    }  # fmt: skip
    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), reads


# --------------------------------------------------------------------------- webhooks


class WebhookReceiver:
    """A real HTTP server on 127.0.0.1, in a thread: answers the n-th POST with ``answers[n]`` (the last one
    repeats), a (status, headers) pair, and records (path, headers, body) of every request."""

    def __init__(self, answers: Sequence[tuple[int, dict[str, str]]]) -> None:
        self.answers = list(answers)
        self.received: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                index = len(receiver.received)
                receiver.received.append((self.path, dict(self.headers.items()), body))
                status, headers = receiver.answers[min(index, len(receiver.answers) - 1)]
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook?lab=a"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def disks(
    shape: tuple[int, int] = (64, 64),
    centres: tuple[tuple[int, int], ...] = ((16, 16), (16, 46), (44, 20), (46, 48)),
    radius: int = 7,
) -> np.ndarray:
    """A label image of filled disks, label i at the i-th centre."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    for i, (cy, cx) in enumerate(centres, start=1):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = i
    return labels
