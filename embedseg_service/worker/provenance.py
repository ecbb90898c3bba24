"""Provenance of a trained model: what made it, recorded in ``Model.provenance``.

The training configuration itself is the model's ``config`` column; the provenance names it and
repeats only its seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from embedseg_service.records.orm import Volume, utcnow

if TYPE_CHECKING:
    from embedseg_service.core.training.config import TrainConfig


def volume_entries(rows: Sequence[Volume]) -> list[dict[str, Any]]:
    """``{"id", "name", "sha256"}`` of each volume, in order."""
    return [{"id": row.id, "name": row.name, "sha256": row.sha256} for row in rows]


def training_provenance(job_id: str, config: TrainConfig, volumes: dict[str, Sequence[Volume]]) -> dict[str, Any]:
    """The provenance of a model trained by job ``job_id`` with ``config`` on ``volumes`` (by role:
    ``images``, ``masks``, ``val_images``, ``val_masks``): library versions, seed, device type
    (``cpu`` or ``cuda``), the volumes' ids, names and sha256, and when it was made (UTC, ISO 8601)."""
    from embedseg_service.core.device import resolve_device
    from embedseg_service.core.model.checkpoint import library_versions

    return {
        "origin": "trained",
        "job_id": job_id,
        "created_at": utcnow().isoformat(),
        "versions": library_versions(),
        "device": resolve_device(config.device).type,
        "seed": config.seed,
        "config": "the model's config field holds the full training configuration",
        "volumes": {role: volume_entries(rows) for role, rows in volumes.items()},
    }
