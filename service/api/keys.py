"""Routes for ops admins: API keys (list, create, revoke). Every change is audited."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from service.api.deps import OpsAdmin, ServicesDep, utcnow
from service.auth import ApiKeyCreate, ApiKeyCreated, ApiKeyRead, Reason, create_key, list_keys, revoke_key
from service.events import ErrorBody

router = APIRouter(tags=["api keys"])
_auth: dict[int | str, dict[str, Any]] = {401: {"model": ErrorBody}, 403: {"model": ErrorBody}}


@router.get("/v1/keys", response_model=list[ApiKeyRead], responses=_auth)
async def get_keys(services: ServicesDep, _: OpsAdmin) -> list[ApiKeyRead]:
    """Every API key, oldest first: name, role, prefix, expiry, revocation, last use (never the key)."""
    return [ApiKeyRead.of(row) for row in await list_keys(services.engine)]


@router.post(
    "/v1/keys",
    status_code=201,
    response_model=ApiKeyCreated,
    responses={**_auth, 422: {"model": ErrorBody}},
)
async def post_key(body: Annotated[ApiKeyCreate, Body()], services: ServicesDep, principal: OpsAdmin) -> ApiKeyCreated:
    """Create an API key; the answer is the only time the key is shown."""
    now = utcnow()
    expires_at = now + dt.timedelta(days=body.expires_in_days) if body.expires_in_days else None
    created = await create_key(
        services.engine,
        name=body.name,
        role=body.role,
        now=now,
        expires_at=expires_at,
        actor=principal,
        reason=body.reason,
    )
    return ApiKeyCreated.of_created(created)


@router.delete(
    "/v1/keys/{key_id}",
    response_model=ApiKeyRead,
    responses={**_auth, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
async def delete_key(
    key_id: int,
    services: ServicesDep,
    principal: OpsAdmin,
    reason: Annotated[Reason | None, Query(description="Why, for the audit log.")] = None,
) -> ApiKeyRead:
    """Revoke an API key; it stops working at once (409 if it was revoked already)."""
    row = await revoke_key(services.engine, key_id=key_id, now=utcnow(), actor=principal, reason=reason)
    return ApiKeyRead.of(row)
