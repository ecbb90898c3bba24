"""``embedseg evaluate GT PRED``: AP_dsb table (or JSON) of predictions against ground truth, at the IoU
thresholds given or the default ones of the labels' dimensionality
(:func:`embedseg_service.core.metrics.default_thresholds`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embedseg_service.core.cli import arguments
from embedseg_service.core.cli.files import CommandError, match_by_name, progress_bar, read


def evaluate_pairs(pairs: Sequence[tuple[str, Path, Path]], thresholds: Sequence[float] | None) -> dict[str, Any]:
    """AP_dsb per threshold for each ``(name, gt_file, pred_file)`` and the mean over images.

    Returns ``{"thresholds", "ap", "pooled", "n_images", "n_empty", "images": [row per image]}``.
    """
    from embedseg_service.core.metrics import aggregate, average_precision, default_thresholds

    results = []
    chosen: tuple[float, ...] | None = tuple(thresholds) if thresholds else None
    bar = progress_bar(iterable=list(pairs), desc="evaluate", unit="image", disable=len(pairs) < 2)
    for name, gt_path, pred_path in bar:
        gt = read(gt_path)
        pred = read(pred_path)
        if gt.axes.startswith("C") or pred.axes.startswith("C"):
            raise CommandError(f"{name}: label images must have no channel axis (got {gt.axes} and {pred.axes})")
        if gt.data.shape != pred.data.shape:
            raise CommandError(
                f"{name}: ground truth shape {gt.data.shape} and prediction shape {pred.data.shape} differ"
            )
        if chosen is None:
            chosen = default_thresholds(gt.data.ndim)
        results.append(average_precision(gt.data, pred.data, chosen, name=name))
    return aggregate(results).to_dict()


def format_table(result: dict[str, Any]) -> str:
    """The AP table of :func:`evaluate_pairs`: one row per image and the mean."""
    thresholds = result["thresholds"]
    width = max([len("image"), len("mean")] + [len(str(r["name"])) for r in result["images"]])
    head = f"{'image':<{width}}  {'gt':>5} {'pred':>5}  " + " ".join(f"{t:>6.2f}" for t in thresholds)
    lines = [head, "-" * len(head)]
    for row in result["images"]:
        lines.append(
            f"{row['name']:<{width}}  {row['n_gt']:>5} {row['n_pred']:>5}  " + " ".join(f"{v:>6.3f}" for v in row["ap"])
        )
    lines.append("-" * len(head))
    lines.append(f"{'mean':<{width}}  {'':>5} {'':>5}  " + " ".join(f"{v:>6.3f}" for v in result["ap"]))
    if result.get("n_empty"):
        lines.append(f"({result['n_empty']} image(s) without objects in either file left out of the mean)")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``embedseg evaluate GT PRED``: AP_dsb table (or JSON) of predictions against ground truth."""
    gt, pred = Path(args.gt), Path(args.pred)
    if gt.is_file() != pred.is_file() and gt.exists() and pred.exists():
        raise CommandError("GT and PRED must both be files or both be folders")
    pairs = match_by_name(gt, pred, ("ground-truth", "prediction"))
    result = evaluate_pairs(pairs, args.thresholds)
    if args.json:
        print(json.dumps(result, default=_json_default))
    else:
        print(format_table(result))
    return 0


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, set)):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def add_parser(sub: Any) -> None:
    """The ``evaluate`` sub-command."""
    p = sub.add_parser("evaluate", help="AP of predicted labels against ground truth", description=cmd_evaluate.__doc__)
    p.add_argument("gt", metavar="GT", help="ground-truth label file or folder")
    p.add_argument("pred", metavar="PRED", help="predicted label file or folder (matched by name)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--thresholds", type=arguments.thresholds,
                   help="IoU thresholds, e.g. 0.5,0.75 (default by dimension)")  # fmt: skip
    p.set_defaults(func=cmd_evaluate)
