"""Routes for the CRM outbox: readers list and inspect deliveries; ops replay them."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from service.api.deps import OpsAdmin, ServicesDep, Viewer, utcnow
from service.delivery.admin import list_deliveries, read_delivery, replay_dead_letters, replay_delivery
from service.delivery.schemas import (
    BulkReplayed,
    BulkReplayRequest,
    DeliveryDetail,
    DeliveryPage,
    DeliveryReplayed,
    DeliveryStatus,
)
from service.events import ErrorBody

router = APIRouter(tags=["deliveries"])
_auth: dict[int | str, dict[str, Any]] = {401: {"model": ErrorBody}, 403: {"model": ErrorBody}}


@router.get("/v1/deliveries", response_model=DeliveryPage, responses={**_auth, 422: {"model": ErrorBody}})
async def get_deliveries(
    services: ServicesDep,
    _: Viewer,
    status: DeliveryStatus | None = None,
    destination: str | None = None,
    lead_id: uuid.UUID | None = None,
    cursor: Annotated[str | None, Query(description="`next_cursor` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> DeliveryPage:
    """Deliveries, newest first, filtered by status, destination or lead; paged by cursor."""
    return await list_deliveries(
        services.engine, status=status, destination=destination, lead_id=lead_id, cursor=cursor, limit=limit
    )


@router.get(
    "/v1/deliveries/{delivery_id}", response_model=DeliveryDetail, responses={**_auth, 404: {"model": ErrorBody}}
)
async def get_delivery(delivery_id: uuid.UUID, services: ServicesDep, _: Viewer) -> DeliveryDetail:
    """A delivery with its payload and every attempt (status code, error, duration, response excerpt)."""
    return await read_delivery(services.engine, delivery_id)


@router.post(
    "/v1/deliveries/replay",
    response_model=BulkReplayed,
    responses={**_auth, 422: {"model": ErrorBody}},
)
async def replay_dead_deliveries(
    request: Annotated[BulkReplayRequest, Body()], services: ServicesDep, _: OpsAdmin
) -> BulkReplayed:
    """Replay dead letters matching the filters (oldest first, up to `limit`): pending again, due now."""
    replayed = await replay_dead_letters(services.engine, request, now=utcnow())
    if services.delivery is not None:
        services.delivery.wake()
    return replayed


@router.post(
    "/v1/deliveries/{delivery_id}/replay",
    response_model=DeliveryReplayed,
    responses={**_auth, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
async def replay_one_delivery(delivery_id: uuid.UUID, services: ServicesDep, _: OpsAdmin) -> DeliveryReplayed:
    """Send a dead or delivered delivery again (same idempotency key; its attempts are kept)."""
    replayed = await replay_delivery(services.engine, delivery_id, now=utcnow())
    if services.delivery is not None:
        services.delivery.wake()
    return replayed
