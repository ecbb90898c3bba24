"""CUDA checks and figures: clustering on the GPU against the CPU and the reference, mixed-precision
training on real 2D data, a GPU-trained model segmenting on the CPU, and GPU memory of tiled prediction.

Needs a CUDA device. Sections (each one reports and the script goes on if one fails):

* ``cluster``: ``core.cluster`` on CUDA and on the CPU for the cases of ``bench_clustering.py``
  (2D 512x512, 3D 64x256x256, 3D noisy); whether the labels are identical up to relabelling, and the
  median times of ours on CUDA, ours on the CPU and the reference's ``Cluster`` / ``Cluster_3d`` on CUDA.
* ``train``: ``embedseg_service.core.training.train.train`` with ``device="auto"`` (mixed precision on, off or both:
  ``--amp``) on the images of ``--data`` for ``--train-seconds`` of wall-clock time; every 4th sorted name is held
  apart. Prints steps, seconds per step, and held-out AP0.5 / mAP (0.5..0.9) with and without TTA on
  CUDA; then loads the checkpoint on the CPU and reports AP0.5 of the CPU labels against the CUDA
  labels (the same model must give the same objects on both devices).
* ``train3d``: ``embedseg_service.core.training.train.train`` in 3D on ``tests/data/nuclei3d_synthetic`` (rows 0-45 of
  Y; rows 46-60 held apart) for ``--train-seconds`` per ``--batch3d`` setting (``BxM`` or ``auto``); prints optimiser
  steps, seconds per step and AP on the held-apart rows with and without TTA.
* ``tiling``: peak CUDA memory (``torch.cuda.max_memory_allocated``) of a random-weight 3D network
  predicting one tile-sized volume whole, a volume of 2x the tile per axis in tiles, and that volume
  whole; and the largest difference between the tiled and the whole raw output.

    EMBEDSEG_REFERENCE=/path/to/folder/with/EmbedSeg python benchmarks/bench_gpu.py \
        [--data tests/data/cells2d_bbbc007] [--train-seconds 60] [--sections cluster,train,train3d,tiling] \
        [--batch3d auto,16x1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from _common import add_reference_option, median_times
from bench_clustering import clustering_cases, reference_clusterers, same_up_to_relabelling
from bench_quality import list_names, read_pairs, score, split_names

from embedseg_service.core.device import resolve_device
from embedseg_service.core.inference.clustering import cluster
from embedseg_service.core.metrics import average_precision

ROOT = Path(__file__).resolve().parents[1]
DEVICE = torch.device("cuda")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _peak_mib(base: int = 0) -> float:
    """Peak CUDA memory allocated since the last reset, above ``base`` bytes (0 on the CPU)."""
    return (torch.cuda.max_memory_allocated() - base) / 2**20 if DEVICE.type == "cuda" else 0.0


def median_wall(fn, repeats: int):
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls after one warm-up call, and its result."""
    wall, _, out = median_times(fn, repeats, warm_up=True, sync=_sync)
    return wall, out


GUARD_RADIUS = 12.0
"""Seed radius limit (pixels) of the guarded clustering run, below the largest Gaussians of the cases."""


def section_cluster(args: argparse.Namespace) -> None:
    Cluster, Cluster_3d = reference_clusterers(args.reference)
    for name, _, raw, step, n_sigma, ref in clustering_cases(Cluster, Cluster_3d, str(DEVICE)):
        _cluster_case(name, raw, step, n_sigma, ref, args.repeats)


def _cluster_case(name: str, raw: np.ndarray, step, n_sigma: int, ref, repeats: int) -> None:
    cuda = DEVICE
    raw_gpu = torch.from_numpy(raw).to(cuda)
    raw_cpu = torch.from_numpy(raw)
    t_gpu, ours_gpu = median_wall(lambda: cluster(raw_gpu, step=step, min_size=36), repeats)
    t_cpu, ours_cpu = median_wall(lambda: cluster(raw_cpu, step=step, min_size=36, device="cpu"), repeats)
    t_ref, ref_out = median_wall(
        lambda: ref.cluster(raw_gpu, n_sigma=n_sigma, seed_thresh=0.9, fg_thresh=0.5, min_object_size=36),
        repeats,
    )
    ref_labels = ref_out.cpu().numpy().astype(np.int32)
    res = average_precision(ref_labels, ours_gpu, thresholds=[0.5, 0.9])
    guard = {"step": step, "min_size": 36, "max_radius": GUARD_RADIUS}
    guarded = [cluster(r, device=d, **guard) for r, d in ((raw_gpu, cuda), (raw_cpu, "cpu"))]
    print(
        f"{name}: objects ours cuda {int(ours_gpu.max())}, ours cpu {int(ours_cpu.max())}, "
        f"reference cuda {int(ref_labels.max())}\n"
        f"  cuda labels identical to cpu labels (up to relabelling): {same_up_to_relabelling(ours_cpu, ours_gpu)}\n"
        f"  with max_radius {GUARD_RADIUS}: objects cuda {int(guarded[0].max())}, cpu {int(guarded[1].max())}, "
        f"identical: {same_up_to_relabelling(guarded[1], guarded[0])}\n"
        f"  ours vs reference: AP0.5 {res.at(0.5).ap:.4f}, AP0.9 {res.at(0.9).ap:.4f}, identical: "
        f"{same_up_to_relabelling(ref_labels, ours_gpu)}\n"
        f"  wall: ours cuda {t_gpu * 1e3:.1f} ms, ours cpu {t_cpu * 1e3:.1f} ms, reference cuda "
        f"{t_ref * 1e3:.1f} ms, reference / ours (cuda) {t_ref / t_gpu:.1f}x",
        flush=True,
    )


