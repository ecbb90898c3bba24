"""Export of a trained network as a TorchScript or an ONNX file that loads without this package.

The network is traced in eval mode on the CPU with one example input; the trace records the
convolutions only, so the exported graph accepts any batch size and any spatial size that is a
multiple of 8 (the checks of :meth:`BranchedERFNet.check_input` are Python and are not recorded:
the exported network does not check its input). The contract of input and output:
:data:`embedseg_service.core.model.export_format.INPUT_CONTRACT`. ONNX export needs the ``onnx``
package (the ``export`` extra).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from embedseg_service.core.model.checkpoint import TrainedModel
from embedseg_service.core.model.export_format import (
    INPUT_NAME,
    METADATA_NAME,
    OUTPUT_NAME,
    ExportFormat,
    missing_exporter,
)

EXAMPLE_SIZE = {2: (64, 64), 3: (16, 32, 32)}
"""Spatial size of the example input the network is traced with (any multiple of 8 gives the same graph)."""

ONNX_OPSET = 17


class ExportUnavailable(RuntimeError):
    """The format cannot be written in this environment (a package is missing); the message says which."""


def export_description(model: TrainedModel) -> dict[str, Any]:
    """The JSON description stored in an exported file: dimensions, channels, step, normalisation,
    minimum object size and the output channel names."""
    d = model.spatial_dims
    axes = "xyz"[:d]
    return {
        "format": "embedseg-service-network",
        "spatial_dims": d,
        "in_channels": model.in_channels,
        "step": list(model.step),
        "normalization": model.normalization.to_dict(),
        "min_object_size": model.min_object_size,
        "size_multiple": 8,
        "input": f"{INPUT_NAME}: float32 (N, {model.in_channels}, {'Z, ' if d == 3 else ''}Y, X), normalised",
        "output_channels": [f"offset_{a}" for a in axes] + [f"sigma_{a}" for a in axes] + ["seed_logit"],
        "versions": dict(model.versions),
    }


def _cpu_network(model: TrainedModel) -> torch.nn.Module:
    net = model.net if next(model.net.parameters()).device.type == "cpu" else copy.deepcopy(model.net).cpu()
    return net.eval()


def _example(model: TrainedModel) -> torch.Tensor:
    shape = (1, model.in_channels, *EXAMPLE_SIZE[model.spatial_dims])
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def _write_torchscript(net: torch.nn.Module, example: torch.Tensor, description: str, target: Path) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the input checks, deprecation notices
        traced = torch.jit.trace(net, example, check_trace=False)
        torch.jit.save(traced, str(target), _extra_files={METADATA_NAME: description})


def _write_onnx(net: torch.nn.Module, example: torch.Tensor, description: str, target: Path) -> None:
    import onnx

    d = example.dim() - 2
    sizes = {0: "batch", **{2 + i: name for i, name in enumerate("zyx"[3 - d :])}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            str(target),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: sizes, OUTPUT_NAME: sizes},
            opset_version=ONNX_OPSET,
        )
    graph = onnx.load(str(target))
    entry = graph.metadata_props.add()
    entry.key, entry.value = METADATA_NAME, description
    onnx.checker.check_model(graph)
    onnx.save(graph, str(target))


_WRITERS: dict[ExportFormat, Callable[[torch.nn.Module, torch.Tensor, str, Path], None]] = {
    ExportFormat.torchscript: _write_torchscript,
    ExportFormat.onnx: _write_onnx,
}


def export_model(model: TrainedModel, fmt: ExportFormat | str, path: str | os.PathLike) -> Path:
    """Write ``model``'s network to ``path`` as ``fmt`` (``torchscript`` or ``onnx``), atomically.

    The file maps a float32 ``(N, C, *S)`` normalised image (every size of ``S`` a multiple of 8)
    to the raw ``(N, 2D + 1, *S)`` outputs, as ``model.net`` in eval mode does, and carries the
    :func:`export_description`. Raises :class:`ExportUnavailable` when the format's package is
    missing, ``ValueError`` for an unknown format. Returns the path.
    """
    fmt = ExportFormat.parse(fmt)
    missing = missing_exporter(fmt)
    if missing:
        raise ExportUnavailable(missing)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    description = json.dumps(export_description(model), sort_keys=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        _WRITERS[fmt](_cpu_network(model), _example(model), description, Path(tmp_name))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
