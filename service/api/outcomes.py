"""The route the CRM reports outcomes to (signed like the lead webhook, served by FastAPI)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from service.api.deps import ServicesDep, utcnow
from service.api.webhooks import ERRORS
from service.crm_outcomes import OutcomesAccepted, openapi_body, receive_outcomes
from service.events import ErrorBody
from service.settings import Settings
from service.webhooks.base import RequestLine

OUTCOMES_PATH = "/v1/webhooks/crm-outcomes"

router = APIRouter(tags=["webhooks"])
_responses: dict[int | str, dict[str, Any]] = {
    200: {"model": OutcomesAccepted, "description": "Every outcome had been received before; nothing stored."},
    **{code: {"model": ErrorBody, "description": text} for code, text in ERRORS.items()},
    422: {
        "model": ErrorBody,
        "description": "Unparseable JSON, an invalid outcome (`InvalidEvent`) or one naming no known lead "
        "(`UnknownLead`); `detail` names each item. Nothing is stored.",
    },
}


@router.post(
    OUTCOMES_PATH,
    status_code=202,
    response_model=OutcomesAccepted,
    response_description="Stored, the leads' stages moved, and committed.",
    responses=_responses,
    openapi_extra={"requestBody": openapi_body(Settings.model_fields["max_events_per_request"].default)},
)
async def receive_crm_outcomes(request: Request, response: Response, services: ServicesDep) -> OutcomesAccepted:
    """Record outcomes (accepted, converted, won, lost) the CRM reports for leads; each moves the lead's
    lifecycle stage and labels it for training and reports. Signed with Standard Webhooks by the source
    `crm-outcomes`; 202 once stored and committed, 200 when every outcome is a repeat."""
    settings = services.settings
    raw_path = request.scope.get("raw_path")
    accepted = await receive_outcomes(
        engine=services.engine,
        registry=services.registry,
        limits=services.limits,
        headers=request.headers,
        chunks=request.stream(),
        request=RequestLine(
            method=request.method,
            scheme=request.url.scheme,
            host=request.headers.get("host"),
            raw_path=raw_path.split(b"?", 1)[0].decode("latin-1") if raw_path else request.url.path,
            query=request.url.query,
            public_base_url=services.limits.public_base_url,
        ),
        lost_stage=settings.lost_outcome_stage,
        retry_after=settings.retry_after_seconds,
        now=utcnow(),
    )
    if accepted.duplicate:
        response.status_code = 200
    return accepted