class _Steps:
    """Progress callback that records the training's steps and epochs."""

    def __init__(self) -> None:
        self.last = None
        self.total = 0

    def __call__(self, p) -> bool:
        self.last = p
        self.total = p.epoch * p.steps_per_epoch + p.step
        return True


def _timed_train(images, masks, config, out: Path):
    """Train to ``out`` with a step-counting callback, the peak CUDA memory reset first; returns the
    result, the callback and the wall-clock seconds."""
    from embedseg_service.core.training.train import train

    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = _Steps()
    t0 = time.perf_counter()
    result = train(images, masks, config, out_path=out, progress=steps)
    return result, steps, time.perf_counter() - t0


def section_train(args: argparse.Namespace) -> None:
    data = Path(args.data)
    names = list_names(data)
    train_names, _, test_names = split_names(names, None)
    images, masks = read_pairs(data, train_names)
    test_images, test_masks = read_pairs(data, test_names)
    print(f"device auto -> {resolve_device('auto')}; {len(train_names)} training images, {len(test_names)} test images")
    for amp in {"on": [True], "off": [False], "both": [True, False]}[args.amp]:
        _train_and_score(args, amp, images, masks, test_images, test_masks, test_names)


def _train_and_score(args, amp: bool, images, masks, test_images, test_masks, test_names) -> None:
    from embedseg_service.core.model.checkpoint import load_model
    from embedseg_service.core.training.train import TrainConfig

    config = TrainConfig(
        spatial_dims=2, epochs=10**6, max_time_minutes=args.train_seconds / 60.0, seed=args.seed, amp=amp
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.pt"
        result, steps, wall = _timed_train(images, masks, config, out)
        p = steps.last
        print(
            f"amp {'on' if amp else 'off'}: trained {wall:.1f} s wall: epoch {p.epoch}, {steps.total} steps, "
            f"{wall / max(steps.total, 1):.3f} s per step (validation included), best epoch {result.best_epoch} "
            f"{result.best_metrics}, stopped: {result.stopped}, peak CUDA "
            f"{_peak_mib():.0f} MiB",
            flush=True,
        )
        model = load_model(out, device="auto")
        print(f"checkpoint loaded on {model.device}; amp in config: {model.config.get('amp')}")
        labels_gpu = {}
        for tta in (False, True):
            t0 = time.perf_counter()
            preds = [model.segment(im, tta=tta) for im in test_images]
            dt = time.perf_counter() - t0
            s = score(test_masks, preds, test_names)
            labels_gpu[tta] = preds
            print(
                f"held-out ({'TTA' if tta else 'no TTA'}, cuda): AP0.5 {s['ap50']:.3f}, mAP {s['mean_ap']:.3f}, "
                f"{dt / len(test_images):.2f} s per image",
                flush=True,
            )
        cpu_model = load_model(out, device="cpu")
        t0 = time.perf_counter()
        cpu_preds = [cpu_model.segment(im, tta=False) for im in test_images]
        dt = time.perf_counter() - t0
        agree = [average_precision(g, c, thresholds=[0.5]).at(0.5).ap for g, c in zip(labels_gpu[False], cpu_preds)]
        s = score(test_masks, cpu_preds, test_names)
        print(
            f"GPU-trained checkpoint on the cpu: AP0.5 {s['ap50']:.3f}, mAP {s['mean_ap']:.3f}, "
            f"{dt / len(test_images):.2f} s per image; cpu labels vs cuda labels AP0.5 per image "
            f"{', '.join(f'{a:.3f}' for a in agree)}",
            flush=True,
        )


SPLIT_ROW_3D = 46
"""Rows of the 3D volume's Y axis given to training; the rest are segmented (as in the 3D e2e test)."""


def section_train3d(args: argparse.Namespace) -> None:
    """3D training on the synthetic nuclei volume, one run per ``--batch3d`` setting (``BxM``: physical
    batch B, virtual multiplier M; ``auto`` for the library's choice), each for ``--train-seconds``."""
    from embedseg_service.core.data.io import read_tiff
    from embedseg_service.core.model.checkpoint import load_model
    from embedseg_service.core.training.train import TrainConfig, choose_batch

    folder = ROOT / "tests" / "data" / "nuclei3d_synthetic"
    name = "synthetic_img3d.tif"
    image = read_tiff(folder / "images" / name).data
    mask = read_tiff(folder / "masks" / name).data
    test_image, test_mask = image[:, SPLIT_ROW_3D:], mask[:, SPLIT_ROW_3D:]
    for setting in args.batch3d.split(","):
        batch, m = (None, None) if setting == "auto" else (int(v) for v in setting.split("x"))
        config = TrainConfig(spatial_dims=3, epochs=10**6, max_time_minutes=args.train_seconds / 60.0,
                             seed=args.seed, batch_size=batch, virtual_batch=m)  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "model.pt"
            result, steps, wall = _timed_train(image[:, :SPLIT_ROW_3D], mask[:, :SPLIT_ROW_3D], config, out)
            model = load_model(out, device="auto")
            chosen = "x".join(map(str, choose_batch(3, model.properties["crop_shape"], batch, m)))
            print(
                f"3D batch {setting} -> {chosen}, crops {model.properties['crop_shape']}: {wall:.1f} s wall, "
                f"epoch {steps.last.epoch}, {steps.total} optimiser steps, {wall / max(steps.total, 1):.3f} s per step "
                f"(validation included), best epoch {result.best_epoch} {result.best_metrics}, "
                f"peak CUDA {_peak_mib():.0f} MiB",
                flush=True,
            )
            for tta in (False, True):
                labels = model.segment(test_image, tta=tta, tile=None)
                res = average_precision(test_mask, labels)
                print(
                    f"  held-out rows ({'TTA' if tta else 'no TTA'}): AP0.5 {res.at(0.5).ap:.3f}, mean AP "
                    f"{float(np.mean(res.ap)):.3f}, {int(labels.max())} objects for "
                    f"{len(np.unique(test_mask)) - 1}",
                    flush=True,
                )


def section_tiling(_args: argparse.Namespace) -> None:
    from embedseg_service.core.inference.predict import predict_raw
    from embedseg_service.core.model.erfnet import BranchedERFNet

    cuda = DEVICE
    tile = (32, 128, 128)
    torch.manual_seed(0)
    net = BranchedERFNet(3).to(cuda).eval()
    rng = np.random.default_rng(0)
    small = rng.random(tile).astype(np.float32)
    large = rng.random(tuple(2 * t for t in tile)).astype(np.float32)
    rows = {}
    for name, image, tiling in (("one tile, whole", small, None), ("8x volume, tiled", large, tile),
                                ("8x volume, whole", large, None)):  # fmt: skip
        base = 0
        if cuda.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        raw = predict_raw(net, image, device=cuda, tile=tiling)
        _sync()
        dt = time.perf_counter() - t0
        peak = _peak_mib(base)
        rows[name] = raw
        print(
            f"{name:18} {'x'.join(map(str, image.shape)):>12}: peak CUDA above the model {peak:8.0f} MiB, {dt:.2f} s",
            flush=True,
        )
    diff = float(np.abs(rows["8x volume, tiled"] - rows["8x volume, whole"]).max())
    print(f"max |tiled - whole| raw output on the 8x volume: {diff:.3g}", flush=True)


SECTIONS = {"cluster": section_cluster, "train": section_train, "train3d": section_train3d, "tiling": section_tiling}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_reference_option(parser)
    parser.add_argument("--data", default=str(ROOT / "tests" / "data" / "cells2d_bbbc007"))
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", choices=("on", "off", "both"), default="on", help="mixed-precision training")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch3d", default="auto,16x1", help="train3d settings: BxM or auto, comma-separated")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--device", default="cuda", help="cuda (default); cpu only to try the script out")
    args = parser.parse_args()
    global DEVICE
    DEVICE = resolve_device(args.device)
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, {name}, CUDA {torch.version.cuda}", flush=True)
    failed = []
    for name in args.sections.split(","):
        print(f"\n== {name}", flush=True)
        try:
            SECTIONS[name](args)
        except Exception:  # report and go on with the other sections
            traceback.print_exc()
            failed.append(name)
    if failed:
        sys.exit(f"failed sections: {', '.join(failed)}")


if __name__ == "__main__":
    main()
