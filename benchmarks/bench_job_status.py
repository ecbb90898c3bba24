"""Job-status latency and queue pick-up time of the embedded default, over loopback.

Starts ``embedseg serve`` (SQLite, local storage, embedded worker) on a free port with a
temporary data directory and uploads the repository's 2D test mask twice as label volumes.

1. Pick-up: POSTs ``/api/v1/jobs/evaluate`` jobs one at a time to the idle worker (after one
   uncounted job that warms it up) and prints,
   per job, the time until the row says it started (``started_at - created_at``, server
   clocks) and until a client polling ``GET /api/v1/jobs/{id}`` first sees it leave
   ``queued``; then the medians.
2. Latency: 32 concurrent clients (one connection each, each sending its next request when
   the last one is answered) poll ``GET /api/v1/jobs/{id}`` of the finished evaluate job and
   of a training job with ``--metrics-epochs`` epochs of per-epoch metrics (a row written
   straight into the database, which nothing runs). Each run prints p50/p90/p99/max and the
   rate against the target p99 < 50 ms, after one client alone (the service time without
   queueing), and the API process's CPU time per request: its Python code runs on one core at
   a time, so 1 / (CPU per request) bounds the rate and, by Little's law, clients / rate is
   the mean latency at saturation. ``--during-training`` repeats it while a training job runs
   on the same machine (then the worker competes with the API for the CPU).

The load comes from ``wrk`` when it is on PATH (one thread, ``--seconds`` per run; its
latency histogram gives the percentiles), else from asyncio + httpx (``--requests`` per
client), whose own CPU time per request is several times the server's; ``--client`` picks.
Either runs on the same machine as the server, so its CPU use competes with the server's.

    python benchmarks/bench_job_status.py [--client wrk|httpx] [--clients 32] [--seconds 5] [--pickups 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np
from _common import listening_pid, running_server

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "nuclei2d_dsb"
TARGET_P99_MS = 50.0
TERMINAL = {"succeeded", "failed", "cancelled"}


def upload(client: httpx.Client, path: Path, kind: str) -> str:
    with path.open("rb") as handle:
        response = client.post(
            "/api/v1/volumes", files={"file": (path.name, handle, "image/tiff")}, data={"kind": kind}
        )
    response.raise_for_status()
    return response.json()["id"]


def post_job(client: httpx.Client, kind: str, body: dict) -> str:
    response = client.post(f"/api/v1/jobs/{kind}", json=body)
    if response.status_code != 202:
        raise RuntimeError(f"POST /jobs/{kind} answered {response.status_code}: {response.text[:500]}")
    return response.json()["id"]


def wait_finished(client: httpx.Client, job_id: str, timeout_s: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.05)
    raise RuntimeError(f"job {job_id} did not finish within {timeout_s:.0f} s")


def wait_status(client: httpx.Client, job_id: str, wanted: str, timeout_s: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] == wanted:
            return job
        if job["status"] in TERMINAL:
            raise RuntimeError(f"job {job_id} ended {job['status']} before it was {wanted}: {job.get('error')}")
        time.sleep(0.05)
    raise RuntimeError(f"job {job_id} was not {wanted} within {timeout_s:.0f} s")


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def pickups(client: httpx.Client, body: dict, count: int) -> None:
    """Time ``count + 1`` jobs one after the other; the first (cold worker) is shown apart."""
    server_ms, client_ms = [], []
    for index in range(count + 1):
        start = time.perf_counter()
        job_id = post_job(client, "evaluate", body)
        posted = time.perf_counter()
        while True:
            job = client.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] != "queued":
                seen = time.perf_counter()
                break
            if time.perf_counter() - start > 120:
                raise RuntimeError(f"job {job_id} stayed queued for 120 s")
        job = wait_finished(client, job_id)
        if job["started_at"] is None:
            raise RuntimeError(f"job {job_id} ended {job['status']} without starting: {job.get('error')}")
        row_ms = (_time(job["started_at"]) - _time(job["created_at"])).total_seconds() * 1000
        server_ms.append(row_ms)
        client_ms.append((seen - start) * 1000)
        note = " (first after start, not counted)" if index == 0 else ""
        print(
            f"  job {index:2d}{note}: started {row_ms:7.1f} ms after its row was created; client saw it leave "
            f"queued {client_ms[-1]:7.1f} ms after sending the POST (POST took {(posted - start) * 1000:.1f} ms); "
            f"ended {job['status']}"
        )
    server_ms, client_ms = server_ms[1:], client_ms[1:]
    print(
        f"POST to running, idle worker ({count} jobs): median {statistics.median(server_ms):.1f} ms (row), "
        f"{statistics.median(client_ms):.1f} ms (client), max {max(server_ms):.1f} / {max(client_ms):.1f} ms"
    )


# ------------------------------------------------------------------ latency under load


@dataclass
class Latency:
    """One load run: request count, wall seconds and latency percentiles in ms."""

    requests: int
    seconds: float
    p50: float
    p90: float
    p99: float
    max: float
    failed: int = 0


async def _httpx_latencies(base: str, url: str, clients: int, per_client: int) -> Latency:
    times: list[float] = []
    failed = 0

    async def one_client() -> None:
        nonlocal failed
        async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
            (await client.get(url)).raise_for_status()  # connect and warm up
            await ready.wait()
            for _ in range(per_client):
                start = time.perf_counter()
                response = await client.get(url)
                times.append(time.perf_counter() - start)
                failed += response.status_code != 200

    ready = asyncio.Event()
    tasks = [asyncio.create_task(one_client()) for _ in range(clients)]
    await asyncio.sleep(0.5)
    start = time.perf_counter()
    ready.set()
    await asyncio.gather(*tasks)
    seconds = time.perf_counter() - start
    ms = np.asarray(times) * 1000
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return Latency(ms.size, seconds, float(p50), float(p90), float(p99), float(ms.max()), failed)


def httpx_latency(base: str, url: str, clients: int, per_client: int) -> Latency:
    """``clients`` asyncio tasks, one httpx connection each, ``per_client`` GETs each, back to back."""
    return asyncio.run(_httpx_latencies(base, url, clients, per_client))


# wrk keeps its latency histogram in microseconds; this prints what the benchmark reads back.
WRK_REPORT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout + e.status, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


def wrk_latency(url: str, clients: int, seconds: float) -> Latency:
    """``clients`` wrk connections (one wrk thread: it needs little CPU) sending GETs back to back for ``seconds``."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(WRK_REPORT)
        script.flush()
        command = [
            "wrk",
            "-t1",
            f"-c{clients}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "30s",
            "-s",
            script.name,
            url,
        ]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    fields = next(line for line in out.splitlines() if line.startswith("RESULT ")).split()[1:]
    requests, duration_us, failed, p50, p90, p99, worst = (int(value) for value in fields)
    return Latency(requests, duration_us / 1e6, p50 / 1000, p90 / 1000, p99 / 1000, worst / 1000, failed)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (wrk)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Target:
    """Where the load goes: the server, its API process and the client that generates the load."""

    base: str
    api_pid: int
    client: str
    requests: int
    seconds: float


