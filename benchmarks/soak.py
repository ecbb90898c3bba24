"""Soak test of the service: concurrent clients of several owners submit, poll and download jobs.

Against ``--url`` with ``--keys`` (one key per owner, each of another owner, used by nothing else
during the run: their listings are compared with what the clients made), or by default against
a service it starts itself on the production path: a fresh PostgreSQL schema in the database
``test`` (127.0.0.1:5432, user postgres), an empty Redis database (127.0.0.1:6379, ``--redis-db``
or the first empty one of 1-14, claimed with a marker key), ``embedseg db upgrade``, one API key per
owner, ``embedseg serve`` on a free loopback port and ``--workers`` Celery worker processes
(``embedseg worker``). Everything is removed at the end: processes stopped, schema dropped, that
Redis database flushed, files deleted.

Setup (not timed): a tiny 2D model is trained once with the library on a generated image (or
``--model FILE`` is used) and uploaded for every owner, with a few label volumes for evaluate jobs.
Then ``--clients`` threads (one httpx connection each, spread over the owners) together submit
``--jobs`` jobs: predict jobs (``--predict-fraction``; each first uploads its own small image) and
evaluate jobs, each POST with an ``Idempotency-Key``. A fraction (``--resend-fraction``) of the
POSTs is sent again with the same key and body, after the first answer or at the same time; the
answer must name the same job or volume. A client keeps ``--in-flight`` jobs open, polls their
status every ``--poll-s`` seconds until final, downloads each predicted label volume and checks
its sha256 against the volume's row, and after every job asks for another owner's job, volume,
download or model, which must answer 404. At the end every owner's job and volume listings are
compared with what was submitted.

Printed: submitted, succeeded, failed, lost (accepted but not final within ``--timeout`` seconds
of its acceptance, or missing from the listing), duplicated (jobs or volumes beyond one per
distinct key, a resend answered with another id, an id answered for two keys), cross-owner leaks
(a 200 to another owner's id, or another owner's id in a listing), sha256 mismatches, p50/p99
latencies (ms) of upload, submit, status poll, download and probe, wall time and the machine.
The exit code is 1 when any of lost, duplicated, leaks, sha256 mismatches, failed jobs, refused
submissions or client errors is not 0, and 2 when the run could not start. The Celery workers get
``OMP_NUM_THREADS`` = cores / workers, so that their torch threads do not oversubscribe the CPU.

    python benchmarks/soak.py [--jobs 200] [--clients 8] [--owners 3] [--workers 2]
    python benchmarks/soak.py --url http://host:8000 --keys KEY1,KEY2,KEY3 [--model model.pt]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _common import running_server

API = "/api/v1"
FINAL = ("succeeded", "failed", "cancelled")
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_BASE = "redis://127.0.0.1:6379"
REDIS_CANDIDATES = range(1, 15)
CLAIM_KEY = "embedseg-soak:claimed"
RETRIES = 30
"""Attempts of one request when the server answers 409 in progress, 429, 502-504 or the connection fails."""
PROBE_ROUTES = ("job", "volume", "download", "model")
LATENCIES = ("upload", "submit", "status", "download", "probe")


@dataclass(frozen=True)
class Config:
    """The run's options (see ``--help``)."""

    jobs: int = 200
    clients: int = 8
    owners: int = 3
    workers: int = 2
    predict_fraction: float = 0.5
    resend_fraction: float = 0.1
    in_flight: int = 4
    poll_s: float = 0.5
    timeout_s: float = 300.0
    size: int = 64
    seed: int = 0


# --------------------------------------------------------------------------------------------
# shared state of the clients


@dataclass
class Owner:
    """One owner as the clients see it: its key and what setup made for it."""

    name: str
    key: str
    model_id: str = ""
    pairs: list[tuple[str, str]] = field(default_factory=list)
    setup_volumes: int = 0
    baseline_jobs: set[str] = field(default_factory=set)
    baseline_volumes: set[str] = field(default_factory=set)


