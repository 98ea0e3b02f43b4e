"""The statements of one group-commit transaction of the ingest path (SQLAlchemy Core)."""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from service.identity import Identity, LeadState, Merge
from service.repositories.tables import (
    inbound_event,
    inbound_request,
    insert_ignoring_conflicts,
    lead,
    lead_identity,
    lead_merge,
)

# Larger IN lists are split so no statement exceeds SQLite's bound-parameter limit.
_CHUNK = 500


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory-lock key for a logical name."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def lock_names(conn: AsyncConnection, keys: Iterable[int]) -> None:
    """Take transaction-scoped advisory locks on PostgreSQL, in a fixed order (no deadlock between
    batches). SQLite needs none: `BEGIN IMMEDIATE` already serialises writers."""
    ordered = sorted(set(keys))
    if conn.dialect.name != "postgresql" or not ordered:
        return
    await conn.execute(
        sa.text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS t(k)"),
        {"keys": ordered},
    )


def _one_of(column: sa.ColumnElement[Any], values: Sequence[Any], dialect: str) -> sa.ColumnElement[bool]:
    """`column IN values`. On PostgreSQL as `= ANY(:array)`: one SQL text whatever the count, so
    asyncpg prepares it once (an IN list of each new length is a new statement to prepare)."""
    if dialect == "postgresql":
        return column == sa.any_(sa.bindparam(None, list(values), type_=postgresql.ARRAY(column.type)))
    return column.in_(values)


def _grouped(keys: Iterable[tuple[Any, str]]) -> dict[Any, list[str]]:
    groups: dict[Any, list[str]] = {}
    for first, second in sorted(set(keys)):
        groups.setdefault(first, []).append(second)
    return groups


async def find_events(
    conn: AsyncConnection, keys: Sequence[tuple[int, str]]
) -> dict[tuple[int, str], tuple[uuid.UUID, uuid.UUID]]:
    """Events already stored under `(source_id, external_id)`: their id and lead id."""
    found: dict[tuple[int, str], tuple[uuid.UUID, uuid.UUID]] = {}
    for source_id, external_ids in _grouped(keys).items():
        for chunk in _chunks(external_ids):
            rows = await conn.execute(
                sa.select(inbound_event.c.external_id, inbound_event.c.id, inbound_event.c.lead_id).where(
                    inbound_event.c.source_id == source_id,
                    _one_of(inbound_event.c.external_id, chunk, conn.dialect.name),
                )
            )
            for external_id, event_id, lead_id in rows:
                found[(source_id, external_id)] = (event_id, lead_id)
    return found


async def find_and_lock_leads(
    conn: AsyncConnection, keys: Sequence[Identity]
) -> tuple[dict[Identity, uuid.UUID], dict[uuid.UUID, LeadState], dict[uuid.UUID, uuid.UUID]]:
    """In one statement: which lead owns each identity, and those leads, locked in id order.

    Returns `(identity -> lead id, lead states, {merged id: survivor id})`; the last lists leads
    that a concurrent transaction merged away while we waited for their lock.
    """
    identities: dict[Identity, uuid.UUID] = {}
    states: dict[uuid.UUID, LeadState] = {}
    merged: dict[uuid.UUID, uuid.UUID] = {}
    unique = sorted(set(keys))
    for chunk in _chunks(unique):
        if conn.dialect.name == "postgresql":
            wanted = (
                sa.func.unnest(
                    sa.bindparam(None, [ns for ns, _ in chunk], type_=postgresql.ARRAY(sa.String())),
                    sa.bindparam(None, [v for _, v in chunk], type_=postgresql.ARRAY(sa.String())),
                )
                .table_valued("ns", "v")
                .render_derived()
            )
            match = sa.and_(lead_identity.c.namespace == wanted.c.ns, lead_identity.c.value == wanted.c.v)
            source: sa.FromClause = lead_identity.join(wanted, match)
            where: sa.ColumnElement[bool] = sa.true()
        else:
            source = lead_identity
            where = sa.tuple_(lead_identity.c.namespace, lead_identity.c.value).in_(chunk)
        rows = await conn.execute(
            sa.select(
                lead_identity.c.namespace,
                lead_identity.c.value,
                lead.c.id,
                lead.c.created_at,
                lead.c.traits,
                lead.c.trait_times,
                lead.c.first_event_at,
                lead.c.last_event_at,
                lead.c.merged_into_id,
            )
            .select_from(source.join(lead, lead.c.id == lead_identity.c.lead_id))
            .where(where)
            .order_by(lead.c.id)
            .with_for_update(of=lead)
        )
        for row in rows:
            identities[(row.namespace, row.value)] = row.id
            _keep(row, states, merged)
    return identities, states, merged


