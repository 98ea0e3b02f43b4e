"""Reading leads with their identities and events."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.repositories.tables import inbound_event, lead, lead_identity, source


async def get_live_lead(conn: AsyncConnection, lead_id: uuid.UUID, *, lock: bool = False) -> dict[str, Any] | None:
    """The lead, or the lead it was merged into (followed to the survivor). With `lock`, each row
    read is locked for the transaction (PostgreSQL; SQLite writers are serialised anyway), so a
    merge cannot move the lead's rows from under the caller: one that committed meanwhile is seen
    (the locked read returns the row's latest version) and followed."""
    query = sa.select(lead).where(lead.c.id == sa.bindparam("lead_id"))
    if lock:
        query = query.with_for_update()
    for _ in range(100):
        row = (await conn.execute(query, {"lead_id": lead_id})).one_or_none()
        if row is None:
            return None
        if row.merged_into_id is None:
            return dict(row._mapping)
        lead_id = row.merged_into_id
    raise RuntimeError(f"merge chain of lead {lead_id} is too long")


async def leads_by_identities(
    conn: AsyncConnection, keys: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], uuid.UUID]:
    """The lead each `(namespace, value)` identity belongs to, for those that belong to one."""
    if not keys:
        return {}
    rows = await conn.execute(
        sa.select(lead_identity.c.namespace, lead_identity.c.value, lead_identity.c.lead_id).where(
            sa.tuple_(lead_identity.c.namespace, lead_identity.c.value).in_(sorted(set(keys)))
        )
    )
    return {(row.namespace, row.value): row.lead_id for row in rows}


async def lead_identities(conn: AsyncConnection, lead_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(lead_identity.c.namespace, lead_identity.c.value)
        .where(lead_identity.c.lead_id == lead_id)
        .order_by(lead_identity.c.namespace, lead_identity.c.value)
    )
    return [dict(r._mapping) for r in rows]


async def merged_into(conn: AsyncConnection, lead_id: uuid.UUID) -> list[uuid.UUID]:
    rows = await conn.execute(sa.select(lead.c.id).where(lead.c.merged_into_id == lead_id).order_by(lead.c.id))
    return list(rows.scalars())


async def lead_events(conn: AsyncConnection, lead_id: uuid.UUID, *, limit: int) -> tuple[list[dict[str, Any]], int]:
    """The lead's most recent events (by event time) and how many it has in all."""
    total = (await conn.execute(sa.select(sa.func.count()).where(inbound_event.c.lead_id == lead_id))).scalar_one()
    rows = await conn.execute(
        sa.select(
            inbound_event.c.id,
            source.c.name.label("source"),
            inbound_event.c.external_id,
            inbound_event.c.type,
            inbound_event.c.name,
            inbound_event.c.occurred_at,
            inbound_event.c.received_at,
            inbound_event.c.payload,
        )
        .join(source, source.c.id == inbound_event.c.source_id)
        .where(inbound_event.c.lead_id == lead_id)
        .order_by(inbound_event.c.occurred_at.desc(), inbound_event.c.id.desc())
        .limit(limit)
    )
    return [dict(r._mapping) for r in rows], int(total)
