"""CPU inference options of the 2D network: bf16 autocast, channels_last and ``torch.compile`` against float32.

The float32 network has contiguous weights (as trained); ``load_model`` gives a 2D network on the CPU
channels-last weights, the second variant. Labels of ``precision="bf16"`` are compared on such a model.

Model: ``--model FILE``, else one trained as the tests' ``dsb_model`` (``bench_service_throughput.trained_model``).
Images: crops of the DSB image. For each side of ``--sides`` the forward pass of one image and of four
(per image) is timed for each variant, medians of ``--repeats`` calls taken in turn (one untimed call
each first; wall-clock and process CPU time: on a loaded machine the CPU time of one thread is the
steadier figure), with the largest difference of the raw outputs from float32. ``torch.compile`` prints
its compile time (once per input shape). Then 16 crops per side in batches of 1 to 16 (ms per image).
Then the labels: ``segment`` of the held-out DSB rows and of 40 64² crops with ``precision="bf16"``
against float32, without and with TTA: how many are identical, the pixels whose foreground differs,
and AP0.5 on the held-out rows; and whether channels-last weights give the labels of contiguous ones.

    python benchmarks/bench_inference_options.py [--model FILE] [--threads 1] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _common import median_times_alternating
from bench_service_throughput import crops, dsb_image, trained_model

from embedseg_service.core.metrics import average_precision
from embedseg_service.core.model.checkpoint import load_model


def variants(net: torch.nn.Module, compile_net: bool) -> dict[str, tuple[torch.nn.Module, Callable, Callable]]:
    """name -> (network, input transform, call wrapper)."""

    def plain(x: torch.Tensor) -> torch.Tensor:
        return x

    def channels_last(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    def run(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model(x)

    def run_bf16(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x).float()

    contiguous = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    last = copy.deepcopy(net).to(memory_format=torch.channels_last)
    found = {
        "fp32": (contiguous, plain, run),
        "channels_last": (last, channels_last, run),
        "bf16 autocast": (contiguous, plain, run_bf16),
        "bf16 autocast, channels_last": (last, channels_last, run_bf16),
    }
    if compile_net:
        found["torch.compile"] = (torch.compile(copy.deepcopy(contiguous)), plain, run)
    return found


def forward_times(model_path: Path, sides: list[int], repeats: int, compile_net: bool) -> None:
    net = load_model(model_path, device="cpu").net
    image, _ = dsb_image()
    prepare = load_model(model_path, device="cpu").prepare
    for side in sides:
        for batch in (1, 4):
            x = torch.from_numpy(np.stack([prepare(c) for c in crops(image, side, batch)]))
            found = variants(net, compile_net)
            calls = []
            with torch.inference_mode():
                reference = found["fp32"][0](x)
                for name, (model, transform, call) in found.items():
                    xi = transform(x)
                    start = time.perf_counter()
                    out = call(model, xi)
                    first = time.perf_counter() - start
                    difference = float((out.float() - reference).abs().max())
                    note = f", first call (compiles) {first:.1f} s" if name == "torch.compile" else ""
                    print(f"  {side}² x {batch} {name}: largest output difference from fp32 {difference:.2e}{note}")
                    calls.append((name, lambda m=model, c=call, v=xi: c(m, v)))
                times = median_times_alternating([fn for _, fn in calls], repeats)
            for (name, _), (wall, cpu) in zip(calls, times):
                per_image = f"{wall * 1000 / batch:.1f} ms per image ({cpu * 1000 / batch:.1f} ms CPU)"
                print(f"{side}² x {batch}, {name}: {per_image}")


def batch_sizes(model_path: Path, sides: list[int], repeats: int) -> None:
    """Forward passes of 16 crops per side in batches of 1, 2, 4, 8 and 16 (the network as ``load_model`` gives
    it): ms per image, medians of ``repeats`` rounds taken in turn."""
    model = load_model(model_path, device="cpu")
    image, _ = dsb_image()
    for side in sides:
        x = torch.from_numpy(np.stack([model.prepare(c) for c in crops(image, side, 16)]))

        def run(batch: int, x: torch.Tensor = x) -> Callable[[], None]:
            def forward() -> None:
                with torch.inference_mode():
                    for start in range(0, 16, batch):
                        model.net(x[start : start + batch])

            return forward

        times = median_times_alternating([run(b) for b in (1, 2, 4, 8, 16)], repeats)
        print(
            f"{side}², batches of 1, 2, 4, 8, 16: "
            + ", ".join(f"{w * 1000 / 16:.1f}" for w, _ in times)
            + " ms per image"
        )


def label_agreement(model_path: Path) -> None:
    """Labels of bf16 against fp32, and of contiguous against channels-last weights (fp32)."""
    model = load_model(model_path, device="cpu")
    contiguous = load_model(model_path, device="cpu")
    contiguous.net.to(memory_format=torch.contiguous_format)
    image, mask = dsb_image()
    held, gt = image[384:], mask[384:]
    small = crops(image, 64, 40)
    for tta in (False, True):
        a, b = model.segment(held, tta=tta), model.segment(held, tta=tta, precision="bf16")
        ap32, ap16 = average_precision(gt, a).ap[0], average_precision(gt, b).ap[0]
        same = sum(
            np.array_equal(model.segment(c, tta=tta), model.segment(c, tta=tta, precision="bf16")) for c in small
        )
        print(f"labels, tta {tta}: held-out rows identical {np.array_equal(a, b)} ({int(((a > 0) != (b > 0)).sum())} "
              f"foreground pixels differ; AP0.5 fp32 {ap32:.3f}, bf16 {ap16:.3f}; {int(a.max())} / {int(b.max())} "
              f"objects); 64² crops identical: {same} of {len(small)}")  # fmt: skip
    images = [held, *crops(image, 64, 20), *crops(image, 128, 10), *crops(image, 256, 6)]
    for tta in (False, True):
        same = sum(np.array_equal(model.segment(i, tta=tta), contiguous.segment(i, tta=tta)) for i in images)
        print(f"labels, tta {tta}: channels-last against contiguous weights identical on {same} of "
              f"{len(images)} images (held-out rows, 20 64², 10 128², 6 256² crops)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--sides", default="64,256")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (about a minute per shape)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="embedseg-bench-options-") as tmp:
        model = args.model or trained_model(Path(tmp))
        print(f"model {model}; torch {torch.__version__}, {args.threads} thread(s)", flush=True)
        sides = [int(s) for s in args.sides.split(",")]
        forward_times(model, sides, args.repeats, not args.no_compile)
        batch_sizes(model, sides, max(3, args.repeats // 2))
        label_agreement(model)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
