"""Routes for webhook senders (marketing automation platforms)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from service.api.deps import ServicesDep, utcnow
from service.events import ErrorBody, EventAccepted
from service.responses import JsonResponse
from service.webhooks.receive import receive

router = APIRouter(tags=["webhooks"])

_errors: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        401: "Missing, malformed, stale or wrong signature.",
        404: "Unknown or disabled source.",
        413: "Body over `LEADSCORE_MAX_BODY_BYTES`.",
        415: "Body is not JSON.",
        422: "Unparseable JSON or an invalid event; `detail` names each field.",
        503: "Storage unavailable; retry after `Retry-After` seconds.",
    }.items()
}

# The body is read raw (the signature covers the exact bytes), so its schema is declared here.
_request_body = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {"$ref": "#/components/schemas/LeadEvent"},
                    {"type": "array", "items": {"$ref": "#/components/schemas/LeadEvent"}, "maxItems": 500},
                ]
            }
        }
    },
}


@router.post(
    "/v1/webhooks/{source}",
    status_code=202,
    response_model=EventAccepted,
    responses={200: {"model": EventAccepted, "description": "Every event is a duplicate."}, **_errors},
    openapi_extra={"requestBody": _request_body},
)
async def receive_webhook(source: str, request: Request, services: ServicesDep) -> Response:
    """Receive lead events from a signed webhook; 202 once stored, 200 for a repeat."""
    result = await receive(
        source_name=source,
        headers=request.headers,
        chunks=request.stream(),
        registry=services.registry,
        writer=services.writer,
        limits=services.limits,
        now=utcnow(),
    )
    lead_ids = set(result.lead_ids)
    single = next(iter(lead_ids)) if len(lead_ids) == 1 else None
    current = result.scores.get(single) if single is not None else None
    return JsonResponse(
        {
            "lead_id": single,
            "score": current["score"] if current else None,
            "grade": current["grade"] if current else None,
            "scores": {str(k): v for k, v in result.scores.items()},
            "lead_ids": result.lead_ids,
            "event_ids": result.event_ids,
            "duplicate": result.duplicate,
            "duplicates": result.duplicates,
        },
        status_code=200 if result.duplicate else 202,
    )
