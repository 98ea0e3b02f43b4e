"""Routes for webhook senders (marketing automation platforms)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from service.api.deps import Services, utcnow
from service.events import ErrorBody, EventAccepted, LeadEvent
from service.metrics import ROUTE_TEMPLATE
from service.responses import JsonResponse
from service.webhooks.receive import receive

_errors = {
    401: "Missing, malformed, stale or wrong signature.",
    404: "Unknown or disabled source.",
    413: "Body over `LEADSCORE_MAX_BODY_BYTES`.",
    415: "Body is not JSON.",
    422: "Unparseable JSON or an invalid event; `detail` names each field.",
    503: "Storage unavailable; retry after `Retry-After` seconds.",
}


def _json(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def openapi_path() -> tuple[dict[str, Any], list[type[BaseModel]]]:
    """The OpenAPI path item of the webhook route, and the models it refers to.

    The route is a plain Starlette route (see `receive_webhook`), which FastAPI does not describe,
    so it is described here.
    """
    operation = {
        "tags": ["webhooks"],
        "summary": "Receive Webhook",
        "operationId": "receive_webhook",
        "description": (receive_webhook.__doc__ or "").strip(),
        "parameters": [{"name": "source", "in": "path", "required": True, "schema": {"type": "string"}}],
        "requestBody": {
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
        },
        "responses": {
            "202": {"description": "Stored, scored and committed.", "content": _json("EventAccepted")},
            "200": {"description": "Every event had been received before.", "content": _json("EventAccepted")},
            **{str(code): {"description": text, "content": _json("ErrorBody")} for code, text in _errors.items()},
        },
    }
    return {"post": operation}, [LeadEvent, EventAccepted, ErrorBody]


async def receive_webhook(request: Request) -> Response:
    """Receive lead events from a signed webhook; 202 once stored, 200 for a repeat.

    A plain Starlette endpoint rather than a FastAPI route: the body must be read raw for the
    signature anyway, and FastAPI's dependency and validation layers cost a third of the CPU of
    this, the hottest route (measured: 225 vs 185 us per request without storage).
    """
    # A plain route has no FastAPI route object for the metrics middleware: name the template.
    request.scope[ROUTE_TEMPLATE] = "/v1/webhooks/{source}"
    services: Services = request.app.state.services
    result = await receive(
        source_name=request.path_params["source"],
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
