"""The per-object tables of a succeeded predict job, as JSON pages and as one CSV.

The worker computes each table when the job runs, from the labels it has in memory (and the ground
truth it reads for AP), and stores it as a JSON file per volume
(:mod:`embedseg_service.records.object_tables`): a request reads only the files of the volumes its page
covers, never a label volume. Jobs that ran before tables were recorded have none (409).
"""

from __future__ import annotations

import csv
import enum
import io
from collections.abc import Iterator, Sequence
from typing import Any

from embedseg_service.records.object_tables import TableEntry, read_table, table_entries
from embedseg_service.records.orm import Job, JobKind, JobStatus
from embedseg_service.records.schemas import ObjectOut, Page
from embedseg_service.records.storage import Storage, StorageError


class ObjectsUnavailable(Exception):
    """The job has no object table to hand out; ``status`` and ``detail`` say why and what to do."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class ObjectSort(str, enum.Enum):
    """The column a page of objects is sorted by (within each volume)."""

    label = "label"
    voxel_count = "voxel_count"
    iou = "iou"


def job_tables(job: Job) -> list[TableEntry]:
    """The tables of ``job``; :class:`ObjectsUnavailable` (409) unless a succeeded predict job stored them."""
    if job.kind != JobKind.predict.value:
        article = "an" if job.kind[:1] in "aeiou" else "a"
        raise ObjectsUnavailable(409, f"Job {job.id} is {article} {job.kind} job; only predict jobs have object tables")
    if job.status != JobStatus.succeeded.value:
        raise ObjectsUnavailable(
            409, f"Job {job.id} is {job.status}; its object table is available once it has succeeded"
        )
    entries = table_entries(job.id, job.result)
    if entries is None:
        raise ObjectsUnavailable(
            409,
            f"Job {job.id} has no object table: it ran before the service recorded them; run the prediction again",
        )
    return entries


def select_volume(job: Job, entries: Sequence[TableEntry], volume_id: str | None) -> list[TableEntry]:
    """The entries of ``volume_id`` (an input volume or its label volume), or all; 422 for another id."""
    if volume_id is None:
        return list(entries)
    chosen = [entry for entry in entries if volume_id in (entry.volume_id, entry.labels_id)]
    if not chosen:
        raise ObjectsUnavailable(
            422,
            f"query.volume_id: volume {volume_id} is not a volume of job {job.id}; give one of its input "
            "volume ids or label volume ids",
        )
    return chosen


def _load(storage: Storage, job: Job, entry: TableEntry) -> dict[str, Any]:
    try:
        return read_table(storage, entry)
    except (StorageError, ValueError) as error:
        raise ObjectsUnavailable(
            409,
            f"the object table of volume {entry.volume_id} of job {job.id} cannot be read ({error}); "
            "run the prediction again",
        ) from None


def _rows(table: dict[str, Any], entry: TableEntry) -> list[ObjectOut]:
    return [
        ObjectOut(volume_id=entry.volume_id, labels_id=entry.labels_id, gt_volume_id=entry.gt_id, **row)
        for row in table.get("objects") or []
    ]


def _sort_key(sort: ObjectSort):  # type: ignore[no-untyped-def]
    if sort is ObjectSort.iou:
        return lambda row: (row.iou is None, row.iou or 0.0, row.label)
    if sort is ObjectSort.voxel_count:
        return lambda row: (row.voxel_count, row.label)
    return lambda row: row.label


def object_page(
    storage: Storage,
    job: Job,
    entries: Sequence[TableEntry],
    *,
    sort: ObjectSort,
    descending: bool,
    limit: int,
    offset: int,
) -> Page[ObjectOut]:
    """Rows ``offset`` to ``offset + limit`` of the tables of ``entries``, volume after volume in the job's
    order, each volume's rows sorted by ``sort``; reads only the files of the volumes the page covers."""
    total = sum(entry.n_objects for entry in entries)
    items: list[ObjectOut] = []
    start = 0
    for entry in entries:
        end = start + entry.n_objects
        if end > offset and start < offset + limit and entry.n_objects:
            rows = _rows(_load(storage, job, entry), entry)
            rows.sort(key=_sort_key(sort), reverse=descending)
            items.extend(rows[max(0, offset - start) : offset + limit - start])
        start = end
        if start >= offset + limit:
            break
    return Page[ObjectOut](items=items, total=total, limit=limit, offset=offset)


AXES = {2: "yx", 3: "zyx"}


def csv_header(dims: int) -> list[str]:
    """The CSV columns for tables of ``dims`` spatial axes."""
    axes = AXES[dims]
    return [
        "volume_id",
        "labels_id",
        "label",
        "voxel_count",
        *(f"centroid_{a}" for a in axes),
        *(f"centroid_{a}_physical" for a in axes),
        *(f"bbox_min_{a}" for a in axes),
        *(f"bbox_max_{a}" for a in axes),
        "gt_volume_id",
        "gt_label",
        "iou",
    ]


def _csv_row(row: ObjectOut, dims: int) -> list[Any]:
    physical = row.centroid_physical or [""] * dims
    return [
        row.volume_id,
        row.labels_id,
        row.label,
        row.voxel_count,
        *row.centroid,
        *physical,
        *row.bbox_min,
        *row.bbox_max,
        row.gt_volume_id or "",
        "" if row.gt_label is None else row.gt_label,
        "" if row.iou is None else row.iou,
    ]


def check_files(storage: Storage, job: Job, entries: Sequence[TableEntry]) -> None:
    """:class:`ObjectsUnavailable` (409) when one of the table files is gone (checked before streaming)."""
    for entry in entries:
        if not storage.exists(entry.key):
            raise ObjectsUnavailable(
                409,
                f"the object table of volume {entry.volume_id} of job {job.id} is missing; run the prediction again",
            )


def csv_lines(storage: Storage, job: Job, entries: Sequence[TableEntry]) -> Iterator[str]:
    """The CSV (header row, then one row per object, volume after volume in the job's order, by label)
    as text chunks of one volume each; the columns follow the axes of the first table (one model: one
    dimensionality)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    dims = 0
    for entry in entries:
        table = _load(storage, job, entry)
        if not dims:
            dims = len(str(table.get("axes") or "YX"))
            writer.writerow(csv_header(dims))
        for row in _rows(table, entry):
            writer.writerow(_csv_row(row, dims))
        yield out.getvalue()
        out.seek(0)
        out.truncate()
