"""Routes for change control: propose, decide, apply and preview changes (ops), read them (viewer)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from service.api.deps import OpsAdmin, ServicesDep, Viewer, utcnow
from service.change_requests import apply_request as apply_change
from service.change_requests import approve, close, get_request, list_requests, preview, propose
from service.change_schemas import STATUSES, ChangeRequestCreate, ChangeRequestRead, Decision, Impact, Status
from service.events import ErrorBody

router = APIRouter(tags=["change control"])
_errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 403, 404, 409, 422)}


@router.post("/v1/change-requests", response_model=ChangeRequestRead, status_code=201, responses=_errors)
async def create_change_request(
    body: Annotated[ChangeRequestCreate, Body()], services: ServicesDep, principal: OpsAdmin
) -> ChangeRequestRead:
    """Propose a change (threshold policy, active or shadow pipeline, rollback) with a reason and its impact."""
    return await propose(services.engine, body, principal=principal, control=services.control, now=utcnow())


@router.get("/v1/change-requests", response_model=list[ChangeRequestRead], responses=_errors)
async def get_change_requests(
    services: ServicesDep,
    _: Viewer,
    status: Annotated[list[Status] | None, Query(description=f"Any of: {', '.join(STATUSES)}.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before_id: Annotated[int | None, Query(description="Page on: requests older than this id.")] = None,
) -> list[ChangeRequestRead]:
    """Change requests, newest first, optionally only those in the given statuses."""
    return await list_requests(
        services.engine, statuses=list(status) if status else None, limit=limit, before_id=before_id
    )


@router.get("/v1/change-requests/{request_id}", response_model=ChangeRequestRead, responses=_errors)
async def get_change_request(request_id: int, services: ServicesDep, _: Viewer) -> ChangeRequestRead:
    """One change request, with its impact preview and what applying it did."""
    return await get_request(services.engine, request_id)


@router.get("/v1/change-requests/{request_id}/impact", response_model=Impact, responses=_errors)
async def get_change_request_impact(request_id: int, services: ServicesDep, _: Viewer) -> Impact:
    """The change's impact on lead stages, computed afresh from the current data; changes nothing."""
    return await preview(services.engine, request_id, control=services.control, now=utcnow())


@router.post("/v1/change-requests/{request_id}/approve", response_model=ChangeRequestRead, responses=_errors)
async def approve_change_request(request_id: int, services: ServicesDep, principal: OpsAdmin) -> ChangeRequestRead:
    """Approve a pending change (never your own); it applies at once unless scheduled later."""
    return await approve(services.engine, request_id, principal=principal, control=services.control, now=utcnow())


@router.post("/v1/change-requests/{request_id}/apply", response_model=ChangeRequestRead, responses=_errors)
async def apply_change_request(request_id: int, services: ServicesDep, principal: OpsAdmin) -> ChangeRequestRead:
    """Apply an approved change now, even if it was scheduled for later."""
    return await apply_change(
        services.engine,
        request_id,
        actor=principal.subject,
        role=principal.role,
        control=services.control,
        now=utcnow(),
    )


@router.post("/v1/change-requests/{request_id}/reject", response_model=ChangeRequestRead, responses=_errors)
async def reject_change_request(
    request_id: int, decision: Annotated[Decision, Body()], services: ServicesDep, principal: OpsAdmin
) -> ChangeRequestRead:
    """Reject a change that is not applied yet, with a reason."""
    return await close(services.engine, request_id, decision, withdraw=False, principal=principal, now=utcnow())


@router.post("/v1/change-requests/{request_id}/withdraw", response_model=ChangeRequestRead, responses=_errors)
async def withdraw_change_request(
    request_id: int, decision: Annotated[Decision, Body()], services: ServicesDep, principal: OpsAdmin
) -> ChangeRequestRead:
    """Withdraw your own change that is not applied yet, with a reason."""
    return await close(services.engine, request_id, decision, withdraw=True, principal=principal, now=utcnow())