def latency(target: Target, job_id: str, clients: int, label: str) -> Latency:
    """Measure and print one run: latency, rate, and the API process's CPU time per request."""
    url = f"/api/v1/jobs/{job_id}"
    load = os.getloadavg()[0]
    cpu_before, client_before = cpu_seconds(target.api_pid), client_cpu_seconds()
    if target.client == "wrk":
        result = wrk_latency(target.base + url, clients, target.seconds)
    else:
        result = httpx_latency(target.base, url, clients, target.requests)
    cpu_ms = (cpu_seconds(target.api_pid) - cpu_before) * 1000 / max(1, result.requests)
    client_ms = (client_cpu_seconds() - client_before) * 1000 / max(1, result.requests)
    if result.failed:
        raise RuntimeError(f"{result.failed} of {result.requests} requests to {url} failed")
    verdict = "met" if result.p99 < TARGET_P99_MS else "MISSED"
    clients_text = f"{clients} concurrent clients" if clients > 1 else "1 client"
    rate = result.requests / result.seconds
    # The API's Python code runs on one core at a time (one process, one GIL): at saturation it
    # serves at most 1 / cpu_ms requests per ms, and by Little's law the clients then wait on
    # average clients / rate.
    bound = f"at most {1000 / cpu_ms:.0f} req/s on one core" if cpu_ms > 0 else "too little to measure"
    print(
        f"GET /api/v1/jobs/{{id}} {label} [{target.client}]: {result.requests} requests, {clients_text}, "
        f"{rate:.0f} req/s (mean wait {clients / rate * 1000:.1f} ms by Little's law); p50 {result.p50:.1f} ms, "
        f"p90 {result.p90:.1f} ms, p99 {result.p99:.1f} ms, max {result.max:.1f} ms "
        f"(target p99 < {TARGET_P99_MS:.0f} ms: {verdict})\n"
        f"    API CPU {cpu_ms:.2f} ms/request ({bound}), client CPU {client_ms:.2f} ms/request, "
        f"load average {load:.1f}"
    )
    return result


