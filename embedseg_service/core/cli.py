"""The ``embedseg`` command line: ``train``, ``predict``, ``evaluate`` and plug-in sub-commands.

Plug-ins are entry points of the group ``embedseg.commands``; each names a
``register(subparsers)`` function that adds its sub-parser and sets ``func`` (called with the
parsed arguments, returning an exit code or ``None``). A plug-in that cannot be imported does
not break the built-in commands: it is listed with the reason and fails only when used.

Bad input ends with exit code 2 and a one-line message on stderr (no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

PLUGIN_GROUP = "embedseg.commands"
BUILTIN_COMMANDS = ("train", "predict", "evaluate")
TIFF_SUFFIXES = (".tif", ".tiff")
EXIT_USAGE = 2


class CommandError(Exception):
    """A user error: printed as one line, exit code 2."""


# --------------------------------------------------------------------------- argument types


def _int_list(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{what} is empty")
    return values


def _float_list(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"{what} is empty")
    return values


def _crop_size(text: str) -> str | int:
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--crop-size must be 'auto' or a multiple of 8, got {text!r}") from None
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"--crop-size must be a positive multiple of 8, got {value}")
    return value


def _tile(text: str) -> str | tuple[int, ...] | None:
    if text == "auto":
        return "auto"
    if text in ("none", "off"):
        return None
    values = _int_list(text, "--tile")
    if len(values) not in (2, 3) or any(v < 8 or v % 8 for v in values):
        raise argparse.ArgumentTypeError(
            f"--tile must be 'auto', 'none' or Y,X / Z,Y,X sizes, each a positive multiple of 8; got {text!r}"
        )
    return values


def _voxel_size(text: str) -> tuple[float, ...]:
    values = _float_list(text, "--voxel-size")
    if len(values) not in (2, 3) or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"--voxel-size must be 2 or 3 positive numbers (Z,Y,X or Y,X), got {text!r}")
    return values


def _thresholds(text: str) -> tuple[float, ...]:
    values = _float_list(text, "--thresholds")
    if any(not 0.0 < v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"--thresholds must lie in (0, 1], got {text!r}")
    return values


def _int_at_least(text: str, least: int, kind: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a {kind} integer, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _int_at_least(text, 1, "positive")


def _non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "non-negative")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), got {value}")
    return value


# --------------------------------------------------------------------------- files


def tiff_files(path: Path) -> list[Path]:
    """The TIFF files of a folder (sorted by name), or ``[path]`` for a file."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES)
        if not files:
            raise CommandError(f"no .tif/.tiff files in {path}")
        return files
    if path.is_file():
        return [path]
    raise CommandError(f"{path} does not exist")


def match_by_name(first: Path, second: Path, names: tuple[str, str]) -> list[tuple[str, Path, Path]]:
    """Pairs ``(name, file_a, file_b)`` of files with the same name (without .tif suffix).

    Two files are paired as they are; two folders are matched by name and every file of the
    first must have a partner in the second.
    """
    from embedseg_service.core.data.io import stem

    if first.is_file() and second.is_file():
        return [(stem(first), first, second)]
    a = {stem(p): p for p in tiff_files(first)}
    b = {stem(p): p for p in tiff_files(second)}
    missing = sorted(set(a) - set(b))
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise CommandError(f"no {names[1]} file for {len(missing)} {names[0]} file(s) in {second}: {shown}")
    return [(name, a[name], b[name]) for name in sorted(a)]