class Tally:
    """Counts, latencies and ids the client threads record (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)
        self.problems: list[str] = []
        self.job_key: dict[str, str] = {}  # job id -> the Idempotency-Key that made it
        self.job_owner: dict[str, int] = {}
        self.volume_key: dict[str, str] = {}
        self.final: dict[str, str] = {}  # job id -> final status
        self.extras: set[str] = set()  # ids a resend answered instead of the first answer's (duplicates)
        self.owned: dict[int, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))

    def time(self, name: str, seconds: float) -> None:
        """Record one request of kind ``name`` that took ``seconds``."""
        with self.lock:
            self.latency[name].append(seconds * 1000.0)

    def add(self, name: str, count: int = 1) -> None:
        """Add ``count`` to the counter ``name``."""
        with self.lock:
            self.counts[name] += count

    def problem(self, name: str, text: str) -> None:
        """Count ``name`` and keep the first problems' texts for the report."""
        with self.lock:
            self.counts[name] += 1
            if len(self.problems) < 12:
                self.problems.append(f"{name}: {text}")

    def own(self, owner: int, what: str, item_id: str) -> None:
        """Record that ``item_id`` (a job, volume or model) belongs to owner number ``owner``."""
        with self.lock:
            self.owned[owner][what].append(item_id)

    def others(self, owner: int, what: str) -> list[str]:
        """Ids of ``what`` (job, volume, model) that belong to owners other than ``owner``."""
        with self.lock:
            return [i for other, items in self.owned.items() if other != owner for i in items[what]]

    def register(self, table: dict[str, str], item_id: str, key: str) -> None:
        """Record that ``key`` made ``item_id``; an id answered for a second key is a duplicate."""
        with self.lock:
            first = table.setdefault(item_id, key)
        if first != key:
            self.problem("duplicated", f"{item_id} answered for keys {first} and {key}")


# --------------------------------------------------------------------------------------------
# requests


def timed_request(http: httpx.Client, tally: Tally, name: str, method: str, url: str, **kwargs: Any) -> httpx.Response:
    """Send a request, retrying (same body, same headers) on transport errors, 409 "still being
    handled" (a header ``Retry-After``), 429 and 502-504; every answer's time counts under ``name``."""
    for attempt in range(RETRIES):
        start = time.perf_counter()
        try:
            response = http.request(method, url, **kwargs)
        except httpx.TransportError as error:
            tally.add("retries")
            if attempt == RETRIES - 1:
                raise RuntimeError(f"{method} {url}: {type(error).__name__}: {error}") from None
            time.sleep(0.2 * (attempt + 1))
            continue
        tally.time(name, time.perf_counter() - start)
        busy = response.status_code == 409 and "retry-after" in response.headers
        if not (busy or response.status_code in (429, 502, 503, 504)) or attempt == RETRIES - 1:
            return response
        tally.add("retries")
        time.sleep(min(float(response.headers.get("retry-after", 1)), 1.0) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def tiff_bytes(data: np.ndarray) -> bytes:
    """The bytes of a TIFF holding ``data``."""
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, data, photometric="minisblack")
    return buffer.getvalue()


def upload_volume(
    http: httpx.Client, tally: Tally, content: bytes, kind: str, key: str | None = None
) -> httpx.Response:
    """POST a TIFF to /volumes (with ``Idempotency-Key: key`` when given), timed as ``upload``."""
    headers = {"Idempotency-Key": key} if key else {}
    return timed_request(http, tally, "upload", "POST", f"{API}/volumes", headers=headers,
                         files={"file": ("soak.tif", content, "image/tiff")}, data={"kind": kind})  # fmt: skip


def listing(http: httpx.Client, what: str) -> set[str]:
    """Every id of a paged list route (``jobs``, ``volumes``, ``models``) the client's key sees."""
    ids: set[str] = set()
    offset = 0
    while True:
        response = http.get(f"{API}/{what}", params={"limit": 100, "offset": offset})
        if response.status_code != 200:
            raise RuntimeError(f"GET {API}/{what} answered {response.status_code}: {response.text[:300]}")
        page = response.json()
        ids.update(item["id"] for item in page["items"])
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return ids


# --------------------------------------------------------------------------------------------
# data and setup


