"""``embedseg worker --gpus``: the list and its checks (exit 2 with a clear message), ``all``, the children's
node names, environment and command lines, and the restart back-off. The processes themselves run in
``tests/integration/test_gpu_workers.py``."""

from __future__ import annotations

import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedseg_service.core.cli import build_parser, main
from embedseg_service.records.settings import Settings, set_settings
from embedseg_service.worker.gpus import ALL, Child, child_argv, child_environment, node_name, resolve_gpus

NVIDIA_SMI_L = "GPU 0: NVIDIA H100 (UUID: GPU-aaaa)\nGPU 1: NVIDIA H100 (UUID: GPU-bbbb)\n"


@pytest.fixture
def no_nvidia_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A PATH without nvidia-smi and no CUDA_VISIBLE_DEVICES (a CPU host)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A PATH whose nvidia-smi lists two GPUs (a script that prints what the real one prints for ``-L``)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    script = folder / "nvidia-smi"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nassert sys.argv[1:] == ['-L']\nprint({NVIDIA_SMI_L!r}, end='')\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(folder))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


@pytest.fixture
def with_broker(tmp_path: Path) -> Iterator[None]:
    set_settings(Settings(_env_file=None, data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0"))
    try:
        yield
    finally:
        set_settings(None)


def test_the_gpu_list_is_parsed() -> None:
    parse = build_parser().parse_args
    assert parse(["worker", "--gpus", "0,1"]).gpus == [0, 1]
    assert parse(["worker", "--gpus", " 3, 1 "]).gpus == [3, 1]
    assert parse(["worker", "--gpus", "ALL"]).gpus == ALL
    assert parse(["worker"]).gpus is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0,0", "argument --gpus: GPU 0 is listed twice in '0,0'; give each GPU once"),
        ("x", "argument --gpus: 'x' is not a GPU list; give 'all' or comma-separated GPU indices as nvidia-smi "
              "numbers them, e.g. 0,1"),
        ("0,", "argument --gpus: '0,' is not a GPU list"),
        ("", "argument --gpus: '' is not a GPU list"),
    ],
)  # fmt: skip
def test_a_bad_gpu_list_exits_2_saying_how_to_write_it(capsys: pytest.CaptureFixture[str], value, message) -> None:  # type: ignore[no-untyped-def]
    assert main(["worker", "--gpus", value]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.usefixtures("no_nvidia_smi", "with_broker")
def test_gpus_all_without_nvidia_smi_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--gpus", "all"]) == 2
    assert capsys.readouterr().err.strip() == (
        "embedseg worker: error: --gpus all counts the GPUs with nvidia-smi, which is not on PATH; give --gpus 0,1,..."
    )


@pytest.mark.usefixtures("no_nvidia_smi", "with_broker")
def test_gpus_run_one_job_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--gpus", "0,1", "--concurrency", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "embedseg worker: error: --gpus runs one job at a time on each GPU; leave --concurrency out"
    )


@pytest.mark.usefixtures("two_gpus")
def test_gpus_are_checked_against_nvidia_smi() -> None:
    assert resolve_gpus(ALL) == [0, 1]
    assert resolve_gpus([1]) == [1]
    with pytest.raises(ValueError, match=r"^--gpus: GPU 3 is not on this host; nvidia-smi -L lists 0, 1$"):
        resolve_gpus([0, 3])


@pytest.mark.usefixtures("two_gpus")
def test_gpus_all_takes_the_scheduler_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert resolve_gpus(ALL) == [1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa")
    with pytest.raises(ValueError, match=r"CUDA_VISIBLE_DEVICES='GPU-aaaa' does not list GPU indices; give --gpus"):
        resolve_gpus(ALL)


@pytest.mark.usefixtures("no_nvidia_smi")
def test_without_nvidia_smi_the_indices_are_taken_as_given() -> None:
    assert resolve_gpus([0, 1]) == [0, 1]  # a CPU host: the children find no GPU and run their jobs on the CPU


def test_each_child_is_a_worker_pinned_to_its_gpu_under_a_node_name_of_its_own() -> None:
    assert [node_name(None, 0), node_name("w1@%h", 1), node_name("box", 2)] == [
        "gpu0@%h", "w1-gpu1@%h", "gpu2@box",
    ]  # fmt: skip
    env = child_environment(1, {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert env == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    parent = build_parser().parse_args(["worker", "--gpus", "0,1", "--pool", "solo", "--loglevel", "debug"])
    argv = child_argv(parent, "gpu,gpu-large", 1)
    assert argv[:4] == [sys.executable, "-m", "embedseg_service.core.cli", "worker"]
    child = build_parser().parse_args(argv[3:])
    assert (child.gpus, child.queues, child.concurrency, child.pool, child.loglevel, child.hostname) == (
        None, "gpu,gpu-large", 1, "solo", "debug", "gpu1@%h",
    )  # fmt: skip


def test_a_child_that_keeps_dying_waits_longer_each_time() -> None:
    child = Child(0, ["true"])
    waits = []
    for failures in range(1, 9):
        child.failures = failures
        waits.append(child.backoff_s())
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60]
