"""Pipeline versions (insert-only), the active/shadow slots, and score records."""

from __future__ import annotations

import datetime as dt
import functools
import uuid
from collections.abc import Sequence
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.repositories.ingest import bulk_insert, driver, in_list
from service.repositories.tables import inbound_event, lead, pipeline_slot, pipeline_version, score_record

SLOTS = ("active", "shadow")


async def insert_version(
    conn: AsyncConnection,
    *,
    name: str,
    spec: dict[str, Any],
    artifact: dict[str, Any],
    metrics: dict[str, Any],
    sklearn_version: str,
    training_data_sha256: str | None,
    created_by: str,
    now: dt.datetime,
) -> int:
    version_id: int = (
        await conn.execute(
            pipeline_version.insert()
            .values(
                name=name,
                spec=spec,
                artifact=artifact,
                metrics=metrics,
                sklearn_version=sklearn_version,
                training_data_sha256=training_data_sha256,
                created_by=created_by,
                created_at=now,
            )
            .returning(pipeline_version.c.id)
        )
    ).scalar_one()
    return version_id


async def get_version(conn: AsyncConnection, version_id: int) -> dict[str, Any] | None:
    row = (await conn.execute(sa.select(pipeline_version).where(pipeline_version.c.id == version_id))).one_or_none()
    return dict(row._mapping) if row is not None else None


async def list_versions(conn: AsyncConnection) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(
            pipeline_version.c.id,
            pipeline_version.c.name,
            pipeline_version.c.metrics,
            pipeline_version.c.sklearn_version,
            pipeline_version.c.training_data_sha256,
            pipeline_version.c.created_by,
            pipeline_version.c.created_at,
        ).order_by(pipeline_version.c.id)
    )
    return [dict(r._mapping) for r in rows]


async def get_slots(conn: AsyncConnection) -> dict[str, int]:
    rows = await conn.execute(sa.select(pipeline_slot.c.slot, pipeline_slot.c.version_id))
    return {str(row[0]): int(row[1]) for row in rows}


async def set_slot(conn: AsyncConnection, *, slot: str, version_id: int | None, actor: str, now: dt.datetime) -> None:
    """Point `slot` at a version, or clear it with None."""
    await conn.execute(pipeline_slot.delete().where(pipeline_slot.c.slot == slot))
    if version_id is not None:
        await conn.execute(
            pipeline_slot.insert().values(slot=slot, version_id=version_id, assigned_at=now, assigned_by=actor)
        )


