"""Mautic: `{"mautic.<event>": [items], ..., "timestamp": ...}`, one key per event type.

`Webhook-Signature` is the base64 HMAC-SHA256 of the body, keyed by the webhook's secret. Mautic
sends no event id and no signed timestamp: each item is deduplicated by a digest of its content
(with the event type), so a redelivered item is stored once.

Mautic drops an event on any answer but 2xx, and disables the webhook on 410: this source never
answers 410, and answers 2xx whenever the body was stored, listing items it could not map as
`skipped` (they stay in the stored raw body).

Every contact snapshot an item carries (`contact` or `lead`, with its `fields` by group) sets the
lead's traits by field alias as of the item's time (an empty field is a null trait), plus `points`.
The contact's Mautic id is the external id `mautic`, its email the email.
"""

from __future__ import annotations

import base64
import binascii
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
    digest,
    first_time,
    load_json,
    matches_any,
    require_secrets,
    subject,
)

NAMESPACE = "mautic"
PREFIX = "mautic."


class MauticSignature:
    name = "mautic"

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
        signature = headers.get("webhook-signature")
        if not signature:
            raise InvalidSignature("missing Webhook-Signature header")
        try:
            candidate = base64.b64decode(signature.strip(), validate=True)
        except binascii.Error:
            raise InvalidSignature("Webhook-Signature is not base64") from None
        require_secrets(secrets)
        expected = [hmac.new(s.encode(), body, hashlib.sha256).digest() for s in secrets if s]
        if not matches_any(expected, candidate):
            raise InvalidSignature("no signature matches a live secret of this source")
        return Verified(webhook_id=None, signed_at=None)


def _contact_traits(contact: dict[str, Any]) -> dict[str, Any]:
    """Field alias -> value over every field group; empty is null. Groups with no fields come as []."""
    traits: dict[str, Any] = {}
    fields = contact.get("fields")
    if isinstance(fields, dict):
        for group in fields.values():
            if not isinstance(group, dict):
                continue
            for alias, field in group.items():
                if not isinstance(field, dict) or "value" not in field:
                    continue
                value = field["value"]
                if value == "" or value is None:
                    traits[alias] = None
                elif isinstance(value, str | int | float | bool):
                    traits[alias] = value
    if isinstance(contact.get("points"), int | float) and not isinstance(contact.get("points"), bool):
        traits["points"] = contact["points"]
    return traits


def _email(contact: dict[str, Any]) -> Any:
    fields = contact.get("fields")
    core = fields.get("core") if isinstance(fields, dict) else None
    field = core.get("email") if isinstance(core, dict) else None
    return field.get("value") if isinstance(field, dict) else contact.get("email")


def _named(value: Any, *keys: str) -> dict[str, Any]:
    return {k: v for k, v in as_object(value).items() if k in keys}


