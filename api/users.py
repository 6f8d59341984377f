"""API users: keys are random, shown once, and stored only as their SHA-256 (``ApiKey.key_hash``).

A SHA-256 without salt is enough here because keys are 256-bit random strings, not passwords: there is
nothing to guess, and a fast hash keeps per-request authentication cheap.
"""

from __future__ import annotations

import enum
import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from radialog.registry import ApiKey, utcnow

KEY_PREFIX = "rdl_"


class Role(str, enum.Enum):
    """reader: read studies and reports, ask questions; radiologist: also correct and approve;
    admin: also re-run studies and read the audit log, but does not approve (signing is clinical)."""

    READER = "reader"
    RADIOLOGIST = "radiologist"
    ADMIN = "admin"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_user(session: Session, name: str, role: Role | str) -> str:
    """Create user ``name`` and return its new key (the only time the key is known)."""
    role = Role(role)
    if session.scalar(select(ApiKey).where(ApiKey.name == name)) is not None:
        raise ValueError(f"user {name!r} exists (revoke it first or pick another name)")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(name=name, role=role.value, key_hash=hash_key(key), created_at=utcnow()))
    session.flush()
    return key


def revoke_user(session: Session, name: str) -> bool:
    """Revoke ``name``'s key; the row stays so the audit log keeps meaning. False when unknown."""
    user = session.scalar(select(ApiKey).where(ApiKey.name == name))
    if user is None:
        return False
    if user.revoked_at is None:
        user.revoked_at = utcnow()
    return True


def list_users(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.name)))


def authenticate(session: Session, key: str) -> ApiKey | None:
    """The active user holding ``key``, or None."""
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
