"""Segment and RudderStack: Segment Spec messages (`identify`, `track`, `page`, `screen`, `group`),
one per body, a list, or a `{"batch": [...]}`.

Segment's webhook destination signs: `X-Signature` is the hex HMAC-SHA1 of the body, keyed by the
shared secret set in the destination. RudderStack's webhook destination does not sign, so a
RudderStack source authenticates with its secret as a bearer token (`Authorization: Bearer ...`,
set as a header in the destination). Neither carries a signed timestamp: a replayed message is
caught by its `messageId`, the deduplication key (see the README).

Identity: `userId` is the external id `segment`, `anonymousId` is `segment_anonymous` (RudderStack
implements the same spec, so the same ids name the same people whichever pipe carried them), and
the email is the `email` trait (of the message, or of `context.traits`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets as random
from collections.abc import Mapping, Sequence
from typing import Any

from service.errors import InvalidEvent, InvalidSignature
from service.webhooks.base import (
    EventBuilder,
    Mapped,
    RequestLine,
    SourceConfig,
    Unmappable,
    Verified,
    as_object,
    check_count,
    external_id,
    first_time,
    load_json,
    matches_any,
    require_secrets,
    scalar_traits,
    subject,
)


class SegmentSignature:
    name = "segment"

    def new_secret(self) -> str | None:
        return random.token_urlsafe(32)

    def verify(
        self,
        *,
        headers: Mapping[str, str],
        body: bytes,
        secrets: Sequence[str],
        now: dt.datetime,  # noqa: ARG002 - nothing signed carries a time
        tolerance: dt.timedelta,  # noqa: ARG002
        request: RequestLine,  # noqa: ARG002
        config: SourceConfig,  # noqa: ARG002
    ) -> Verified:
        signature = headers.get("x-signature")
        if not signature:
            raise InvalidSignature("missing X-Signature header")
        try:
            candidate = bytes.fromhex(signature.strip())
        except ValueError:
            raise InvalidSignature("X-Signature is not hex") from None
        require_secrets(secrets)
        expected = [hmac.new(s.encode(), body, hashlib.sha1).digest() for s in secrets if s]
        if not matches_any(expected, candidate):
            raise InvalidSignature("no signature matches a live secret of this source")
        return Verified(webhook_id=None, signed_at=None)


class BearerToken:
    """A per-source token in a header, for senders that cannot sign (RudderStack, Marketo).

    The token is the source's secret: rotated and retired like any other.
    """

    def __init__(self, name: str, header: str, *, bearer: bool) -> None:
        self.name = name
        self._header = header
        self._bearer = bearer

    def new_secret(self) -> str | None:
        return random.token_urlsafe(32)

    def verify(
        self,
        *,
        headers: Mapping[str, str],
        body: bytes,  # noqa: ARG002 - nothing is signed
        secrets: Sequence[str],
        now: dt.datetime,  # noqa: ARG002
        tolerance: dt.timedelta,  # noqa: ARG002
        request: RequestLine,  # noqa: ARG002
        config: SourceConfig,  # noqa: ARG002
    ) -> Verified:
        value = headers.get(self._header)
        if not value:
            raise InvalidSignature(f"missing {self._header} header")
        if self._bearer:
            scheme, _, value = value.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise InvalidSignature(f"{self._header} is not 'Bearer <token>'")
        require_secrets(secrets)
        if not matches_any((s.encode() for s in secrets if s), value.strip().encode()):
            raise InvalidSignature("the token is not a live secret of this source")
        return Verified(webhook_id=None, signed_at=None)


# Segment Spec call -> canonical activity name (track uses its own event name)
_VIEWS = {"page": "Page Viewed", "screen": "Screen Viewed"}


class SegmentSpecMapper:
    def map(
        self, body: bytes, *, verified: Verified, config: SourceConfig, now: dt.datetime, max_events: int
    ) -> Mapped:
        data = load_json(body)
        if isinstance(data, dict) and isinstance(data.get("batch"), list):
            messages: list[Any] = data["batch"]
        elif isinstance(data, dict):
            messages = [data]
        elif isinstance(data, list):
            messages = data  # a batching destination's array of messages
        else:
            raise InvalidEvent([{"loc": "", "msg": "expected a Segment message, a list or a batch", "type": "type"}])
        check_count(messages, max_events)
        out = EventBuilder(config=config, now=now)
        for index, message in enumerate(messages):
            try:
                key, event = _message(message, default_at=verified.signed_at or now)
            except Unmappable as exc:
                out.skip(index, str(exc))
                continue
            out.add(index, key, event)
        return out.result()


def _message(message: Any, *, default_at: dt.datetime) -> tuple[str, dict[str, Any]]:
    if not isinstance(message, dict):
        raise Unmappable("not an object")
    kind = message.get("type")
    raw_id = message.get("messageId")
    message_id = str(raw_id).strip() if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else ""
    if not message_id:
        raise Unmappable("no messageId")
    traits = as_object(message.get("traits"))
    context_traits = as_object(as_object(message.get("context")).get("traits"))
    properties = as_object(message.get("properties"))
    occurred_at = first_time(
        [(f, message.get(f)) for f in ("timestamp", "originalTimestamp", "sentAt", "receivedAt")],
        default=default_at,
    )
    event: dict[str, Any] = {
        "occurred_at": occurred_at.isoformat(),
        "subject": subject(
            (traits.get("email") if kind == "identify" else None) or context_traits.get("email"),
            segment=message.get("userId"),
            segment_anonymous=message.get("anonymousId"),
        ),
    }
    if kind == "identify":
        event |= {"type": "lead.identified", "traits": scalar_traits(traits)}
    elif kind == "track":
        name = message.get("event")
        if not isinstance(name, str) or not name.strip():
            raise Unmappable("a track call without an event name")
        event |= {"type": "lead.activity", "name": name, "properties": properties}
    elif kind in _VIEWS:
        details = {k: message[k] for k in ("name", "category") if isinstance(message.get(k), str)}
        event |= {"type": "lead.activity", "name": _VIEWS[kind], "properties": {**details, **properties}}
    elif kind == "group":
        group_id = external_id(message.get("groupId"))
        group = scalar_traits(traits, prefix="group.")
        if group_id is not None:
            group["group.id"] = group_id
        event |= {"type": "lead.updated", "traits": group}
    else:
        raise Unmappable(f"{kind!r} calls are not mapped (identify, track, page, screen and group are)")
    return message_id, event
