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
    """The live key with this hash, marking it used now; None if unknown, revoked or expired.

    One UPDATE ... RETURNING: the check and the mark are atomic, and on SQLite the statement takes
    the write lock at once instead of upgrading a read (which fails, not waits, under a writer).
    """
    c = api_key.c
    row = (
        await conn.execute(
            api_key.update()
            .where(c.key_hash == key_hash, c.revoked_at.is_(None), sa.or_(c.expires_at.is_(None), c.expires_at > now))
            .values(last_used_at=now)
            .returning(*api_key.c)
        )
    ).one_or_none()
    return None if row is None else _row(row)


async def get_key(conn: AsyncConnection, key_id: int) -> ApiKeyRow | None:
    row = (await conn.execute(sa.select(api_key).where(api_key.c.id == key_id))).one_or_none()
    return None if row is None else _row(row)


async def list_keys(conn: AsyncConnection) -> list[ApiKeyRow]:
    rows = await conn.execute(sa.select(api_key).order_by(api_key.c.id))
    return [_row(r) for r in rows]


async def revoke_key(conn: AsyncConnection, *, key_id: int, now: dt.datetime) -> bool:
    result = await conn.execute(
        api_key.update().where(api_key.c.id == key_id, api_key.c.revoked_at.is_(None)).values(revoked_at=now)
    )
    return result.rowcount > 0
