"""``embedseg train``: train a model on images and masks matched by file name.

The options reach :class:`embedseg_service.core.training.config.TrainConfig` through
:func:`embedseg_service.core.training.config.config_from_options`, the path a train job takes; their
defaults are the configuration's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedseg_service.core.cli import arguments
from embedseg_service.core.cli.files import CommandError, match_by_name, progress_bar, read
from embedseg_service.core.data.center_mode import CenterMode
from embedseg_service.core.training.config import SelectionMetric, config_from_options, option_default

if TYPE_CHECKING:
    import numpy as np

    from embedseg_service.core.training.train import TrainProgress

TRAIN_OPTIONS = (
    "dims", "epochs", "max_time_minutes", "batch_size", "samples_per_epoch", "crop_size", "center", "seed",
    "device", "amp", "val_fraction", "selection_metric", "voxel_size", "min_object_size", "foreground_weight",
)  # fmt: skip
"""The parsed arguments that are training options (``dims`` for ``spatial_dims``)."""


def load_pairs(
    images_dir: Path, masks_dir: Path, what: str
) -> tuple[list[np.ndarray], list[np.ndarray], list[str], tuple[float, ...] | None]:
    """Images, masks, names and the first voxel size an image states, of files matched by name."""
    pairs = match_by_name(images_dir, masks_dir, (f"{what} image", "mask"))
    images, masks, names = [], [], []
    voxel = None
    for name, image_path, mask_path in pairs:
        image = read(image_path)
        mask = read(mask_path)
        if mask.axes.startswith("C"):
            raise CommandError(f"{mask_path}: a mask must have no channel axis (got axes {mask.axes})")
        if image.spatial_shape != mask.spatial_shape:
            raise CommandError(f"{name}: image shape {image.spatial_shape} and mask shape {mask.spatial_shape} differ")
        images.append(image.data)
        masks.append(mask.data)
        names.append(name)
        if voxel is None and image.voxel_size is not None:
            voxel = image.voxel_size
    return images, masks, names, voxel


def cmd_train(args: argparse.Namespace) -> int:
    """``embedseg train``: train a model on images and masks matched by file name."""
    from embedseg_service.core.training.train import train

    images, masks, names, file_voxel = load_pairs(Path(args.images), Path(args.masks), "training")
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
        val_images, val_masks, _, _ = load_pairs(Path(args.val_images), Path(args.val_masks), "validation")
    if args.voxel_size is not None and len(args.voxel_size) != dims:
        raise CommandError(f"--voxel-size needs {dims} values for {dims}D data, got {len(args.voxel_size)}")
    options = {name: getattr(args, name) for name in TRAIN_OPTIONS}
    options.update(dims=dims, in_channels=channels.pop())
    config = config_from_options(options, data_voxel_size=file_voxel)
    print(f"training a {dims}D model on {len(images)} image(s): {', '.join(names[:5])}{' …' if len(names) > 5 else ''}")
    bar = progress_bar(total=1000, unit="‰", bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")
    try:
        result = train(
            images,
            masks,
            config,
            out_path=Path(args.out),
            val_images=val_images,
            val_masks=val_masks,
            resume_from=args.resume,
            progress=_on_progress(bar),
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


def _on_progress(bar: Any) -> Any:
    """A training progress callback that writes messages above ``bar`` and moves it (in ‰)."""
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

    return on_progress


def _fmt_metric(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def add_parser(sub: Any) -> None:
    """The ``train`` sub-command; option defaults are :class:`TrainConfig`'s."""
    p = sub.add_parser("train", help="train a model on images and label masks", description=cmd_train.__doc__)
    p.add_argument("--images", required=True, help="folder (or file) of training images")
    p.add_argument("--masks", required=True, help="folder (or file) of label masks, matched to images by file name")
    p.add_argument("--out", required=True, help="model file to write (the last state goes to <name>.last.pt)")
    p.add_argument("--val-images", help="folder of validation images (default: hold out --val-fraction)")
    p.add_argument("--val-masks", help="folder of validation masks")
    p.add_argument("--val-fraction", type=arguments.fraction, default=option_default("val_fraction"),
                   help="fraction held out for validation (%(default)s)")  # fmt: skip
    p.add_argument("--dims", type=int, choices=(2, 3), help="2 or 3 (default: from the masks)")
    p.add_argument("--epochs", type=arguments.positive_int, default=option_default("epochs"),
                   help="number of epochs (%(default)s)")  # fmt: skip
    p.add_argument("--max-time", dest="max_time_minutes", type=arguments.positive_float, metavar="MINUTES",
                   help="wall-clock budget in minutes")  # fmt: skip
    p.add_argument("--batch-size", type=arguments.positive_int, help="crops per forward pass (default: automatic)")
    p.add_argument("--samples-per-epoch", type=arguments.positive_int, metavar="N",
                   help="crops per epoch (default: every crop, repeated to at least 10 optimiser steps)")  # fmt: skip
    p.add_argument("--crop-size", type=arguments.crop_size, default=option_default("crop_size"),
                   help="auto or a multiple of 8")  # fmt: skip
    p.add_argument("--center", choices=[m.value for m in CenterMode], default=option_default("center").value)
    p.add_argument("--selection-metric", choices=[m.value for m in SelectionMetric],
                   default=option_default("selection_metric").value,
                   help="best state by validation mean AP over the IoU thresholds (default), AP at 0.5 "
                        "(ap_dsb) or oracle IoU")  # fmt: skip
    p.add_argument("--seed", type=int, default=option_default("seed"))
    p.add_argument("--device", default=option_default("device"), help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="mixed precision on CUDA (for GPUs without TF32)")
    p.add_argument("--voxel-size", type=arguments.voxel_size, metavar="Z,Y,X", help="overrides the files' voxel size")
    p.add_argument("--min-object-size", type=arguments.non_negative_int, metavar="PIXELS",
                   help="overrides the data-derived minimum object size")  # fmt: skip
    p.add_argument("--foreground-weight", type=arguments.positive_float, metavar="W",
                   help="overrides the data-derived foreground weight of the seed loss")  # fmt: skip
    p.add_argument("--resume", metavar="CHECKPOINT", help="continue from the .last checkpoint of an earlier run")
    p.set_defaults(func=cmd_train)
