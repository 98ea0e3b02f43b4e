"""API keys (stored as SHA-256 hashes)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.repositories.tables import api_key


@dataclass(frozen=True)
class ApiKeyRow:
    id: int
    name: str
    role: str
    prefix: str
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None


def _row(r: sa.Row[tuple[object, ...]]) -> ApiKeyRow:
    m = r._mapping
    return ApiKeyRow(
        id=m["id"],
        name=m["name"],
        role=m["role"],
        prefix=m["prefix"],
        created_at=m["created_at"],
        expires_at=m["expires_at"],
        revoked_at=m["revoked_at"],
        last_used_at=m["last_used_at"],
    )


async def insert_key(
    conn: AsyncConnection,
    *,
    name: str,
    role: str,
    prefix: str,
    key_hash: str,
    now: dt.datetime,
    expires_at: dt.datetime | None,
) -> int:
    key_id: int = (
        await conn.execute(
            api_key.insert()
            .values(name=name, role=role, prefix=prefix, key_hash=key_hash, created_at=now, expires_at=expires_at)
            .returning(api_key.c.id)
        )
    ).scalar_one()
    return key_id


async def use_key(conn: AsyncConnection, *, key_hash: str, now: dt.datetime) -> ApiKeyRow | None:
    """The live key with this hash, marking it used now; None if unknown, revoked or expired."""
    row = (await conn.execute(sa.select(api_key).where(api_key.c.key_hash == key_hash))).one_or_none()
    if row is None:
        return None
    key = _row(row)
    if key.revoked_at is not None or (key.expires_at is not None and key.expires_at <= now):
        return None
    await conn.execute(api_key.update().where(api_key.c.id == key.id).values(last_used_at=now))
    return key


async def list_keys(conn: AsyncConnection) -> list[ApiKeyRow]:
    rows = await conn.execute(sa.select(api_key).order_by(api_key.c.id))
    return [_row(r) for r in rows]


async def revoke_key(conn: AsyncConnection, *, key_id: int, now: dt.datetime) -> bool:
    result = await conn.execute(
        api_key.update().where(api_key.c.id == key_id, api_key.c.revoked_at.is_(None)).values(revoked_at=now)
    )
    return result.rowcount > 0
