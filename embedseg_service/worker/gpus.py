"""``embedseg worker --gpus 0,1``: one child ``embedseg worker`` per GPU, each pinned to its GPU, supervised.

Each child is a separate ``embedseg worker`` process (its own Celery node ``gpu<N>@<host>``, one job
at a time) started with ``CUDA_VISIBLE_DEVICES=<N>`` and ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` in its
environment, so torch in the child (imported only there) sees that one GPU as ``cuda:0`` and the
indices mean what ``nvidia-smi`` shows. The parent imports neither torch nor Celery and never touches
CUDA. ``--gpus all`` takes the GPUs of the parent's ``CUDA_VISIBLE_DEVICES`` when that is set (a
batch scheduler's allocation), else the ones ``nvidia-smi -L`` lists.

The parent restarts a child that exits (after 1 s, then 2, 4 ... up to :data:`MAX_BACKOFF_S` while
it keeps failing; a child that ran :data:`STABLE_S` starts from 1 s again). SIGTERM to the parent
is forwarded once to every child: each stops as a single worker does (its running job stops at the
next step, goes back to ``queued`` and is sent again), and the parent exits when all have. SIGINT
is not forwarded: Ctrl-C in a terminal already reaches every process of the foreground group.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

ALL = "all"
GPU_LIST = re.compile(r"^[0-9]{1,4}(,[0-9]{1,4})*$")
FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
STABLE_S = 60.0
"""A child that ran this long before it exited is restarted after :data:`FIRST_BACKOFF_S` again."""
POLL_S = 0.5


def parse_gpus(text: str) -> list[int] | str:
    """The ``--gpus`` value: :data:`ALL`, or the distinct GPU indices of a comma-separated list such as
    ``0,1,3``; raises ``argparse.ArgumentTypeError`` saying how to write it."""
    value = text.strip().replace(" ", "")
    if value.lower() == ALL:
        return ALL
    if not GPU_LIST.match(value):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a GPU list; give 'all' or comma-separated GPU indices as nvidia-smi numbers them, "
            "e.g. 0,1"
        )
    gpus = [int(part) for part in value.split(",")]
    repeated = sorted({gpu for gpu in gpus if gpus.count(gpu) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"GPU {repeated[0]} is listed twice in {text!r}; give each GPU once")
    return gpus


def listed_gpus(timeout_s: float = 30.0) -> list[int] | None:
    """The indices ``nvidia-smi -L`` lists (it asks the driver; CUDA is not initialised here), or None when
    nvidia-smi is not on PATH. Raises ValueError when it fails."""
    program = shutil.which("nvidia-smi")
    if program is None:
        return None
    try:
        done = subprocess.run([program, "-L"], capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ValueError(f"nvidia-smi -L failed ({type(error).__name__}: {error})") from None
    if done.returncode != 0:
        raise ValueError(f"nvidia-smi -L failed ({(done.stderr or done.stdout).strip() or done.returncode})")
    return [int(index) for index in re.findall(r"^GPU (\d+):", done.stdout, re.M)]


def resolve_gpus(gpus: list[int] | str) -> list[int]:
    """The GPU indices to start a child for: the list as given, checked against ``nvidia-smi -L`` when that is
    on PATH; for :data:`ALL` the parent's ``CUDA_VISIBLE_DEVICES`` (indices), else every GPU nvidia-smi lists.
    Raises ValueError saying what is wrong."""
    listed = listed_gpus()
    if gpus == ALL:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        if visible:
            chosen = parse_gpus(visible) if GPU_LIST.match(visible.replace(" ", "")) else None
            if not isinstance(chosen, list):
                raise ValueError(
                    f"--gpus all: CUDA_VISIBLE_DEVICES={visible!r} does not list GPU indices; give --gpus 0,1,... "
                    "instead"
                )
            return chosen
        if listed is None:
            raise ValueError("--gpus all counts the GPUs with nvidia-smi, which is not on PATH; give --gpus 0,1,...")
        if not listed:
            raise ValueError("--gpus all: nvidia-smi -L lists no GPU on this host")
        return listed
    assert isinstance(gpus, list)
    missing = [gpu for gpu in gpus if listed is not None and gpu not in listed]
    if missing:
        names = ", ".join(str(gpu) for gpu in listed or []) or "none"
        raise ValueError(f"--gpus: GPU {missing[0]} is not on this host; nvidia-smi -L lists {names}")
    return gpus


def node_name(hostname: str | None, gpu: int) -> str:
    """The Celery node name of the child for ``gpu``: ``gpu<N>@%h``, ``<name>-gpu<N>@<host>`` for ``--hostname
    name@host``, ``gpu<N>@<host>`` for ``--hostname host``."""
    if not hostname:
        return f"gpu{gpu}@%h"
    name, at, host = hostname.partition("@")
    return f"{name}-gpu{gpu}@{host}" if at else f"gpu{gpu}@{hostname}"


def child_environment(gpu: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the child pinned to ``gpu``."""
    env = dict(os.environ if base is None else base)
    env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # number the GPUs as nvidia-smi does
    return env


