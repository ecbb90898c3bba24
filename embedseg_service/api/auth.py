"""Who is asking: API keys (``Authorization: Bearer <key>``) and the owner every row is scoped to.

Once any key exists, every API route but ``/health`` and ``/ready`` needs a valid key (401 with
``WWW-Authenticate: Bearer`` otherwise). Before that (the embedded default on a loopback address)
requests are anonymous and see everything. A key's requests act as its ``owner``: they see and
touch only that owner's volumes, jobs and models, and another owner's id answers 404 exactly as
an unknown id does. An admin key sees every owner's rows.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Select, update
from sqlalchemy.orm import Session

from embedseg_service.api.deps import SessionDep
from embedseg_service.records.keys import find_key, keys_exist
from embedseg_service.records.orm import ApiKey, utcnow

LAST_USED_EVERY_S = 60.0
"""A key's ``last_used_at`` is written at most this often (not on every request)."""

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key made by an admin with `embedseg keys create --owner LAB`; sent as "
    "`Authorization: Bearer <key>`.",
)


@dataclass(frozen=True)
class Principal:
    """The caller: ``owner`` (None when anonymous), whether it sees every owner's rows, and its key's id."""

    owner: str | None
    admin: bool
    key_id: str | None = None

    def can_see(self, owner: str | None) -> bool:
        """Whether a row of ``owner`` is visible to this caller."""
        return self.admin or owner == self.owner


ANONYMOUS = Principal(owner=None, admin=True)
"""The caller while no key exists: sees every row, creates rows without an owner."""


def unauthorized(detail: str) -> HTTPException:
    """401 with the ``WWW-Authenticate`` header a client needs to know to send a bearer key."""
    return HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": 'Bearer realm="embedseg"'})


class _LastUsed:
    """Throttles the ``last_used_at`` writes of keys (per process)."""

    def __init__(self) -> None:
        self._written: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, key_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._written.get(key_id, -LAST_USED_EVERY_S) < LAST_USED_EVERY_S:
                return False
            self._written[key_id] = now
            return True


_last_used = _LastUsed()


def _principal_of(session: Session, secret: str) -> Principal:
    row = find_key(session, secret)
    if row is None:
        raise unauthorized("the API key is not valid; check it, or ask an admin for one (embedseg keys create)")
    if row.revoked_at is not None:
        raise unauthorized("the API key was revoked; ask an admin for a new one (embedseg keys create)")
    if _last_used.due(row.id):
        session.execute(update(ApiKey).where(ApiKey.id == row.id).values(last_used_at=utcnow()))
        session.commit()
    return Principal(owner=row.owner, admin=bool(row.admin), key_id=row.id)


def get_principal(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller of this request; 401 for a missing, malformed, unknown or revoked key when keys are required."""
    header = request.headers.get("authorization")
    if credentials is not None:
        return _principal_of(session, credentials.credentials.strip())
    if header:
        raise unauthorized("the Authorization header must be 'Bearer <API key>'")
    if keys_exist(session):
        raise unauthorized(
            "this server requires an API key: send 'Authorization: Bearer <key>' (an admin creates one with "
            "'embedseg keys create --owner LAB')"
        )
    return ANONYMOUS


PrincipalDep = Annotated[Principal, Depends(get_principal)]

S = TypeVar("S", bound=Select[Any])


def visible(statement: S, column: Any, principal: Principal) -> S:
    """``statement`` limited to the rows ``principal`` may see (``column``: the table's owner column)."""
    if principal.admin:
        return statement
    return statement.where(column == principal.owner)
