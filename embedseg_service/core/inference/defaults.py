"""Defaults of prediction shared by the library, the command line and the service (dependency-free, so
that the service's job schemas can take them from here)."""

from __future__ import annotations

DEFAULT_TTA = True
"""Test-time augmentation is on unless asked off (:meth:`embedseg_service.core.model.checkpoint.TrainedModel.segment`,
``embedseg predict``, predict jobs)."""
