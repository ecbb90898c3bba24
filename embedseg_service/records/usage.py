"""What owners store: bytes of volumes and models (checkpoints and their exports) per owner (quotas and metrics
read it here)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from embedseg_service.records.orm import Model, Volume


def stored_bytes(session: Session, owners: Iterable[str | None] | None = None) -> dict[tuple[str | None, str], int]:
    """Bytes per (owner, ``"volumes"`` or ``"models"``); only ``owners`` when given (None: rows made without a key)."""
    stored: dict[tuple[str | None, str], int] = {}
    wanted = None if owners is None else list(owners)
    for what, table, size in (
        ("volumes", Volume, Volume.size_bytes),
        ("models", Model, Model.size_bytes + Model.export_bytes),
    ):
        statement = select(table.owner, func.sum(size)).group_by(table.owner)
        if wanted is not None:
            statement = statement.where(or_(*(table.owner.is_not_distinct_from(owner) for owner in wanted)))
        for owner, total in session.execute(statement):
            stored[(owner, what)] = int(total or 0)
    return stored
