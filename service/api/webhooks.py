"""Routes for webhook senders (marketing automation platforms)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import structlog
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from service.api.deps import Services, utcnow
from service.crm_outcomes import SOURCE as OUTCOMES_SOURCE
from service.errors import LeadscoreError
from service.events import ErrorBody, EventAccepted, LeadEvent
from service.metrics import HTTP_DURATION
from service.responses import JsonResponse
from service.webhooks.base import RequestLine
from service.webhooks.receive import Received
from service.webhooks.receive import receive as receive_events

log = structlog.get_logger(__name__)

ERRORS = {
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

    The route is a raw ASGI handler (see `receive_webhook`), which FastAPI does not describe,
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
                            {"type": ["object", "array"], "description": "A vendor source's own body."},
                        ]
                    }
                }
            },
        },
        "responses": {
            "202": {"description": "Stored, scored and committed.", "content": _json("EventAccepted")},
            "200": {"description": "Every event had been received before.", "content": _json("EventAccepted")},
            **{str(code): {"description": text, "content": _json("ErrorBody")} for code, text in ERRORS.items()},
        },
    }
    return {"post": operation}, [LeadEvent, EventAccepted, ErrorBody]


PATH_PREFIX = "/v1/webhooks/"
ROUTE = "/v1/webhooks/{source}"
# Served by a FastAPI route of its own (`service.api.outcomes`): CRM outcomes are not lead events.
NOT_LEAD_SOURCES = frozenset({OUTCOMES_SOURCE})


def is_webhook(scope: Scope) -> bool:
    """Whether an ASGI request is `POST /v1/webhooks/{source}` for a lead source."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    path: str = scope["path"]
    return (
        path.startswith(PATH_PREFIX)
        and len(path) > len(PATH_PREFIX)
        and "/" not in path[len(PATH_PREFIX) :]
        and _source_name(path) not in NOT_LEAD_SOURCES
    )


def _source_name(path: str) -> str:
    return unquote(path[len(PATH_PREFIX) :])


async def receive_webhook(services: Services, scope: Scope, receive: Receive, send: Send) -> None:
    """Receive lead events from a signed webhook; 202 once stored, 200 for a repeat.

    The body is the canonical `LeadEvent` (or a list) for `standard` sources, and the vendor's own body
    for `hubspot`, `segment`, `rudderstack`, `mautic` and `marketo` sources, mapped to lead events.
    `crm-outcomes` is not a lead source: `POST /v1/webhooks/crm-outcomes` has a route of its own.

    A raw ASGI handler, called by the app before any middleware or routing: this is the hot route,
    and the framework's layers (routing, dependencies, middleware, request and response objects)
    cost more CPU than everything the route itself does (measured per request without storage:
    FastAPI route 254 us, Starlette route 185 us). It renders errors and records metrics itself,
    the same way the rest of the API does.
    """
    started = time.perf_counter()
    status = 500
    try:
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in reversed(scope["headers"])}
        raw_path = scope.get("raw_path")
        received = await receive_events(
            source_name=_source_name(scope["path"]),
            headers=headers,
            chunks=_body(receive),
            registry=services.registry,
            writer=services.writer,
            limits=services.limits,
            now=utcnow(),
            pipelines=lambda: services.pipelines.current,
            request=RequestLine(
                method=scope["method"],
                scheme=scope.get("scheme", "http"),
                host=headers.get("host"),
                # ASGI's raw_path has no query, but some servers (httpx's transport) leave it on.
                raw_path=raw_path.split(b"?", 1)[0].decode("latin-1") if raw_path else scope["path"],
                query=scope.get("query_string", b"").decode("latin-1"),
                public_base_url=services.limits.public_base_url,
            ),
        )
        status = 200 if received.result.duplicate else 202
        await _respond(send, status, _accepted(received))
    except LeadscoreError as exc:
        status = exc.status
        await _respond(send, status, {"error": type(exc).__name__, "detail": exc.detail}, exc.response_headers())
    except ClientDisconnected:
        status = 499  # nginx's code for it: nobody is left to answer, and nothing was stored
    except Exception:
        log.exception("webhook request failed")
        await _respond(send, 500, {"error": "InternalError", "detail": "the request failed; it was not stored"})
        raise
    finally:
        HTTP_DURATION.labels("POST", ROUTE, str(status)).observe(time.perf_counter() - started)


def _accepted(received: Received) -> dict[str, Any]:
    result = received.result
    lead_ids = set(result.lead_ids)
    single = next(iter(lead_ids)) if len(lead_ids) == 1 else None
    current = result.scores.get(single) if single is not None else None
    return {
        "lead_id": single,
        "score": current["score"] if current else None,
        "grade": current["grade"] if current else None,
        "stage": result.stages.get(single) if single is not None else None,
        "scores": {str(k): v for k, v in result.scores.items()},
        "stages": {str(k): v for k, v in result.stages.items()},
        "lead_ids": result.lead_ids,
        "event_ids": result.event_ids,
        "duplicate": result.duplicate,
        "duplicates": result.duplicates,
        **({"skipped": received.skipped} if received.skipped else {}),
    }


class ClientDisconnected(Exception):
    """The sender went away before its body arrived; nothing is stored."""


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def _respond(send: Send, status: int, content: Any, headers: dict[str, str] | None = None) -> None:
    body = JsonResponse(content).body
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
