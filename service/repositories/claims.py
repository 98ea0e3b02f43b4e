"""Claiming due rows of a work table for a worker, with a lease: the CRM outbox (`delivery`) and
HubSpot enrichment (`enrichment_job`) share it.

A work table has `id`, `status` (`pending`, `in_flight`, then its own final states), `attempts`,
`next_attempt_at`, `claimed_by`, `claim_token`, `lease_expires_at` and `updated_at`. While a row is
in flight its `next_attempt_at` is the lease's end, so one `(status, next_attempt_at)` index finds
both kinds of due row: pending ones whose time has come and claims that ran out (a killed worker's).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.ids import uuid7

WAITING = ("pending", "in_flight")


def _due(table: sa.Table, now: dt.datetime, where: Sequence[sa.ColumnElement[bool]]) -> list[sa.ColumnElement[bool]]:
    return [table.c.status.in_(WAITING), table.c.next_attempt_at <= now, *where]


async def any_due(
    conn: AsyncConnection, table: sa.Table, *, now: dt.datetime, where: Sequence[sa.ColumnElement[bool]] = ()
) -> bool:
    """Is any row due? A read, so that an idle worker's polls take no write lock (on SQLite the
    write lock is the whole database's)."""
    query = sa.select(sa.literal(1)).where(*_due(table, now, where)).limit(1)
    return (await conn.execute(query)).first() is not None


async def claim_due(
    conn: AsyncConnection,
    table: sa.Table,
    *,
    limit: int,
    worker: str,
    now: dt.datetime,
    lease: dt.timedelta,
    returning: Sequence[sa.ColumnElement[Any]],
    where: Sequence[sa.ColumnElement[bool]] = (),
    values: Mapping[str, Any] | None = None,
) -> tuple[uuid.UUID, list[sa.Row[Any]]]:
    """Claim up to `limit` due rows (oldest due first) under a new claim token, counting an attempt
    each; returns the token and the `returning` columns of the rows (`attempts` as counted). On
    PostgreSQL the rows are picked with `FOR UPDATE SKIP LOCKED`, so concurrent workers claim
    disjoint sets without waiting on each other; SQLite's write lock (the caller's `BEGIN
    IMMEDIATE`) serialises claims. `values` are set on the claimed rows too."""
    token = uuid7()
    if limit <= 0:
        return token, []
    chosen = (
        sa.select(table.c.id)
        .where(*_due(table, now, where))
        .order_by(table.c.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    expires = now + lease
    statement = (
        table.update()
        .where(table.c.id.in_(chosen.scalar_subquery()))
        .values(
            status="in_flight",
            attempts=table.c.attempts + 1,
            claimed_by=worker,
            claim_token=token,
            lease_expires_at=expires,
            next_attempt_at=expires,
            updated_at=now,
            **(values or {}),
        )
        .returning(*returning)
    )
    return token, list(await conn.execute(statement))


async def release_claims(
    conn: AsyncConnection,
    table: sa.Table,
    claims: Sequence[tuple[uuid.UUID, uuid.UUID]],
    *,
    now: dt.datetime,
    retry_at: dt.datetime,
) -> None:
    """Give back claimed rows `(id, claim token)` that were never tried (a worker stopping, a
    circuit that opened): pending again from `retry_at`, the attempt not counted; rows no longer
    held by that claim are left alone."""
    for token in {t for _, t in claims}:
        ids = [row_id for row_id, t in claims if t == token]
        await conn.execute(
            table.update()
            .where(table.c.id.in_(ids), table.c.claim_token == token, table.c.status == "in_flight")
            .values(
                status="pending",
                attempts=table.c.attempts - 1,
                next_attempt_at=retry_at,
                claimed_by=None,
                claim_token=None,
                lease_expires_at=None,
                updated_at=now,
            )
        )
