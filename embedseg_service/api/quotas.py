"""Per-owner limits: bytes stored (volumes and models) and jobs waiting in the queue.

Every owner, the anonymous one included, has the same limits (``EMBEDSEG_QUOTA_*``). A request
that would pass one answers 413 (storage) or 429 (queue) with a ``detail`` naming the limit, its
value and what to do.
"""

from __future__ import annotations

from fastapi import HTTPException
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from embedseg_service.api.auth import Principal
from embedseg_service.records.orm import Job, JobStatus
from embedseg_service.records.settings import Settings
from embedseg_service.records.storage import PendingWrite
from embedseg_service.records.usage import stored_bytes


def _who(owner: str | None) -> str:
    return "anonymous requests" if owner is None else f"owner {owner!r}"


def check_storage(session: Session, settings: Settings, principal: Principal, incoming: int = 0) -> None:
    """413 when the caller's stored bytes plus ``incoming`` would exceed ``quota_stored_bytes``."""
    check_owner_storage(session, settings, principal.owner, incoming)


def check_owner_storage(
    session: Session, settings: Settings, owner: str | None, incoming: int = 0, adds: str = "this upload adds"
) -> None:
    """:func:`check_storage` for the bytes of ``owner`` (``adds``: what the message says brings ``incoming``)."""
    limit = settings.quota_stored_bytes
    used = sum(stored_bytes(session, [owner]).values())
    if used + incoming > limit or used >= limit:
        raise HTTPException(
            status_code=413,
            detail=f"storage quota exceeded: {_who(owner)} store {used} bytes"
            + (f" and {adds} {incoming}" if incoming else "")
            + f"; the limit is {limit} bytes (EMBEDSEG_QUOTA_STORED_BYTES); delete volumes or models first",
        )


def check_received(session: Session, settings: Settings, principal: Principal, pending: PendingWrite) -> None:
    """:func:`check_storage` for a received upload; the upload is discarded when it does not fit."""
    try:
        check_storage(session, settings, principal, pending.size)
    except HTTPException:
        pending.abort()
        raise


def check_queue(session: Session, settings: Settings, principal: Principal) -> None:
    """429 when the caller already has ``quota_queued_jobs`` jobs waiting to run."""
    limit = settings.quota_queued_jobs
    queued = (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.owner.is_not_distinct_from(principal.owner), Job.status == JobStatus.queued.value)  # fmt: skip
        )
        or 0
    )
    if queued >= limit:
        raise HTTPException(
            status_code=429,
            detail=f"queue quota reached: {_who(principal.owner)} have {queued} queued jobs; the limit is {limit} "
            "(EMBEDSEG_QUOTA_QUEUED_JOBS); wait for some to start or cancel them",
            headers={"Retry-After": "60"},
        )
