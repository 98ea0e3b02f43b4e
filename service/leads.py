"""Lead read use cases."""

from __future__ import annotations

import uuid
from typing import Any, overload

from sqlalchemy.ext.asyncio import AsyncEngine

from service.errors import LeadNotFound
from service.events import EventRead, IdentityRead, LeadRead, ScoreRead
from service.pipelines import unpack_explanation
from service.qualification import transition_read
from service.repositories import leads as repo
from service.repositories import pipelines as pipelines_repo
from service.repositories import qualification as qualification_repo
from service.repositories import routing as routing_repo
from service.routing_schemas import AssignmentRead


async def read_lead(
    engine: AsyncEngine, lead_id: uuid.UUID, *, events_limit: int = 100, history_limit: int = 50
) -> LeadRead:
    async with engine.connect() as conn:
        row = await repo.get_live_lead(conn, lead_id)
        if row is None:
            raise LeadNotFound(f"no lead {lead_id}")
        live_id: uuid.UUID = row["id"]
        identities = await repo.lead_identities(conn, live_id)
        merged = await repo.merged_into(conn, live_id)
        events, total = await repo.lead_events(conn, live_id, limit=events_limit)
        current = (await pipelines_repo.latest_scores(conn, [live_id])).get(live_id)
        shadow = (await pipelines_repo.latest_scores(conn, [live_id], shadow=True)).get(live_id)
        history = await pipelines_repo.score_history(conn, live_id, limit=history_limit)
        transitions = await qualification_repo.lead_transitions(conn, live_id, limit=history_limit)
        assigned = await routing_repo.latest_assignment(conn, [live_id, *merged])
    return LeadRead(
        id=live_id,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        first_event_at=row["first_event_at"],
        last_event_at=row["last_event_at"],
        traits=row["traits"],
        identities=[IdentityRead(**i) for i in identities],
        merged_ids=merged,
        events=[EventRead(**e) for e in events],
        events_total=total,
        score=_score(current),
        shadow_score=_score(shadow),
        score_history=[_score(h, explanation=False) for h in history],
        stage=row["stage"],
        stage_changed_at=row["stage_changed_at"],
        transitions=[transition_read(t) for t in transitions],
        assignment=_assignment(assigned),
    )


def _assignment(row: dict[str, Any] | None) -> AssignmentRead | None:
    if row is None:
        return None
    return AssignmentRead(
        id=row["id"],
        kind=row["kind"],
        owner_id=row["owner_id"],
        pool_id=row["pool_id"],
        queue=row["queue"],
        routing_version=row["routing_version_id"],
        rule_id=row["rule_id"],
        matched_by=row["matched_by"],
        reason=row["reason"],
        stage=row["stage"],
        assigned_at=row["assigned_at"],
    )


@overload
def _score(row: None, *, explanation: bool = True) -> None: ...
@overload
def _score(row: dict[str, Any], *, explanation: bool = True) -> ScoreRead: ...
def _score(row: dict[str, Any] | None, *, explanation: bool = True) -> ScoreRead | None:
    if row is None:
        return None
    return ScoreRead(
        id=row["id"],
        pipeline_version=row["pipeline_version_id"],
        shadow=row["shadow"],
        event_id=row["event_id"],
        scored_at=row["scored_at"],
        score=row["score"],
        fit=row["fit"],
        engagement=row["engagement"],
        probability=row["probability"],
        grade=row["grade"],
        inputs_digest=row["inputs_digest"],
        explanation=unpack_explanation(row["explanation"]) if explanation and row.get("explanation") else None,
    )