def _item(kind: str, item: Any, *, default_at: dt.datetime) -> dict[str, Any]:
    """The canonical event of one item of `mautic.<kind>`."""
    if not isinstance(item, dict):
        raise Unmappable("not an object")
    # The contact snapshot sits under `contact` (lead events), or inside the stat, submission or hit.
    inner = next((item[k] for k in ("stat", "submission", "hit") if isinstance(item.get(k), dict)), item)
    contact = as_object(item.get("contact")) or as_object(inner.get("lead")) or as_object(inner.get("contact"))
    traits = _contact_traits(contact)
    contact_id = contact.get("id")
    email: Any = _email(contact)
    name: str | None = None
    properties: dict[str, Any] = {}
    at_fields: list[str] = ["timestamp"]
    kind_type = "lead.activity"

    if kind in ("lead_post_save_new", "lead_post_save_update"):
        kind_type = "lead.identified" if kind.endswith("_new") else "lead.updated"
        at_fields = ["timestamp", "contact.dateModified", "contact.dateAdded"]
    elif kind == "lead_points_change":
        kind_type = "lead.updated"
        points = as_object(item.get("points"))
        if isinstance(points.get("new_points"), int | float):
            traits["points"] = points["new_points"]
    elif kind == "lead_post_delete":
        # The deleted contact's id moves to the item (Mautic nulls it on the entity); its fields
        # describe a contact that no longer exists, so they set nothing.
        contact_id = item.get("id", contact_id)
        traits = {}
        name, properties = "Contact Deleted", {"mautic_id": contact_id}
    elif kind == "lead_channel_subscription_changed":
        name = "Channel Subscription Changed"
        properties = _named(item, "channel", "old_status", "new_status")
    elif kind == "form_on_submit":
        results = as_object(inner.get("results"))
        email = email or results.get("email")
        name = "Form Submitted"
        properties = {
            "form": _named(inner.get("form"), "id", "name", "alias"),
            "results": results,
            **_named(inner, "id", "referer", "trackingId"),
            "page": _named(inner.get("page"), "id", "title", "alias"),
        }
        at_fields = ["submission.dateSubmitted", "timestamp"]
    elif kind == "email_on_open":
        email = email or inner.get("emailAddress")
        name = "Email Opened"
        properties = {
            "email": _named(inner.get("email"), "id", "name", "subject", "language"),
            **_named(inner, "openCount", "source", "sourceId", "viewedInBrowser"),
        }
        at_fields = ["stat.dateRead", "stat.lastOpened", "timestamp"]
    elif kind == "email_on_send":
        name = "Email Sent"
        properties = {"email": _named(item.get("email"), "id", "name", "subject", "language")}
    elif kind == "page_on_hit":
        name = "Page Viewed"
        properties = {
            "page": _named(inner.get("page"), "id", "title", "alias"),
            **_named(inner, "url", "urlTitle", "referer", "source", "sourceId", "code", "pageLanguage"),
        }
        at_fields = ["hit.dateHit", "timestamp"]
    elif kind == "lead_company_change":
        name = "Company Changed"
        properties = {"company": _named(item.get("company"), "id", "name"), **_named(item, "added")}
    else:
        # A Mautic event this version does not know, about a contact: kept as an activity of that name.
        name = f"Mautic {kind}"

    if not contact and email is None:
        raise Unmappable(f"a {kind} item without a contact")
    paths = {
        "timestamp": item.get("timestamp"),
        "contact.dateModified": contact.get("dateModified"),
        "contact.dateAdded": contact.get("dateAdded"),
        "submission.dateSubmitted": inner.get("dateSubmitted"),
        "stat.dateRead": inner.get("dateRead"),
        "stat.lastOpened": inner.get("lastOpened"),
        "hit.dateHit": inner.get("dateHit"),
    }
    occurred_at = first_time([(f, paths[f]) for f in at_fields], default=default_at)
    event: dict[str, Any] = {
        "type": kind_type,
        "occurred_at": occurred_at.isoformat(),
        "subject": subject(email, **{NAMESPACE: contact_id}),
        "traits": traits,
    }
    if kind_type == "lead.activity":
        event |= {"name": name, "properties": properties}
    return event


class MauticMapper:
    def map(
        self,
        body: bytes,
        *,
        verified: Verified,  # noqa: ARG002 - nothing but the body is vouched for
        config: SourceConfig,
        now: dt.datetime,
        max_events: int,
    ) -> Mapped:
        data = load_json(body)
        if not isinstance(data, dict):
            raise InvalidEvent([{"loc": "", "msg": 'expected {"mautic.<event>": [...]}', "type": "type"}])
        default_at = now
        if data.get("timestamp"):
            try:
                default_at = first_time([("timestamp", data["timestamp"])], default=now)
            except Unmappable:
                default_at = now
        items: list[tuple[str, int, Any]] = []
        for key, value in data.items():
            if not key.startswith(PREFIX):
                continue  # `timestamp`, and anything Mautic may add
            for index, item in enumerate(value if isinstance(value, list) else [value]):
                items.append((key, index, item))
        # A body of no events (Mautic's own test ping, say) is stored and answered 202, never refused.
        check_count(items, max_events, allow_empty=True)
        out = EventBuilder(config=config, now=now)
        for key, index, item in items:
            where = f"{key}.{index}"
            try:
                event = _item(key.removeprefix(PREFIX), item, default_at=default_at)
            except Unmappable as exc:
                out.skip(where, str(exc))
                continue
            out.add(where, f"{key}:{digest(item)}", event)
        return out.result()
