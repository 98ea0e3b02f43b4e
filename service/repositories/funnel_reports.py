"""What the funnel report reads: the leads it concerns, their first event's source and their stage
history up to the end of the period, in one consistent snapshot."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.repositories.tables import inbound_event, lead, source, stage_transition, threshold_policy


@asynccontextmanager
async def read_snapshot(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A read-only transaction in which every statement sees the same data: a report's queries
    must agree with each other (PostgreSQL's default, READ COMMITTED, gives each statement its own
    snapshot; SQLite's read transaction is one snapshot already)."""
    async with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        async with conn.begin():
            yield conn


@dataclass(frozen=True)
class FunnelLead:
    """A live lead: when it was created, the stage it started in, and the source of its first event."""

    id: uuid.UUID
    created_at: dt.datetime
    initial_stage: str
    source: str | None


@dataclass(frozen=True)
class FunnelMove:
    """One stage transition of a `FunnelLead`."""

    lead_id: uuid.UUID
    from_stage: str
    to_stage: str
    transitioned_at: dt.datetime
    cause: str
    policy_id: int | None


async def source_id(conn: AsyncConnection, name: str) -> int | None:
    value = (await conn.execute(sa.select(source.c.id).where(source.c.name == name))).scalar_one_or_none()
    return int(value) if value is not None else None


def _first_source() -> sa.ScalarSelect[Any]:
    # First by event time (first-touch attribution); the (lead_id, occurred_at) index serves it.
    return (
        sa.select(inbound_event.c.source_id)
        .where(inbound_event.c.lead_id == lead.c.id)
        .order_by(inbound_event.c.occurred_at, inbound_event.c.received_at, inbound_event.c.id)
        .limit(1)
        .correlate(lead)
        .scalar_subquery()
    )


def _initial_stage() -> sa.ScalarSelect[Any]:
    return (
        sa.select(stage_transition.c.from_stage)
        .where(stage_transition.c.lead_id == lead.c.id)
        .order_by(stage_transition.c.transitioned_at, stage_transition.c.id)
        .limit(1)
        .correlate(lead)
        .scalar_subquery()
    )


def _concerned(since: dt.datetime, until: dt.datetime, source_id: int | None) -> list[sa.ColumnElement[bool]]:
    """Live leads created before `until` that were created in the period or moved stage in it."""
    moved_in_period = sa.exists(
        sa.select(stage_transition.c.id).where(
            stage_transition.c.lead_id == lead.c.id,
            stage_transition.c.transitioned_at >= since,
            stage_transition.c.transitioned_at < until,
        )
    )
    conditions = [
        lead.c.merged_into_id.is_(None),
        lead.c.created_at < until,
        sa.or_(lead.c.created_at >= since, moved_in_period),
    ]
    if source_id is not None:
        conditions.append(_first_source() == source_id)
    return conditions


async def funnel_leads(
    conn: AsyncConnection, *, since: dt.datetime, until: dt.datetime, source_id: int | None
) -> list[FunnelLead]:
    """Live (not merged) leads created before `until` and either created in `[since, until)` or
    with a stage transition in it; only those whose first event came from `source_id`, if given.
    A lead's initial stage is the `from_stage` of its first transition, else its current stage."""
    names = {int(r.id): str(r.name) for r in await conn.execute(sa.select(source.c.id, source.c.name))}
    query = sa.select(
        lead.c.id,
        lead.c.created_at,
        sa.func.coalesce(_initial_stage(), lead.c.stage).label("initial_stage"),
        _first_source().label("source_id"),
    ).where(*_concerned(since, until, source_id))
    return [
        FunnelLead(
            id=row.id,
            created_at=row.created_at,
            initial_stage=str(row.initial_stage),
            source=names.get(int(row.source_id)) if row.source_id is not None else None,
        )
        for row in await conn.execute(query)
    ]


async def funnel_moves(
    conn: AsyncConnection, *, since: dt.datetime, until: dt.datetime, source_id: int | None
) -> list[FunnelMove]:
    """The stage transitions before `until` of the leads `funnel_leads` returns, oldest first."""
    concerned = sa.select(lead.c.id).where(*_concerned(since, until, source_id))
    query = (
        sa.select(
            stage_transition.c.lead_id,
            stage_transition.c.from_stage,
            stage_transition.c.to_stage,
            stage_transition.c.transitioned_at,
            stage_transition.c.cause,
            stage_transition.c.policy_id,
        )
        .where(stage_transition.c.transitioned_at < until, stage_transition.c.lead_id.in_(concerned))
        .order_by(stage_transition.c.lead_id, stage_transition.c.transitioned_at, stage_transition.c.id)
    )
    return [
        FunnelMove(
            lead_id=row.lead_id,
            from_stage=str(row.from_stage),
            to_stage=str(row.to_stage),
            transitioned_at=row.transitioned_at,
            cause=str(row.cause),
            policy_id=int(row.policy_id) if row.policy_id is not None else None,
        )
        for row in await conn.execute(query)
    ]


async def policy_names(conn: AsyncConnection, policy_ids: list[int]) -> dict[int, str]:
    if not policy_ids:
        return {}
    rows = await conn.execute(
        sa.select(threshold_policy.c.id, threshold_policy.c.name).where(threshold_policy.c.id.in_(policy_ids))
    )
    return {int(r.id): str(r.name) for r in rows}
