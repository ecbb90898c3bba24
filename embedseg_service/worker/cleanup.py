"""Files nobody needs any more: a finished job's unregistered files, and what dead processes left behind.

A job's files live under ``jobs/<job id>/a<attempt>/``. Once the job has finished, only the files
it registered (the outputs of the attempt that succeeded) are kept: a failed or cancelled job's
folder goes entirely, and a succeeded job loses its checkpoints and the files of attempts that
lost their claim. Temporary files of the store and job scratch folders of processes that no
longer run are removed when a worker starts.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from embedseg_service.records import jobs
from embedseg_service.records.orm import JobStatus
from embedseg_service.records.storage import STALE_TEMP_S, Storage, job_prefix, writer_gone, writer_tag

log = logging.getLogger(__name__)

SCRATCH_PREFIX = "embedseg-job-"
"""Job scratch folders are ``<temp dir>/embedseg-job-<host>@<pid>@<random>``."""
BATCH = 500


def scratch_prefix() -> str:
    """The name prefix of this process's job scratch folders."""
    return f"{SCRATCH_PREFIX}{writer_tag()}@"


def clean_scratch(root: Path | None = None) -> int:
    """Remove job scratch folders under ``root`` (default: the system's temp dir) whose process no
    longer runs on this host; returns how many went."""
    root = Path(root or tempfile.gettempdir())
    count = 0
    for item in root.glob(f"{SCRATCH_PREFIX}*"):
        try:
            abandoned = (
                item.is_dir()
                and item.name.startswith(f"{SCRATCH_PREFIX}{socket.gethostname()}@")
                and (writer_gone(item.name[len(SCRATCH_PREFIX) :], item.stat().st_mtime, float("inf")))
            )
        except FileNotFoundError:
            continue
        if abandoned:
            shutil.rmtree(item, ignore_errors=True)
            count += 1
    return count


def purge_job_files(storage: Storage, sessions: sessionmaker[Session], job_ids: Sequence[str]) -> int:
    """Remove the files of the finished jobs among ``job_ids`` that they did not register; returns how
    many files went. Queued and running jobs (and unknown ids) are left alone."""
    removed = 0
    for start in range(0, len(job_ids), BATCH):
        batch = list(job_ids[start : start + BATCH])
        with sessions() as session:
            states = jobs.job_states(session, batch)
            succeeded = [job_id for job_id, (status, _) in states.items() if status == JobStatus.succeeded.value]
            kept = jobs.registered_keys(session, succeeded) if succeeded else {}
        for job_id, (status, _) in states.items():
            if status in (JobStatus.failed.value, JobStatus.cancelled.value):
                removed += storage.delete_prefix(job_prefix(job_id))
            elif status == JobStatus.succeeded.value:
                for key in storage.list_keys(job_prefix(job_id)):
                    if key not in kept[job_id] and storage.delete(key):
                        removed += 1
    return removed


def clean_at_start(storage: Storage, sessions: sessionmaker[Session]) -> dict[str, int]:
    """What a worker removes when it starts: temporary files and scratch folders of dead processes, and
    the unregistered files of every finished job in the store. Returns the count of each."""
    counts = {"temp": storage.clean_temp(older_than_s=STALE_TEMP_S), "scratch": clean_scratch()}
    counts["job_files"] = purge_job_files(storage, sessions, storage.list_folders("jobs"))
    if any(counts.values()):
        log.info(
            "removed at start: %(temp)d temporary file(s), %(scratch)d scratch folder(s), "
            "%(job_files)d file(s) of finished jobs",
            counts,
        )
    return counts