def generated_pair(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A float32 image of about ``size**2 / 500`` round objects and their uint16 labels."""
    from embedseg_service.core.data.synthetic import random_labels, render_image

    labels = random_labels((size, size), max(2, size * size // 500), (3.0, 6.0), seed=seed)
    return render_image(labels, seed=seed), labels.astype(np.uint16)


def train_tiny_model(folder: Path, size: int) -> Path:
    """A 2D model trained for a few steps on one generated image (its quality does not matter here)."""
    import torch

    from embedseg_service.core.training.train import TrainConfig, train

    image, labels = generated_pair(max(size, 64), seed=1000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = TrainConfig(spatial_dims=2, epochs=1, samples_per_epoch=8, batch_size=4, crop_size=32,
                             device="cpu", seed=0)  # fmt: skip
        return Path(train(image, labels, config, out_path=folder / "soak-model.pt").model_path)
    finally:
        torch.set_num_threads(threads)


def prepare_owner(base: str, owner: Owner, index: int, model: Path, size: int, tally: Tally) -> None:
    """Record what the owner already has, upload the model and two (ground truth, prediction) label pairs."""
    with httpx.Client(base_url=base, headers=auth(owner.key), timeout=120.0) as http:
        owner.baseline_jobs = listing(http, "jobs")
        owner.baseline_volumes = listing(http, "volumes")
        response = timed_request(http, tally, "setup", "POST", f"{API}/models",
                                 files={"file": ("soak.pt", model.read_bytes())}, data={"name": "soak"})  # fmt: skip
        if response.status_code != 201:
            raise RuntimeError(f"model upload for {owner.name} answered {response.status_code}: {response.text}")
        owner.model_id = response.json()["id"]
        tally.own(index, "model", owner.model_id)
        for pair in range(2):
            _, truth = generated_pair(size, seed=100 * index + pair)
            ids = []
            for labels in (truth, np.roll(truth, 1, axis=1)):
                response = timed_request(http, tally, "setup", "POST", f"{API}/volumes",
                                         files={"file": ("soak.tif", tiff_bytes(labels), "image/tiff")},
                                         data={"kind": "labels"})  # fmt: skip
                if response.status_code != 201:
                    raise RuntimeError(f"label upload for {owner.name} answered {response.status_code}: "
                                       f"{response.text}")  # fmt: skip
                ids.append(response.json()["id"])
                tally.own(index, "volume", ids[-1])
            owner.pairs.append((ids[0], ids[1]))
        owner.setup_volumes = 4


def auth(key: str) -> dict[str, str]:
    """The header that sends ``key``."""
    return {"Authorization": f"Bearer {key}"}


# --------------------------------------------------------------------------------------------
# one client


@dataclass
class Plan:
    """One job a client will submit: ``kind``, its Idempotency-Key and how it is resent."""

    kind: str
    key: str
    resend: str  # "", "after" (once the first answer is in) or "together" (at the same time)
    image: int = 0  # index of the predict job's image among the generated ones
    pair: int = 0


@dataclass
class Tracked:
    """A job accepted by the server and not yet final."""

    job_id: str
    plan: Plan
    deadline: float


@dataclass
class Client:
    """One client thread's inputs: its owner, its plans, the shared tally and images."""

    base: str
    owner_index: int
    owner: Owner
    plans: list[Plan]
    config: Config
    tally: Tally
    images: list[bytes]
    rng: random.Random


def post_twice(client: Client, http: httpx.Client, send: Any, resend: str) -> tuple[httpx.Response, list[Any]]:
    """``send(http)``, and again as asked by ``resend``: "after" the first answer, or "together" from a
    second connection. Returns the answer that counts (the first success, else the first answer) and
    the others (answers, or the errors of a resend that got none)."""
    if resend != "together":
        first = send(http)
        return first, [send(http)] if resend == "after" and first.status_code < 300 else []
    answers: list[Any] = []

    def again() -> None:
        with httpx.Client(base_url=client.base, headers=auth(client.owner.key), timeout=120.0) as other:
            try:
                answers.append(send(other))
            except RuntimeError as error:
                answers.append(error)

    thread = threading.Thread(target=again)
    thread.start()
    first = send(http)
    thread.join()
    other = answers[0]
    if first.status_code >= 300 and isinstance(other, httpx.Response) and other.status_code < 300:
        return other, [first]
    return first, answers


def check_resends(client: Client, first: httpx.Response, answers: list[Any], what: str, key: str) -> None:
    """Every resend of a request that succeeded must name the same id as the answer that counts."""
    tally = client.tally
    first_id = first.json()["id"] if first.status_code < 300 else None
    replays = [first.headers.get("idempotent-replayed") == "true"]
    for answer in answers:
        tally.add("resent")
        if isinstance(answer, Exception):
            tally.problem("client errors", f"resend of {what} {key}: {answer}")
            continue
        replays.append(answer.headers.get("idempotent-replayed") == "true")
        if answer.status_code < 300 and first_id is not None and answer.json()["id"] != first_id:
            with tally.lock:
                tally.extras.add(answer.json()["id"])
            tally.problem("duplicated", f"resent {what} {key} made {answer.json()['id']}, first {first_id}")
        elif answer.status_code >= 300 and first_id is not None:
            tally.problem("client errors", f"resend of {what} {key} answered {answer.status_code}: {answer.text}")
    tally.add("replayed", sum(replays))


def upload_image(client: Client, http: httpx.Client, plan: Plan) -> str | None:
    """Upload the predict job's image (resent like the job); its volume id, or None when refused."""
    key = f"{plan.key}-image"
    content = client.images[plan.image]

    def send(target: httpx.Client) -> httpx.Response:
        return upload_volume(target, client.tally, content, "image", key)

    first, answers = post_twice(client, http, send, plan.resend)
    if first.status_code != 201:
        client.tally.problem("refused", f"upload {key} answered {first.status_code}: {first.text[:300]}")
        return None
    volume_id = first.json()["id"]
    client.tally.register(client.tally.volume_key, volume_id, key)
    client.tally.own(client.owner_index, "volume", volume_id)
    check_resends(client, first, answers, "upload", key)
    return volume_id


def submit(client: Client, http: httpx.Client, plan: Plan) -> Tracked | None:
    """POST the plan's job (with its resends); the accepted job, or None when it was refused."""
    if plan.kind == "predict":
        volume_id = upload_image(client, http, plan)
        if volume_id is None:
            return None
        body: dict[str, Any] = {"model_id": client.owner.model_id, "volume_ids": [volume_id], "tta": False}
    else:
        gt, pred = client.owner.pairs[plan.pair]
        body = {"pairs": [{"gt_id": gt, "pred_id": pred}]}

    def send(target: httpx.Client) -> httpx.Response:
        return timed_request(target, client.tally, "submit", "POST", f"{API}/jobs/{plan.kind}",
                             headers={"Idempotency-Key": plan.key}, json=body)  # fmt: skip

    first, answers = post_twice(client, http, send, plan.resend)
    if first.status_code != 202:
        client.tally.problem("refused", f"{plan.kind} {plan.key} answered {first.status_code}: {first.text[:300]}")
        return None
    job_id = first.json()["id"]
    tally = client.tally
    tally.add("submitted")
    tally.register(tally.job_key, job_id, plan.key)
    with tally.lock:
        tally.job_owner[job_id] = client.owner_index
    tally.own(client.owner_index, "job", job_id)
    check_resends(client, first, answers, plan.kind, plan.key)
    return Tracked(job_id, plan, time.monotonic() + client.config.timeout_s)


def download_labels(client: Client, http: httpx.Client, job: dict) -> None:
    """Download every label volume of a predict job and compare its sha256 with the volume's row."""
    tally = client.tally
    for volume_id in (job.get("result") or {}).get("label_volume_ids", []):
        tally.own(client.owner_index, "volume", volume_id)
        row = timed_request(http, tally, "status", "GET", f"{API}/volumes/{volume_id}")
        file = timed_request(http, tally, "download", "GET", f"{API}/volumes/{volume_id}/download")
        if row.status_code != 200 or file.status_code != 200:
            tally.problem("sha256 mismatches", f"volume {volume_id}: row {row.status_code}, file {file.status_code}")
        elif sha256(file.content).hexdigest() != row.json()["sha256"]:
            tally.problem("sha256 mismatches", f"volume {volume_id}: the file's sha256 is not the row's")
        else:
            tally.add("downloads")


def probe(client: Client, http: httpx.Client, route: str) -> None:
    """Ask for another owner's job, volume, volume file or model: anything but 404 is a leak or an error."""
    what = {"download": "volume"}.get(route, route)
    candidates = client.tally.others(client.owner_index, what)
    if not candidates:
        return
    item = client.rng.choice(candidates)
    url = {"job": f"{API}/jobs/{item}", "volume": f"{API}/volumes/{item}",
           "download": f"{API}/volumes/{item}/download", "model": f"{API}/models/{item}"}[route]  # fmt: skip
    response = timed_request(http, client.tally, "probe", "GET", url)
    client.tally.add("probes")
    if response.status_code == 200:
        client.tally.problem("leaks", f"{client.owner.name} got another owner's {route} {item}")
    elif response.status_code != 404:
        client.tally.problem("probe errors", f"GET {url} answered {response.status_code}")


def sweep(client: Client, http: httpx.Client, pending: dict[str, Tracked]) -> None:
    """Poll every pending job once; finished ones are downloaded, probed around and dropped."""
    tally = client.tally
    for job_id, tracked in list(pending.items()):
        response = timed_request(http, tally, "status", "GET", f"{API}/jobs/{job_id}")
        body = response.json() if response.status_code == 200 else {}
        if response.status_code != 200:
            tally.problem("client errors", f"GET job {job_id} answered {response.status_code}: {response.text[:200]}")
        elif body["status"] in FINAL:
            with tally.lock:
                tally.final[job_id] = body["status"]
            if body["status"] != "succeeded":
                tally.problem(body["status"], f"{tracked.plan.kind} job {job_id}: {body.get('error')}")
            elif tracked.plan.kind == "predict":
                download_labels(client, http, body)
            probe(client, http, client.rng.choice(PROBE_ROUTES))
            del pending[job_id]
            continue
        if time.monotonic() > tracked.deadline:
            tally.problem("timed out", f"job {job_id} not final after {client.config.timeout_s:g} s: {body}")
            del pending[job_id]


def run_client(client: Client) -> None:
    """Submit the client's plans keeping ``in_flight`` jobs open, poll them to the end, probe every route."""
    pending: dict[str, Tracked] = {}
    plans = deque(client.plans)
    with httpx.Client(base_url=client.base, headers=auth(client.owner.key), timeout=120.0) as http:
        while plans or pending:
            while plans and len(pending) < client.config.in_flight:
                tracked = submit(client, http, plans.popleft())
                if tracked is not None:
                    pending[tracked.job_id] = tracked
            sweep(client, http, pending)
            if pending:
                time.sleep(client.config.poll_s)
        for route in PROBE_ROUTES:
            probe(client, http, route)


def guarded(client: Client) -> None:
    """:func:`run_client`, recording an exception instead of losing it with the thread."""
    try:
        run_client(client)
    except Exception as error:  # a client bug or a dead server: reported, the run fails
        client.tally.problem("client errors", f"client of {client.owner.name} stopped: {type(error).__name__}: "
                                              f"{error}")  # fmt: skip


# --------------------------------------------------------------------------------------------
# the run


def make_plans(config: Config) -> list[list[Plan]]:
    """The jobs of each client: kinds, keys and resends drawn from ``config.seed``."""
    rng = random.Random(config.seed)
    run = uuid.uuid4().hex[:8]
    plans: list[list[Plan]] = [[] for _ in range(config.clients)]
    for index in range(config.jobs):
        kind = "predict" if rng.random() < config.predict_fraction else "evaluate"
        resend = "" if rng.random() >= config.resend_fraction else rng.choice(("after", "together"))
        plan = Plan(kind, f"soak-{run}-{index}", resend, image=rng.randrange(8), pair=rng.randrange(2))
        plans[index % config.clients].append(plan)
    return plans


def soak(base: str, owners: list[Owner], config: Config, model: Path) -> tuple[Tally, float]:
    """Set the owners up, run the clients to the end and check the listings; the tally and the wall seconds."""
    tally = Tally()
    for index, owner in enumerate(owners):
        prepare_owner(base, owner, index, model, config.size, tally)
    images = [tiff_bytes(generated_pair(config.size, seed=10_000 + i)[0]) for i in range(8)]
    clients = [Client(base, i % len(owners), owners[i % len(owners)], plans, config, tally, images,
                      random.Random(config.seed + i))
               for i, plans in enumerate(make_plans(config))]  # fmt: skip
    start = time.perf_counter()
    threads = [threading.Thread(target=guarded, args=(client,), name=f"soak-client-{i}")
               for i, client in enumerate(clients)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    check_listings(base, owners, tally)
    return tally, wall


def check_listings(base: str, owners: list[Owner], tally: Tally) -> None:
    """Each owner's new jobs and volumes are exactly those its clients made; no other owner's id is listed."""
    for index, owner in enumerate(owners):
        with httpx.Client(base_url=base, headers=auth(owner.key), timeout=120.0) as http:
            jobs = listing(http, "jobs") - owner.baseline_jobs
            volumes = listing(http, "volumes") - owner.baseline_volumes
            models = listing(http, "models")
        with tally.lock:
            made = {job_id for job_id, who in tally.job_owner.items() if who == index}
            own_volumes = set(tally.owned[index]["volume"])
            jobs, volumes = jobs - tally.extras, volumes - tally.extras  # counted already
        foreign = {kind: set(tally.others(index, kind)) for kind in ("job", "volume", "model")}
        for kind, seen in (("job", jobs), ("volume", volumes), ("model", models)):
            for item in sorted(seen & foreign[kind]):
                tally.problem("leaks", f"{owner.name}'s {kind} listing shows another owner's {item}")
        for job_id in sorted(jobs - made - foreign["job"]):
            tally.problem("duplicated", f"{owner.name}'s job listing has {job_id}, which no submission answered")
        for job_id in sorted(made - jobs):
            tally.problem("missing", f"{owner.name}'s job listing lacks accepted job {job_id}")
        for volume_id in sorted(volumes - own_volumes - foreign["volume"]):
            tally.problem("duplicated", f"{owner.name}'s volume listing has {volume_id}, which nothing answered")


# --------------------------------------------------------------------------------------------
# the service this script starts


def embedseg_command() -> list[str]:
    """The installed ``embedseg`` command (the project must be installed: ``pip install -e .``)."""
    script = Path(sys.executable).parent / "embedseg"
    return [str(script)] if script.exists() else [sys.executable, "-m", "embedseg_service.core.cli"]


def claim_redis_db(wanted: int | None) -> int:
    """An empty Redis database number, claimed by writing a marker key into it (``wanted`` if given)."""
    import redis

    for number in [wanted] if wanted is not None else REDIS_CANDIDATES:
        db = redis.Redis.from_url(f"{REDIS_BASE}/{number}", socket_connect_timeout=5)
        if db.dbsize() == 0 and db.set(CLAIM_KEY, str(os.getpid()), nx=True):
            return int(number)
    where = f"database {wanted}" if wanted is not None else f"any of the databases {REDIS_CANDIDATES.start}-14"
    raise SystemExit(f"soak: Redis {where} at {REDIS_BASE} is not empty; pass --redis-db with an empty one "
                     "(this script flushes the database it used when it ends)")  # fmt: skip


@contextmanager
def postgres_schema() -> Iterator[str]:
    """A fresh schema in the database ``test``; yields the service's URL on it; dropped on exit."""
    import sqlalchemy as sa

    from embedseg_service.records.db import make_engine

    schema = f"soak_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def redis_db(wanted: int | None) -> Iterator[str]:
    """An empty Redis database's URL; that database (only it) is flushed on exit."""
    import redis

    number = claim_redis_db(wanted)
    url = f"{REDIS_BASE}/{number}"
    try:
        yield url
    finally:
        redis.Redis.from_url(url).flushdb()


def create_keys(database_url: str, count: int) -> list[Owner]:
    """One API key for each of ``count`` owners ``soak-lab-<i>``."""
    from embedseg_service.records.db import make_engine, make_sessionmaker
    from embedseg_service.records.keys import create_key

    engine = make_engine(database_url)
    try:
        with make_sessionmaker(engine)() as session:
            return [Owner(f"soak-lab-{i}", create_key(session, f"soak-lab-{i}").secret) for i in range(count)]
    finally:
        engine.dispose()


@contextmanager
def worker_processes(count: int, env: dict[str, str], folder: Path) -> Iterator[list[subprocess.Popen]]:
    """``count`` ``embedseg worker`` processes (each in its own process group); stopped on exit."""
    processes: list[subprocess.Popen] = []
    try:
        for index in range(count):
            log = open(folder / f"worker-{index}.log", "wb")  # noqa: SIM115 - the process writes it
            command = [*embedseg_command(), "worker", "--concurrency", "1", "--loglevel", "info",
                       "--hostname", f"soak{index}-{uuid.uuid4().hex[:6]}@%h"]  # fmt: skip
            processes.append(subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))  # fmt: skip
            log.close()
        yield processes
    finally:
        for process in processes:
            stop_group(process)


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the process's group, SIGKILL it after 30 s."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def wait_workers_ready(processes: list[subprocess.Popen], folder: Path, timeout_s: float = 180.0) -> None:
    """Wait until every worker's log says it is ready; raise with the log when one exits or is too slow."""
    deadline = time.monotonic() + timeout_s
    for index, process in enumerate(processes):
        log = folder / f"worker-{index}.log"
        while " ready." not in log.read_text(errors="replace"):
            if process.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {process.returncode}" if process.poll() is not None else "is not ready"
                raise RuntimeError(f"worker {index} {state}:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.3)


@dataclass
class Service:
    """A started service: its URL, owners with their keys, the model file and a description."""

    base: str
    owners: list[Owner]
    model: Path
    description: str


@contextmanager
def own_service(config: Config, folder: Path, redis_number: int | None, model: Path | None) -> Iterator[Service]:
    """The production path, started in ``folder`` and removed on exit (see the module's docstring)."""
    with ExitStack() as stack:
        database_url = stack.enter_context(postgres_schema())
        broker_url = stack.enter_context(redis_db(redis_number))
        env = {key: value for key, value in os.environ.items() if not key.startswith("EMBEDSEG_")}
        env.update(EMBEDSEG_DATABASE_URL=database_url, EMBEDSEG_BROKER_URL=broker_url,
                   EMBEDSEG_DATA_DIR=str(folder), EMBEDSEG_STORAGE_DIR=str(folder / "storage"))  # fmt: skip
        upgrade = subprocess.run([*embedseg_command(), "db", "upgrade"], env=env, cwd=folder, capture_output=True,
                                 text=True, timeout=300)  # fmt: skip
        if upgrade.returncode != 0:
            raise RuntimeError(f"embedseg db upgrade failed:\n{upgrade.stdout}{upgrade.stderr}")
        owners = create_keys(database_url, config.owners)
        worker_env = dict(env, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // config.workers)))
        workers = stack.enter_context(worker_processes(config.workers, worker_env, folder))
        server_env = {key: value for key, value in env.items() if key.startswith("EMBEDSEG_")}
        base, _ = stack.enter_context(running_server(folder, server_env, timeout_s=180.0))
        model = model or train_tiny_model(folder, config.size)  # while the workers start
        wait_workers_ready(workers, folder)
        number = broker_url.rsplit("/", 1)[1]
        yield Service(base, owners, model, f"{config.workers} Celery worker process(es), PostgreSQL schema in "
                                           f"'test', Redis database {number}")  # fmt: skip


# --------------------------------------------------------------------------------------------
# report


def percentiles(values: list[float]) -> str:
    """Count, p50, p99 and maximum of ``values`` (ms) as one table row."""
    if not values:
        return f"{0:>7d}{'-':>9}{'-':>9}{'-':>9}"
    p50, p99 = np.percentile(values, [50, 99])
    return f"{len(values):>7d}{p50:>9.1f}{p99:>9.1f}{max(values):>9.1f}"


def machine() -> str:
    """CPU model, core count and the load average."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average {load}; Python {platform.python_version()}"


def failures(tally: Tally) -> dict[str, int]:
    """The counts that make the run fail, by name."""
    counts = tally.counts
    lost = counts["timed out"] + counts["missing"] + (counts["submitted"] - len(tally.final) - counts["timed out"])
    return {
        "lost": lost,
        "duplicated": counts["duplicated"],
        "leaks": counts["leaks"],
        "sha256 mismatches": counts["sha256 mismatches"],
        "failed": counts["failed"] + counts["cancelled"],
        "refused": counts["refused"],
        "client errors": counts["client errors"] + counts["probe errors"],
    }


def report(tally: Tally, wall: float, setup: float, config: Config, where: str) -> int:
    """Print the run's figures; the exit code (1 when anything was lost, duplicated, leaked or broken)."""
    counts, bad = tally.counts, failures(tally)
    kinds: dict[str, int] = defaultdict(int)
    for plans in make_plans(config):
        for plan in plans:
            kinds[plan.kind] += 1
    print(
        f"soak: {config.jobs} jobs ({kinds['predict']} predict, {kinds['evaluate']} evaluate) from "
        f"{config.clients} clients of {config.owners} owners, {config.in_flight} in flight each; {where}"
    )
    print(f"submitted   {counts['submitted']} (distinct Idempotency-Keys accepted; {bad['refused']} refused)")
    print(
        f"resent      {counts['resent']} POSTs with a used key ({counts['replayed']} answered "
        f"'Idempotent-Replayed: true'); {counts['retries']} retries after 409/429/5xx or a dropped connection"
    )
    print(
        f"completed   {sum(1 for s in tally.final.values() if s == 'succeeded')} succeeded, "
        f"{counts['failed']} failed, {counts['cancelled']} cancelled"
    )
    print(f"lost        {bad['lost']}")
    print(f"duplicated  {bad['duplicated']}")
    print(
        f"leaks       {bad['leaks']} (cross-owner probes: {counts['probes']}, answered other than 404: "
        f"{counts['probe errors']}; listings checked)"
    )
    print(
        f"downloads   {counts['downloads']} predicted label volumes, sha256 matching the row; "
        f"{bad['sha256 mismatches']} mismatches"
    )
    print(f"client errors {bad['client errors']}")
    print(f"latency ms {'n':>7}{'p50':>9}{'p99':>9}{'max':>9}")
    for name in LATENCIES:
        print(f"  {name:<9}{percentiles(tally.latency[name])}")
    print(f"wall        {wall:.1f} s for the jobs ({config.jobs / wall:.2f} jobs/s); setup {setup:.1f} s")
    print(f"machine     {machine()}")
    for text in tally.problems:
        print(f"  problem: {text}")
    return 1 if any(bad.values()) else 0


# --------------------------------------------------------------------------------------------
# command line


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Config]:
    """The command line's options and the run's :class:`Config`; exits with a message on a bad combination."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See the module docstring for what is checked.")  # fmt: skip
    parser.add_argument("--url", help="base URL of a running service (default: start one on the production path)")
    parser.add_argument("--keys", help="with --url: comma-separated API keys, one per owner")
    parser.add_argument("--model", type=Path, help="model file to upload per owner (default: train a tiny one)")
    parser.add_argument("--redis-db", type=int, help="empty Redis database number to use (default: first empty 1-14)")
    defaults = Config()
    for name in ("jobs", "clients", "owners", "workers", "in_flight", "size", "seed"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("predict_fraction", "resend_fraction", "poll_s"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    parser.add_argument(
        "--timeout",
        type=float,
        default=defaults.timeout_s,
        help="seconds a job may take from acceptance to a final state before it counts as lost",
    )
    args = parser.parse_args(argv)
    if args.url and not args.keys:
        parser.error("--url needs --keys (one API key per owner)")
    owners = len(args.keys.split(",")) if args.url else args.owners
    if owners < 2 or args.clients < owners or args.jobs < 1:
        parser.error("give at least 2 owners, at least as many clients as owners, and at least 1 job")
    config = Config(jobs=args.jobs, clients=args.clients, owners=owners, workers=args.workers,
                    predict_fraction=args.predict_fraction, resend_fraction=args.resend_fraction,
                    in_flight=args.in_flight, poll_s=args.poll_s, timeout_s=args.timeout, size=args.size,
                    seed=args.seed)  # fmt: skip
    return args, config


def main(argv: list[str] | None = None) -> int:
    """Run the soak (starting the service unless ``--url``) and print the report; the exit code."""
    import redis
    from sqlalchemy.exc import OperationalError

    args, config = parse(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="embedseg-soak-") as tmp:
        folder = Path(tmp)
        with ExitStack() as stack:
            try:
                if args.url:
                    owners = [Owner(f"owner-{i}", key.strip()) for i, key in enumerate(args.keys.split(","))]
                    model = args.model or train_tiny_model(folder, config.size)
                    service = Service(args.url.rstrip("/"), owners, model, f"service at {args.url}")
                else:
                    service = stack.enter_context(own_service(config, folder, args.redis_db, args.model))
                tally, wall = soak(service.base, service.owners, config, service.model)
            except (RuntimeError, httpx.HTTPError, OperationalError, redis.RedisError) as error:
                print(f"soak: could not run: {type(error).__name__}: {error}", file=sys.stderr)
                return 2
            setup = time.perf_counter() - start - wall
        return report(tally, wall, setup, config, service.description)


if __name__ == "__main__":
    sys.exit(main())
