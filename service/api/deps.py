"""Dependencies shared by the routers, as `Annotated` aliases."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from service.auth import Principal, authenticate, require_role
from service.change_requests import ChangeApplier, ChangeControl
from service.delivery.worker import DeliveryWorker
from service.enrichment import EnrichmentWorker
from service.ingest import IngestWriter
from service.oidc import OidcVerifier
from service.pipelines import PipelineRegistry
from service.qualification import PolicyRegistry
from service.settings import Settings
from service.sources import SourceRegistry
from service.webhooks.receive import WebhookLimits


@dataclass(frozen=True)
class Services:
    """Things with a lifetime, made once in the app's lifespan."""

    settings: Settings
    engine: AsyncEngine
    registry: SourceRegistry
    writer: IngestWriter
    pipelines: PipelineRegistry
    policies: PolicyRegistry
    control: ChangeControl
    applier: ChangeApplier
    limits: WebhookLimits
    migration_head: str | None
    oidc: OidcVerifier | None = None
    # The in-process delivery worker (SQLite's default), if this process runs one; `destinations`
    # are the configured delivery destinations' names.
    delivery: DeliveryWorker | None = None
    destinations: tuple[str, ...] = ()
    # The in-process HubSpot enrichment worker, where the delivery worker runs in process.
    enrichment: EnrichmentWorker | None = None


async def get_services(request: Request) -> Services:
    # async on purpose: FastAPI runs a plain `def` dependency in its thread pool.
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _principal(
    services: ServicesDep,
    authorization: Annotated[
        str | None, Header(description="`Bearer <API key>`, or `Bearer <token>` from the identity provider")
    ] = None,
) -> Principal:
    return await authenticate(services.engine, authorization, now=utcnow(), oidc=services.oidc)


async def _viewer(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    return require_role(principal, ("viewer", "ops"))


Viewer = Annotated[Principal, Depends(_viewer)]


async def _ops(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
    return require_role(principal, ("ops",))


OpsAdmin = Annotated[Principal, Depends(_ops)]
