"""API credentials: keys made by `leadscore keys create`, sent as `Authorization: Bearer <key>`.

Keys are 256-bit random tokens, so a plain SHA-256 is enough to store them (no slow hash is
needed against guessing); only the hash and a short display prefix are kept.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import write_transaction
from service.errors import Forbidden, StorageUnavailable, Unauthenticated
from service.repositories import keys as repo

Role = Literal["ops", "viewer"]
ROLES: tuple[Role, ...] = ("ops", "viewer")
KEY_PREFIX = "lsk_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's id and name, and its role."""

    subject: str
    role: Role


@dataclass(frozen=True)
class CreatedKey:
    id: int
    name: str
    role: Role
    key: str
    expires_at: dt.datetime | None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


async def create_key(
    engine: AsyncEngine, *, name: str, role: Role, now: dt.datetime, expires_at: dt.datetime | None = None
) -> CreatedKey:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    async with engine.begin() as conn:
        key_id = await repo.insert_key(
            conn,
            name=name,
            role=role,
            prefix=key[:12],
            key_hash=hash_key(key),
            now=now,
            expires_at=expires_at,
        )
    return CreatedKey(id=key_id, name=name, role=role, key=key, expires_at=expires_at)


async def authenticate(engine: AsyncEngine, authorization: str | None, *, now: dt.datetime) -> Principal:
    """The principal behind an `Authorization` header, or `Unauthenticated`."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("send an API key as `Authorization: Bearer <key>`")
    if not token.startswith(KEY_PREFIX):
        raise Unauthenticated("unknown, expired or revoked credential")
    try:
        # A write transaction from the start: on SQLite a read that turns into a write fails at
        # once ("database is locked", no busy wait) when another connection wrote in between.
        async with write_transaction(engine) as conn:
            row = await repo.use_key(conn, key_hash=hash_key(token), now=now)
    except (DBAPIError, OSError, TimeoutError) as exc:
        raise StorageUnavailable("the database is unavailable; retry later") from exc
    if row is None or row.role not in ROLES:
        raise Unauthenticated("unknown, expired or revoked credential")
    role: Role = "ops" if row.role == "ops" else "viewer"
    return Principal(subject=f"key:{row.id}:{row.name}", role=role)


def require_role(principal: Principal, allowed: tuple[Role, ...]) -> Principal:
    if principal.role not in allowed:
        raise Forbidden(f"this needs the {' or '.join(allowed)} role; the credential has {principal.role}")
    return principal
