"""Where a predict job keeps its per-object tables and how its result lists them (shared by the worker,
which writes them, the API, which serves them, and the clean-up, which keeps them).

A succeeded predict job stored one JSON file per input volume, ``objects-<image volume id>.json``, in
the folder of the attempt that succeeded, beside that volume's labels, and listed them in its result::

    result["object_tables"] = {"attempt": 1, "volumes": [{"volume_id", "labels_id", "gt_id", "n_objects"}, ...]}

A file holds ``{"volume_id", "labels_id", "gt_id", "axes", "voxel_size", "match_threshold", "objects"}``,
``objects`` being the rows of :func:`embedseg_service.core.metrics.object_table` in label order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from embedseg_service.records.storage import Storage, job_output_key

RESULT_KEY = "object_tables"
"""The key of ``job.result`` that lists the tables."""


@dataclass(frozen=True)
class TableEntry:
    """One volume's table as the job's result lists it, and the storage key of its file."""

    volume_id: str
    labels_id: str
    gt_id: str | None
    n_objects: int
    key: str


def table_name(volume_id: str) -> str:
    """The file name of the table of the input volume ``volume_id``."""
    return f"objects-{volume_id}.json"


def result_entry(attempt: int | None, volumes: list[dict[str, Any]]) -> dict[str, Any]:
    """The value of ``job.result["object_tables"]`` for tables written by ``attempt``; ``volumes``:
    ``{"volume_id", "labels_id", "gt_id", "n_objects"}`` per input volume, in the job's order."""
    return {"attempt": attempt, "volumes": volumes}


def table_entries(job_id: str, result: dict[str, Any] | None) -> list[TableEntry] | None:
    """The tables a job's result lists, in the job's order; ``None`` when it lists none (a job that is
    not a predict job, or one that ran before tables were recorded)."""
    listed = (result or {}).get(RESULT_KEY)
    if not isinstance(listed, dict) or not isinstance(listed.get("volumes"), list):
        return None
    attempt = listed.get("attempt")
    attempt = attempt if isinstance(attempt, int) else None
    return [
        TableEntry(
            volume_id=str(item["volume_id"]),
            labels_id=str(item["labels_id"]),
            gt_id=None if item.get("gt_id") is None else str(item["gt_id"]),
            n_objects=int(item["n_objects"]),
            key=job_output_key(job_id, table_name(str(item["volume_id"])), attempt),
        )
        for item in listed["volumes"]
    ]


def table_keys(job_id: str, result: dict[str, Any] | None) -> list[str]:
    """Storage keys of the table files a job's result lists (files the job registered)."""
    return [entry.key for entry in table_entries(job_id, result) or []]


def read_table(storage: Storage, entry: TableEntry) -> dict[str, Any]:
    """The stored table of ``entry`` (see the module's docstring); :class:`StorageError` when it is gone."""
    with storage.open_read(entry.key) as handle:
        return dict(json.load(handle))
