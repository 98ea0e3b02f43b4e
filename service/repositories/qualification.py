"""Threshold policy versions and the active one, lead stages, stage transitions and outcomes."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.repositories.ingest import bulk_insert, driver
from service.repositories.tables import (
    insert_ignoring_conflicts,
    lead,
    outcome,
    score_record,
    stage_transition,
    threshold_policy,
    threshold_policy_slot,
)

ACTIVE = "active"


async def insert_policy(
    conn: AsyncConnection,
    *,
    name: str,
    spec: dict[str, Any],
    change_request_id: int | None,
    created_by: str,
    now: dt.datetime,
) -> int:
    policy_id: int = (
        await conn.execute(
            threshold_policy.insert()
            .values(name=name, spec=spec, change_request_id=change_request_id, created_by=created_by, created_at=now)
            .returning(threshold_policy.c.id)
        )
    ).scalar_one()
    return policy_id


async def get_policy(conn: AsyncConnection, policy_id: int) -> dict[str, Any] | None:
    row = (await conn.execute(sa.select(threshold_policy).where(threshold_policy.c.id == policy_id))).one_or_none()
    return dict(row._mapping) if row is not None else None


async def list_policies(conn: AsyncConnection) -> list[dict[str, Any]]:
    rows = await conn.execute(sa.select(threshold_policy).order_by(threshold_policy.c.id))
    return [dict(r._mapping) for r in rows]


async def active_policy_id(conn: AsyncConnection) -> int | None:
    value = (
        await conn.execute(sa.select(threshold_policy_slot.c.policy_id).where(threshold_policy_slot.c.slot == ACTIVE))
    ).scalar_one_or_none()
    return int(value) if value is not None else None


async def set_active_policy(conn: AsyncConnection, *, policy_id: int, actor: str, now: dt.datetime) -> None:
    await conn.execute(threshold_policy_slot.delete().where(threshold_policy_slot.c.slot == ACTIVE))
    await conn.execute(
        threshold_policy_slot.insert().values(slot=ACTIVE, policy_id=policy_id, assigned_at=now, assigned_by=actor)
    )


# --- stages and transitions ---------------------------------------------------------------------


async def insert_transitions(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    await bulk_insert(conn, stage_transition, rows)


_PG_SET_STAGES = (
    "UPDATE lead SET stage = u.stage, stage_changed_at = $1, updated_at = $1 "
    "FROM unnest($2::uuid[], $3::text[]) AS u(id, stage) WHERE lead.id = u.id"
)


async def set_stages(conn: AsyncConnection, stages: Mapping[uuid.UUID, str], now: dt.datetime) -> None:
    """Set each lead's stage, in one statement."""
    if not stages:
        return
    if conn.dialect.name == "postgresql":
        await (await driver(conn)).execute(_PG_SET_STAGES, now, list(stages), list(stages.values()))
        return
    await conn.execute(
        lead.update()
        .where(lead.c.id == sa.bindparam("b_id"))
        .values(stage=sa.bindparam("b_stage"), stage_changed_at=now, updated_at=now),
        [{"b_id": lead_id, "b_stage": stage} for lead_id, stage in stages.items()],
    )


async def lead_stages(conn: AsyncConnection, lead_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, str]:
    if not lead_ids:
        return {}
    rows = await conn.execute(sa.select(lead.c.id, lead.c.stage).where(lead.c.id.in_(list(set(lead_ids)))))
    return {row[0]: str(row[1]) for row in rows}


async def lock_live_lead(conn: AsyncConnection, lead_id: uuid.UUID) -> dict[str, Any] | None:
    """A live (not merged) lead's id, stage and traits, locked for the transaction (PostgreSQL)."""
    query = sa.select(lead.c.id, lead.c.stage, lead.c.traits, lead.c.merged_into_id).where(lead.c.id == lead_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    row = (await conn.execute(query)).one_or_none()
    return dict(row._mapping) if row is not None else None


async def lead_transitions(conn: AsyncConnection, lead_id: uuid.UUID, *, limit: int) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(stage_transition)
        .where(stage_transition.c.lead_id == lead_id)
        .order_by(stage_transition.c.transitioned_at.desc(), stage_transition.c.id.desc())
        .limit(limit)
    )
    return [dict(r._mapping) for r in rows]


