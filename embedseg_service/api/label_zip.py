"""A ZIP of every label volume a succeeded predict job produced, each named after the image it segments.

The archive is built in a spooled temporary file (in memory while small, on disk beyond that), copying
each stored TIFF in chunks, then streamed to the client. Entries are stored, not deflated: the label
TIFFs are already zlib-compressed.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from typing import IO

from sqlalchemy import select
from sqlalchemy.orm import Session

from embedseg_service.records.orm import Job, JobKind, JobStatus, Volume, VolumeFormat
from embedseg_service.records.storage import OME_ZARR_ZIP_SUFFIX, Storage

SPOOL_BYTES = 8 * 1024 * 1024
CHUNK_BYTES = 1024 * 1024
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\:]")


class LabelsUnavailable(Exception):
    """The job has no label volumes to hand out; ``detail`` says why and what to do."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _check_job(job: Job) -> list[str]:
    """The job's label volume ids; :class:`LabelsUnavailable` unless it is a succeeded predict job."""
    if job.kind != JobKind.predict.value:
        article = "an" if job.kind[:1] in "aeiou" else "a"
        raise LabelsUnavailable(f"Job {job.id} is {article} {job.kind} job; only predict jobs produce label volumes")
    if job.status != JobStatus.succeeded.value:
        raise LabelsUnavailable(f"Job {job.id} is {job.status}; its labels can be downloaded once it has succeeded")
    ids = (job.result or {}).get("label_volume_ids") or []
    return [str(volume_id) for volume_id in ids]


def job_labels(session: Session, job: Job) -> list[tuple[str, Volume]]:
    """``(entry name, label volume)`` for each label volume of ``job``, in the job's order.

    An entry is named after the input image the labels segment (``<image name>.tif``, or ``.ome.zarr.zip`` for
    an OME-Zarr label volume, stored as it is; the label
    volume's own name when that image is gone), made unique with ``-2``, ``-3``... Raises
    :class:`LabelsUnavailable` for a job that is not a succeeded predict job, or when one of its
    label volumes has been deleted.
    """
    ids = _check_job(job)
    rows = {row.id: row for row in session.scalars(select(Volume).where(Volume.id.in_(ids))).all()}
    for volume_id in ids:
        if volume_id not in rows or rows[volume_id].owner != job.owner:
            raise LabelsUnavailable(
                f"label volume {volume_id} of job {job.id} has been deleted; download the others with "
                "GET /volumes/{id}/download, or run the prediction again"
            )
    labels = [rows[volume_id] for volume_id in ids]
    image_ids = [row.image_volume_id for row in labels if row.image_volume_id]
    images = {row.id: row.name for row in session.scalars(select(Volume).where(Volume.id.in_(image_ids))).all()}
    stems = [images.get(row.image_volume_id or "", row.name) for row in labels]
    suffixes = [OME_ZARR_ZIP_SUFFIX if row.format == VolumeFormat.ome_zarr.value else ".tif" for row in labels]
    return list(zip(unique_names(stems, suffixes), labels))


def unique_names(stems: Sequence[str], suffix: str | Sequence[str] = ".tif") -> list[str]:
    """File names ``<stem><suffix>`` (one suffix, or one per stem) without separators or control characters,
    unique even on case-insensitive file systems: a clash gets ``-2``, ``-3``... before the suffix."""
    taken: set[str] = set()
    names = []
    suffixes = [suffix] * len(stems) if isinstance(suffix, str) else list(suffix)
    for stem, suffix in zip(stems, suffixes):
        base = _UNSAFE.sub("_", stem).strip(" .") or "labels"
        name, n = f"{base}{suffix}", 1
        while name.casefold() in taken:
            n += 1
            name = f"{base}-{n}{suffix}"
        taken.add(name.casefold())
        names.append(name)
    return names


def build_zip(storage: Storage, entries: Sequence[tuple[str, Volume]]) -> IO[bytes]:
    """The ZIP of ``entries`` in a spooled temporary file positioned at its start (the caller closes it)."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (returned; the caller closes it)
    try:
        with zipfile.ZipFile(spool, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, volume in entries:
                info = zipfile.ZipInfo(name, date_time=volume.created_at.timetuple()[:6])
                info.compress_type = zipfile.ZIP_STORED
                info.file_size = volume.size_bytes
                with storage.open_read(volume.storage_key) as source, archive.open(info, "w") as target:
                    shutil.copyfileobj(source, target, CHUNK_BYTES)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool  # type: ignore[return-value]


def iter_file(handle: IO[bytes], chunk: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The bytes of ``handle`` in chunks; closes it when done (or when the iteration is abandoned)."""
    try:
        while block := handle.read(chunk):
            yield block
    finally:
        handle.close()
