"""What a job handler receives and returns (shared by :mod:`embedseg_service.worker.runner` and
:mod:`embedseg_service.worker.handlers`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from embedseg_service.records.orm import JobKind, Model, Volume
from embedseg_service.records.settings import Settings
from embedseg_service.records.storage import Storage, job_output_key
from embedseg_service.worker.progress import JobReporter


@dataclass
class JobContext:
    """What a handler gets: the job's id, kind and validated spec, storage, progress and scratch space,
    and the claim's ``attempt`` number (its output files go under that attempt's storage folder)."""

    job_id: str
    kind: JobKind
    spec: dict[str, Any]
    settings: Settings
    storage: Storage
    sessions: sessionmaker[Session]
    reporter: JobReporter
    scratch: Path
    attempt: int | None = None

    def session(self) -> Session:
        return self.sessions()

    def output_key(self, name: str) -> str:
        """The storage key of the output file ``name`` of this attempt (``jobs/<job>/a<attempt>/<name>``)."""
        return job_output_key(self.job_id, name, self.attempt)

    def labels_name(self, image_name: str, tta: bool) -> str:
        """``<image name>-labels-<job id prefix>`` (``-tta`` when segmented with TTA): predictions of one image by
        different jobs, or with and without TTA, keep distinguishable names."""
        return f"{image_name}-labels-{self.job_id[:8]}{'-tta' if tta else ''}"


@dataclass
class JobOutcome:
    """What a successful handler returns: ``result`` ids, final ``metrics`` and new rows to register."""

    result: dict[str, Any]
    metrics: dict[str, Any] | None = None
    outputs: list[Volume | Model] = field(default_factory=list)


Handler = Callable[[JobContext], JobOutcome]