def running_training_job(data_dir: Path, epochs: int) -> str:
    """A training job row as its worker leaves it ``epochs`` epochs in (per-epoch loss, IoU and AP).

    Written straight into the server's SQLite database under a worker name of no local process,
    so nothing runs it: the benchmark polls a large ``metrics`` without training on the CPU.
    """
    from embedseg_service.records import jobs
    from embedseg_service.records.db import make_engine, make_sessionmaker

    engine = make_engine(f"sqlite:///{data_dir / 'embedseg.db'}")
    try:
        with make_sessionmaker(engine)() as session:
            job = jobs.create_job(
                session, "train", {"image_ids": ["bench"], "mask_ids": ["bench"], "dims": 2, "epochs": 2 * epochs}
            )
            jobs.claim_job(session, job.id, "bench-host:0")
            rng = np.random.default_rng(0)
            history = [
                {
                    "epoch": epoch,
                    "loss": float(1 / epoch + rng.random() / 100),
                    "val_iou": float(rng.random()),
                    "val_ap": float(rng.random()),
                }
                for epoch in range(1, epochs + 1)
            ]
            jobs.update_progress(
                session,
                job.id,
                progress=0.5,
                stage=f"training epoch {epochs + 1}/{2 * epochs}",
                eta_s=600.0,
                metrics={"epochs": history, "epochs_total": 2 * epochs},
            )
            return job.id
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--client",
        choices=("wrk", "httpx"),
        default="wrk" if shutil.which("wrk") else "httpx",
        help="load generator (default: wrk when on PATH, else httpx)",
    )
    parser.add_argument("--requests", type=int, default=100, help="requests per client (httpx)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of one run (wrk)")
    parser.add_argument("--pickups", type=int, default=10, help="jobs timed from POST to running")
    parser.add_argument("--repeats", type=int, default=3, help="latency runs (each printed)")
    parser.add_argument(
        "--metrics-epochs",
        type=int,
        default=1000,
        help="also poll a training job with this many epochs of metrics (0: skip)",
    )
    parser.add_argument("--during-training", action="store_true", help="also measure latency while a training job runs")
    args = parser.parse_args(argv)
    if args.client == "wrk" and shutil.which("wrk") is None:
        parser.error("--client wrk: wrk is not on PATH (e.g. apt-get install wrk)")

    image = DATA / "images" / "dsb2018_img2d.tif"
    mask = DATA / "masks" / "dsb2018_img2d.tif"
    with tempfile.TemporaryDirectory(prefix="embedseg-bench-jobs-") as tmp:
        with running_server(Path(tmp)) as (base, process), httpx.Client(base_url=base, timeout=60.0) as client:
            api_pid = listening_pid(process.pid, int(base.rsplit(":", 1)[1]))
            target = Target(base, api_pid, args.client, args.requests, args.seconds)
            gt = upload(client, mask, "labels")
            pred = upload(client, mask, "labels")
            evaluate = {"pairs": [{"gt_id": gt, "pred_id": pred}]}
            print(
                f"server {base} (API process {api_pid}); evaluate job on {mask.relative_to(ROOT)} against itself; "
                f"client {args.client}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
            )
            pickups(client, evaluate, args.pickups)

            job_id = post_job(client, "evaluate", evaluate)
            wait_finished(client, job_id)
            polled = [(job_id, f"finished job, {len(client.get(f'/api/v1/jobs/{job_id}').content)} B")]
            if args.metrics_epochs > 0:
                train_id = running_training_job(Path(tmp), args.metrics_epochs)
                size = len(client.get(f"/api/v1/jobs/{train_id}").content)
                polled.append((train_id, f"training job, {args.metrics_epochs} epochs of metrics, {size} B"))
            for polled_id, what in polled:
                latency(target, polled_id, 1, f"({what}, one client: service time)")
                for repeat in range(args.repeats):
                    latency(target, polled_id, args.clients, f"({what}, run {repeat + 1})")

            if args.during_training:
                image_id = upload(client, image, "image")
                train = {"image_ids": [image_id], "mask_ids": [gt], "dims": 2, "epochs": 1000, "max_time_minutes": 10}
                train_id = post_job(client, "train", train)
                wait_status(client, train_id, "running")
                time.sleep(2.0)
                for repeat in range(args.repeats):
                    latency(target, train_id, args.clients, f"(job training, run {repeat + 1})")
                client.post(f"/api/v1/jobs/{train_id}/cancel").raise_for_status()
                job = wait_finished(client, train_id, timeout_s=600)
                print(f"training job ended {job['status']} at stage {job['stage']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