def _fmt_metric(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _read(path: Path) -> Any:
    from embedseg_service.core.data.io import read_tiff

    try:
        return read_tiff(path)
    except ValueError as exc:
        raise CommandError(f"{path}: {exc}") from None


def _progress_bar(**kwargs: Any) -> Any:
    from tqdm import tqdm

    return tqdm(file=sys.stderr, dynamic_ncols=True, **kwargs)


# --------------------------------------------------------------------------- train


def _load_pairs(images_dir: Path, masks_dir: Path, what: str) -> tuple[list, list, list[str], tuple | None]:
    pairs = match_by_name(images_dir, masks_dir, (f"{what} image", "mask"))
    images, masks, names = [], [], []
    voxel = None
    for name, image_path, mask_path in pairs:
        image = _read(image_path)
        mask = _read(mask_path)
        if mask.axes.startswith("C"):
            raise CommandError(f"{mask_path}: a mask must have no channel axis (got axes {mask.axes})")
        if image.spatial_shape != mask.spatial_shape:
            raise CommandError(
                f"{name}: image shape {image.spatial_shape} and mask shape {mask.spatial_shape} differ"
            )
        images.append(image.data)
        masks.append(mask.data)
        names.append(name)
        if voxel is None and image.voxel_size is not None:
            voxel = image.voxel_size
    return images, masks, names, voxel


def cmd_train(args: argparse.Namespace) -> int:
    """``embedseg train``: train a model on images and masks matched by file name."""
    from embedseg_service.core.training.train import TrainConfig, TrainProgress, train

    images, masks, names, file_voxel = _load_pairs(Path(args.images), Path(args.masks), "training")
    dims = args.dims or (masks[0].ndim)
    if any(m.ndim != dims for m in masks):
        raise CommandError(f"all masks must be {dims}D; got shapes {sorted({m.shape for m in masks})}")
    channels = {1 if im.ndim == dims else im.shape[0] for im in images}
    if len(channels) != 1:
        raise CommandError(f"all images need the same number of channels; got {sorted(channels)}")
    val_images = val_masks = None
    if (args.val_images is None) != (args.val_masks is None):
        raise CommandError("give both --val-images and --val-masks, or neither (then --val-fraction is held out)")
    if args.val_images is not None:
        val_images, val_masks, _, _ = _load_pairs(Path(args.val_images), Path(args.val_masks), "validation")
    voxel = args.voxel_size if args.voxel_size is not None else file_voxel
    if voxel is not None and len(voxel) != dims:
        if args.voxel_size is not None:
            raise CommandError(f"--voxel-size needs {dims} values for {dims}D data, got {len(voxel)}")
        voxel = None
    config = TrainConfig(
        spatial_dims=dims,
        epochs=args.epochs,
        max_time_minutes=args.max_time,
        batch_size=args.batch_size,
        samples_per_epoch=args.samples_per_epoch,
        crop_size=args.crop_size,
        center=args.center,
        seed=args.seed,
        device=args.device,
        amp=args.amp,
        val_fraction=args.val_fraction,
        selection_metric=args.selection_metric,
        voxel_size=voxel,
        in_channels=channels.pop(),
        min_object_size=args.min_object_size,
        foreground_weight=args.foreground_weight,
    )
    print(f"training a {dims}D model on {len(images)} image(s): {', '.join(names[:5])}{' …' if len(names) > 5 else ''}")
    bar = _progress_bar(total=1000, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
    shown = {"value": 0}

    def on_progress(info: TrainProgress) -> bool:
        if info.message:
            bar.write(info.message)
        target = int(round(info.fraction * 1000))
        if target > shown["value"]:
            bar.update(target - shown["value"])
            shown["value"] = target
        post = {"epoch": f"{info.epoch}/{info.epochs}"}
        if info.loss is not None:
            post["loss"] = f"{info.loss:.4f}"
        if info.val_ap is not None:
            post["val AP0.5"] = f"{info.val_ap:.3f}"
        if info.val_map is not None:
            post["val mAP"] = f"{info.val_map:.3f}"
        bar.set_postfix(post, refresh=False)
        return True

    try:
        result = train(
            images,
            masks,
            config,
            out_path=Path(args.out),
            val_images=val_images,
            val_masks=val_masks,
            resume_from=args.resume,
            progress=on_progress,
        )
    finally:
        bar.close()
    best = result.best_metrics
    print(
        f"saved {result.model_path} (best epoch {result.best_epoch}, val AP0.5 {_fmt_metric(best.get('val_ap'))}, "
        f"val mean AP {_fmt_metric(best.get('val_map'))}); last state {result.last_path}; "
        f"{result.epochs_completed} epoch(s), {result.stopped}, {result.elapsed_s / 60:.1f} min"
    )
    return 0


# --------------------------------------------------------------------------- predict


def cmd_predict(args: argparse.Namespace) -> int:
    """``embedseg predict``: one label TIFF per input image, same name and shape, voxel size kept."""
    from embedseg_service.core.data.io import write_labels
    from embedseg_service.core.model.checkpoint import load_model

    inputs: list[Path] = []
    for item in args.inputs:
        inputs.extend(tiff_files(Path(item)))
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise CommandError(f"--out {out_dir} exists and is not a folder")
    model = load_model(args.model, device=args.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [p.name for p in inputs]
    if len(set(names)) != len(names):
        raise CommandError("two inputs have the same file name; their outputs would overwrite each other")
    for path in _progress_bar(iterable=inputs, desc="predict", unit="image", disable=len(inputs) < 2):
        volume = _read(path)
        if volume.spatial_dims != model.spatial_dims:
            raise CommandError(
                f"{path}: a {volume.spatial_dims}D image cannot be segmented by a {model.spatial_dims}D model"
            )
        tile = args.tile
        if isinstance(tile, tuple) and len(tile) != model.spatial_dims:
            raise CommandError(f"--tile needs {model.spatial_dims} sizes for a {model.spatial_dims}D model, got {tile}")
        labels = model.segment(volume.data, tta=args.tta, tile=tile, min_size=args.min_size)
        target = out_dir / path.name
        write_labels(target, labels, voxel_size=volume.voxel_size)
        print(f"{path.name}: {int(labels.max())} object(s) -> {target}")
    return 0


# --------------------------------------------------------------------------- evaluate


def evaluate_pairs(
    pairs: Sequence[tuple[str, Path, Path]], thresholds: Sequence[float] | None
) -> dict[str, Any]:
    """AP_dsb per threshold for each ``(name, gt_file, pred_file)`` and the mean over images.

    Returns ``{"thresholds", "ap", "pooled", "n_images", "n_empty", "images": [row per image]}``.
    """
    from embedseg_service.core.metrics import aggregate, average_precision, default_thresholds

    results = []
    chosen: tuple[float, ...] | None = tuple(thresholds) if thresholds else None
    bar = _progress_bar(iterable=list(pairs), desc="evaluate", unit="image", disable=len(pairs) < 2)
    for name, gt_path, pred_path in bar:
        gt = _read(gt_path)
        pred = _read(pred_path)
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


def _format_table(result: dict[str, Any]) -> str:
    thresholds = result["thresholds"]
    width = max([len("image"), len("mean")] + [len(str(r["name"])) for r in result["images"]])
    head = f"{'image':<{width}}  {'gt':>5} {'pred':>5}  " + " ".join(f"{t:>6.2f}" for t in thresholds)
    lines = [head, "-" * len(head)]
    for row in result["images"]:
        lines.append(
            f"{row['name']:<{width}}  {row['n_gt']:>5} {row['n_pred']:>5}  "
            + " ".join(f"{v:>6.3f}" for v in row["ap"])
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
        print(_format_table(result))
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


# --------------------------------------------------------------------------- parser


def _add_train(sub: Any) -> None:
    p = sub.add_parser("train", help="train a model on images and label masks", description=cmd_train.__doc__)
    p.add_argument("--images", required=True, help="folder (or file) of training images")
    p.add_argument("--masks", required=True, help="folder (or file) of label masks, matched to images by file name")
    p.add_argument("--out", required=True, help="model file to write (the last state goes to <name>.last.pt)")
    p.add_argument("--val-images", help="folder of validation images (default: hold out --val-fraction)")
    p.add_argument("--val-masks", help="folder of validation masks")
    p.add_argument("--val-fraction", type=_fraction, default=0.15, help="fraction held out for validation (0.15)")
    p.add_argument("--dims", type=int, choices=(2, 3), help="2 or 3 (default: from the masks)")
    p.add_argument("--epochs", type=_positive_int, default=200, help="number of epochs (200)")
    p.add_argument("--max-time", type=_positive_float, metavar="MINUTES", help="wall-clock budget in minutes")
    p.add_argument("--batch-size", type=_positive_int, help="crops per forward pass (default: automatic)")
    p.add_argument("--samples-per-epoch", type=_positive_int, metavar="N",
                   help="crops per epoch (default: every crop, repeated to at least 10 optimiser steps)")  # fmt: skip
    p.add_argument("--crop-size", type=_crop_size, default="auto", help="auto or a multiple of 8")
    p.add_argument("--center", choices=("medoid", "approximate_medoid", "centroid"), default="medoid")
    p.add_argument("--selection-metric", choices=("mean_ap", "ap_dsb", "oracle_iou"), default="mean_ap",
                   help="best state by validation mean AP over the IoU thresholds (default), AP at 0.5 "
                        "(ap_dsb) or oracle IoU")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA (for GPUs without TF32)")
    p.add_argument("--voxel-size", type=_voxel_size, metavar="Z,Y,X", help="overrides the files' voxel size")
    p.add_argument("--min-object-size", type=_non_negative_int, metavar="PIXELS",
                   help="overrides the data-derived minimum object size")  # fmt: skip
    p.add_argument("--foreground-weight", type=_positive_float, metavar="W",
                   help="overrides the data-derived foreground weight of the seed loss")  # fmt: skip
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue from the .last checkpoint of an earlier run")
    p.set_defaults(func=cmd_train)


def _add_predict(sub: Any) -> None:
    p = sub.add_parser("predict", help="segment images with a trained model", description=cmd_predict.__doc__)
    p.add_argument("--model", required=True, help="model file written by 'embedseg train'")
    p.add_argument("--out", required=True, help="folder for the label images")
    p.add_argument("--tta", dest="tta", action="store_true", default=True, help="test-time augmentation (default)")
    p.add_argument("--no-tta", dest="tta", action="store_false", help="no test-time augmentation")
    p.add_argument("--tile", type=_tile, default="auto", help="auto, none, or Y,X / Z,Y,X tile sizes")
    p.add_argument("--min-size", type=_non_negative_int, metavar="PIXELS",
                   help="objects need more pixels than this (default: the model's minimum object size)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.set_defaults(func=cmd_predict)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="AP of predicted labels against ground truth", description=cmd_evaluate.__doc__)
    p.add_argument("gt", metavar="GT", help="ground-truth label file or folder")
    p.add_argument("pred", metavar="PRED", help="predicted label file or folder (matched by name)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--thresholds", type=_thresholds, help="IoU thresholds, e.g. 0.5,0.75 (default by dimension)")
    p.set_defaults(func=cmd_evaluate)


def _unavailable(name: str, reason: str) -> Callable[[argparse.Namespace], int]:
    def run(_: argparse.Namespace) -> int:
        raise CommandError(f"the '{name}' command is not available: {reason}")

    return run


def _register_plugins(sub: Any) -> None:
    try:
        entry_points = metadata.entry_points(group=PLUGIN_GROUP)
    except Exception:  # a broken installation must not break the built-in commands
        return
    for ep in sorted(entry_points, key=lambda e: e.name):
        if ep.name in BUILTIN_COMMANDS:
            continue
        try:
            register = ep.load()
            register(sub)
        except Exception as exc:  # noqa: BLE001 - any failure of a plug-in is reported, not raised
            reason = f"{type(exc).__name__}: {exc}"
            if ep.name not in sub.choices:
                p = sub.add_parser(ep.name, help=f"(unavailable: {reason})")
                p.set_defaults(func=_unavailable(ep.name, reason))


def build_parser(with_plugins: bool = True) -> argparse.ArgumentParser:
    """The ``embedseg`` argument parser (plug-ins from the ``embedseg.commands`` group when asked)."""
    parser = argparse.ArgumentParser(prog="embedseg", description="EmbedSeg instance segmentation (2D and 3D).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_train(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    if with_plugins:
        _register_plugins(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``embedseg`` command line; returns the exit code (2 for bad input)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    # the built-in commands never import the plug-ins (the service stack is not needed to train)
    builtin = bool(args_list) and args_list[0] in BUILTIN_COMMANDS
    parser = build_parser(with_plugins=not builtin)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse has printed its message
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code = func(args)
    except CommandError as exc:
        print(f"embedseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        print(f"embedseg {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
