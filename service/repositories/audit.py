"""The audit log: appends under a lock, pages, and the whole chain in id order."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.repositories.tables import audit_entry

# PostgreSQL: appends are serialised by a transaction-scoped advisory lock. The two-key form lives
# in a key space apart from the one-key locks the ingest path takes, so they never collide.
_LOCK_SPACE = 0x4C53  # "LS"
_AUDIT_APPEND = 1
_APPEND_LOCK = sa.text("SELECT pg_advisory_xact_lock(:space, :key)").bindparams(space=_LOCK_SPACE, key=_AUDIT_APPEND)


@dataclass(frozen=True)
class AuditRow:
    id: int
    recorded_at: dt.datetime
    actor: str
    role: str
    action: str
    entity: str
    entity_id: str | None
    before: Any
    after: Any
    reason: str | None
    prev_hash: str
    hash: str


@dataclass(frozen=True)
class AuditFilter:
    """Exact matches on the named columns; `since` inclusive, `until` exclusive."""

    action: str | None = None
    entity: str | None = None
    entity_id: str | None = None
    actor: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None


def _row(r: sa.Row[Any]) -> AuditRow:
    return AuditRow(**r._mapping)


async def lock_head(conn: AsyncConnection) -> tuple[int, str] | None:
    """Take the append lock and return the last entry's id and hash (None while the log is empty).

    PostgreSQL: the advisory lock is held until the caller's transaction ends, and the head is read
    after it is granted (READ COMMITTED takes a new snapshot per statement), so two appenders never
    see the same head. SQLite: the caller's transaction must hold the write lock (BEGIN IMMEDIATE,
    `service.db.write_transaction`); SQLite allows one writer at a time. Either way the primary key
    (the writer assigns head id + 1) refuses a second entry after the same head.
    """
    if conn.dialect.name == "postgresql":
        await conn.execute(_APPEND_LOCK)
    row = (
        await conn.execute(sa.select(audit_entry.c.id, audit_entry.c.hash).order_by(audit_entry.c.id.desc()).limit(1))
    ).one_or_none()
    return None if row is None else (row.id, row.hash)


async def insert_entry(conn: AsyncConnection, entry: AuditRow) -> None:
    await conn.execute(audit_entry.insert().values(**vars(entry)))


def _where(filters: AuditFilter) -> list[sa.ColumnElement[bool]]:
    c = audit_entry.c
    clauses: list[sa.ColumnElement[bool]] = []
    for column, value in (
        (c.action, filters.action),
        (c.entity, filters.entity),
        (c.entity_id, filters.entity_id),
        (c.actor, filters.actor),
    ):
        if value is not None:
            clauses.append(column == value)
    if filters.since is not None:
        clauses.append(c.recorded_at >= filters.since)
    if filters.until is not None:
        clauses.append(c.recorded_at < filters.until)
    return clauses


async def list_entries(
    conn: AsyncConnection,
    *,
    filters: AuditFilter,
    after_id: int | None,
    before_id: int | None,
    newest_first: bool,
    limit: int,
) -> list[AuditRow]:
    """Entries matching `filters` with after_id < id < before_id, in id order, at most `limit`."""
    c = audit_entry.c
    clauses = _where(filters)
    if after_id is not None:
        clauses.append(c.id > after_id)
    if before_id is not None:
        clauses.append(c.id < before_id)
    statement = (
        sa.select(audit_entry).where(*clauses).order_by(c.id.desc() if newest_first else c.id.asc()).limit(limit)
    )
    return [_row(r) for r in await conn.execute(statement)]


async def iter_entries(
    conn: AsyncConnection,
    *,
    filters: AuditFilter | None = None,
    after_id: int | None = None,
    before_id: int | None = None,
    newest_first: bool = False,
    batch_size: int = 1000,
) -> AsyncIterator[list[AuditRow]]:
    """Every matching entry in batches (keyset paging: memory stays flat however long the log)."""
    filters = filters or AuditFilter()
    while True:
        batch = await list_entries(
            conn,
            filters=filters,
            after_id=after_id,
            before_id=before_id,
            newest_first=newest_first,
            limit=batch_size,
        )
        if not batch:
            return
        yield batch
        if newest_first:
            before_id = batch[-1].id
        else:
            after_id = batch[-1].id
        if len(batch) < batch_size:
            return
