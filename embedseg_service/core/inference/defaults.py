"""Defaults of prediction shared by the library, the command line and the service (dependency-free, so
that the service's job schemas can take them from here)."""

from __future__ import annotations

from embedseg_service.core.options import Option

DEFAULT_TTA = True
"""Test-time augmentation is on unless asked off (:meth:`embedseg_service.core.model.checkpoint.TrainedModel.segment`,
``embedseg predict``, predict jobs)."""


class InferencePrecision(Option):
    """Number format the network computes in at prediction: ``fp32``, or autocast to ``bf16`` (CPU or
    CUDA) or ``fp16`` (CUDA only). Clustering always runs on float32 outputs."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    @classmethod
    def option_name(cls) -> str:
        return "inference precision"

    def __str__(self) -> str:
        return self.value


DEFAULT_PRECISION = InferencePrecision.fp32
"""Prediction computes in float32 unless asked otherwise (``benchmarks/RESULTS.md``: bf16 on the CPU)."""
