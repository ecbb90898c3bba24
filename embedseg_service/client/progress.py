"""Waiting for a job: polling its row until a final status, with a progress bar on a terminal."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from embedseg_service.client.errors import ConnectionFailed, JobFailed, WaitInterrupted, WaitTimeout
from embedseg_service.records.orm import JobStatus
from embedseg_service.records.schemas import JobOut

FINAL = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
FIRST_POLL_S = 0.05
"""Wait before the second poll of a job; each further wait is :data:`POLL_GROWTH` times the last, up to
``poll_s``: a short job is seen finished soon after it ends, a long one is polled every ``poll_s`` seconds."""
POLL_GROWTH = 1.5


def show_progress(progress: bool | None) -> bool:
    """Whether to draw a bar: as asked, or (``None``) when standard error is a terminal."""
    if progress is not None:
        return progress
    return sys.stderr.isatty()


class _Bar:
    """A tqdm bar in percent whose label is the job's kind and stage; nothing when not shown."""

    def __init__(self, job: JobOut, shown: bool) -> None:
        self.bar: Any = None
        if shown:
            from tqdm import tqdm

            self.bar = tqdm(total=100, desc=job.kind.value, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% {postfix}")

    def update(self, job: JobOut) -> None:
        if self.bar is None:
            return
        self.bar.set_description(f"{job.kind.value} {job.stage or job.status.value}", refresh=False)
        if job.eta_s is not None:
            self.bar.set_postfix_str(f"eta {job.eta_s:.0f} s", refresh=False)
        self.bar.n = round(job.progress * 100, 1)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def wait_for(
    fetch: Callable[[float | None], JobOut],
    *,
    timeout: float | None,
    poll_s: float,
    progress: bool | None,
    sleep: Callable[[float], None],
    clock: Callable[[], float] = time.monotonic,
) -> JobOut:
    """Poll ``fetch`` until the job is final, every ``poll_s`` seconds after the first few polls
    (:data:`FIRST_POLL_S`, growing by :data:`POLL_GROWTH`); return the job when it succeeded.

    ``fetch`` gets the seconds left of ``timeout`` (``None``: no limit), which bound its retries. A
    job already final answers at once (waiting again resumes). Raises :class:`JobFailed` when it
    ended ``failed`` or ``cancelled``, :class:`WaitTimeout` when it is not final within ``timeout``
    seconds, and :class:`WaitInterrupted` (with the last state seen) when a poll after the first
    could not reach the server.
    """
    deadline = None if timeout is None else clock() + timeout

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - clock())

    job = fetch(left())
    bar = _Bar(job, show_progress(progress) and job.status not in FINAL)
    wait_s = min(FIRST_POLL_S, poll_s)
    try:
        while True:
            bar.update(job)
            if job.status in FINAL:
                break
            if deadline is not None and clock() >= deadline:
                raise WaitTimeout(job, timeout or 0.0)
            pause = wait_s if deadline is None else max(0.0, min(wait_s, deadline - clock()))
            sleep(pause)
            wait_s = min(POLL_GROWTH * wait_s, poll_s)
            try:
                job = fetch(left())
            except ConnectionFailed as lost:
                raise WaitInterrupted(job, lost) from lost
    finally:
        bar.close()
    if job.status is not JobStatus.succeeded:
        raise JobFailed(job)
    return job
