"""Reading CRM outcomes and the traits of their leads, for a training-data export.

"Labelled outcomes" are outcomes of the given kinds that occurred in `[since, until)` (either bound
optional). Every query here filters by the same clause, so the trait names and the rows agree.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.repositories.tables import lead, outcome


def _outcome_filter(
    *, kinds: Collection[str], since: dt.datetime | None, until: dt.datetime | None
) -> list[sa.ColumnElement[bool]]:
    conditions: list[sa.ColumnElement[bool]] = [outcome.c.kind.in_(sorted(kinds))]
    if since is not None:
        conditions.append(outcome.c.occurred_at >= since)
    if until is not None:
        conditions.append(outcome.c.occurred_at < until)
    return conditions


@asynccontextmanager
async def read_snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A read-only transaction that sees one snapshot for all its statements, so that the trait
    names read first match the rows paged afterwards. (SQLite's deferred `BEGIN`, see `service.db`,
    reads one WAL snapshot from its first read to its end.)"""
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        async with conn.begin():
            yield conn


async def labelled_trait_names(
    conn: AsyncConnection, *, kinds: Collection[str], since: dt.datetime | None, until: dt.datetime | None
) -> list[str]:
    """The names of every trait of the live leads with a labelled outcome, sorted."""
    labelled = sa.select(outcome.c.lead_id).where(*_outcome_filter(kinds=kinds, since=since, until=until))
    live = (lead.c.merged_into_id.is_(None), lead.c.id.in_(labelled))
    query: sa.Select[Any]
    if conn.dialect.name == "postgresql":
        query = sa.select(sa.func.jsonb_object_keys(lead.c.traits)).where(*live).distinct()
    else:
        keys = sa.func.json_each(lead.c.traits).table_valued("key")
        query = sa.select(keys.c.key).select_from(lead).join(keys, sa.true()).where(*live).distinct()
    return sorted(str(name) for (name,) in await conn.execute(query))


async def labelled_lead_ids_page(
    conn: AsyncConnection,
    *,
    kinds: Collection[str],
    since: dt.datetime | None,
    until: dt.datetime | None,
    after: uuid.UUID | None,
    limit: int,
) -> list[uuid.UUID]:
    """The next `limit` distinct lead ids (in id order, after `after`) that have a labelled outcome,
    merged or not: read in the order of the `(lead_id, occurred_at)` index of `outcome`."""
    query = sa.select(outcome.c.lead_id).where(*_outcome_filter(kinds=kinds, since=since, until=until))
    if after is not None:
        query = query.where(outcome.c.lead_id > after)
    query = query.group_by(outcome.c.lead_id).order_by(outcome.c.lead_id).limit(limit)
    return [row[0] for row in await conn.execute(query)]


async def live_leads_with_traits(conn: AsyncConnection, lead_ids: Collection[uuid.UUID]) -> list[dict[str, Any]]:
    """id, traits and trait_times of those of `lead_ids` that are not merged, in id order."""
    if not lead_ids:
        return []
    rows = await conn.execute(
        sa.select(lead.c.id, lead.c.traits, lead.c.trait_times)
        .where(lead.c.id.in_(list(lead_ids)), lead.c.merged_into_id.is_(None))
        .order_by(lead.c.id)
    )
    return [dict(row._mapping) for row in rows]


async def labelled_outcomes(
    conn: AsyncConnection,
    lead_ids: Collection[uuid.UUID],
    *,
    kinds: Collection[str],
    since: dt.datetime | None,
    until: dt.datetime | None,
) -> list[dict[str, Any]]:
    """id, lead_id, kind and occurred_at of every labelled outcome of `lead_ids`."""
    if not lead_ids:
        return []
    rows = await conn.execute(
        sa.select(outcome.c.id, outcome.c.lead_id, outcome.c.kind, outcome.c.occurred_at).where(
            outcome.c.lead_id.in_(list(lead_ids)), *_outcome_filter(kinds=kinds, since=since, until=until)
        )
    )
    return [dict(row._mapping) for row in rows]
