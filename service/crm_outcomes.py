"""Outcomes posted by the CRM to `POST /v1/webhooks/crm-outcomes`: verified like any signed webhook,
resolved to leads, then recorded by `service.outcomes.record_outcomes` in one transaction.

The request is signed by the source named `crm-outcomes` (`leadscore sources add crm-outcomes
--scheme standard`); its checks are the lead webhook's (404 unknown or disabled source, 413, 415,
401). The body is one `CrmOutcome` or a list; the request is applied whole or not at all: an invalid
item (422 `InvalidEvent`) or an item that names no known lead (422 `UnknownLead`) refuses the request,
and `detail` lists every such item. Repeats of a CRM event id are answered, not stored again.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Annotated, Any, Literal

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.db import write_transaction
from service.errors import InvalidEvent, InvalidJson, StorageUnavailable, UnknownLead
from service.events import Namespace, ShortStr, Subject
from service.metrics import CRM_OUTCOMES, DB_ERRORS, WEBHOOK_EVENTS
from service.outcomes import Amount, Currency, OutcomeKind, OutcomeReport, record_outcomes
from service.repositories import leads as leads_repo
from service.repositories import qualification as qualification_repo
from service.sources import SourceRegistry
from service.webhooks.base import MAX_FUTURE, RequestLine
from service.webhooks.receive import WebhookLimits, verify_request
from service.webhooks.standard import field_errors

SOURCE = "crm-outcomes"
"""The source whose secrets sign outcome requests, and the `source` of the outcomes stored."""


class CrmOutcome(BaseModel):
    """One outcome of one lead, as the CRM posts it. Name the lead by `lead_id`, `email` or
    `external_ids` (any that are known must name the same lead)."""

    model_config = ConfigDict(extra="forbid")

    id: ShortStr = Field(
        description="The CRM's id of this outcome event; a repeat with the same id is answered, not stored again.",
        examples=["deal-4711-won"],
    )
    outcome: OutcomeKind = Field(description="`accepted`, `converted`, `won` or `lost`.")
    occurred_at: AwareDatetime = Field(description="When sales reported it, with a UTC offset.")
    lead_id: uuid.UUID | None = Field(default=None, description="Leadscore's lead id (as handed off to the CRM).")
    email: Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, max_length=320)] | None = Field(
        default=None, description="The lead's email; trimmed and lower-cased before matching.", examples=["ana@acme.io"]
    )
    external_ids: dict[Namespace, ShortStr] = Field(
        default_factory=dict,
        description="Ids of the lead in other systems, by system name, as events sent them.",
        examples=[{"hubspot": "123"}],
    )
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)] | None = Field(
        default=None, description="Why (a lost reason); stored, and in the reason of the stage transition it causes."
    )
    amount: Amount | None = Field(default=None, description="The deal's value, in `currency`.", examples=[1200.5])
    currency: Currency | None = Field(default=None, description="ISO 4217 code of `amount`.", examples=["EUR"])

    @model_validator(mode="after")
    def _names_a_lead(self) -> CrmOutcome:
        if self.email is not None or self.external_ids:
            # The identity rules of lead events (an email must be an address; "" means none).
            try:
                subject = Subject(email=self.email, external_ids=self.external_ids)
            except ValidationError as exc:
                raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
            self.email = subject.email
        elif self.lead_id is None:
            raise ValueError("name the lead: lead_id, email or external_ids")
        return self

    def identities(self) -> list[tuple[str, str]]:
        keys = [("email", self.email)] if self.email else []
        keys.extend(sorted(self.external_ids.items()))
        return keys


class OutcomeResult(BaseModel):
    id: str = Field(description="The CRM's id of the outcome event.")
    outcome_id: int | None = Field(description="Leadscore's id of the stored outcome; null for a repeat.")
    lead_id: uuid.UUID = Field(description="The lead it was recorded on (the survivor, for a merged lead).")
    outcome: OutcomeKind
    duplicate: bool = Field(description="True when this CRM event id had been received before (nothing stored).")
    from_stage: str | None = Field(description="The stage this outcome moved the lead from; null when it did not.")
    to_stage: str | None = Field(description="The stage this outcome moved the lead to; null when it did not.")
    stage: str = Field(description="The lead's lifecycle stage after the whole request.")


class OutcomesAccepted(BaseModel):
    """The answer to an accepted (202) or repeated (200) outcomes request."""

    duplicate: bool = Field(description="True when every outcome of the request had been received before.")
    results: list[OutcomeResult] = Field(description="One per outcome, in request order.")


def parse_outcomes(body: bytes, *, max_items: int, now: dt.datetime) -> list[CrmOutcome]:
    """One outcome or a list of them, all valid or `InvalidJson` / `InvalidEvent` naming each bad field."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from None
    items = data if isinstance(data, list) else [data]
    if not items:
        raise InvalidEvent([{"loc": "", "msg": "the list of outcomes is empty", "type": "too_short"}])
    if len(items) > max_items:
        raise InvalidEvent([{"loc": "", "msg": f"at most {max_items} outcomes per request", "type": "too_long"}])
    outcomes: list[CrmOutcome] = []
    problems: list[dict[str, str]] = []
    for index, item in enumerate(items):
        prefix = f"{index}." if isinstance(data, list) else ""
        try:
            parsed = CrmOutcome.model_validate(item)
        except ValidationError as exc:
            problems += [{**e, "loc": (prefix + e["loc"]).rstrip(".")} for e in field_errors(exc)]
            continue
        if parsed.occurred_at > now + MAX_FUTURE:
            problems.append({"loc": f"{prefix}occurred_at", "msg": "more than a day in the future", "type": "future"})
        outcomes.append(parsed)
    if problems:
        raise InvalidEvent(problems)
    return outcomes


