"""Health, readiness and metrics: for load balancers, orchestrators and Prometheus."""

from __future__ import annotations

import os

import sqlalchemy as sa
from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from starlette.responses import Response

from service.api.deps import ServicesDep, utcnow
from service.delivery import refresh_outbox_gauges
from service.metrics import DB_ERRORS
from service.migrate import known_revisions
from service.responses import JsonResponse

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "Not ready: database or migrations."}})
async def readyz(services: ServicesDep) -> Response:
    """Ready when the database answers and its schema is at this release's migrations or ahead of them."""
    try:
        async with services.engine.connect() as conn:
            version = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar()
    except Exception as exc:
        DB_ERRORS.labels(operation="readyz").inc()
        return JsonResponse(
            {"status": "unavailable", "database": "unreachable", "detail": type(exc).__name__},
            status_code=503,
        )
    # Behind (a revision this code knows, short of its head, or none): the migration job has not
    # run yet. Ahead (a revision it does not know): a newer release has migrated first, and this
    # replica keeps serving until it is replaced, which is why migrations stay backward compatible.
    if version != services.migration_head and (version is None or version in known_revisions()):
        return JsonResponse(
            {
                "status": "unavailable",
                "database": "ok",
                "migration": version,
                "head": services.migration_head,
            },
            status_code=503,
        )
    return JsonResponse({"status": "ok", "database": "ok", "migration": version, "head": services.migration_head})


@router.get("/metrics", include_in_schema=False)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus exposition, across processes when PROMETHEUS_MULTIPROC_DIR is set."""
    try:
        await refresh_outbox_gauges(services.engine, services.destinations, now=utcnow())
    except Exception:  # the database may be down: still expose what this process knows
        DB_ERRORS.labels(operation="outbox_gauges").inc()
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
