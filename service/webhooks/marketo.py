"""Marketo: a webhook called from a smart campaign, with the body built from Marketo tokens.

Marketo does not sign webhook calls, so the source's secret travels as a token in a custom header
(`X-Leadscore-Token`), compared in constant time. The body is the template shipped in
`docs/marketo-webhook.md`:

    {"marketo_id": "{{lead.Id}}", "email": "{{lead.Email Address}}", "sent_at": "{{system.dateTime}}",
     "campaign": "{{campaign.name}}", "activity": "", "properties": {}, "traits": {"Job Title": "..."}}

With `activity` empty the call is a `lead.updated` of the traits; with a name it is a `lead.activity`
of that name (with the traits as of now too). Marketo renders an empty field as "", which is a null
trait here. There is no event id: the body's digest is the deduplication key, and `sent_at` (which
changes every second) keeps two calls apart. The event time is the receive time, unless the body
has an `occurred_at` with an offset (Marketo's own date tokens have none).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from service.errors import InvalidEvent
from service.webhooks.base import (
    EventBuilder,
    Mapped,
    SourceConfig,
    Unmappable,
    Verified,
    as_object,
    digest,
    load_json,
    scalar_traits,
    subject,
)
from service.webhooks.segment import BearerToken

NAMESPACE = "marketo"
TOKEN_HEADER = "x-leadscore-token"


def marketo_token() -> BearerToken:
    return BearerToken("marketo", TOKEN_HEADER, bearer=False)


class MarketoMapper:
    def map(
        self,
        body: bytes,
        *,
        verified: Verified,  # noqa: ARG002 - nothing but the token is vouched for
        config: SourceConfig,
        now: dt.datetime,
        max_events: int,  # noqa: ARG002 - one call, one event
    ) -> Mapped:
        data = load_json(body)
        if not isinstance(data, dict):
            raise InvalidEvent([{"loc": "", "msg": "expected the Marketo webhook template's object", "type": "type"}])
        try:
            event = _event(data, now=now)
        except Unmappable as exc:
            raise InvalidEvent([{"loc": "", "msg": str(exc), "type": "unmappable"}]) from None
        out = EventBuilder(config=config, now=now)
        out.add(0, f"marketo:{digest(data)}", event)
        if out.skipped:
            raise InvalidEvent([{"loc": "", "msg": out.skipped[0]["reason"], "type": "invalid"}])
        return out.result()


def _event(data: dict[str, Any], *, now: dt.datetime) -> dict[str, Any]:
    occurred_at = now
    if data.get("occurred_at"):
        given = str(data["occurred_at"]).strip()
        try:
            occurred_at = dt.datetime.fromisoformat(given.replace("Z", "+00:00"))
        except ValueError:
            raise Unmappable(f"occurred_at is not an ISO 8601 time: {given!r}") from None
        # Marketo renders its date tokens in the instance's time zone without saying which: a time
        # without an offset would be read wrongly, so it is refused rather than guessed.
        if occurred_at.tzinfo is None:
            raise Unmappable("occurred_at needs a UTC offset (or leave it out: the receive time is used)")
    traits = as_object(data.get("traits"))
    event: dict[str, Any] = {
        "occurred_at": occurred_at.isoformat(),
        "subject": subject(data.get("email"), **{NAMESPACE: data.get("marketo_id")}),
        "traits": scalar_traits(traits, empty_is_none=True),
    }
    activity = data.get("activity")
    if isinstance(activity, str) and activity.strip():
        properties = as_object(data.get("properties"))
        if isinstance(data.get("campaign"), str) and data["campaign"]:
            properties = {"campaign": data["campaign"], **properties}
        event |= {"type": "lead.activity", "name": activity.strip(), "properties": properties}
    else:
        event["type"] = "lead.updated"
    return event
