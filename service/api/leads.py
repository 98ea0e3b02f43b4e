"""Routes for API readers (viewer and ops keys)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Query

from service.api.deps import OpsAdmin, ServicesDep, Viewer, utcnow
from service.events import ErrorBody, LeadRead, StageMove, StageTransitionRead
from service.leads import read_lead
from service.qualification import move_lead_stage

router = APIRouter(tags=["leads"])


@router.get(
    "/v1/leads/{lead_id}",
    response_model=LeadRead,
    responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}, 404: {"model": ErrorBody}},
)
async def get_lead(
    lead_id: uuid.UUID,
    services: ServicesDep,
    _: Viewer,
    events_limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> LeadRead:
    """A lead (following merges to the surviving lead), its identities and its latest events."""
    return await read_lead(services.engine, lead_id, events_limit=events_limit)


@router.post(
    "/v1/leads/{lead_id}/stage",
    response_model=StageTransitionRead,
    responses={
        401: {"model": ErrorBody},
        403: {"model": ErrorBody},
        404: {"model": ErrorBody},
        422: {"model": ErrorBody},
    },
)
async def move_stage(
    lead_id: uuid.UUID, move: Annotated[StageMove, Body()], services: ServicesDep, principal: OpsAdmin
) -> StageTransitionRead:
    """Move a lead's lifecycle stage by hand (ops); moving back needs a reason, which is kept."""
    return await move_lead_stage(
        services.engine, lead_id, move, principal=principal, handoff=services.control.handoff, now=utcnow()
    )
