"""Quality at an equal CPU budget: this project's training against the reference EmbedSeg 0.2.5's.

Both implementations train on the same real 2D images or 3D stacks (``--dims``) for the same process
CPU time (default 15 CPU-minutes, one torch thread each), for each seed, and segment the same
held-apart images, which are scored by this project's ``embedseg_service.core.metrics`` for both (identical metric
code).

- Split: image names sorted; every 4th (the 1st, 5th, 9th, ...) is held apart for testing
  (``--test-names`` overrides), unless some names start with ``test_``: then those are the test
  images and names starting with ``val_`` the validation images (as in the few-slice 3D stand-ins
  of ``tests/data``). ``--test-names`` / ``--val-names`` take comma-separated names or shell patterns
  (``'test_*'``). With validation images named, both implementations validate on exactly those;
  otherwise each holds out its own from the rest, as its users would.
- 3D (``--dims 3``): the voxel size (Z, Y, X) comes from ``--voxel-size`` or else the files' metadata
  (all files must agree; none stated means isotropic). Ours gets it as ``TrainConfig.voxel_size``;
  the reference gets Z / X as its ``anisotropy_factor`` and runs its 3D notebooks' pipeline, with
  its crops capped at the depth of its loss grid (the test stacks' depth rounded up to 8) and stacks
  thinner than a crop padded to the crop's depth for crop generation only (a 5-slice stack becomes
  8 slices for 8-slice crops); see ``reference_training.py``. Scores use the 3D thresholds.
- Ours: ``embedseg_service.core.training.train.train`` with ``TrainConfig(spatial_dims=D, epochs=10**6, seed=s,
  device="cpu")`` and every other option at its default (data-derived crop size, ...) unless ``--ours-option
  KEY=VALUE`` sets it (repeatable, e.g. ``random_crops=1.0``). ``--ours-budget callback``
  (default): the progress callback stops training on the budget. ``--ours-budget clock``: the
  project's own budget handling (``max_time_minutes``: learning-rate decay over the budget,
  validation cadence, stopping in time to validate) with ``train``'s ``clock`` reading process CPU time;
  the callback still stops at the budget. Test images are segmented through the checkpoint's
  ``TrainedModel.segment`` (default tiling), without and with TTA.
- Reference: ``benchmarks/reference_training.py`` runs its 2D or 3D notebooks' pipeline with its
  own functions (split, data properties, crops, ``begin_training``, ``begin_evaluating``); see there.
- Budget: ``time.process_time()`` of the training process (one thread, data loading in-process),
  counted from the start of data preparation (ours: the ``train`` call; reference: its split, data
  properties and crop generation) to the end of training, validation and checkpoint saving
  included. Under ``callback`` both follow one rule: an epoch starts only while the previous
  epoch's CPU time fits in what is left, a batch only while the previous batch's time fits.
- Score: AP_dsb per test image (``embedseg_service.core.metrics.average_precision``) at IoU 0.50, 0.55 ... 0.90 in 2D,
  0.1, 0.2 ... 0.9 in 3D (``embedseg_service.core.metrics.default_thresholds``), averaged over the test images (images
  with neither objects nor predictions left out); "mAP" is the mean of the 9 thresholds, "AP0.5" the
  value at IoU 0.5. The table also gives each run's optimiser steps and median CPU seconds per step.
  Target: every seed of ours has AP0.5 and mAP at least the reference's best seed (checked without
  and with TTA).

Usage::

    EMBEDSEG_REFERENCE=/path/to/folder/with/EmbedSeg python benchmarks/bench_quality.py \
        --data DIR --out runs/ [--minutes 15] [--seeds 0,1,2] [--jobs 2] [--impl both]
    EMBEDSEG_REFERENCE=... python benchmarks/bench_quality.py --dims 3 \
        --data tests/data/nuclei3d_fewslice_synthetic --out runs3d/ [--voxel-size 1.0,0.2,0.2]

``DIR`` holds ``images/<name>.tif`` and ``masks/<name>.tif``. Each (implementation, seed) run keeps
its JSON records, checkpoint and predictions under ``--out``; runs whose ``result.json`` exists are
skipped (``--rescore`` re-segments and re-scores them from their checkpoints).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from _common import CpuBudget, add_reference_option, median, reference_folder

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_DATA = {
    2: ROOT / "tests" / "data" / "cells2d_bbbc007",
    3: ROOT / "tests" / "data" / "nuclei3d_fewslice_synthetic",
}
OURS_EPOCHS = 10**6
"""Epochs given to ours: far more than fit, so that the budget ends training."""
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------------------
# data and scoring


def list_names(data: Path) -> list[str]:
    """Sorted names that have both ``images/<name>.tif`` and ``masks/<name>.tif``."""
    names = sorted(p.stem for p in (data / "images").glob("*.tif") if (data / "masks" / p.name).exists())
    if not names:
        sys.exit(f"no images/<name>.tif with masks/<name>.tif found under {data}")
    return names


def _select(names: list[str], patterns: str, option: str) -> list[str]:
    """The names matching any of the comma-separated names or shell patterns (sorted order)."""
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    unmatched = [p for p in wanted if not fnmatch.filter(names, p)]
    if unmatched:
        sys.exit(f"{option} not in the data folder: {', '.join(unmatched)}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in wanted)]


def split_names(
    names: list[str], test_names: str | None, val_names: str | None = None
) -> tuple[list[str], list[str] | None, list[str]]:
    """(training names, validation names or None, test names); see the module docstring for the rule."""
    if test_names is None and any(n.startswith("test_") for n in names):
        test_names = "test_*"
        if val_names is None and any(n.startswith("val_") for n in names):
            val_names = "val_*"
    test = _select(names, test_names, "--test-names") if test_names else names[::4]
    val = _select(names, val_names, "--val-names") if val_names else None
    if val and set(val) & set(test):
        sys.exit(f"images both in validation and test: {', '.join(sorted(set(val) & set(test)))}")
    train = [n for n in names if n not in test and n not in (val or [])]
    if len(train) < (1 if val else 2) or not test:
        need = 1 if val else 2
        sys.exit(f"need at least {need} training image(s) and 1 test image, got {len(train)} and {len(test)}")
    return train, val, test


def voxel_size_of(data: Path, names: list[str], given: str | None) -> list[float] | None:
    """The voxel size (Z, Y, X) from ``given`` ("Z,Y,X") or else the files' common metadata (None: not stated)."""
    from embedseg_service.core.data.io import inspect_tiff

    if given:
        values = [float(v) for v in given.split(",")]
        if len(values) != 3 or not all(v > 0 for v in values):
            sys.exit(f"--voxel-size takes three positive numbers Z,Y,X, got {given!r}")
        return values
    stated = {inspect_tiff(data / "images" / f"{n}.tif").voxel_size for n in names}
    if len(stated) > 1:
        sys.exit(f"the images state different voxel sizes {sorted(map(str, stated))}; pass --voxel-size Z,Y,X")
    found = stated.pop()
    return [float(v) for v in found] if found is not None else None


