"""API keys: create (shown once), look up by hash, list and revoke. No web code.

A key is ``esk_`` followed by 43 URL-safe characters (256 random bits); only its SHA-256 is
stored. Because keys are random rather than chosen by people, one unsalted hash suffices: it
cannot be reversed by guessing. Its first :data:`PREFIX_LENGTH` characters are kept to name it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from embedseg_service.records.orm import ApiKey, utcnow

KEY_PREFIX = "esk_"
PREFIX_LENGTH = 12
OWNER_MAX = 255


@dataclass(frozen=True)
class NewKey:
    """A key just created: ``secret`` is the only copy of the key in clear."""

    row: ApiKey
    secret: str


class KeyNotFound(LookupError):
    """No key has the given id or prefix, or more than one does."""


def hash_key(secret: str) -> str:
    """The stored form of a key: its SHA-256, hexadecimal."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def check_owner(owner: str) -> str:
    """``owner`` stripped; ValueError when empty, too long or holding control characters."""
    owner = owner.strip()
    if not owner:
        raise ValueError("owner must not be empty")
    if len(owner) > OWNER_MAX:
        raise ValueError(f"owner must be at most {OWNER_MAX} characters")
    if any(ord(ch) < 32 for ch in owner):
        raise ValueError("owner must not contain control characters")
    return owner


def create_key(session: Session, owner: str, *, admin: bool = False, name: str | None = None) -> NewKey:
    """Insert a new key for ``owner`` (an admin key when ``admin``) and commit; returns it with its secret."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        owner=check_owner(owner),
        name=(name or "").strip()[:255] or None,
        prefix=secret[:PREFIX_LENGTH],
        key_hash=hash_key(secret),
        admin=admin,
    )
    session.add(row)
    session.commit()
    return NewKey(row=row, secret=secret)


def find_key(session: Session, secret: str) -> ApiKey | None:
    """The key row whose hash matches ``secret`` (revoked or not), or None."""
    return session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(secret))).first()


def keys_exist(session: Session) -> bool:
    """True once any key was ever created (revoking every key does not open the API again)."""
    return session.scalars(select(ApiKey.id).limit(1)).first() is not None


def list_keys(session: Session, owner: str | None = None) -> list[ApiKey]:
    """Every key (or ``owner``'s), oldest first."""
    statement = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if owner is not None:
        statement = statement.where(ApiKey.owner == owner)
    return list(session.scalars(statement).all())


def revoke_key(session: Session, id_or_prefix: str) -> ApiKey:
    """Revoke the key with this id or printed prefix and commit; :class:`KeyNotFound` unless exactly one matches.

    Revoking a revoked key keeps its first revocation time.
    """
    wanted = id_or_prefix.strip()
    if not wanted:
        raise KeyNotFound("give the key's id or its prefix (see: embedseg keys list)")
    rows = session.scalars(select(ApiKey).where(or_(ApiKey.id == wanted, ApiKey.prefix == wanted))).all()
    if len(rows) != 1:
        problem = "no key has" if not rows else f"{len(rows)} keys have"
        raise KeyNotFound(f"{problem} the id or prefix {wanted!r}; see: embedseg keys list")
    row = rows[0]
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.commit()
    return row
