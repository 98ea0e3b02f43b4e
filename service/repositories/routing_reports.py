"""What the routing report reads: assignments counted per target, the active routing spec, and the
CRM handoffs enqueued in the period with their first delivered attempt."""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.repositories import routing as routing_repo
from service.repositories.tables import assignment, delivery, delivery_attempt, lead


@dataclass(frozen=True)
class AssignmentCount:
    """Assignments of live leads in the period to one target by one routing rules version."""

    kind: str
    pool_id: str | None
    owner_id: str | None
    queue: str | None
    routing_version_id: int
    assignments: int


@dataclass(frozen=True)
class Handoff:
    """A CRM handoff (delivery row) and, once delivered, its first delivered attempt."""

    id: uuid.UUID
    destination: str
    status: str
    created_at: dt.datetime
    delivered_started_at: dt.datetime | None
    delivered_duration_ms: float | None


async def assignment_counts(
    conn: AsyncConnection, *, since: dt.datetime, until: dt.datetime, pool: str | None
) -> list[AssignmentCount]:
    """Assignments made in `[since, until)` to live (not merged) leads, counted per kind, pool,
    owner, queue and routing version; only the pool's when `pool` is given."""
    keys = (
        assignment.c.kind,
        assignment.c.pool_id,
        assignment.c.owner_id,
        assignment.c.queue,
        assignment.c.routing_version_id,
    )
    query = (
        sa.select(*keys, sa.func.count().label("n"))
        .join(lead, lead.c.id == assignment.c.lead_id)
        .where(
            lead.c.merged_into_id.is_(None),
            assignment.c.assigned_at >= since,
            assignment.c.assigned_at < until,
        )
        .group_by(*keys)
    )
    if pool is not None:
        query = query.where(assignment.c.pool_id == pool)
    return [
        AssignmentCount(
            kind=str(r.kind),
            pool_id=r.pool_id,
            owner_id=r.owner_id,
            queue=r.queue,
            routing_version_id=int(r.routing_version_id),
            assignments=int(r.n),
        )
        for r in await conn.execute(query)
    ]


async def active_spec(conn: AsyncConnection) -> tuple[int, dict[str, Any]] | None:
    """`(version id, spec)` of the active routing rules version, or None before any."""
    active = await routing_repo.active_version(conn)
    if active is None:
        return None
    row = await routing_repo.get_version(conn, active[0])
    return (active[0], dict(row["spec"])) if row is not None else None


def _pool_at_enqueue() -> sa.ScalarSelect[Any]:
    # The lead's assignment in force when the handoff was enqueued: the one made in that same
    # transaction (same time), or else the latest before it.
    return (
        sa.select(assignment.c.pool_id)
        .where(assignment.c.lead_id == delivery.c.lead_id, assignment.c.assigned_at <= delivery.c.created_at)
        .order_by(assignment.c.assigned_at.desc(), assignment.c.id.desc())
        .limit(1)
        .correlate(delivery)
        .scalar_subquery()
    )


async def handoffs(conn: AsyncConnection, *, since: dt.datetime, until: dt.datetime, pool: str | None) -> list[Handoff]:
    """Deliveries of live leads enqueued in `[since, until)`, with their current status and the
    start and duration of each delivered attempt (normally one; a row per attempt); only those
    whose lead was assigned from `pool`, when given."""
    query = (
        sa.select(
            delivery.c.id,
            delivery.c.destination,
            delivery.c.status,
            delivery.c.created_at,
            delivery_attempt.c.started_at,
            delivery_attempt.c.duration_ms,
        )
        .join(lead, lead.c.id == delivery.c.lead_id)
        .outerjoin(
            delivery_attempt,
            sa.and_(delivery_attempt.c.delivery_id == delivery.c.id, delivery_attempt.c.outcome == "delivered"),
        )
        .where(lead.c.merged_into_id.is_(None), delivery.c.created_at >= since, delivery.c.created_at < until)
    )
    if pool is not None:
        query = query.where(_pool_at_enqueue() == pool)
    return [
        Handoff(
            id=r.id,
            destination=str(r.destination),
            status=str(r.status),
            created_at=r.created_at,
            delivered_started_at=r.started_at,
            delivered_duration_ms=float(r.duration_ms) if r.duration_ms is not None else None,
        )
        for r in await conn.execute(query)
    ]
