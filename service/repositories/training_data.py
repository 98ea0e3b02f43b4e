"""Reading CRM outcomes and the events of their leads, for a training-data export.

"Labelled outcomes" are outcomes of the given kinds that occurred in `[since, until)` (either bound
optional); they choose the exported leads and their labels. A lead's *cutoff* is its first outcome
of any kind, whenever it happened: the events that count are those that occurred strictly before
it. Every query here filters by the same clauses, so the trait names and the rows agree.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.repositories.tables import inbound_event, lead, outcome


def _outcome_filter(
    *, kinds: Collection[str], since: dt.datetime | None, until: dt.datetime | None
) -> list[sa.ColumnElement[bool]]:
    conditions: list[sa.ColumnElement[bool]] = [outcome.c.kind.in_(sorted(kinds))]
    if since is not None:
        conditions.append(outcome.c.occurred_at >= since)
    if until is not None:
        conditions.append(outcome.c.occurred_at < until)
    return conditions


def _first_outcomes(lead_ids: sa.ColumnElement[bool]) -> sa.Subquery:
    """Per lead picked by `lead_ids` (a condition on `outcome.lead_id`): its first outcome's time."""
    return (
        sa.select(outcome.c.lead_id, sa.func.min(outcome.c.occurred_at).label("first_at"))
        .where(lead_ids)
        .group_by(outcome.c.lead_id)
        .subquery("first_outcome")
    )


def _before_first_outcome(first: sa.Subquery) -> list[sa.ColumnElement[bool]]:
    return [inbound_event.c.lead_id == first.c.lead_id, inbound_event.c.occurred_at < first.c.first_at]


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
    """The names of every trait in the events before the cutoff of the live leads with a labelled
    outcome, sorted: the traits that replaying those events gives them."""
    labelled = sa.select(outcome.c.lead_id).where(*_outcome_filter(kinds=kinds, since=since, until=until))
    first = _first_outcomes(outcome.c.lead_id.in_(labelled))
    events = inbound_event.join(first, sa.and_(*_before_first_outcome(first))).join(
        lead, lead.c.id == inbound_event.c.lead_id
    )
    live = lead.c.merged_into_id.is_(None)
    query: sa.Select[Any]
    if conn.dialect.name == "postgresql":
        # `payload` is `json` on PostgreSQL (see `models.types.json_document`).
        keys = sa.func.json_object_keys(inbound_event.c.payload.op("->")("traits"))
        query = sa.select(keys).select_from(events).where(live).distinct()
    else:
        pairs = sa.func.json_each(inbound_event.c.payload, "$.traits").table_valued("key")
        query = sa.select(pairs.c.key).select_from(events).join(pairs, sa.true()).where(live).distinct()
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


async def live_lead_ids(conn: AsyncConnection, lead_ids: Collection[uuid.UUID]) -> list[uuid.UUID]:
    """Those of `lead_ids` that are not merged, in id order."""
    if not lead_ids:
        return []
    rows = await conn.execute(
        sa.select(lead.c.id).where(lead.c.id.in_(list(lead_ids)), lead.c.merged_into_id.is_(None)).order_by(lead.c.id)
    )
    return [row[0] for row in rows]


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


async def events_before_first_outcome(conn: AsyncConnection, lead_ids: Collection[uuid.UUID]) -> list[dict[str, Any]]:
    """lead_id, occurred_at and traits (a dict) of every event of `lead_ids` that occurred strictly
    before the lead's first outcome (of any kind), ordered by lead, occurred_at and id. A lead
    without an outcome has none."""
    if not lead_ids:
        return []
    ids = list(lead_ids)
    first = _first_outcomes(outcome.c.lead_id.in_(ids))
    traits: sa.ColumnElement[Any]
    if conn.dialect.name == "postgresql":
        traits = inbound_event.c.payload.op("->", return_type=sa.JSON)("traits")
    else:
        traits = sa.func.json_extract(inbound_event.c.payload, "$.traits", type_=sa.JSON)
    rows = await conn.execute(
        sa.select(inbound_event.c.lead_id, inbound_event.c.occurred_at, traits.label("traits"))
        .join(first, sa.and_(*_before_first_outcome(first)))
        .where(inbound_event.c.lead_id.in_(ids))
        .order_by(inbound_event.c.lead_id, inbound_event.c.occurred_at, inbound_event.c.id)
    )
    return [dict(row._mapping) for row in rows]