async def insert_scores(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    await bulk_insert(conn, score_record, rows)


class ActivityRow(NamedTuple):
    lead_id: uuid.UUID
    name: str | None
    occurred_at: dt.datetime
    payload: dict[str, Any]
    # The event's id: activities are ordered by (occurred_at, id).
    id: uuid.UUID


@functools.cache
def _activities(dialect: str) -> sa.Select[Any]:
    # Built once: on the ingest path, building a statement costs more than running it.
    return (
        sa.select(
            inbound_event.c.lead_id,
            inbound_event.c.name,
            inbound_event.c.occurred_at,
            inbound_event.c.payload,
            inbound_event.c.id,
        )
        .where(
            in_list(inbound_event.c.lead_id, "lead_ids", dialect),
            inbound_event.c.type == "lead.activity",
            inbound_event.c.occurred_at >= sa.bindparam("since"),
        )
        .order_by(inbound_event.c.occurred_at, inbound_event.c.id)
    )


_PG_ACTIVITIES = (
    "SELECT lead_id, name, occurred_at, payload, id FROM inbound_event "
    "WHERE lead_id = ANY($1::uuid[]) AND type = 'lead.activity' AND occurred_at >= $2 ORDER BY occurred_at, id"
)


async def lead_activities(
    conn: AsyncConnection, lead_ids: Sequence[uuid.UUID], *, since: dt.datetime
) -> list[ActivityRow]:
    """Activity events of the leads since `since`, oldest first."""
    if not lead_ids:
        return []
    if conn.dialect.name == "postgresql":
        # The ingest hot path: straight on the driver, in the caller's transaction (see `driver`).
        records = await (await driver(conn)).fetch(_PG_ACTIVITIES, list(lead_ids), since)
        return [ActivityRow(*record) for record in records]
    rows = await conn.execute(_activities(conn.dialect.name), {"lead_ids": list(lead_ids), "since": since})
    return [ActivityRow(*row) for row in rows]


async def latest_scores(
    conn: AsyncConnection, lead_ids: Sequence[uuid.UUID], *, shadow: bool = False
) -> dict[uuid.UUID, dict[str, Any]]:
    """The most recent score record of each lead (active or shadow), in one statement."""
    if not lead_ids:
        return {}
    rows = await conn.execute(_latest(conn.dialect.name), {"lead_ids": list(dict.fromkeys(lead_ids)), "shadow": shadow})
    return {row.lead_id: {k: v for k, v in row._mapping.items() if k != "rn"} for row in rows}


@functools.cache
def _latest(dialect: str) -> sa.Select[Any]:
    ranked = (
        sa.select(
            score_record,
            sa.func.row_number()
            .over(
                partition_by=score_record.c.lead_id,
                order_by=(score_record.c.scored_at.desc(), score_record.c.id.desc()),
            )
            .label("rn"),
        )
        .where(in_list(score_record.c.lead_id, "lead_ids", dialect), score_record.c.shadow == sa.bindparam("shadow"))
        .subquery()
    )
    return sa.select(ranked).where(ranked.c.rn == 1)


async def score_history(conn: AsyncConnection, lead_id: uuid.UUID, *, limit: int) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(
            score_record.c.id,
            score_record.c.pipeline_version_id,
            score_record.c.shadow,
            score_record.c.event_id,
            score_record.c.scored_at,
            score_record.c.score,
            score_record.c.fit,
            score_record.c.engagement,
            score_record.c.probability,
            score_record.c.grade,
            score_record.c.inputs_digest,
        )
        .where(score_record.c.lead_id == lead_id)
        .order_by(score_record.c.scored_at.desc(), score_record.c.id.desc())
        .limit(limit)
    )
    return [dict(r._mapping) for r in rows]


async def compare_versions(conn: AsyncConnection, *, version_id: int, baseline_id: int) -> list[Any]:
    """Per lead, the latest score by `version_id` and by `baseline_id` (leads scored by both)."""

    def latest(vid: int) -> sa.Subquery:
        ranked = sa.select(
            score_record.c.lead_id,
            score_record.c.score,
            score_record.c.grade,
            score_record.c.probability,
            sa.func.row_number()
            .over(
                partition_by=score_record.c.lead_id,
                order_by=(score_record.c.scored_at.desc(), score_record.c.id.desc()),
            )
            .label("rn"),
        ).where(score_record.c.pipeline_version_id == vid)
        return ranked.subquery()

    a, b = latest(version_id), latest(baseline_id)
    rows = await conn.execute(
        sa.select(
            a.c.lead_id,
            a.c.score.label("score"),
            a.c.grade.label("grade"),
            a.c.probability.label("probability"),
            b.c.score.label("baseline_score"),
            b.c.grade.label("baseline_grade"),
            b.c.probability.label("baseline_probability"),
        )
        .join(b, sa.and_(a.c.lead_id == b.c.lead_id, b.c.rn == 1))
        .join(lead, lead.c.id == a.c.lead_id)
        .where(a.c.rn == 1, lead.c.merged_into_id.is_(None))
    )
    return list(rows)


async def live_lead_ids_page(
    conn: AsyncConnection, *, after: uuid.UUID | None, limit: int, not_scored_by: int
) -> list[uuid.UUID]:
    """Live leads in id order after `after` that have no score record from version `not_scored_by`."""
    scored = sa.select(score_record.c.lead_id).where(
        score_record.c.pipeline_version_id == not_scored_by, score_record.c.lead_id == lead.c.id
    )
    query = sa.select(lead.c.id).where(lead.c.merged_into_id.is_(None), ~sa.exists(scored))
    if after is not None:
        query = query.where(lead.c.id > after)
    rows = await conn.execute(query.order_by(lead.c.id).limit(limit))
    return list(rows.scalars())


async def lead_traits(conn: AsyncConnection, lead_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
    rows = await conn.execute(sa.select(lead.c.id, lead.c.traits).where(lead.c.id.in_(list(lead_ids))))
    return {row[0]: dict(row[1]) for row in rows}
