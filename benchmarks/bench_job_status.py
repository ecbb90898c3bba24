"""Job-status latency and queue pick-up time of the embedded default, over loopback.

Starts ``embedseg serve`` (SQLite, local storage, embedded worker) on a free port with a
temporary data directory and uploads the repository's 2D test mask twice as label volumes.

1. Pick-up: POSTs ``/api/v1/jobs/evaluate`` jobs one at a time to the idle worker (after one
   uncounted job that warms it up) and prints,
   per job, the time until the row says it started (``started_at - created_at``, server
   clocks) and until a client polling ``GET /api/v1/jobs/{id}`` first sees it leave
   ``queued``; then the medians.
2. Latency: 32 concurrent clients (asyncio + httpx, one connection each) send a bounded
   number of ``GET /api/v1/jobs/{id}`` requests; prints p50/p90/p99/max and the rate,
   against the target p99 < 50 ms, after one client alone (the service time without queueing).
   ``--during-training`` repeats it while a training job
   runs on the same machine (then the worker competes with the API for the CPU).

    python benchmarks/bench_job_status.py [--clients 32] [--requests 100] [--pickups 10]

The client runs on the same machine as the server, so its own overhead is included.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_upload import running_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "nuclei2d_dsb"
TARGET_P99_MS = 50.0
TERMINAL = {"succeeded", "failed", "cancelled"}


def upload(client: httpx.Client, path: Path, kind: str) -> str:
    with path.open("rb") as handle:
        response = client.post("/api/v1/volumes", files={"file": (path.name, handle, "image/tiff")},
                               data={"kind": kind})
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
        print(f"  job {index:2d}{note}: started {row_ms:7.1f} ms after its row was created; client saw it leave "
              f"queued {client_ms[-1]:7.1f} ms after sending the POST (POST took {(posted - start) * 1000:.1f} ms); "
              f"ended {job['status']}")
    server_ms, client_ms = server_ms[1:], client_ms[1:]
    print(f"POST to running, idle worker ({count} jobs): median {statistics.median(server_ms):.1f} ms (row), "
          f"{statistics.median(client_ms):.1f} ms (client), max {max(server_ms):.1f} / {max(client_ms):.1f} ms")


async def _latencies(base: str, job_id: str, clients: int, per_client: int) -> tuple[np.ndarray, float]:
    url = f"/api/v1/jobs/{job_id}"
    times: list[float] = []

    async def one_client() -> None:
        async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
            (await client.get(url)).raise_for_status()  # connect and warm up
            await ready.wait()
            for _ in range(per_client):
                start = time.perf_counter()
                response = await client.get(url)
                times.append(time.perf_counter() - start)
                response.raise_for_status()

    ready = asyncio.Event()
    tasks = [asyncio.create_task(one_client()) for _ in range(clients)]
    await asyncio.sleep(0.5)
    start = time.perf_counter()
    ready.set()
    await asyncio.gather(*tasks)
    return np.asarray(times) * 1000, time.perf_counter() - start


def latency(base: str, job_id: str, clients: int, per_client: int, label: str) -> None:
    ms, seconds = asyncio.run(_latencies(base, job_id, clients, per_client))
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    verdict = "met" if p99 < TARGET_P99_MS else "MISSED"
    clients_text = f"{clients} concurrent clients" if clients > 1 else "1 client"
    print(f"GET /api/v1/jobs/{{id}} {label}: {ms.size} requests, {clients_text}, "
          f"{ms.size / seconds:.0f} req/s; p50 {p50:.1f} ms, p90 {p90:.1f} ms, p99 {p99:.1f} ms, max {ms.max():.1f} ms "
          f"(target p99 < {TARGET_P99_MS:.0f} ms: {verdict})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=100, help="requests per client")
    parser.add_argument("--pickups", type=int, default=10, help="jobs timed from POST to running")
    parser.add_argument("--repeats", type=int, default=3, help="latency runs (each printed)")
    parser.add_argument("--during-training", action="store_true",
                        help="also measure latency while a training job runs")
    args = parser.parse_args(argv)

    image = DATA / "images" / "dsb2018_img2d.tif"
    mask = DATA / "masks" / "dsb2018_img2d.tif"
    with tempfile.TemporaryDirectory(prefix="embedseg-bench-jobs-") as tmp:
        with running_server(Path(tmp)) as (base, _process), httpx.Client(base_url=base, timeout=60.0) as client:
            gt = upload(client, mask, "labels")
            pred = upload(client, mask, "labels")
            evaluate = {"pairs": [{"gt_id": gt, "pred_id": pred}]}
            print(f"server {base}; evaluate job on {mask.relative_to(ROOT)} against itself; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
            pickups(client, evaluate, args.pickups)

            job_id = post_job(client, "evaluate", evaluate)
            wait_finished(client, job_id)
            latency(base, job_id, 1, args.requests, "(one client, service time)")
            for repeat in range(args.repeats):
                latency(base, job_id, args.clients, args.requests, f"(finished job, run {repeat + 1})")

            if args.during_training:
                image_id = upload(client, image, "image")
                train = {"image_ids": [image_id], "mask_ids": [gt], "dims": 2, "epochs": 1000,
                         "max_time_minutes": 10}
                train_id = post_job(client, "train", train)
                wait_status(client, train_id, "running")
                time.sleep(2.0)
                for repeat in range(args.repeats):
                    latency(base, train_id, args.clients, args.requests, f"(job training, run {repeat + 1})")
                client.post(f"/api/v1/jobs/{train_id}/cancel").raise_for_status()
                job = wait_finished(client, train_id, timeout_s=600)
                print(f"training job ended {job['status']} at stage {job['stage']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
