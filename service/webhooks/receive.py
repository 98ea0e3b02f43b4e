"""The webhook use case: from an HTTP request's parts to stored events.

Order of checks: the source exists and is enabled (404), the body fits (413, enforced while
reading), it says it is JSON (415), the request is the sender's (signature or token, fresh where the
scheme carries a time: 401), and only then is the body parsed and mapped to canonical events (422).
Nothing is stored for a rejected request.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.errors import PayloadTooLarge, UnknownSource, UnsupportedMediaType
from service.ingest import IngestJob, IngestResult, IngestWriter
from service.metrics import WEBHOOK_EVENTS
from service.pipelines import Pipelines
from service.repositories.sources import SourceRow
from service.sources import SourceRegistry
from service.webhooks.base import RequestLine, Verified
from service.webhooks.hubspot import contact_properties, pipeline_traits
from service.webhooks.schemes import mapper_for, scheme_for


@dataclass(frozen=True)
class WebhookLimits:
    max_body_bytes: int
    max_events: int
    tolerance: dt.timedelta
    public_base_url: str | None = None


@dataclass(frozen=True)
class Received:
    """What was stored, and the items of a vendor body that carried no lead event."""

    result: IngestResult
    skipped: list[dict[str, Any]] = field(default_factory=list)


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


@dataclass(frozen=True)
class VerifiedRequest:
    """A request that passed every check before parsing: the source, the raw body, what the signature
    vouches for."""

    source: SourceRow
    body: bytes
    content_type: str
    verified: Verified


async def verify_request(
    *,
    source_name: str,
    headers: Mapping[str, str],
    chunks: AsyncIterator[bytes],
    registry: SourceRegistry,
    limits: WebhookLimits,
    now: dt.datetime,
    request: RequestLine,
) -> VerifiedRequest:
    """The checks every signed request goes through, in order (404, 413, 415, 401); raises a
    `LeadscoreError` for a rejection and counts it in `WEBHOOK_EVENTS` under the source's name."""
    source = await registry.get(source_name)
    if source is None or not source.enabled:
        WEBHOOK_EVENTS.labels("_unknown", "unknown_source").inc()
        raise UnknownSource(f"no enabled webhook source named {source_name!r}")
    try:
        body = await read_limited(chunks, content_length=headers.get("content-length"), limit=limits.max_body_bytes)
        content_type = headers.get("content-type")
        if not is_json(content_type):
            raise UnsupportedMediaType("send the events as application/json")
        verified = scheme_for(source.scheme).verify(
            headers=headers,
            body=body,
            secrets=source.secrets,
            now=now,
            tolerance=limits.tolerance,
            request=request,
            config=source.config,
        )
    except Exception as exc:
        WEBHOOK_EVENTS.labels(source.name, type(exc).__name__).inc()
        raise
    return VerifiedRequest(source=source, body=body, content_type=content_type or "", verified=verified)


async def receive(
    *,
    source_name: str,
    headers: Mapping[str, str],
    chunks: AsyncIterator[bytes],
    registry: SourceRegistry,
    writer: IngestWriter,
    limits: WebhookLimits,
    now: dt.datetime,
    request: RequestLine,
    pipelines: Callable[[], Pipelines] = Pipelines,
) -> Received:
    """Verify, map and store one webhook request; raises a `LeadscoreError` for a rejection.
    `pipelines` is what scores now: its traits are among the vendor properties a source reads."""
    checked = await verify_request(
        source_name=source_name,
        headers=headers,
        chunks=chunks,
        registry=registry,
        limits=limits,
        now=now,
        request=request,
    )
    source = checked.source
    label = source.name
    try:
        mapped = mapper_for(source.scheme).map(
            checked.body, verified=checked.verified, config=source.config, now=now, max_events=limits.max_events
        )
        result = await writer.submit(
            IngestJob(
                source_id=source.id,
                webhook_id=checked.verified.webhook_id,
                content_type=checked.content_type,
                body=checked.body,
                events=mapped.events,
                event_keys=mapped.keys,
                received_at=now,
                # Without an API token the source scores on what arrived, as it always did.
                fetch=mapped.wanted_fetches(lambda: _reads(source, pipelines()))
                if source.api_token is not None
                else {},
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
    if mapped.skipped:
        WEBHOOK_EVENTS.labels(label, "skipped").inc(len(mapped.skipped))
    return Received(result=result, skipped=mapped.skipped)


def _reads(source: SourceRow, pipelines: Pipelines) -> frozenset[str]:
    """The vendor properties a source's enrichment reads (HubSpot's contact properties)."""
    traits = pipeline_traits(pipelines.active.compiled.spec) if pipelines.active is not None else []
    return frozenset(contact_properties(source.config, traits))
