"""What a CRM handoff needs to know of newly qualified leads, read in one statement per table."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from service.repositories.tables import lead, lead_identity, score_record


async def lead_facts(
    conn: AsyncConnection, lead_ids: Sequence[uuid.UUID]
) -> tuple[dict[uuid.UUID, dict[str, Any]], dict[uuid.UUID, list[tuple[str, str]]]]:
    """Each lead's traits, and its identities `(namespace, value)` oldest first."""
    ids = list(dict.fromkeys(lead_ids))
    if not ids:
        return {}, {}
    traits = {
        row.id: dict(row.traits or {})
        for row in await conn.execute(sa.select(lead.c.id, lead.c.traits).where(lead.c.id.in_(ids)))
    }
    identities: dict[uuid.UUID, list[tuple[str, str]]] = {}
    rows = await conn.execute(
        sa.select(lead_identity.c.lead_id, lead_identity.c.namespace, lead_identity.c.value)
        .where(lead_identity.c.lead_id.in_(ids))
        .order_by(lead_identity.c.lead_id, lead_identity.c.id)
    )
    for row in rows:
        identities.setdefault(row.lead_id, []).append((row.namespace, row.value))
    return traits, identities


async def score_records(conn: AsyncConnection, record_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
    """Score records by id: score, fit, engagement, probability, grade and pipeline version."""
    ids = list(dict.fromkeys(record_ids))
    if not ids:
        return {}
    rows = await conn.execute(
        sa.select(
            score_record.c.id,
            score_record.c.score,
            score_record.c.fit,
            score_record.c.engagement,
            score_record.c.probability,
            score_record.c.grade,
            score_record.c.pipeline_version_id,
        ).where(score_record.c.id.in_(ids))
    )
    return {row.id: dict(row._mapping) for row in rows}
