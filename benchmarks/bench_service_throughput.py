"""Predict-job throughput and per-job overhead of the embedded service, over loopback.

Starts ``embedseg serve`` (SQLite, local storage, one embedded worker process) on a free port with a
temporary data directory, uploads a model (``--model FILE``, else one trained here as the tests'
``dsb_model``: 24 epochs on the top rows of the repository's DSB image, one torch thread) and crops of
the DSB image (uint16, distinct crops and their flips and rotations), then:

1. ``jobs``: ``--jobs`` predict jobs of one 256² image each, one after the other (POST, then poll
   ``GET /api/v1/jobs/{id}`` every ``--poll-ms`` until it is final): jobs/s, the median time from
   the POST to the client seeing ``succeeded``, and the per-job overhead: that median minus the median
   in-process ``TrainedModel.segment`` time of the same images in this process, each job followed by
   the segmentation of its image, so that both see the same load (``--worker-threads`` sets the torch
   threads of both; default: torch's choice, the number of cores).
   Then the same number of jobs posted at once: jobs/s until the last one succeeded.
2. ``batch``: one predict job of ``--batch-images`` images of ``--batch-side``² (default 256), on this
   server (images of one shape run through the network together) and on a second one started with
   ``EMBEDSEG_INFERENCE_BATCH_VOXELS=0`` (one image at a time), in turn ``--batch-repeats`` times:
   images/s of each (medians) and their ratio; after section 1 (256² images), also the batched job's
   images/s against section 1's jobs/s. ``--batch-voxels N`` runs the batched job on a third server
   with ``EMBEDSEG_INFERENCE_BATCH_VOXELS=N`` instead.
3. ``latency``: ``--latency-jobs`` jobs of one 64² image each, one after the other: the median and
   90th percentile from the POST to the client seeing ``succeeded``, and the split of the median job
   (queued, running, until the client saw it) from the row's timestamps.

Every section first runs one uncounted job (the worker loads the model then). ``--tta`` segments with
test-time augmentation (the service's default); without it the jobs ask ``"tta": false``.

    python benchmarks/bench_service_throughput.py [--model FILE] [--tta] [--sections jobs,batch,latency]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from _common import median, running_server

ROOT = Path(__file__).resolve().parents[1]
DSB = ROOT / "tests" / "data" / "nuclei2d_dsb"
FINAL = {"succeeded", "failed", "cancelled"}
SECTIONS = ("jobs", "batch", "latency")


# ------------------------------------------------------------------ data and model


def dsb_image() -> tuple[np.ndarray, np.ndarray]:
    from embedseg_service.core.data.io import read_tiff

    name = "dsb2018_img2d.tif"
    return read_tiff(DSB / "images" / name).data, read_tiff(DSB / "masks" / name).data


def crops(image: np.ndarray, side: int, count: int) -> list[np.ndarray]:
    """``count`` distinct ``side``² crops of ``image``: windows on a grid of half-side steps, each in its 8
    flips and rotations, cycled when more are asked for."""
    starts = range(0, image.shape[0] - side + 1, max(8, side // 2))
    windows = [image[y : y + side, x : x + side] for y in starts for x in starts]
    variants = [
        np.rot90(w, k) if not flip else np.rot90(w[::-1], k) for flip in (0, 1) for k in range(4) for w in windows
    ]
    return [np.ascontiguousarray(variants[i % len(variants)]) for i in range(count)]


def trained_model(folder: Path) -> Path:
    """A model trained as the tests' ``dsb_model`` (24 epochs x 10 steps of 7 crops, seed 0, one thread)."""
    import torch

    from embedseg_service.core.training.train import TrainConfig, train

    image, mask = dsb_image()
    config = TrainConfig(spatial_dims=2, epochs=24, samples_per_epoch=70, seed=0, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        print("training the model (24 epochs on the DSB image, one thread) ...", flush=True)
        return Path(train(image[:384], mask[:384], config, out_path=folder / "dsb.pt").model_path)
    finally:
        torch.set_num_threads(threads)


def tiff_bytes(array: np.ndarray) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


# ------------------------------------------------------------------ HTTP


def upload_volume(client: httpx.Client, array: np.ndarray, name: str) -> str:
    files = {"file": (f"{name}.tif", tiff_bytes(array), "image/tiff")}
    response = client.post("/api/v1/volumes", files=files, data={"kind": "image"})
    response.raise_for_status()
    return response.json()["id"]


def upload_model(client: httpx.Client, path: Path) -> str:
    with path.open("rb") as handle:
        response = client.post("/api/v1/models", files={"file": (path.name, handle, "application/octet-stream")})
    response.raise_for_status()
    return response.json()["id"]


def post_predict(client: httpx.Client, model_id: str, volume_ids: list[str], tta: bool) -> str:
    response = client.post("/api/v1/jobs/predict", json={"model_id": model_id, "volume_ids": volume_ids, "tta": tta})
    if response.status_code != 202:
        raise RuntimeError(f"POST /jobs/predict answered {response.status_code}: {response.text[:500]}")
    return response.json()["id"]


def wait_final(client: httpx.Client, job_id: str, poll_s: float, timeout_s: float = 3600.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        job = client.get(f"/api/v1/jobs/{job_id}").json()
        if job["status"] in FINAL:
            if job["status"] != "succeeded":
                raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
            return job
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job_id} did not finish within {timeout_s:.0f} s")
        time.sleep(poll_s)


def timed_job(
    client: httpx.Client, model_id: str, volume_ids: list[str], tta: bool, poll_s: float
) -> tuple[float, dict]:
    """Seconds from sending the POST to seeing the job ``succeeded``, and the job."""
    start = time.perf_counter()
    job_id = post_predict(client, model_id, volume_ids, tta)
    job = wait_final(client, job_id, poll_s)
    return time.perf_counter() - start, job


def _stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# ------------------------------------------------------------------ sections


def section_jobs(
    client: httpx.Client,
    model_id: str,
    ids: list[str],
    images: list[np.ndarray],
    model_path: Path,
    args: argparse.Namespace,
) -> tuple[float, float]:
    """Jobs one after the other, each followed by the in-process ``segment`` of its image (the same load on both);
    returns the jobs/s one after the other and posted at once."""
    from embedseg_service.core.model.checkpoint import load_model

    model = load_model(model_path, device="cpu")
    model.segment(images[0], tta=args.tta)
    poll_s = args.poll_ms / 1000
    timed_job(client, model_id, ids[:1], args.tta, poll_s)
    latencies, segments = [], []
    for i in range(args.jobs):
        latencies.append(timed_job(client, model_id, [ids[i % len(ids)]], args.tta, poll_s)[0])
        start = time.perf_counter()
        model.segment(images[i % len(images)], tta=args.tta)
        segments.append(time.perf_counter() - start)
    overhead = median(latencies) - median(segments)
    print(f"1. {args.jobs} jobs of one 256² image, one after the other: {args.jobs / sum(latencies):.2f} jobs/s; "
          f"POST to succeeded median {median(latencies) * 1000:.1f} ms; in-process segment median "
          f"{median(segments) * 1000:.1f} ms; per-job overhead {overhead * 1000:.1f} ms")  # fmt: skip
    start = time.perf_counter()
    posted = [post_predict(client, model_id, [ids[i % len(ids)]], args.tta) for i in range(args.jobs)]
    for job_id in posted:
        wait_final(client, job_id, 0.05)
    total = time.perf_counter() - start
    print(f"   the same {args.jobs} jobs posted at once: {args.jobs / total:.2f} jobs/s")
    return args.jobs / sum(latencies), args.jobs / total


def batch_seconds(client: httpx.Client, model_id: str, ids: list[str], args: argparse.Namespace) -> float:
    """Seconds from POST to succeeded of one job of all of ``ids``."""
    seconds, job = timed_job(client, model_id, ids, args.tta, 0.05)
    run_s = (_stamp(job["finished_at"]) - _stamp(job["started_at"])).total_seconds()
    print(f"   {len(ids)} images: {seconds:.2f} s from POST to succeeded ({run_s:.2f} s running): "
          f"{len(ids) / seconds:.2f} images/s", flush=True)  # fmt: skip
    return seconds


def section_batch(
    servers: list[tuple[httpx.Client, str, list[str]]], args: argparse.Namespace, jobs: tuple[float, float] | None
) -> None:
    """The same job on the batching server and on the one-at-a-time server, in turn ``--batch-repeats`` times;
    with ``jobs`` (section 1's jobs/s one after the other and posted at once), the batched job against them."""
    print(f"2. one job of {args.batch_images} {args.batch_side}² images, batched (first) and one image at a time "
          f"(EMBEDSEG_INFERENCE_BATCH_VOXELS=0), in turn:")  # fmt: skip
    for client, model_id, ids in servers:
        timed_job(client, model_id, ids[:2], args.tta, args.poll_ms / 1000)
    times: list[list[float]] = [[], []]
    for _ in range(args.batch_repeats):
        for seconds, (client, model_id, ids) in zip(times, servers):
            seconds.append(batch_seconds(client, model_id, ids, args))
    batched, single = (args.batch_images / median(seconds) for seconds in times)
    print(f"   batched {batched:.2f} images/s, one at a time {single:.2f} images/s (medians): "
          f"{batched / single:.2f}x")  # fmt: skip
    if jobs is not None and args.batch_side == 256:
        print(f"   the batched job against one job per image (section 1): {batched / jobs[0]:.2f}x one after the "
              f"other (target >= 1.5x), {batched / jobs[1]:.2f}x posted at once")  # fmt: skip


def section_latency(client: httpx.Client, model_id: str, ids: list[str], args: argparse.Namespace) -> None:
    poll_s = args.poll_ms / 1000
    timed_job(client, model_id, ids[:1], args.tta, poll_s)
    runs = [timed_job(client, model_id, [ids[i % len(ids)]], args.tta, poll_s) for i in range(args.latency_jobs)]
    ms = sorted(seconds * 1000 for seconds, _ in runs)
    mid = statistics.median_low(ms)
    seconds, job = next(run for run in runs if run[0] * 1000 == mid)
    queued = (_stamp(job["started_at"]) - _stamp(job["created_at"])).total_seconds() * 1000
    running = (_stamp(job["finished_at"]) - _stamp(job["started_at"])).total_seconds() * 1000
    print(f"3. {args.latency_jobs} jobs of one 64² image: POST to succeeded median {median(ms):.1f} ms, "
          f"p90 {float(np.percentile(ms, 90)):.1f} ms, min {ms[0]:.1f} ms (target < 100 ms); median job: "
          f"{queued:.1f} ms queued, {running:.1f} ms running, {mid - queued - running:.1f} ms the rest "
          f"(POST before the row, polls after it)")  # fmt: skip


def start_server(stack: ExitStack, tmp: Path, env: dict[str, str], model: Path) -> tuple[httpx.Client, str]:
    """A server with ``env`` in a fresh folder under ``tmp`` (stopped when ``stack`` closes), its client and the
    id of ``model`` uploaded to it."""
    base, _ = stack.enter_context(running_server(Path(tempfile.mkdtemp(dir=tmp)), env=env))
    client = stack.enter_context(httpx.Client(base_url=base, timeout=120.0))
    return client, upload_model(client, model)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="model file (default: train one, about 2 CPU-minutes)")
    parser.add_argument("--tta", action="store_true", help="segment with test-time augmentation")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--batch-images", type=int, default=200)
    parser.add_argument("--batch-side", type=int, default=256, help="side of the images of the batch section")
    parser.add_argument("--batch-repeats", type=int, default=2, help="runs of each batch job, in turn")
    parser.add_argument("--batch-voxels", type=int, default=None,
                        help="EMBEDSEG_INFERENCE_BATCH_VOXELS of the batching server (default: its own)")  # fmt: skip
    parser.add_argument("--latency-jobs", type=int, default=50)
    parser.add_argument("--poll-ms", type=float, default=10.0, help="client poll interval (ms)")
    parser.add_argument("--worker-threads", type=int, default=None,
                        help="torch threads of the servers and this process (default: torch's)")  # fmt: skip
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if unknown := sorted(set(args.sections) - set(SECTIONS)):
        parser.error(f"unknown section(s) {', '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    image, _ = dsb_image()
    large, small = crops(image, 256, args.jobs), crops(image, 64, args.latency_jobs)
    batch_images = crops(image, args.batch_side, args.batch_images)
    env = {"EMBEDSEG_QUOTA_QUEUED_JOBS": str(max(1000, 2 * args.jobs))}
    if args.worker_threads is not None:
        env["OMP_NUM_THREADS"] = str(args.worker_threads)
        torch.set_num_threads(args.worker_threads)
    with tempfile.TemporaryDirectory(prefix="embedseg-bench-throughput-") as name, ExitStack() as stack:
        tmp = Path(name)
        model = args.model or trained_model(tmp)
        print(f"model {model}; tta {args.tta}; client polls every {args.poll_ms:g} ms; torch threads "
              f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
              flush=True)  # fmt: skip
        client, model_id = start_server(stack, tmp, env, model)
        jobs = None
        if "jobs" in args.sections:
            ids = [upload_volume(client, a, f"large-{i}") for i, a in enumerate(large)]
            jobs = section_jobs(client, model_id, ids, large, model, args)
        if "batch" in args.sections:
            batching = (client, model_id)
            if args.batch_voxels is not None:
                batching = start_server(
                    stack, tmp, {**env, "EMBEDSEG_INFERENCE_BATCH_VOXELS": str(args.batch_voxels)}, model
                )
            single = start_server(stack, tmp, {**env, "EMBEDSEG_INFERENCE_BATCH_VOXELS": "0"}, model)
            servers = [(c, m, [upload_volume(c, a, f"b-{i}") for i, a in enumerate(batch_images)])
                       for c, m in (batching, single)]  # fmt: skip
            section_batch(servers, args, jobs)
        if "latency" in args.sections:
            small_ids = [upload_volume(client, a, f"small-{i}") for i, a in enumerate(small)]
            section_latency(client, model_id, small_ids, args)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
