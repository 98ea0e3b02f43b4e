"""Routes for API readers (viewer and ops keys)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from service.api.deps import ServicesDep, Viewer
from service.events import ErrorBody, LeadRead
from service.leads import read_lead

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
