"""The webhook use case: from an HTTP request's parts to stored events.

Order of checks: the source exists and is enabled (404), the body fits (413, enforced while
reading), it says it is JSON (415), the signature over the raw bytes is valid and fresh (401),
and only then is the body parsed (422). Nothing is stored for a rejected request.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import orjson
from pydantic import TypeAdapter, ValidationError

from service.errors import (
    InvalidEvent,
    InvalidJson,
    PayloadTooLarge,
    UnknownSource,
    UnsupportedMediaType,
)
from service.events import LeadEvent
from service.ingest import IngestJob, IngestResult, IngestWriter, event_keys
from service.metrics import WEBHOOK_EVENTS
from service.sources import SourceRegistry
from service.webhooks.schemes import scheme_for

_events_adapter = TypeAdapter(list[LeadEvent])


@dataclass(frozen=True)
class WebhookLimits:
    max_body_bytes: int
    max_events: int
    tolerance: dt.timedelta


async def read_limited(chunks: AsyncIterator[bytes], *, content_length: str | None, limit: int) -> bytes:
    """The body, refusing to hold more than `limit` bytes (checked while reading, not after)."""
    if content_length is not None and content_length.isdigit() and int(content_length) > limit:
        raise PayloadTooLarge(f"the body is over {limit} bytes")
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"the body is over {limit} bytes")
    return bytes(body)


def is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def parse_events(body: bytes, *, max_events: int) -> list[LeadEvent]:
    """One event or a list of events; `InvalidJson` / `InvalidEvent` naming each bad field."""
    if body[:1] == b"{":
        # The common case, validated straight from the bytes (no intermediate dict).
        try:
            return [LeadEvent.model_validate_json(body)]
        except ValidationError as exc:
            if not any(e["type"] == "json_invalid" for e in exc.errors()):
                raise InvalidEvent(_field_errors(exc)) from None
            # Not JSON after all: fall through for the same message as any other bad JSON.
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from None
    try:
        if isinstance(data, list):
            if not data:
                raise InvalidEvent([{"loc": "", "msg": "the list of events is empty", "type": "too_short"}])
            if len(data) > max_events:
                raise InvalidEvent([{"loc": "", "msg": f"at most {max_events} events per request", "type": "too_long"}])
            return _events_adapter.validate_python(data)
        return [LeadEvent.model_validate(data)]
    except ValidationError as exc:
        raise InvalidEvent(_field_errors(exc)) from None


def _field_errors(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]


# Traits keep the value with the latest event time, so an event dated far ahead would pin them.
MAX_FUTURE = dt.timedelta(days=1)


def _refuse_future(events: list[LeadEvent], now: dt.datetime) -> None:
    late = [
        {
            "loc": f"{i}.occurred_at" if len(events) > 1 else "occurred_at",
            "msg": "more than a day in the future",
            "type": "future",
        }
        for i, event in enumerate(events)
        if event.occurred_at > now + MAX_FUTURE
    ]
    if late:
        raise InvalidEvent(late)


async def receive(
    *,
    source_name: str,
    headers: Mapping[str, str],
    chunks: AsyncIterator[bytes],
    registry: SourceRegistry,
    writer: IngestWriter,
    limits: WebhookLimits,
    now: dt.datetime,
) -> IngestResult:
    """Verify, parse and store one webhook request; raises a `LeadscoreError` for a rejection."""
    source = await registry.get(source_name)
    if source is None or not source.enabled:
        WEBHOOK_EVENTS.labels("_unknown", "unknown_source").inc()
        raise UnknownSource(f"no enabled webhook source named {source_name!r}")
    label = source.name
    try:
        body = await read_limited(chunks, content_length=headers.get("content-length"), limit=limits.max_body_bytes)
        content_type = headers.get("content-type")
        if not is_json(content_type):
            raise UnsupportedMediaType("send the events as application/json")
        verified = scheme_for(source.scheme).verify(
            headers=headers, body=body, secrets=source.secrets, now=now, tolerance=limits.tolerance
        )
        events = parse_events(body, max_events=limits.max_events)
        _refuse_future(events, now)
        try:
            keys = event_keys(events, verified.webhook_id)
        except ValueError as exc:
            raise InvalidEvent([{"loc": "id", "msg": str(exc), "type": "missing"}]) from None
        result = await writer.submit(
            IngestJob(
                source_id=source.id,
                webhook_id=verified.webhook_id,
                content_type=content_type or "",
                body=body,
                events=events,
                event_keys=keys,
                received_at=now,
            )
        )
    except Exception as exc:
        WEBHOOK_EVENTS.labels(label, type(exc).__name__).inc()
        raise
    new = result.duplicates.count(False)
    if new:
        WEBHOOK_EVENTS.labels(label, "accepted").inc(new)
    if new < len(result.duplicates):
        WEBHOOK_EVENTS.labels(label, "duplicate").inc(len(result.duplicates) - new)
    return result
