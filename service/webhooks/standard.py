"""Standard Webhooks: the canonical `LeadEvent` body, signed per standardwebhooks.com.

The scheme checks the signature over the raw body exactly as received (never a re-serialisation),
with a constant-time comparison, and rejects timestamps outside the tolerance window both ways so a
captured request cannot be replayed later. A source with no live secret accepts nothing.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence

import orjson
from pydantic import TypeAdapter, ValidationError

from service.errors import InvalidEvent, InvalidJson, InvalidSignature
from service.events import LeadEvent
from service.ingest import event_keys
from service.webhooks.base import MAX_FUTURE, Mapped, RequestLine, SourceConfig, Verified, apply_mapping


class StandardWebhooks:
    """Standard Webhooks (standardwebhooks.com), also sent by Svix with `svix-` header names.

    `webhook-signature` holds space-separated `v1,<base64 HMAC-SHA256>` entries over
    `"{webhook-id}.{webhook-timestamp}.{body}"`, keyed by the base64 part of a `whsec_` secret.
    """

    name = "standard"
    _prefix = "whsec_"

    def new_secret(self) -> str:
        return self._prefix + base64.b64encode(secrets.token_bytes(32)).decode()

    @staticmethod
    def _header(headers: Mapping[str, str], name: str) -> str | None:
        return headers.get(f"webhook-{name}") or headers.get(f"svix-{name}")

    def _key(self, secret: str) -> bytes:
        raw = secret.removeprefix(self._prefix)
        return base64.b64decode(raw)

    def verify(
        self,
        *,
        headers: Mapping[str, str],
        body: bytes,
        secrets: Sequence[str],
        now: dt.datetime,
        tolerance: dt.timedelta,
        request: RequestLine,  # noqa: ARG002 - the URL is not signed
        config: SourceConfig,  # noqa: ARG002
    ) -> Verified:
        msg_id = self._header(headers, "id")
        timestamp = self._header(headers, "timestamp")
        signature = self._header(headers, "signature")
        if not msg_id or not timestamp or not signature:
            raise InvalidSignature("missing webhook-id, webhook-timestamp or webhook-signature header")
        if len(msg_id) > 200:
            raise InvalidSignature("webhook-id is longer than 200 characters")
        if not timestamp.isascii() or not timestamp.isdigit():
            raise InvalidSignature("webhook-timestamp is not a number of seconds")
        signed_at = dt.datetime.fromtimestamp(int(timestamp), dt.UTC)
        if abs(now - signed_at) > tolerance:
            raise InvalidSignature("webhook-timestamp is outside the tolerance window")
        if not secrets:
            raise InvalidSignature("the source has no live secret")

        candidates: list[bytes] = []
        for entry in signature.split():
            version, _, value = entry.partition(",")
            if version != "v1" or not value:
                continue
            try:
                candidates.append(base64.b64decode(value, validate=True))
            except binascii.Error:
                continue
        if not candidates:
            raise InvalidSignature("no v1 signature in webhook-signature")

        signed = f"{msg_id}.{timestamp}.".encode() + body
        for secret in secrets:
            expected = hmac.new(self._key(secret), signed, hashlib.sha256).digest()
            # Compare against every candidate so the time taken does not depend on which one matched.
            matched = False
            for candidate in candidates:
                matched |= hmac.compare_digest(expected, candidate)
            if matched:
                return Verified(webhook_id=msg_id, signed_at=signed_at)
        raise InvalidSignature("no signature matches a live secret of this source")


_events_adapter = TypeAdapter(list[LeadEvent])


def parse_events(body: bytes, *, max_events: int) -> list[LeadEvent]:
    """One event or a list of events; `InvalidJson` / `InvalidEvent` naming each bad field."""
    if body[:1] == b"{":
        # The common case, validated straight from the bytes (no intermediate dict).
        try:
            return [LeadEvent.model_validate_json(body)]
        except ValidationError as exc:
            if not any(e["type"] == "json_invalid" for e in exc.errors()):
                raise InvalidEvent(field_errors(exc)) from None
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
        raise InvalidEvent(field_errors(exc)) from None


def field_errors(exc: ValidationError) -> list[dict[str, str]]:
    """Pydantic errors as `{"loc", "msg", "type"}` items, `loc` dotted (`0.subject.email`)."""
    return [
        {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]


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


class StandardMapper:
    """The body is canonical already: one event or a list, all valid or the request is refused (422)."""

    def map(
        self, body: bytes, *, verified: Verified, config: SourceConfig, now: dt.datetime, max_events: int
    ) -> Mapped:
        events = parse_events(body, max_events=max_events)
        _refuse_future(events, now)
        try:
            keys = event_keys(events, verified.webhook_id)
        except ValueError as exc:
            raise InvalidEvent([{"loc": "id", "msg": str(exc), "type": "missing"}]) from None
        if config.mapping:
            events = [
                event.model_copy(update={"traits": apply_mapping(event.traits, config.mapping)})
                if event.traits
                else event
                for event in events
            ]
        return Mapped(events=events, keys=keys)
