"""EmbedSeg instance segmentation (2D and 3D) in numpy + torch.

Public API (imported on first use, so importing :mod:`embedseg_service.core` does not load torch):

- :func:`train`, :class:`TrainConfig`: train a model on images and label images;
- :func:`load_model` -> :class:`TrainedModel` (``.segment``): use a model file;
- :func:`segment`, :func:`predict_raw`: the same on a network in memory;
- :func:`cluster`: raw network outputs to instance labels;
- :func:`average_precision`: AP_dsb of predicted against ground-truth labels;
- :func:`read_tiff`, :func:`write_labels`: TIFF I/O with voxel sizes.

Sub-packages: :mod:`.model`, :mod:`.training`, :mod:`.inference`, :mod:`.data`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train": "training.train",
    "TrainConfig": "training.config",
    "load_model": "model.checkpoint",
    "TrainedModel": "model.checkpoint",
    "segment": "inference.predict",
    "predict_raw": "inference.predict",
    "cluster": "inference.clustering",
    "average_precision": "metrics",
    "read_tiff": "data.io",
    "write_labels": "data.tiff_write",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
