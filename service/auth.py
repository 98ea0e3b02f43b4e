"""API credentials and roles.

Two kinds of bearer credential: API keys made here (`lsk_...`, by `leadscore keys create` or
`POST /v1/keys`), and, when configured, OpenID Connect tokens from the company's identity provider
(`service.oidc`). Either way the caller becomes a `Principal` with a role, `ops` or `viewer`.

Keys are 256-bit random tokens, so a plain SHA-256 is enough to store them (no slow hash is
needed against guessing); only the hash and a short display prefix are kept. Every key change is
written to the audit log in the same transaction.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, Field, StringConstraints
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from service.audit import append_audit
from service.db import write_transaction
from service.errors import Forbidden, LeadscoreError, NotFound, StorageUnavailable, Unauthenticated
from service.repositories import keys as repo
from service.repositories.keys import ApiKeyRow

if TYPE_CHECKING:
    from service.oidc import OidcVerifier

Role = Literal["ops", "viewer"]
ROLES: tuple[Role, ...] = ("ops", "viewer")
KEY_PREFIX = "lsk_"


@dataclass(frozen=True)
class Principal:
    """Who is calling.

    `subject` is stable and unique across kinds, so two principals are the same identity exactly
    when their subjects are equal (self-approval checks compare it): `key:<id>` for an API key,
    `oidc:<sub>` for an identity-provider token, `cli:<OS user>` for the command line,
    `system:<what>` for the service itself. `name` is for people to read (the key's name, the
    token's `preferred_username`/`email`/`name`, the OS user), may be empty, and is not unique.
    """

    subject: str
    role: Role
    name: str = ""


# The actor of changes made by the service itself, or by code that names no one.
SYSTEM = Principal(subject="system", role="ops", name="system")


class KeyNotFound(NotFound):
    """No API key has this id (404)."""


class KeyRevoked(LeadscoreError):
    """The API key was revoked already (409)."""

    status = 409


@dataclass(frozen=True)
class CreatedKey:
    id: int
    name: str
    role: Role
    key: str
    expires_at: dt.datetime | None
    created_at: dt.datetime


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _key_state(row: ApiKeyRow) -> dict[str, object]:
    # Never the key, its hash or its display prefix: the audit log is readable by every viewer.
    return {
        "id": row.id,
        "name": row.name,
        "role": row.role,
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
    }


async def create_key(
    engine: AsyncEngine,
    *,
    name: str,
    role: Role,
    now: dt.datetime,
    expires_at: dt.datetime | None = None,
    actor: Principal = SYSTEM,
    reason: str | None = None,
) -> CreatedKey:
    """Make a key; the only time it is seen in clear is in the result. Audited as `api_key.created`."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; known: {', '.join(ROLES)}")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    async with write_transaction(engine) as conn:
        key_id = await repo.insert_key(
            conn,
            name=name,
            role=role,
            prefix=key[:12],
            key_hash=hash_key(key),
            now=now,
            expires_at=expires_at,
        )
        created = await repo.get_key(conn, key_id)
        assert created is not None
        await append_audit(
            conn,
            actor=actor.subject,
            role=actor.role,
            action="api_key.created",
            entity="api_key",
            entity_id=str(key_id),
            before=None,
            after=_key_state(created),
            reason=reason,
            now=now,
        )
    return CreatedKey(id=key_id, name=name, role=role, key=key, expires_at=expires_at, created_at=now)


async def revoke_key(
    engine: AsyncEngine, *, key_id: int, now: dt.datetime, actor: Principal = SYSTEM, reason: str | None = None
) -> ApiKeyRow:
    """Revoke a key at once (`KeyNotFound`, `KeyRevoked`); audited as `api_key.revoked`."""
    async with write_transaction(engine) as conn:
        before = await repo.get_key(conn, key_id)
        if before is None:
            raise KeyNotFound(f"no API key with id {key_id}")
        if not await repo.revoke_key(conn, key_id=key_id, now=now):
            raise KeyRevoked(f"API key {key_id} was revoked at {before.revoked_at}")
        after = await repo.get_key(conn, key_id)
        assert after is not None
        await append_audit(
            conn,
            actor=actor.subject,
            role=actor.role,
            action="api_key.revoked",
            entity="api_key",
            entity_id=str(key_id),
            before=_key_state(before),
            after=_key_state(after),
            reason=reason,
            now=now,
        )
    return after


async def list_keys(engine: AsyncEngine) -> list[ApiKeyRow]:
    async with engine.connect() as conn:
        return await repo.list_keys(conn)


async def authenticate(
    engine: AsyncEngine, authorization: str | None, *, now: dt.datetime, oidc: OidcVerifier | None = None
) -> Principal:
    """The principal behind an `Authorization` header: an API key (`lsk_...`), else an OpenID
    Connect token when `oidc` is configured. `Unauthenticated` (401) otherwise."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("send an API key or identity-provider token as `Authorization: Bearer <token>`")
    if not token.startswith(KEY_PREFIX):
        if oidc is None:
            raise Unauthenticated("unknown, expired or revoked credential")
        return await oidc.verify(token)
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
    return Principal(subject=f"key:{row.id}", role=role, name=row.name)


def require_role(principal: Principal, allowed: tuple[Role, ...]) -> Principal:
    if principal.role not in allowed:
        raise Forbidden(f"this needs the {' or '.join(allowed)} role; the credential has {principal.role}")
    return principal


# --- HTTP schemas ---------------------------------------------------------------------------------


class ApiKeyRead(BaseModel):
    """An API key as listed: never the key itself, only its first characters."""

    id: int
    name: str
    role: Role
    prefix: str = Field(description="The key's first 12 characters, to recognise it.")
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None

    @classmethod
    def of(cls, row: ApiKeyRow) -> ApiKeyRead:
        return cls(
            id=row.id,
            name=row.name,
            role="ops" if row.role == "ops" else "viewer",
            prefix=row.prefix,
            created_at=row.created_at,
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
            last_used_at=row.last_used_at,
        )


Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]


class ApiKeyCreate(BaseModel):
    name: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=100)]
    role: Role
    expires_in_days: int | None = Field(default=None, ge=1, le=3650, description="Default: never expires.")
    reason: Reason | None = Field(default=None, description="Why, for the audit log.")


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="The key, shown this once: only its hash is stored.")

    @classmethod
    def of_created(cls, created: CreatedKey) -> ApiKeyCreated:
        return cls(
            id=created.id,
            name=created.name,
            role=created.role,
            prefix=created.key[:12],
            created_at=created.created_at,
            expires_at=created.expires_at,
            revoked_at=None,
            last_used_at=None,
            key=created.key,
        )
