"""``embedseg worker``: a Celery worker consuming the GPU queue, or with ``--gpus`` one such worker per GPU
(:mod:`embedseg_service.worker.gpus`); plugged into the ``embedseg`` command line."""

from __future__ import annotations

import argparse
from typing import Any

from embedseg_service.records.settings import get_settings


def cmd_worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    if settings.broker_url is None:
        raise ValueError(
            "set EMBEDSEG_BROKER_URL=redis://host:6379/0 (and EMBEDSEG_DATABASE_URL) to run Celery workers; "
            "on the embedded default 'embedseg serve' runs the jobs itself"
        )
    queues = args.queues or settings.gpu_queue
    if args.gpus is not None:
        from embedseg_service.worker.gpus import child_argv, resolve_gpus, run_gpu_workers

        if args.concurrency != 1:
            raise ValueError("--gpus runs one job at a time on each GPU; leave --concurrency out")
        return run_gpu_workers(resolve_gpus(args.gpus), lambda gpu: child_argv(args, queues, gpu))
    from embedseg_service.worker.celery_app import app

    argv = [
        "worker",
        "--queues",
        queues,
        "--concurrency",
        str(args.concurrency),
        "--loglevel",
        args.loglevel,
        "--pool",
        args.pool,
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``embedseg worker [--queues gpu] [--concurrency 1 | --gpus 0,1 | --gpus all]``."""
    from embedseg_service.worker.gpus import parse_gpus

    parser = subparsers.add_parser(
        "worker",
        help="run a Celery worker for training and prediction jobs (needs EMBEDSEG_BROKER_URL)",
        description="Consume jobs from the Redis broker and run them (CUDA when present). Scale out by "
        "starting more workers; each should own one GPU: --gpus starts and supervises one per GPU.",
    )
    parser.add_argument("--queues", default=None, help="comma-separated queues (default: EMBEDSEG_GPU_QUEUE, 'gpu')")
    parser.add_argument("--concurrency", type=int, default=1, help="jobs run at once (default 1: one GPU)")
    parser.add_argument(
        "--gpus",
        type=parse_gpus,
        default=None,
        metavar="all|0,1,...",
        help="run one worker per GPU (one job at a time each), pinned with CUDA_VISIBLE_DEVICES, restarted when it "
        "dies, stopped together on SIGTERM; 'all': CUDA_VISIBLE_DEVICES if set, else the GPUs nvidia-smi -L lists",
    )
    parser.add_argument(
        "--pool",
        default="prefork",
        choices=["prefork", "solo", "threads"],
        help="Celery pool (default prefork: each job in a child process)",
    )
    parser.add_argument("--loglevel", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--hostname", default=None, help="Celery node name (default: celery@<host>; with --gpus gpu<N>@<host>)"
    )
    parser.set_defaults(func=cmd_worker)
    return parser
