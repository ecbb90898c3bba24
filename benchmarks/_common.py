"""What the benchmark scripts share: the reference EmbedSeg loader, timers, free ports and servers.

How the scripts find this module: they run as ``python benchmarks/<script>.py`` (from the repository
root or any other folder), and Python puts the script's own folder, ``benchmarks/``, first on
``sys.path``. So a script imports this module as ``_common`` (``from _common import median_times``)
and another script's functions by the script's name (``from bench_clustering import ...``);
``embedseg_service`` comes from the installed project (``pip install -e .``). No script edits
``sys.path`` itself: only :func:`use_reference` puts the reference's folder on it.

The reference is the EmbedSeg package of the original authors, found in the folder given by
``--reference`` or else ``$EMBEDSEG_REFERENCE`` (the folder that contains ``EmbedSeg/``).
"""

from __future__ import annotations

import argparse
import importlib.util
import numbers
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import httpx

T = TypeVar("T")

REFERENCE_ENV = "EMBEDSEG_REFERENCE"

# --------------------------------------------------------------------------------------------
# the reference EmbedSeg


def add_reference_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--reference FOLDER`` (the folder that contains ``EmbedSeg/``; default ``$EMBEDSEG_REFERENCE``)."""
    parser.add_argument("--reference", default=None,
                        help=f"folder that contains the EmbedSeg package (default: ${REFERENCE_ENV})")  # fmt: skip


def comparison_parser(
    doc: str, repeats: int, *, device: str | None = None, threads: bool = False
) -> argparse.ArgumentParser:
    """The options of a script that compares this project with the reference: ``doc`` as the help text,
    ``--reference``, ``--repeats`` (default ``repeats``) and, where asked, ``--device`` (default ``device``)
    and ``--threads`` (torch CPU threads; default: torch's choice)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reference_option(parser)
    parser.add_argument("--repeats", type=int, default=repeats)
    if device is not None:
        parser.add_argument("--device", default=device)
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return parser


def reference_folder(folder: str | None) -> str:
    """``folder``, else ``$EMBEDSEG_REFERENCE``; exits with a message when neither names a folder."""
    folder = folder or os.environ.get(REFERENCE_ENV)
    if not folder:
        sys.exit(f"set {REFERENCE_ENV} or pass --reference: the folder that contains the EmbedSeg package")
    return folder


def use_reference(folder: str | None) -> str:
    """Put the reference's folder (``folder``, else ``$EMBEDSEG_REFERENCE``) first on ``sys.path`` so that
    ``import EmbedSeg`` finds it; returns the folder. Exits with a message when neither names one."""
    folder = reference_folder(folder)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return folder


def _stand_in_module(name: str, provides: str) -> types.ModuleType:
    """A module whose missing attributes raise a clear error instead of an AttributeError deep inside."""
    module = types.ModuleType(name)

    def missing(attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise RuntimeError(
            f"{name}.{attr} was called, but the benchmark replaces {name} with a stand-in that "
            f"only provides {provides}; this code path of the reference is not supported here"
        )

    module.__getattr__ = missing  # type: ignore[method-assign]
    return module


class _RandomRotation:
    """The part of ``torchvision.transforms.RandomRotation`` the reference's 2D/3D flips use.

    The reference subclasses it, overrides ``__call__`` and only uses ``degrees`` and
    ``get_params`` (which draws one angle from torch's generator, as torchvision does).
    """

    def __init__(self, degrees: float | tuple[float, float], *args: Any, **kwargs: Any) -> None:
        if args or kwargs:
            raise RuntimeError("the RandomRotation stand-in only accepts `degrees`")
        if isinstance(degrees, numbers.Number):
            if degrees < 0:
                raise ValueError("degrees must be non-negative")
            self.degrees = [-float(degrees), float(degrees)]
        else:
            low, high = degrees
            self.degrees = [float(low), float(high)]

    @staticmethod
    def get_params(degrees: list[float]) -> float:
        import torch

        return float(torch.empty(1).uniform_(float(degrees[0]), float(degrees[1])).item())

    def __call__(self, _sample: Any) -> Any:
        raise RuntimeError("the RandomRotation stand-in does not rotate images; the reference overrides __call__")


class _Compose:
    """``torchvision.transforms.Compose``: apply the transforms in order."""

    def __init__(self, transforms: list[Callable[[Any], Any]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Any) -> Any:
        for transform in self.transforms:
            sample = transform(sample)
        return sample


def install_stand_ins() -> list[str]:
    """Put stand-ins for the reference's imports that are missing here (``torchvision``, ``pycocotools``,
    which cannot be installed beside the CPU build of torch) into ``sys.modules``; returns their names."""
    installed = []
    if importlib.util.find_spec("torchvision") is None:
        provides = "transforms.RandomRotation (degrees, get_params) and transforms.Compose"
        tv = _stand_in_module("torchvision", provides)
        tv.__path__ = []  # a package, so that submodule imports resolve through sys.modules
        tv_transforms = _stand_in_module("torchvision.transforms", provides)
        tv_transforms.__path__ = []
        inner = _stand_in_module("torchvision.transforms.transforms", provides)
        inner.RandomRotation = _RandomRotation
        inner.Compose = _Compose
        tv_transforms.transforms = inner
        tv_transforms.RandomRotation = _RandomRotation
        tv_transforms.Compose = _Compose
        tv.transforms = tv_transforms
        sys.modules.update(
            {"torchvision": tv, "torchvision.transforms": tv_transforms, "torchvision.transforms.transforms": inner}
        )
        installed.append("torchvision")
    if importlib.util.find_spec("pycocotools") is None:
        provides = "nothing (run-length encoded crops, rle_encode=True, are not used)"
        coco = _stand_in_module("pycocotools", provides)
        coco.__path__ = []
        mask = _stand_in_module("pycocotools.mask", provides)
        coco.mask = mask
        sys.modules.update({"pycocotools": coco, "pycocotools.mask": mask})
        installed.append("pycocotools")
    return installed


def compatibility_names() -> list[str]:
    """Restore names the reference uses that newer tifffile / matplotlib releases removed (same meaning);
    returns what was added. Also selects matplotlib's non-interactive ``Agg`` backend."""
    added = []
    import tifffile

    if not hasattr(tifffile, "imsave"):
        tifffile.imsave = tifffile.imwrite
        added.append("tifffile.imsave = tifffile.imwrite")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.rcsetup as rcsetup

    if not hasattr(rcsetup, "interactive_bk"):
        from matplotlib.backends import BackendFilter, backend_registry

        rcsetup.interactive_bk = backend_registry.list_builtin(BackendFilter.INTERACTIVE)
        added.append("matplotlib.rcsetup.interactive_bk")
    return added


# --------------------------------------------------------------------------------------------
# timers


def run_timed(
    fn: Callable[[], T], repeats: int, *, sync: Callable[[], None] | None = None
) -> tuple[list[float], list[float], T | None]:
    """Call ``fn`` ``repeats`` times; returns the wall-clock seconds and the process CPU seconds of each
    call, and the last call's result. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each call
    and before each call's clocks are read, so that queued device work is counted where it belongs."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        if sync is not None:
            sync()
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        if sync is not None:
            sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus, out


def median_times(
    fn: Callable[[], T], repeats: int, *, warm_up: bool = False, sync: Callable[[], None] | None = None
) -> tuple[float, float, T | None]:
    """Median wall-clock and median process CPU seconds of ``repeats`` calls of ``fn``, and the last
    call's result; ``warm_up`` makes one untimed call first. ``sync`` as in :func:`run_timed`."""
    if warm_up:
        fn()
        if sync is not None:
            sync()
    walls, cpus, out = run_timed(fn, repeats, sync=sync)
    return median(walls), median(cpus), out


def median_times_alternating(fns: Sequence[Callable[[], object]], repeats: int) -> list[tuple[float, float]]:
    """Median (wall-clock, process CPU) seconds of each of ``fns``, called in turn ``repeats`` rounds
    after one untimed call each, so that a change of machine load falls on all of them alike."""
    for fn in fns:
        fn()
    samples: list[tuple[list[float], list[float]]] = [([], []) for _ in fns]
    for _ in range(repeats):
        for fn, (walls, cpus) in zip(fns, samples):
            wall, cpu, _ = run_timed(fn, 1)
            walls += wall
            cpus += cpu
    return [(median(walls), median(cpus)) for walls, cpus in samples]


def median(values: Iterable[float]) -> float:
    """The median of ``values``; NaN when there are none."""
    values = list(values)
    return statistics.median(values) if values else float("nan")


class CpuBudget:
    """Process CPU time counted from ``start`` (a ``time.process_time()`` reading) against ``budget_s``,
    with the per-step and per-epoch times a training run records."""

    def __init__(self, start: float, budget_s: float) -> None:
        self.start = start
        self.budget_s = budget_s
        self.step_s: list[float] = []
        self.epoch_s: list[float] = []
        self.epoch_val_s: list[float] = []

    def now(self) -> float:
        """CPU seconds spent since ``start``."""
        return time.process_time() - self.start

    def fits(self, t: float, cost: float) -> bool:
        """Whether something that takes ``cost`` CPU seconds, started at ``t``, ends within the budget."""
        return t + cost <= self.budget_s


# --------------------------------------------------------------------------------------------
# ports and servers


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_command(port: int, server: str) -> list[str]:
    if server == "uvicorn":  # the API alone, without the embedded worker
        return [sys.executable, "-m", "uvicorn", "--factory", "embedseg_service.api.app:create_app",
                "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]  # fmt: skip
    script = Path(sys.executable).parent / "embedseg"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "embedseg_service.core.cli"]
    return head + ["serve", "--host", "127.0.0.1", "--port", str(port)]


@contextmanager
def running_server(
    data_dir: Path, env: dict[str, str] | None = None, timeout_s: float = 120.0, server: str = "serve"
) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``embedseg serve`` (or, with ``server="uvicorn"``, uvicorn on the app factory) on a free
    loopback port with ``data_dir`` as its data folder and ``env`` added to a copy of this process's
    environment without its ``EMBEDSEG_*`` variables; yield (base URL, process) once ``/api/v1/health``
    answers, and stop the server's whole process group on leaving.

    The project must be installed (``pip install -e .``): the server runs the installed ``embedseg``.
    """
    port = free_port()
    environ = {key: value for key, value in os.environ.items() if not key.startswith("EMBEDSEG_")}
    environ.update(env or {})
    environ["EMBEDSEG_DATA_DIR"] = str(data_dir)
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(_serve_command(port, server), cwd=data_dir, env=environ, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                log.flush()
                raise RuntimeError(f"server exited with {process.returncode}:\n"
                                   + (data_dir / "server.log").read_text(errors="replace")[-4000:])  # fmt: skip
            try:
                if httpx.get(f"{base}/api/v1/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer /api/v1/health within {timeout_s:.0f} s")
            time.sleep(0.2)
        yield base, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _socket_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(children.get(current, []))
    return found


def listening_pid(root_pid: int, port: int) -> int:
    """The process (``root_pid`` or one of its descendants) whose socket listens on ``port`` (Linux /proc)."""
    wanted = {f"socket:[{inode}]" for inode in _socket_inodes(port)}
    for pid in _descendants(root_pid):
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    if os.readlink(fd) in wanted:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    raise RuntimeError(f"no process under {root_pid} listens on port {port}")
