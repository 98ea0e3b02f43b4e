"""The queries of the score-band and model reports (see `service.reports.scores` for what they mean).

Both pair a lead's outcomes with the score it had when the first of them happened: its latest
non-shadow score record by the version at or before its first outcome (`occurred_at`), or, for a
lead without an outcome before the period's end, its latest before that end. Merged leads are left
out (their records stay under their own id; the lead they were merged into is scored afresh).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.repositories.tables import change_request, lead, outcome, pipeline_slot, pipeline_version, score_record

POSITIVE = ("converted", "won")
ACCEPTED = ("accepted", "converted", "won")
FINAL = ("converted", "won", "lost")


def _any(condition: sa.ColumnElement[bool]) -> sa.ColumnElement[int]:
    return sa.func.max(sa.case((condition, 1), else_=0))


def _outcomes(until: dt.datetime, *, final_since: dt.datetime | None = None) -> sa.Subquery:
    """Per lead with outcomes before `until`: the first one's time and which kinds it had. With
    `final_since`, only leads with a final outcome (converted, won, lost) since then."""
    query = (
        sa.select(
            outcome.c.lead_id,
            sa.func.min(outcome.c.occurred_at).label("first_at"),
            _any(outcome.c.kind.in_(POSITIVE)).label("converted"),
            _any(outcome.c.kind == "lost").label("lost"),
            _any(outcome.c.kind.in_(ACCEPTED)).label("accepted"),
        )
        .where(outcome.c.occurred_at < until)
        .group_by(outcome.c.lead_id)
    )
    if final_since is not None:
        query = query.having(_any(sa.and_(outcome.c.kind.in_(FINAL), outcome.c.occurred_at >= final_since)) == 1)
    return query.subquery()


def _by_version(version_id: int) -> sa.ColumnElement[bool]:
    return sa.and_(score_record.c.pipeline_version_id == version_id, score_record.c.shadow.is_(False))


def _latest_first() -> Any:
    return sa.func.row_number().over(
        partition_by=score_record.c.lead_id, order_by=(score_record.c.scored_at.desc(), score_record.c.id.desc())
    )


@dataclass(frozen=True)
class BandGradeCount:
    """Leads whose reported score falls in one band and has one grade, and what became of them."""

    band: int
    grade: str
    leads: int
    accepted: int
    converted: int
    lost: int
    probability_sum: float
    score_sum: float


async def band_grade_counts(
    conn: AsyncConnection, *, version_id: int, since: dt.datetime, until: dt.datetime, edges: Sequence[float]
) -> list[BandGradeCount]:
    """Per (band, grade): the live leads whose reported score by the version was made in
    `[since, until)`, and of them how many were accepted, converted (or won) and lost without
    converting, by outcomes before `until`. Band `i` is `[edges[i], edges[i+1])`, the last closed."""
    flags = _outcomes(until)
    inner = list(edges[1:-1])
    band: sa.ColumnElement[int] = (
        sa.case(*((score_record.c.score < edge, i) for i, edge in enumerate(inner)), else_=len(inner))
        if inner
        else sa.literal(0)
    )
    # Filtering on `since` before ranking keeps the same latest record (a lead's latest eligible
    # record is at or after `since` exactly when any eligible one is) and reads far fewer rows.
    ranked = (
        sa.select(
            band.label("band"),
            score_record.c.score,
            score_record.c.probability,
            score_record.c.grade,
            sa.func.coalesce(flags.c.accepted, 0).label("accepted"),
            sa.func.coalesce(flags.c.converted, 0).label("converted"),
            sa.func.coalesce(flags.c.lost, 0).label("lost"),
            _latest_first().label("rn"),
        )
        .select_from(
            score_record.join(lead, lead.c.id == score_record.c.lead_id).outerjoin(
                flags, flags.c.lead_id == score_record.c.lead_id
            )
        )
        .where(
            _by_version(version_id),
            lead.c.merged_into_id.is_(None),
            score_record.c.scored_at >= since,
            score_record.c.scored_at < until,
            sa.or_(flags.c.first_at.is_(None), score_record.c.scored_at <= flags.c.first_at),
        )
        .subquery()
    )
    lost_only = sa.case((sa.and_(ranked.c.lost == 1, ranked.c.converted == 0), 1), else_=0)
    rows = await conn.execute(
        sa.select(
            ranked.c.band,
            ranked.c.grade,
            sa.func.count().label("leads"),
            sa.func.sum(ranked.c.accepted).label("accepted"),
            sa.func.sum(ranked.c.converted).label("converted"),
            sa.func.sum(lost_only).label("lost"),
            sa.func.sum(ranked.c.probability).label("probability_sum"),
            sa.func.sum(ranked.c.score).label("score_sum"),
        )
        .where(ranked.c.rn == 1)
        .group_by(ranked.c.band, ranked.c.grade)
    )
    return [
        BandGradeCount(
            band=int(r.band),
            grade=str(r.grade),
            leads=int(r.leads),
            accepted=int(r.accepted),
            converted=int(r.converted),
            lost=int(r.lost),
            probability_sum=float(r.probability_sum),
            score_sum=float(r.score_sum),
        )
        for r in rows
    ]


@dataclass(frozen=True)
class LabelledLead:
    lead_id: uuid.UUID
    converted: bool
    # None: the version made no (non-shadow) score of the lead before its first outcome.
    probability: float | None


async def labelled_leads(
    conn: AsyncConnection, *, version_id: int, since: dt.datetime, until: dt.datetime
) -> list[LabelledLead]:
    """Every live lead with a final outcome (converted, won, lost) in `[since, until)`: whether it
    converted (a converted or won outcome before `until`), and the probability of its reported score
    by the version (at or before its first outcome), if it has one."""
    flags = _outcomes(until, final_since=since)
    ranked = (
        sa.select(
            flags.c.lead_id,
            flags.c.converted,
            score_record.c.probability,
            sa.func.row_number()
            .over(partition_by=flags.c.lead_id, order_by=(score_record.c.scored_at.desc(), score_record.c.id.desc()))
            .label("rn"),
        )
        .select_from(
            flags.join(lead, lead.c.id == flags.c.lead_id).outerjoin(
                score_record,
                sa.and_(
                    score_record.c.lead_id == flags.c.lead_id,
                    _by_version(version_id),
                    score_record.c.scored_at <= flags.c.first_at,
                ),
            )
        )
        .where(lead.c.merged_into_id.is_(None))
        .subquery()
    )
    rows = await conn.execute(
        sa.select(ranked.c.lead_id, ranked.c.converted, ranked.c.probability)
        .where(ranked.c.rn == 1)
        .order_by(ranked.c.lead_id)
    )
    return [
        LabelledLead(
            lead_id=r.lead_id,
            converted=bool(r.converted),
            probability=None if r.probability is None else float(r.probability),
        )
        for r in rows
    ]


async def activated_at(conn: AsyncConnection, version_id: int) -> dt.datetime | None:
    """When the version was last made active: the latest applied change request (activation,
    rollback or bootstrap) whose result made it the active pipeline; else, if it holds the active
    slot (set without a change request, as tests and old databases may), when it was put there."""
    rows = await conn.execute(
        sa.select(change_request.c.applied_at, change_request.c.result)
        .where(
            change_request.c.status == "applied",
            change_request.c.kind.in_(("active_pipeline", "rollback")),
            change_request.c.applied_at.is_not(None),
        )
        .order_by(change_request.c.applied_at.desc(), change_request.c.id.desc())
    )
    for applied_at, result in rows:
        if (
            isinstance(result, dict)
            and result.get("target") == "active_pipeline"
            and result.get("version") == version_id
        ):
            when: dt.datetime = applied_at
            return when
    slot = (
        await conn.execute(
            sa.select(pipeline_slot.c.assigned_at).where(
                pipeline_slot.c.slot == "active", pipeline_slot.c.version_id == version_id
            )
        )
    ).scalar_one_or_none()
    return slot


async def version_row(conn: AsyncConnection, version_id: int) -> dict[str, Any] | None:
    """A version's id, creation time and training metrics (not its spec or artifact)."""
    row = (
        await conn.execute(
            sa.select(pipeline_version.c.id, pipeline_version.c.created_at, pipeline_version.c.metrics).where(
                pipeline_version.c.id == version_id
            )
        )
    ).one_or_none()
    return dict(row._mapping) if row is not None else None
