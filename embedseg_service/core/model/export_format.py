"""What an exported network is, shared by its writer and by readers that must not import torch.

:mod:`embedseg_service.core.model.export` writes a trained network as a TorchScript or an ONNX
file; the API's export route and the command line describe and name those files with this
module, which imports neither torch nor onnx.
"""

from __future__ import annotations

import importlib.util

from embedseg_service.core.options import Option


class ExportFormat(Option):
    """File format of an exported network."""

    torchscript = "torchscript"
    onnx = "onnx"

    @property
    def suffix(self) -> str:
        """File name suffix: ``.pt`` (TorchScript) or ``.onnx``."""
        return ".pt" if self is ExportFormat.torchscript else ".onnx"


METADATA_NAME = "embedseg.json"
"""Name of the JSON description inside an exported file (TorchScript extra file, ONNX metadata property)."""

INPUT_NAME = "image"
OUTPUT_NAME = "raw"

INPUT_CONTRACT = f"""\
The exported file holds the network alone: no normalisation, padding, test-time augmentation or
clustering is baked in.

- **Input** `{INPUT_NAME}`: a float32 tensor `(N, C, Y, X)` for a 2D model, `(N, C, Z, Y, X)` for a 3D
  model. `C` is the model's `config.in_channels`. Every spatial size must be a positive multiple of 8
  (the service reflect-pads an image, centred, and crops the output back); `N` and the sizes may change
  from call to call. Each image and channel must be normalised as the training images were, following
  the model's `data_properties`: `normalization` `percentile` (the default): `(x - P_low) / (P_high -
  P_low)` with `P_low`, `P_high` the image's own `p_low` and `p_high` percentiles (1 and 99.8 unless the
  model says otherwise); `meanstd`: `(x - mean) / std`; `none`: unchanged. No clipping; a constant
  image is only shifted to 0.
- **Output** `{OUTPUT_NAME}`: float32 `(N, 2D + 1, *S)`, the input's spatial size, `D` = 2 or 3. Channels
  `0 .. D-1`: offsets `o` in x, y[, z] order (the pixel's embedding is `tanh(o)` plus its index times
  the model's `step` per axis); `D .. 2D-1`: sigma `s` in x, y[, z] order (precision `exp(10 s)` in embedding units⁻²);
  `2D`: the seed logit (`sigmoid` gives the seediness). No activation is applied; clustering these into
  labels is left to the caller (docs/method.md §1, §6).
- **Description**: the file carries `{METADATA_NAME}` (spatial_dims, in_channels, step in array order,
  normalisation, min_object_size, channel names): a TorchScript extra file
  (`torch.jit.load(path, _extra_files={{"{METADATA_NAME}": ""}})`) or an ONNX metadata property.
"""
"""The contract of an exported network, in Markdown (the API's route description and the CLI's help)."""


def missing_exporter(fmt: ExportFormat | str) -> str | None:
    """Why ``fmt`` cannot be written in this environment (``None`` when it can); imports nothing."""
    if ExportFormat.parse(fmt) is ExportFormat.onnx and importlib.util.find_spec("onnx") is None:
        return "ONNX export needs the 'onnx' package, which is not installed here (pip install onnx)"
    return None
