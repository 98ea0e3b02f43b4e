"""Routes for API readers: routing rules versions and routing previews."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from service.api.deps import ServicesDep, Viewer, utcnow
from service.events import ErrorBody
from service.routing import list_versions, preview_routing
from service.routing_schemas import RoutingPreview, RoutingPreviewRequest, RoutingRulesList

router = APIRouter(tags=["routing"])
_auth: dict[int | str, dict[str, Any]] = {401: {"model": ErrorBody}, 403: {"model": ErrorBody}}


@router.get("/v1/routing/rules", response_model=RoutingRulesList, responses=_auth)
async def get_routing_rules(services: ServicesDep, _: Viewer) -> RoutingRulesList:
    """Every routing rules version with its spec, which one is active, and the activation history."""
    return await list_versions(services.engine)


@router.post(
    "/v1/routing/preview",
    response_model=RoutingPreview,
    responses={**_auth, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 422: {"model": ErrorBody}},
)
async def preview_lead_routing(
    request: Annotated[RoutingPreviewRequest, Body()], services: ServicesDep, _: Viewer
) -> RoutingPreview:
    """Where a lead would be routed now and why; stores nothing and moves no counter."""
    return await preview_routing(services.engine, request, now=utcnow())
