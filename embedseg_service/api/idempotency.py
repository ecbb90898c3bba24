"""``Idempotency-Key`` on the creating POSTs (jobs, volume and model uploads).

A client that may resend a request (a timeout, a lost connection) sends a key of its choosing
with it. The first request with a key claims it; a later one with the same key and the same body
gets the first one's resource again (same id, same status code, header ``Idempotent-Replayed:
true``) and creates nothing; the same key with another body answers 409, as does a resend while
the first request is still being handled. Keys are scoped to the owner and kept with the rows.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from fastapi import HTTPException, Request, Response
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from embedseg_service.api.auth import Principal
from embedseg_service.api.uploads import ReceivedUpload
from embedseg_service.records.orm import IdempotencyKey, Job, Model, Volume

HEADER = "Idempotency-Key"
_VALID = re.compile(r"^[\x21-\x7e]{1,255}$")


@dataclass(frozen=True)
class Claim:
    """A key this request holds: settle it with the resource made, or release it on failure."""

    scope: str
    key: str


def request_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key`` header, or None; 422 when it is not 1-255 visible ASCII characters."""
    value = request.headers.get(HEADER)
    if value is None:
        return None
    if not _VALID.match(value):
        raise HTTPException(
            status_code=422, detail="header.Idempotency-Key: must be 1-255 visible ASCII characters (e.g. a UUID)"
        )
    return value


def fingerprint(*parts: str | bytes) -> str:
    """SHA-256 over the parts of a request that make it what it is (route, body or file digest, fields)."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def claim(session: Session, principal: Principal, key: str, route: str, digest: str) -> Claim | str:
    """Claim ``key`` for this request (a :class:`Claim`), or the id of what its first request made (replay).

    409 when the key was first used with another route or body, or its first request is still
    being handled.
    """
    scope = principal.owner or ""
    session.add(IdempotencyKey(scope=scope, key=key, route=route, request_sha256=digest))
    try:
        session.commit()
        return Claim(scope, key)
    except IntegrityError:
        session.rollback()
    first = session.get(IdempotencyKey, (scope, key), populate_existing=True)
    if first is None or first.resource_id is None:
        raise HTTPException(
            status_code=409,
            detail=f"the first request with Idempotency-Key {key!r} is still being handled; retry in a moment",
            headers={"Retry-After": "1"},
        )
    if first.route != route or first.request_sha256 != digest:
        raise HTTPException(
            status_code=409,
            detail=f"Idempotency-Key {key!r} was first used with another request ({first.route}, another body); "
            "send a new key with a new request",
        )
    return first.resource_id


def settle(session: Session, held: Claim, resource_id: str) -> None:
    """Record what the claiming request made."""
    session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.scope == held.scope, IdempotencyKey.key == held.key)
        .values(resource_id=resource_id)
    )
    session.commit()


def release(session: Session, held: Claim) -> None:
    """Free the key after the claiming request failed, so that the client can retry it."""
    session.rollback()
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.scope == held.scope, IdempotencyKey.key == held.key))
    session.commit()


@contextmanager
def holding(session: Session, held: Claim | None) -> Iterator[None]:
    """Release ``held`` when the block raises (no-op without a claim)."""
    try:
        yield
    except BaseException:
        if held is not None:
            release(session, held)
        raise


def replayed(response: Response) -> None:
    """Mark ``response`` as the answer of an earlier request."""
    response.headers["Idempotent-Replayed"] = "true"


def gone(kind: str, resource_id: str, key: str) -> HTTPException:
    """409 for a replay whose resource was deleted since."""
    return HTTPException(
        status_code=409,
        detail=f"Idempotency-Key {key!r} made {kind} {resource_id}, which was deleted since; send a new key",
    )


def claim_received(
    session: Session, principal: Principal, key: str, route: str, received: ReceivedUpload
) -> Claim | str:
    """:func:`claim` for a received upload (file digest, file name and fields make the request); a replay
    discards the received file."""
    fields = json.dumps(sorted(received.fields.items()))
    digest = fingerprint(route, received.pending.sha256, received.filename or "", fields)
    outcome = claim(session, principal, key, route, digest)
    if isinstance(outcome, str):
        received.pending.abort()
    return outcome


R = TypeVar("R", Job, Volume, Model)


def replay(request: Request, response: Response, session: Session, cls: type[R], resource_id: str, key: str) -> R:
    """The row a key's first request made, with the answer's ``Location`` and ``Idempotent-Replayed``
    headers set; 409 when it was deleted since."""
    row = session.get(cls, resource_id, populate_existing=True)
    if row is None:
        raise gone(cls.__name__.lower(), resource_id, key)
    replayed(response)
    locate(request, response, row)
    return row


def locate(request: Request, response: Response, row: Job | Volume | Model) -> None:
    """Set the answer's ``Location`` to the row's URL."""
    route, parameter = _ROUTES[type(row)]
    response.headers["Location"] = str(request.url_for(route, **{parameter: row.id}).path)


_ROUTES: dict[type, tuple[str, str]] = {Job: ("get_job", "job_id"), Volume: ("get_volume", "volume_id"),
                                        Model: ("get_model", "model_id")}  # fmt: skip
