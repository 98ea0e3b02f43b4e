"""The FastAPI application factory."""

from __future__ import annotations

import datetime as dt
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from service.api import (
    audit,
    change_requests,
    deliveries,
    health,
    keys,
    leads,
    outcomes,
    pipelines,
    reports,
    routing,
    thresholds,
    webhooks,
)
from service.api.deps import Services
from service.change_requests import ChangeApplier, ChangeControl
from service.crm_outcomes import CrmOutcome
from service.db import create_engine, is_sqlite
from service.delivery import build_adapters, build_worker
from service.enrichment import EnrichmentConfig, EnrichmentWorker
from service.enrichment import http_client as enrichment_http_client
from service.errors import install_error_handlers
from service.ingest import IngestWriter
from service.metrics import RequestMetrics
from service.migrate import head
from service.oidc import OidcVerifier
from service.pipelines import PipelineRegistry
from service.qualification import PolicyRegistry
from service.settings import Settings
from service.sources import SourceRegistry
from service.webhooks.receive import WebhookLimits

log = structlog.get_logger(__name__)


class LeadscoreApp(FastAPI):
    """FastAPI, with the webhook route answered before the framework's layers (see
    `service.api.webhooks.receive_webhook`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if webhooks.is_webhook(scope):
            await webhooks.receive_webhook(self.state.services, scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; nothing connects until the lifespan starts."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url, pool_size=settings.db_pool_size)
        pipelines = PipelineRegistry(engine, refresh_seconds=settings.pipeline_refresh_seconds)
        try:
            await pipelines.refresh()
        except Exception as exc:  # the database may be down at start; the refresh loop retries
            log.warning("could not load pipelines at start", error=str(exc))
        pipelines.start()
        policies = PolicyRegistry(engine, refresh_seconds=settings.pipeline_refresh_seconds)
        try:
            await policies.refresh()
        except Exception as exc:
            log.warning("could not load the threshold policy at start", error=str(exc))
        policies.start()
        control = ChangeControl.from_settings(settings)  # fails start-up on a bad destinations setting
        writer = IngestWriter(
            engine,
            max_batch_events=settings.group_commit_max_events,
            retry_after=settings.retry_after_seconds,
            writers=1 if is_sqlite(settings.database_url) else settings.group_commit_writers,
            pipelines=lambda: pipelines.current,
            policy=lambda: policies.current,
            lookback=dt.timedelta(days=settings.activity_lookback_days),
            handoff=control.handoff,
        )
        writer.start()
        destinations = tuple(sorted(build_adapters(settings)))  # fails start-up on a bad configuration
        in_process = settings.delivery_in_process
        if in_process is None:
            in_process = is_sqlite(settings.database_url)
        delivery, client = build_worker(engine, settings) if in_process else (None, None)
        if delivery is not None:
            delivery.start()
        # HubSpot enrichment runs where the delivery worker runs, on an HTTP client of its own (a pool
        # sized for its fetches), and stores what it fetches through this process's ingest writer.
        enrichment_client = enrichment_http_client(settings) if in_process else None
        enrichment = (
            EnrichmentWorker(
                engine,
                ingest=writer.submit,
                client=enrichment_client,
                config=EnrichmentConfig.from_settings(settings),
                pipelines=lambda: pipelines.current,
            )
            if enrichment_client is not None
            else None
        )
        if enrichment is not None:
            enrichment.start()
        applier = ChangeApplier(engine, control=control, interval_seconds=settings.change_applier_seconds)
        applier.start()
        app.state.services = Services(
            settings=settings,
            engine=engine,
            registry=SourceRegistry(
                engine, ttl=settings.source_cache_seconds, retry_after=settings.retry_after_seconds
            ),
            writer=writer,
            pipelines=pipelines,
            policies=policies,
            control=control,
            applier=applier,
            limits=WebhookLimits(
                max_body_bytes=settings.max_body_bytes,
                max_events=settings.max_events_per_request,
                tolerance=dt.timedelta(seconds=settings.webhook_tolerance_seconds),
                public_base_url=settings.public_base_url,
            ),
            migration_head=head(),
            oidc=OidcVerifier.from_settings(settings),
            delivery=delivery,
            destinations=destinations,
            enrichment=enrichment,
        )
        # Everything made at start-up (modules, compiled pipelines, caches) lives as long as the
        # process: move it out of the collector's sight, so full collections under load only scan
        # what requests allocate (they took a tenth of the ingest CPU before).
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        try:
            yield
        finally:
            await applier.stop()
            if enrichment is not None:
                await enrichment.stop()
            if enrichment_client is not None:
                await enrichment_client.aclose()
            if delivery is not None and client is not None:
                await delivery.stop()
                await client.aclose()
            await writer.stop()
            await policies.stop()
            await pipelines.stop()
            await engine.dispose()

    app = LeadscoreApp(
        title="Leadscore",
        version="0.1.0",
        description="Lead events in through signed webhooks; explainable scores and CRM handoffs out.",
        lifespan=lifespan,
    )
    app.add_middleware(RequestMetrics)
    install_error_handlers(app)
    app.include_router(leads.router)
    app.include_router(pipelines.router)
    app.include_router(keys.router)
    app.include_router(audit.router)
    app.include_router(deliveries.router)
    app.include_router(routing.router)
    app.include_router(change_requests.router)
    app.include_router(thresholds.router)
    app.include_router(outcomes.router)
    app.include_router(reports.router)
    app.include_router(health.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            # The webhook is a raw ASGI handler (see service.api.webhooks): describe it ourselves.
            path_item, models = webhooks.openapi_path()
            schema["paths"] = {"/v1/webhooks/{source}": path_item, **schema["paths"]}
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            # The outcomes route reads its raw body (to verify it) and names the body's schema itself.
            all_models: list[type[BaseModel]] = [*models, CrmOutcome]
            for model in all_models:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