def _recently_scored(since: dt.datetime) -> sa.Exists:
    return sa.exists(
        sa.select(score_record.c.id).where(
            score_record.c.lead_id == lead.c.id,
            score_record.c.shadow.is_(False),
            score_record.c.scored_at >= since,
        )
    )


async def evaluation_page(
    conn: AsyncConnection, *, after: uuid.UUID | None, limit: int, since: dt.datetime, lock: bool
) -> list[dict[str, Any]]:
    """Live leads with an active score since `since`, in id order after `after`: id, stage and
    traits, locked for the transaction when `lock` (PostgreSQL; SQLite's writer holds the database)."""
    query = sa.select(lead.c.id, lead.c.stage, lead.c.traits).where(
        lead.c.merged_into_id.is_(None), _recently_scored(since)
    )
    if after is not None:
        query = query.where(lead.c.id > after)
    query = query.order_by(lead.c.id).limit(limit)
    if lock and conn.dialect.name == "postgresql":
        query = query.with_for_update(of=lead)
    return [dict(r._mapping) for r in await conn.execute(query)]


# --- outcomes ---------------------------------------------------------------------------------------


async def insert_outcomes(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Insert outcomes, skipping repeats of `(source, external_id)`; returns the rows inserted with ids."""
    inserted: list[dict[str, Any]] = []
    statement = insert_ignoring_conflicts(outcome, conn.dialect.name).returning(outcome.c.id)
    for row in rows:
        new_id = (await conn.execute(statement, row)).scalar_one_or_none()
        if new_id is not None:
            inserted.append({**row, "id": new_id})
    return inserted


async def labelled_scores(conn: AsyncConnection, *, since: dt.datetime) -> list[tuple[float, bool]]:
    """For each lead with an outcome since `since`: its latest active score at (or before) its first
    outcome, and whether it converted (any `converted` or `won` outcome)."""
    first = (
        sa.select(
            outcome.c.lead_id,
            sa.func.min(outcome.c.occurred_at).label("first_at"),
            sa.func.max(sa.case((outcome.c.kind.in_(("converted", "won")), 1), else_=0)).label("converted"),
        )
        .where(outcome.c.occurred_at >= since)
        .group_by(outcome.c.lead_id)
        .subquery()
    )
    ranked = (
        sa.select(
            first.c.lead_id,
            first.c.converted,
            score_record.c.score,
            sa.func.row_number()
            .over(partition_by=first.c.lead_id, order_by=(score_record.c.scored_at.desc(), score_record.c.id.desc()))
            .label("rn"),
        )
        .join(score_record, score_record.c.lead_id == first.c.lead_id)
        .where(score_record.c.shadow.is_(False), score_record.c.scored_at <= first.c.first_at)
        .subquery()
    )
    rows = await conn.execute(sa.select(ranked.c.score, ranked.c.converted).where(ranked.c.rn == 1))
    return [(float(score), bool(converted)) for score, converted in rows]


async def window_scores(conn: AsyncConnection, *, since: dt.datetime) -> list[float]:
    """The latest active score of every live lead created since `since` (the flow of new leads)."""
    ranked = (
        sa.select(
            score_record.c.score,
            sa.func.row_number()
            .over(
                partition_by=score_record.c.lead_id,
                order_by=(score_record.c.scored_at.desc(), score_record.c.id.desc()),
            )
            .label("rn"),
        )
        .join(lead, lead.c.id == score_record.c.lead_id)
        .where(score_record.c.shadow.is_(False), lead.c.created_at >= since, lead.c.merged_into_id.is_(None))
        .subquery()
    )
    rows = await conn.execute(sa.select(ranked.c.score).where(ranked.c.rn == 1))
    return [float(score) for (score,) in rows]
