"""``embedseg export``: a model file's network as a TorchScript or ONNX file that loads without this package."""

from __future__ import annotations

import argparse
from typing import Any

from embedseg_service.core.cli.files import CommandError
from embedseg_service.core.model.export_format import ExportFormat


def cmd_export(args: argparse.Namespace) -> int:
    """``embedseg export``: write the network of a model file as TorchScript (``.pt``) or ONNX (``.onnx``).

    The file takes a normalised float32 ``(N, C, [Z,] Y, X)`` image, every spatial size a multiple of 8,
    and gives the raw ``(N, 2D + 1, ...)`` outputs (offsets, sigma, seed logit); no normalisation is baked in.
    """
    from embedseg_service.core.model.checkpoint import load_model
    from embedseg_service.core.model.export import ExportUnavailable, export_model

    try:
        path = export_model(load_model(args.model, device="cpu"), args.format, args.out)
    except ExportUnavailable as error:
        raise CommandError(str(error)) from None
    print(f"{args.model} -> {path} ({ExportFormat.parse(args.format).value})")
    return 0


def add_parser(sub: Any) -> None:
    """The ``export`` sub-command."""
    p = sub.add_parser("export", help="write a model's network as TorchScript or ONNX", description=cmd_export.__doc__)
    p.add_argument("model", metavar="MODEL.pt", help="model file written by 'embedseg train'")
    p.add_argument("--format", choices=[f.value for f in ExportFormat], default=ExportFormat.torchscript.value,
                   help="torchscript (default) or onnx (needs the 'onnx' package)")  # fmt: skip
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="file to write")
    p.set_defaults(func=cmd_export)