@dataclass
class Child:
    """One pinned child worker: its GPU, command line and current process."""

    gpu: int
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=child_environment(self.gpu))
        self.started_at = time.monotonic()
        self.restart_at = None
        log.info("worker for GPU %d started (pid %d)", self.gpu, self.process.pid)

    def backoff_s(self) -> float:
        """The wait before the next start: doubled for each failure in a row, at most :data:`MAX_BACKOFF_S`."""
        return min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** max(0, self.failures - 1))


class GpuWorkers:
    """Starts a :class:`Child` per GPU and supervises them until SIGTERM (see the module docstring)."""

    def __init__(self, gpus: Sequence[int], argv_for: Callable[[int], list[str]]) -> None:
        self.children = [Child(gpu, list(argv_for(gpu))) for gpu in gpus]
        self._stopping = threading.Event()
        self._forward = False
        self._signalled: set[int] = set()

    def stop(self, forward: bool = True) -> None:
        """Stop supervising; with ``forward``, send SIGTERM once to every running child."""
        self._forward = self._forward or forward
        self._stopping.set()
        if self._forward:
            self._signal_children()

    def _signal_children(self) -> None:
        for child in self.children:
            process = child.process
            if process is None or process.pid in self._signalled or process.poll() is not None:
                continue
            self._signalled.add(process.pid)
            try:
                process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                continue

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.warning("signal %d: stopping the GPU workers (their running jobs go back to the queue)", signum)
        self.stop(forward=signum == signal.SIGTERM)

    def _check(self, child: Child) -> None:
        """Restart ``child`` when it exited and its back-off has passed."""
        now = time.monotonic()
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.start()
            return
        if child.process is None or (code := child.process.poll()) is None:
            return
        child.exit_codes.append(code)
        child.failures = 1 if now - child.started_at >= STABLE_S else child.failures + 1
        child.restart_at = now + child.backoff_s()
        log.error(
            "worker for GPU %d (pid %d) exited with %d; restarting in %g s",
            child.gpu, child.process.pid, code, child.restart_at - now,
        )  # fmt: skip

    def run(self) -> int:
        """Start the children, restart the ones that exit, and after SIGTERM wait for all to stop; returns 0 when
        every child stopped cleanly, else 1."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for child in self.children:
            if not self._stopping.is_set():
                child.start()
        if self._forward:  # a SIGTERM while the children started: the ones started since get it too
            self._signal_children()
        while not self._stopping.wait(POLL_S):
            for child in self.children:
                if not self._stopping.is_set():
                    self._check(child)
        codes = [child.process.wait() for child in self.children if child.process is not None]
        log.info("GPU workers stopped (exit codes %s)", codes)
        return 0 if all(code == 0 for code in codes) else 1


def run_gpu_workers(gpus: Sequence[int], argv_for: Callable[[int], list[str]]) -> int:
    """Run :class:`GpuWorkers` for ``gpus``; ``argv_for(gpu)`` is the command line of the child for ``gpu``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [gpu workers] %(message)s")
    log.info("starting one worker per GPU: %s", ", ".join(str(gpu) for gpu in gpus))
    return GpuWorkers(gpus, argv_for).run()


def child_argv(args: argparse.Namespace, queues: str, gpu: int) -> list[str]:
    """The ``embedseg worker`` command line of the child for ``gpu`` (the parent's options, one job at a time)."""
    return [
        sys.executable, "-m", "embedseg_service.core.cli", "worker",
        "--queues", queues, "--concurrency", "1", "--pool", args.pool, "--loglevel", args.loglevel,
        "--hostname", node_name(args.hostname, gpu),
    ]  # fmt: skip