def _keep(row: Any, states: dict[uuid.UUID, LeadState], merged: dict[uuid.UUID, uuid.UUID]) -> None:
    if row.id in states:
        return
    states[row.id] = LeadState(
        id=row.id,
        created_at=row.created_at,
        traits=dict(row.traits),
        trait_times=dict(row.trait_times),
        first_event_at=row.first_event_at,
        last_event_at=row.last_event_at,
    )
    if row.merged_into_id is not None:
        merged[row.id] = row.merged_into_id


async def lock_leads(
    conn: AsyncConnection, ids: Iterable[uuid.UUID]
) -> tuple[dict[uuid.UUID, LeadState], dict[uuid.UUID, uuid.UUID]]:
    """Lock and load leads by id (in id order), as `find_and_lock_leads` does."""
    states: dict[uuid.UUID, LeadState] = {}
    merged: dict[uuid.UUID, uuid.UUID] = {}
    for chunk in _chunks(sorted(set(ids))):
        rows = await conn.execute(
            sa.select(
                lead.c.id,
                lead.c.created_at,
                lead.c.traits,
                lead.c.trait_times,
                lead.c.first_event_at,
                lead.c.last_event_at,
                lead.c.merged_into_id,
            )
            .where(_one_of(lead.c.id, chunk, conn.dialect.name))
            .order_by(lead.c.id)
            .with_for_update()
        )
        for row in rows:
            _keep(row, states, merged)
    return states, merged


async def insert_requests(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(inbound_request.insert(), rows)


async def insert_leads(conn: AsyncConnection, leads: Sequence[LeadState], now: dt.datetime) -> None:
    if leads:
        await conn.execute(
            lead.insert(),
            [
                {
                    "id": s.id,
                    "created_at": s.created_at,
                    "updated_at": now,
                    "traits": s.traits,
                    "trait_times": s.trait_times,
                    "first_event_at": s.first_event_at,
                    "last_event_at": s.last_event_at,
                    "merged_into_id": None,
                }
                for s in leads
            ],
        )


async def update_leads(conn: AsyncConnection, leads: Sequence[LeadState], now: dt.datetime) -> None:
    if leads:
        await conn.execute(
            lead.update()
            .where(lead.c.id == sa.bindparam("b_id"))
            .values(
                updated_at=now,
                traits=sa.bindparam("b_traits"),
                trait_times=sa.bindparam("b_trait_times"),
                first_event_at=sa.bindparam("b_first"),
                last_event_at=sa.bindparam("b_last"),
            ),
            [
                {
                    "b_id": s.id,
                    "b_traits": s.traits,
                    "b_trait_times": s.trait_times,
                    "b_first": s.first_event_at,
                    "b_last": s.last_event_at,
                }
                for s in leads
            ],
        )


async def insert_identities(conn: AsyncConnection, identities: dict[Identity, uuid.UUID], now: dt.datetime) -> None:
    if identities:
        await conn.execute(
            insert_ignoring_conflicts(lead_identity, conn.dialect.name),
            [
                {"lead_id": lead_id, "namespace": ns, "value": value, "created_at": now}
                for (ns, value), lead_id in identities.items()
            ],
        )


async def record_merges(conn: AsyncConnection, merges: Sequence[Merge], now: dt.datetime) -> None:
    """Move everything of each merged lead to its survivor and record the merge."""
    for m in merges:
        await conn.execute(
            lead_identity.update().where(lead_identity.c.lead_id == m.merged_id).values(lead_id=m.survivor_id)
        )
        await conn.execute(
            inbound_event.update().where(inbound_event.c.lead_id == m.merged_id).values(lead_id=m.survivor_id)
        )
        await conn.execute(
            lead.update()
            .where(sa.or_(lead.c.id == m.merged_id, lead.c.merged_into_id == m.merged_id))
            .values(merged_into_id=m.survivor_id, updated_at=now)
        )
    if merges:
        await conn.execute(
            lead_merge.insert(),
            [
                {
                    "survivor_id": m.survivor_id,
                    "merged_id": m.merged_id,
                    "event_id": m.event_id,
                    "merged_at": now,
                    "identities": [{"namespace": ns, "value": v} for ns, v in m.identities],
                }
                for m in merges
            ],
        )


async def insert_events(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    if rows:
        await conn.execute(insert_ignoring_conflicts(inbound_event, conn.dialect.name), rows)
