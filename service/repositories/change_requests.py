"""Change requests: insert, read, and state changes made with conditional updates (a change moves
only from the status the caller saw, so two replicas or two people cannot both apply or decide)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.repositories.tables import change_request


async def insert(conn: AsyncConnection, row: dict[str, Any]) -> int:
    new_id: int = (
        await conn.execute(change_request.insert().values(**row).returning(change_request.c.id))
    ).scalar_one()
    return new_id


async def get(conn: AsyncConnection, request_id: int, *, lock: bool = False) -> dict[str, Any] | None:
    query = sa.select(change_request).where(change_request.c.id == request_id)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = (await conn.execute(query)).one_or_none()
    return dict(row._mapping) if row is not None else None


async def list_requests(
    conn: AsyncConnection, *, statuses: Sequence[str] | None, limit: int, before_id: int | None
) -> list[dict[str, Any]]:
    """Newest first; `before_id` pages on."""
    query = sa.select(change_request)
    if statuses:
        query = query.where(change_request.c.status.in_(list(statuses)))
    if before_id is not None:
        query = query.where(change_request.c.id < before_id)
    rows = await conn.execute(query.order_by(change_request.c.id.desc()).limit(limit))
    return [dict(r._mapping) for r in rows]


async def transition(
    conn: AsyncConnection, request_id: int, *, expected: Sequence[str], values: dict[str, Any]
) -> bool:
    """Set `values` on the request if its status is one of `expected`; whether it was."""
    result = await conn.execute(
        change_request.update()
        .where(change_request.c.id == request_id, change_request.c.status.in_(list(expected)))
        .values(**values)
    )
    return bool(result.rowcount)


async def update(conn: AsyncConnection, request_id: int, values: dict[str, Any]) -> None:
    await conn.execute(change_request.update().where(change_request.c.id == request_id).values(**values))


async def due(conn: AsyncConnection, *, now: dt.datetime, limit: int) -> list[int]:
    """Approved requests whose time to apply has come, oldest first."""
    rows = await conn.execute(
        sa.select(change_request.c.id)
        .where(
            change_request.c.status == "approved",
            change_request.c.apply_at.is_not(None),
            change_request.c.apply_at <= now,
        )
        .order_by(change_request.c.apply_at, change_request.c.id)
        .limit(limit)
    )
    return [int(r[0]) for r in rows]


async def applied_versions(conn: AsyncConnection, *, target: str) -> set[int]:
    """Pipeline versions or policy versions that an applied change request made active."""
    rows = await conn.execute(
        sa.select(change_request.c.result).where(
            change_request.c.status == "applied", change_request.c.result.is_not(None)
        )
    )
    versions: set[int] = set()
    for (result,) in rows:
        if result.get("target") == target and isinstance(result.get("version"), int):
            versions.add(result["version"])
    return versions