def read_pairs(data: Path, names: list[str]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    from embedseg_service.core.data.io import read_tiff

    images = [read_tiff(data / "images" / f"{n}.tif").data for n in names]
    masks = [read_tiff(data / "masks" / f"{n}.tif").data for n in names]
    return images, masks


def score(gts: list[np.ndarray], preds: list[np.ndarray], names: list[str]) -> dict[str, Any]:
    """AP_dsb per threshold (2D 0.50..0.90, 3D 0.1..0.9) as the mean over test images; ``ap50`` at IoU 0.5,
    ``mean_ap`` over the thresholds."""
    from embedseg_service.core.metrics import default_thresholds, evaluate_dataset

    thresholds = default_thresholds(gts[0].ndim)
    at50 = thresholds.index(0.5)
    result = evaluate_dataset(list(zip(gts, preds)), thresholds, names=names)
    return {
        "thresholds": result.thresholds,
        "ap": result.ap,
        "ap50": result.ap[at50],
        "mean_ap": float(np.mean(result.ap)),
        "images": {
            im.name: {"ap50": im.results[at50].ap, "n_gt": im.n_gt, "n_pred": im.n_pred} for im in result.images
        },
    }


# --------------------------------------------------------------------------------------------
# workers (one subprocess per implementation and seed)


class _OursProgress(CpuBudget):
    """Progress callback of ``embedseg_service.core.train``: times steps and epochs in process CPU seconds
    and stops training on the budget (``stop_epochs``: also stop at an epoch end when another epoch would not fit)."""

    def __init__(self, start: float, budget_s: float, stop_epochs: bool) -> None:
        super().__init__(start, budget_s)
        self.stop_epochs = stop_epochs
        self.setup_s: float | None = None
        self.epoch_start = 0.0
        self.last = 0.0
        self.stop_reason: str | None = None
        self.steps_per_epoch: int | None = None

    def __call__(self, info: Any) -> bool:
        t = self.now()
        self.steps_per_epoch = info.steps_per_epoch
        if info.step > 0:
            step = t - self.last
            self.step_s.append(step)
            self.last = t
            if not self.fits(t, step):
                self.stop_reason = "budget spent within an epoch"
                return False
        elif info.message.startswith("data-derived"):
            self.setup_s = self.epoch_start = self.last = t
        elif info.message.startswith("epoch "):
            cost = t - self.epoch_start
            self.epoch_s.append(cost)
            self.epoch_val_s.append(t - self.last)
            self.epoch_start = self.last = t
            if self.stop_epochs and not self.fits(t, cost):
                self.stop_reason = "next epoch does not fit"
                return False
        return True


def ours_options(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` strings as ``TrainConfig`` overrides; values are read as JSON where they parse."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            sys.exit(f"--ours-option takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _ours_train(
    args: argparse.Namespace, seed: int, run: Path, train_names: list[str], val_names: list[str] | None
) -> dict[str, Any]:
    from embedseg_service.core.training.train import TrainConfig, train

    images, masks = read_pairs(Path(args.data), train_names)
    val_images, val_masks = read_pairs(Path(args.data), val_names) if val_names else (None, None)
    budget_s = args.minutes * 60.0
    extra: dict[str, Any] = {}
    clock = time.monotonic
    if args.ours_budget == "clock":
        extra["max_time_minutes"] = args.minutes
        clock = time.process_time  # its budget clock: CPU time
    if args.dims == 3 and args.voxel_size:
        extra["voxel_size"] = tuple(args.voxel_size)
    extra.update(ours_options(args.ours_option))
    config = TrainConfig(spatial_dims=args.dims, epochs=OURS_EPOCHS, seed=seed, device="cpu", **extra)
    start = time.process_time()
    progress = _OursProgress(start, budget_s, stop_epochs=args.ours_budget == "callback")
    result = train(images, masks, config, out_path=run / "model.pt", progress=progress,
                   val_images=val_images, val_masks=val_masks, clock=clock)  # fmt: skip
    cpu_s = time.process_time() - start
    return {
        "cpu_s": cpu_s,
        "prep_cpu_s": progress.setup_s,
        "steps": len(progress.step_s),
        "steps_per_epoch": progress.steps_per_epoch,
        "epochs": result.epochs_completed,
        "stopped": progress.stop_reason or result.stopped,
        "best_epoch": result.best_epoch,
        "best_metrics": result.best_metrics,
        "step_s": progress.step_s,
        "epoch_s": progress.epoch_s,
        "epoch_val_s": progress.epoch_val_s,
        "checkpoint": "model.pt",
        "properties": result.properties,
        "config": config.to_dict(),
        "budget_mode": args.ours_budget,
        "ours_options": ours_options(args.ours_option),
    }


def _ours_predict(args: argparse.Namespace, run: Path, record: dict[str, Any], test_names: list[str], tta: bool):
    from embedseg_service.core.data.tiff_write import write_labels
    from embedseg_service.core.model.checkpoint import load_model

    images, _ = read_pairs(Path(args.data), test_names)
    model = load_model(run / record["checkpoint"], device="cpu")
    out = run / f"predictions_tta{int(tta)}"
    out.mkdir(exist_ok=True)
    t0 = time.process_time()
    predictions = {}
    for name, image in zip(test_names, images):
        predictions[name] = model.segment(image, tta=tta)
        write_labels(out / f"{name}.tif", predictions[name])
    return predictions, None, time.process_time() - t0


def _setting(args: argparse.Namespace, val_names: list[str] | None) -> dict[str, Any]:
    """What a run's record must share with the current options to be reused (beyond budget and split)."""
    return {"dims": args.dims, "voxel_size": args.voxel_size if args.dims == 3 else None, "given_val_names": val_names}


def _check_record(
    record: dict[str, Any], args: argparse.Namespace, test_names: list[str], val_names: list[str] | None, path: Path
) -> None:
    """Refuse to reuse a run made with another budget, split, dimensionality, voxel size or (ours) budget
    handling or options."""
    mode = record.get("budget_mode", args.ours_budget)
    options = record.get("ours_options", {}) if "budget_mode" in record else ours_options(args.ours_option)
    setting = {"dims": record.get("dims", 2), "voxel_size": record.get("voxel_size"),
               "given_val_names": record.get("given_val_names")}  # fmt: skip
    if (
        abs(record["budget_s"] - args.minutes * 60.0) > 1e-6
        or record["test_names"] != test_names
        or (mode != args.ours_budget)
        or options != ours_options(args.ours_option)
        or setting != _setting(args, val_names)
    ):
        sys.exit(f"{path} was made with a budget of {record['budget_s'] / 60:g} CPU min, test images "
                 f"{record['test_names']}, --ours-budget {mode}, ours options {options} and {setting}; "
                 "use another --out for other settings")  # fmt: skip


def worker(args: argparse.Namespace, impl: str, seed: int) -> None:
    """Train (unless ``train.json`` exists), then segment and score the test images; writes ``result.json``."""
    import torch
    from reference_training import import_reference, predict_reference, save_json, train_reference

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    data = Path(args.data)
    train_names, val_names, test_names = split_names(list_names(data), args.test_names, args.val_names)
    run = Path(args.out) / f"{impl}-seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    train_json = run / "train.json"
    ref = import_reference(args.reference) if impl == "reference" else None
    if train_json.exists():
        record = json.loads(train_json.read_text())
        _check_record(record, args, test_names, val_names, train_json)
    else:
        if impl == "ours":
            record = _ours_train(args, seed, run, train_names, val_names)
        else:
            vs = args.voxel_size
            record = train_reference(ref, data, train_names, test_names, seed, args.minutes * 60.0, run / "work",
                                     dims=args.dims, val_names=val_names,
                                     anisotropy=vs[0] / vs[2] if args.dims == 3 and vs else 1.0)  # fmt: skip
        record.update(impl=impl, seed=seed, budget_s=args.minutes * 60.0, train_names=train_names,
                      test_names=test_names, torch_threads=torch.get_num_threads(),
                      **_setting(args, val_names))  # fmt: skip
        save_json(train_json, record)
    print(f"[{impl} seed {seed}] trained: {record['steps']} steps, {record['epochs']} epochs, "
          f"{record['cpu_s'] / 60:.2f} CPU min, stopped: {record['stopped']}", flush=True)  # fmt: skip

    _, gts = read_pairs(data, test_names)
    record["scores"] = {}
    for tta in (False, True):
        key = "tta" if tta else "plain"
        if not record.get("checkpoint"):
            predictions = {n: np.zeros_like(g) for n, g in zip(test_names, gts)}
            own, cpu_s = None, 0.0
        elif impl == "ours":
            predictions, own, cpu_s = _ours_predict(args, run, record, test_names, tta)
        else:
            predictions, own, cpu_s = predict_reference(ref, record, run / "work", tta)
        missing = sorted(set(test_names) - set(predictions))
        if missing:
            raise RuntimeError(f"{impl} wrote no prediction for {', '.join(missing)}")
        entry = score(gts, [predictions[n].astype(np.int64) for n in test_names], test_names)
        entry.update(own_ap50=own, predict_cpu_s=cpu_s)
        record["scores"][key] = entry
    save_json(run / "result.json", record)


# --------------------------------------------------------------------------------------------
# driver


def _launch(args: argparse.Namespace, impl: str, seed: int, log: Path) -> tuple[str, int, int]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, str(seed), "--data", str(args.data),
           "--out", str(args.out), "--minutes", str(args.minutes), "--ours-budget", args.ours_budget,
           "--dims", str(args.dims)]  # fmt: skip
    if args.test_names:
        cmd += ["--test-names", args.test_names]
    if args.val_names:
        cmd += ["--val-names", args.val_names]
    if args.voxel_size:
        cmd += ["--voxel-size", ",".join(repr(v) for v in args.voxel_size)]
    for item in args.ours_option or []:
        cmd += ["--ours-option", item]
    if args.reference:
        cmd += ["--reference", args.reference]
    env = dict(os.environ, **ONE_THREAD)
    with open(log, "a") as handle:
        done = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False)
    return impl, seed, done.returncode


def _table(results: list[dict[str, Any]]) -> None:
    thresholds = results[0]["scores"]["plain"]["thresholds"]
    print(f"AP_dsb over the test images; mAP: mean over IoU {thresholds[0]:g}..{thresholds[-1]:g} "
          f"({len(thresholds)} thresholds); s/step: median CPU seconds per optimiser step")  # fmt: skip
    head = (f"{'impl':>9} {'seed':>4} {'steps':>6} {'s/step':>7} {'epochs':>6} {'CPU min':>7} {'AP0.5':>6} "
            f"{'mAP':>6} {'AP0.5 TTA':>9} {'mAP TTA':>7}  checkpoint / stop")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in results:
        plain, tta = r["scores"]["plain"], r["scores"]["tta"]
        chosen = f"best epoch {r['best_epoch']}" if r["impl"] == "ours" else f"{r['checkpoint_kind']}"
        print(f"{r['impl']:>9} {r['seed']:>4} {r['steps']:>6} {median(r['step_s']):>7.2f} {r['epochs']:>6} "
              f"{r['cpu_s'] / 60:>7.2f} {plain['ap50']:>6.3f} {plain['mean_ap']:>6.3f} {tta['ap50']:>9.3f} "
              f"{tta['mean_ap']:>7.3f}  {chosen}; {r['stopped']}")  # fmt: skip


def _timing(results: list[dict[str, Any]]) -> None:
    print("\nper-epoch CPU time (medians over each run's completed epochs; one thread):")
    for r in results:
        step = median(r["step_s"])
        val = median(r["epoch_val_s"])
        if not step > 0:
            print(f"  {r['impl']:>9} seed {r['seed']}: no complete training step")
            continue
        plain, tta = r["scores"]["plain"]["predict_cpu_s"], r["scores"]["tta"]["predict_cpu_s"]
        print(f"  {r['impl']:>9} seed {r['seed']}: train step {step:.3f} s ({1 / step:.2f} steps/s), "
              f"{r.get('steps_per_epoch')} steps/epoch, epoch {median(r['epoch_s']):.1f} s "
              f"(validation{' + save' if r['impl'] == 'ours' else ''} {val:.1f} s), "
              f"preparation before the first epoch {r['prep_cpu_s'] or 0:.1f} s; segmenting the test images "
              f"{plain:.1f} s, with TTA {tta:.1f} s")  # fmt: skip


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def _verdict(results: list[dict[str, Any]]) -> None:
    ours = [r for r in results if r["impl"] == "ours"]
    ref = [r for r in results if r["impl"] == "reference"]
    if not ours or not ref:
        return
    print("\nverdict (target: every seed of ours >= the reference's best seed):")
    met = True
    thresholds = results[0]["scores"]["plain"]["thresholds"]
    map_name = f"mAP {thresholds[0]:g}-{thresholds[-1]:g}"
    for key, label in (("plain", "without TTA"), ("tta", "with TTA")):
        for metric, name in (("ap50", "AP0.5"), ("mean_ap", map_name)):
            o = [r["scores"][key][metric] for r in ours]
            f = [r["scores"][key][metric] for r in ref]
            ok = min(o) >= max(f)
            met &= ok
            print(f"  {label:>11} {name:>12}: ours worst {min(o):.3f} / mean {np.mean(o):.3f}; reference best "
                  f"{max(f):.3f} / mean {np.mean(f):.3f}; ratio worst/best {_ratio(min(o), max(f))}, mean/mean "
                  f"{_ratio(float(np.mean(o)), float(np.mean(f)))} -> {'met' if ok else 'NOT met'}")  # fmt: skip
    scores = [r["scores"][key][metric] for r in results for key in ("plain", "tta") for metric in ("ap50", "mean_ap")]
    if not any(scores):
        print("  overall: no verdict: every score is 0 (too short a budget to compare)")
    else:
        print(f"  overall: {'TARGET MET' if met else 'TARGET NOT MET'}")


def _describe_data(
    args: argparse.Namespace, data: Path
) -> tuple[list[str], list[str] | None, list[str], list[np.ndarray]]:
    """Split the data, resolve ``args.voxel_size`` (3D) and print both; returns the split and the test masks."""
    names = list_names(data)
    train_names, val_names, test_names = split_names(names, args.test_names, args.val_names)
    print(f"data {data}: {len(names)} {'stacks' if args.dims == 3 else 'images'}")
    print(f"  test (held apart): {', '.join(test_names)}")
    if val_names:
        print(f"  training: {', '.join(train_names)}; validation (both): {', '.join(val_names)}")
    else:
        print(f"  training + validation: {', '.join(train_names)}")
    _, gts = read_pairs(data, test_names)
    if any(g.ndim != args.dims for g in gts):
        sys.exit(f"--dims {args.dims} but the test masks have shapes {[g.shape for g in gts]}")
    args.voxel_size = voxel_size_of(data, names, args.voxel_size) if args.dims == 3 else None
    if args.dims == 3:
        vs = args.voxel_size
        print(f"  voxel size (Z, Y, X): {vs or 'not stated (isotropic)'}; anisotropy Z/X "
              f"{vs[0] / vs[2] if vs else 1.0:.3g}; stack shapes {sorted({g.shape for g in gts})} (test)")  # fmt: skip
    return train_names, val_names, test_names, gts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, choices=(2, 3), default=2, help="2D images or 3D stacks")
    parser.add_argument("--data", default=None, help="folder with images/ and masks/ (TIFFs; default: "
                        "tests/data/cells2d_bbbc007 in 2D, tests/data/nuclei3d_fewslice_synthetic in 3D)")  # fmt: skip
    parser.add_argument("--test-names", default=None,
                        help="comma-separated test image names or patterns (default: see the description)")  # fmt: skip
    parser.add_argument("--val-names", default=None,
                        help="comma-separated validation image names or patterns, used by both (default: see the "
                        "description)")  # fmt: skip
    parser.add_argument("--voxel-size", default=None, metavar="Z,Y,X",
                        help="3D voxel size (default: from the files' metadata); sets the anisotropy")  # fmt: skip
    parser.add_argument("--minutes", type=float, default=15.0, help="CPU minutes of training per run")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each one process, one thread)")
    parser.add_argument("--impl", choices=("ours", "reference", "both"), default="both")
    parser.add_argument("--out", default=None, help="folder for the runs' records (default: a new temporary one)")
    add_reference_option(parser)
    parser.add_argument("--ours-budget", choices=("callback", "clock"), default="callback",
                        help="how ours keeps to the budget (see the description)")  # fmt: skip
    parser.add_argument(
        "--ours-option",
        action="append",
        metavar="KEY=VALUE",
        help="TrainConfig field for ours, e.g. random_crops=1.0 (repeatable; values read as JSON)",
    )
    parser.add_argument("--rescore", action="store_true", help="segment and score again from saved checkpoints")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.minutes > 0:
        sys.exit("--minutes must be positive")
    args.data = str(Path(args.data or DEFAULT_DATA[args.dims]).resolve())
    if args.worker:
        args.voxel_size = [float(v) for v in args.voxel_size.split(",")] if args.voxel_size else None
        worker(args, args.worker[0], int(args.worker[1]))
        return
    impls = ["ours", "reference"] if args.impl == "both" else [args.impl]
    if "reference" in impls:
        args.reference = reference_folder(args.reference)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.out = str(Path(args.out or tempfile.mkdtemp(prefix="bench_quality_")).resolve())
    Path(args.out).mkdir(parents=True, exist_ok=True)

    data = Path(args.data)
    train_names, val_names, test_names, gts = _describe_data(args, data)
    check = score(gts, [g.astype(np.int64) for g in gts], test_names)
    print(f"  scoring check, test masks against themselves: AP0.5 {check['ap50']:.3f}, mAP {check['mean_ap']:.3f}")
    print(f"budget {args.minutes:g} CPU min per run, seeds {seeds}, {args.jobs} run(s) at once, one thread each; "
          f"ours keeps to it by: {args.ours_budget}; records in {args.out}")  # fmt: skip

    runs = []
    for impl in impls:
        for seed in seeds:
            run = Path(args.out) / f"{impl}-seed{seed}"
            if args.rescore and (run / "result.json").exists():
                (run / "result.json").unlink()
            if (run / "result.json").exists():
                _check_record(json.loads((run / "result.json").read_text()), args, test_names, val_names, run)
                print(f"  {impl} seed {seed}: result exists, skipped")
                continue
            run.mkdir(parents=True, exist_ok=True)
            runs.append((impl, seed, run / "log.txt"))
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(_launch, args, impl, seed, log) for impl, seed, log in runs]
        for future in futures:
            impl, seed, code = future.result()
            log = Path(args.out) / f"{impl}-seed{seed}" / "log.txt"
            if code != 0:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                sys.exit(f"{impl} seed {seed} failed (exit {code}); end of {log}:\n{tail}")
            print(f"  {impl} seed {seed}: done ({(time.monotonic() - t0) / 60:.1f} min wall so far)", flush=True)

    results = []
    for impl in impls:
        for seed in seeds:
            results.append(json.loads((Path(args.out) / f"{impl}-seed{seed}" / "result.json").read_text()))
    print()
    _table(results)
    for r in results:
        if r["impl"] == "reference":
            own = r["scores"]["plain"]["own_ap50"]
            own_tta = r["scores"]["tta"]["own_ap50"]
            fmt = "n/a" if own is None else f"{own:.3f}"
            fmt_tta = "n/a" if own_tta is None else f"{own_tta:.3f}"
            padded = r.get("padded_for_crops")
            print(f"  reference seed {r['seed']}: its own test.py AP_dsb@0.5 {fmt} (TTA {fmt_tta}); "
                  f"validation images {', '.join(r['val_names'])}; crops {r['crop_size']} px, "
                  f"{r['train_crops']} train / {r['val_crops']} val"
                  f"{f', stacks padded for crops to {padded}' if padded else ''}; first-epoch estimate "
                  f"{r['first_epoch_estimate']} epochs; best val IoU {r['best_val_iou']}")  # fmt: skip
        else:
            props = r["properties"]
            print(f"  ours seed {r['seed']}: crop {props.get('crop_shape')}, min object size "
                  f"{props.get('min_object_size')}, best validation (epoch {r['best_epoch']}) AP0.5 "
                  f"{r['best_metrics'].get('val_ap')} / mean AP {r['best_metrics'].get('val_map')} / "
                  f"oracle IoU {r['best_metrics'].get('val_iou')}")  # fmt: skip
    _timing(results)
    _verdict(results)


if __name__ == "__main__":
    main()
