"""Routes for API readers: the audit log, as pages or as a JSON lines export."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Header, Query, Request, Response
from pydantic import AwareDatetime
from starlette.responses import StreamingResponse

from service.api.deps import ServicesDep, Viewer
from service.audit import AuditPage, Order, export_audit, read_audit
from service.events import ErrorBody
from service.repositories.audit import AuditFilter

router = APIRouter(tags=["audit"])
JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-lines")


@router.get(
    "/v1/audit",
    response_model=AuditPage,
    responses={
        200: {"content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
        401: {"model": ErrorBody},
        403: {"model": ErrorBody},
        422: {"model": ErrorBody},
    },
)
async def get_audit(
    request: Request,
    services: ServicesDep,
    _: Viewer,
    order: Annotated[Order, Query(description="`newest` first, or `oldest` first.")] = "newest",
    after: Annotated[int | None, Query(ge=0, description="Only entries with a larger id.")] = None,
    before: Annotated[int | None, Query(ge=1, description="Only entries with a smaller id.")] = None,
    limit: Annotated[
        int | None, Query(ge=1, le=1000, description="Page size (default 100); JSON lines: all when absent.")
    ] = None,
    action: Annotated[str | None, Query(description="Exact action, e.g. `api_key.revoked`.")] = None,
    entity: Annotated[str | None, Query(description="Exact entity, e.g. `source`.")] = None,
    entity_id: Annotated[str | None, Query()] = None,
    actor: Annotated[str | None, Query(description="Exact actor, e.g. `key:3` or `cli:ana`.")] = None,
    since: Annotated[AwareDatetime | None, Query(description="Recorded at or after (with offset).")] = None,
    until: Annotated[AwareDatetime | None, Query(description="Recorded before (with offset).")] = None,
    format: Annotated[
        Literal["json", "jsonl"] | None,
        Query(description="`jsonl` streams JSON lines, as `Accept: application/x-ndjson` does."),
    ] = None,
    accept: Annotated[str | None, Header()] = None,
) -> AuditPage | Response:
    """Audit entries (who changed what, when, before and after, why), paged by id; JSON lines export."""
    filters = AuditFilter(action=action, entity=entity, entity_id=entity_id, actor=actor, since=since, until=until)
    if format == "jsonl" or (format is None and any(t in (accept or "") for t in JSONL_TYPES)):
        lines = export_audit(
            services.engine, filters=filters, after_id=after, before_id=before, order=order, limit=limit
        )
        return StreamingResponse(lines, media_type="application/x-ndjson")
    entries, cursor = await read_audit(
        services.engine, filters=filters, after_id=after, before_id=before, order=order, limit=limit or 100
    )
    return AuditPage(entries=entries, next=None if cursor is None else _next(request, order, cursor))


def _next(request: Request, order: Order, cursor: int) -> str:
    """This request's query with the cursor moved past the page's last entry."""
    cursor_param = "before" if order == "newest" else "after"
    params: list[tuple[str, Any]] = [(k, v) for k, v in request.query_params.multi_items() if k != cursor_param]
    params.append((cursor_param, cursor))
    return f"{request.url.path}?{urlencode(params)}"
