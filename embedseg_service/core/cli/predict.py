"""``embedseg predict``: one label TIFF per input image, same name and shape, voxel size kept."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from embedseg_service.core.cli import arguments
from embedseg_service.core.cli.files import CommandError, progress_bar, read, tiff_files
from embedseg_service.core.inference.defaults import DEFAULT_TTA


def cmd_predict(args: argparse.Namespace) -> int:
    """``embedseg predict``: one label TIFF per input image, same name and shape, voxel size kept."""
    from embedseg_service.core.data.tiff_write import write_labels
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
    for path in progress_bar(iterable=inputs, desc="predict", unit="image", disable=len(inputs) < 2):
        volume = read(path)
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


def add_parser(sub: Any) -> None:
    """The ``predict`` sub-command."""
    p = sub.add_parser("predict", help="segment images with a trained model", description=cmd_predict.__doc__)
    p.add_argument("--model", required=True, help="model file written by 'embedseg train'")
    p.add_argument("--out", required=True, help="folder for the label images")
    p.add_argument("--tta", dest="tta", action="store_true", default=DEFAULT_TTA,
                   help="test-time augmentation" + (" (default)" if DEFAULT_TTA else ""))  # fmt: skip
    p.add_argument("--no-tta", dest="tta", action="store_false",
                   help="no test-time augmentation" + ("" if DEFAULT_TTA else " (default)"))  # fmt: skip
    p.add_argument("--tile", type=arguments.tile, default="auto", help="auto, none, or Y,X / Z,Y,X tile sizes")
    p.add_argument("--min-size", type=arguments.non_negative_int, metavar="PIXELS",
                   help="objects need more pixels than this (default: the model's minimum object size)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.set_defaults(func=cmd_predict)