async def _resolve(conn: AsyncConnection, items: Sequence[CrmOutcome], *, listed: bool) -> list[uuid.UUID]:
    """The live lead each outcome names, read from the leads and identities (nothing is written);
    `UnknownLead` listing every item that names no known lead, or two different ones."""
    owners = await leads_repo.leads_by_identities(conn, [key for item in items for key in item.identities()])
    live: dict[uuid.UUID, uuid.UUID | None] = {}

    async def survivor(lead_id: uuid.UUID) -> uuid.UUID | None:
        if lead_id not in live:
            row = await leads_repo.get_live_lead(conn, lead_id)
            live[lead_id] = row["id"] if row is not None else None
        return live[lead_id]

    resolved: list[uuid.UUID] = []
    problems: list[dict[str, str]] = []
    for index, item in enumerate(items):
        named = [item.lead_id] if item.lead_id is not None else []
        named += [owner for key in item.identities() if (owner := owners.get(key)) is not None]
        leads = {found for lead_id in named if (found := await survivor(lead_id)) is not None}
        loc = str(index) if listed else ""
        if not leads:
            problems.append(
                {"loc": loc, "msg": "no lead has this lead_id, email or external id", "type": "unknown_lead"}
            )
        elif len(leads) > 1:
            problems.append(
                {
                    "loc": loc,
                    "msg": "the lead_id, email and external ids name different leads",
                    "type": "ambiguous_lead",
                }
            )
        else:
            resolved.append(leads.pop())
    if problems:
        raise UnknownLead(problems)
    return resolved


async def receive_outcomes(
    *,
    engine: AsyncEngine,
    registry: SourceRegistry,
    limits: WebhookLimits,
    headers: Mapping[str, str],
    chunks: AsyncIterator[bytes],
    request: RequestLine,
    lost_stage: Literal["recycled", "disqualified"],
    retry_after: int,
    now: dt.datetime,
) -> OutcomesAccepted:
    """Verify one outcomes request, then resolve and record its outcomes in one transaction,
    committed before this returns; raises a `LeadscoreError` for a rejection (nothing stored)."""
    checked = await verify_request(
        source_name=SOURCE, headers=headers, chunks=chunks, registry=registry, limits=limits, now=now, request=request
    )
    try:
        items = parse_outcomes(checked.body, max_items=limits.max_events, now=now)
        try:
            async with write_transaction(engine) as conn:
                lead_ids = await _resolve(conn, items, listed=checked.body.lstrip()[:1] == b"[")
                recorded = await record_outcomes(
                    conn,
                    source=SOURCE,
                    outcomes=[
                        OutcomeReport(
                            lead_id=lead_id,
                            kind=item.outcome,
                            occurred_at=item.occurred_at,
                            external_id=item.id,
                            reason=item.reason,
                            amount=item.amount,
                            currency=item.currency,
                        )
                        for item, lead_id in zip(items, lead_ids, strict=True)
                    ],
                    lost_stage=lost_stage,
                    now=now,
                )
                stages = await qualification_repo.lead_stages(conn, [r.lead_id for r in recorded])
        except (DBAPIError, OSError, TimeoutError) as exc:
            DB_ERRORS.labels(operation="crm_outcomes").inc()
            raise StorageUnavailable("the database is unavailable; retry later", retry_after=retry_after) from exc
    except Exception as exc:
        WEBHOOK_EVENTS.labels(SOURCE, type(exc).__name__).inc()
        raise
    results = [
        OutcomeResult(
            id=item.id,
            outcome_id=r.outcome_id,
            lead_id=r.lead_id,
            outcome=r.kind,
            duplicate=r.duplicate,
            from_stage=r.from_stage,
            to_stage=r.to_stage,
            stage=stages[r.lead_id],
        )
        for item, r in zip(items, recorded, strict=True)
    ]
    for result in results:
        WEBHOOK_EVENTS.labels(SOURCE, "duplicate" if result.duplicate else "accepted").inc()
        if not result.duplicate:
            CRM_OUTCOMES.labels(result.outcome).inc()
    return OutcomesAccepted(duplicate=all(r.duplicate for r in results), results=results)


def openapi_body(max_items: int) -> dict[str, Any]:
    """The request body of the route, for OpenAPI (the route reads the raw body to verify it)."""
    ref = {"$ref": "#/components/schemas/CrmOutcome"}
    return {
        "required": True,
        "content": {
            "application/json": {"schema": {"oneOf": [ref, {"type": "array", "items": ref, "maxItems": max_items}]}}
        },
    }
