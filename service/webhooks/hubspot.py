"""HubSpot: app webhooks (arrays of id-only events) and workflow webhooks (a contact's JSON).

Signature v3: `X-HubSpot-Signature-v3` is the base64 HMAC-SHA256, keyed by the app's client secret,
of `method + URI + body + X-HubSpot-Request-Timestamp` (milliseconds), where the URI is the full URL
HubSpot called with the characters of HubSpot's table decoded. v1 (`sha256(secret + body)`) and v2
(`sha256(secret + method + URI + body)`), hex in `X-HubSpot-Signature` with the version in
`X-HubSpot-Signature-Version`, carry no timestamp: they are accepted only when the source lists them.

App webhook events carry ids, not the contact: a property change says which property now has which
value. They are stored as they come and score on what arrived. When the source has an API token,
the contact's other properties are fetched afterwards (`service.enrichment`): the mapper names the
contacts worth fetching (`Mapped.fetch`: after a creation, a restore or a change to a property the
source reads, `contact_properties`; not a deletion), and `contact_record` maps the fetched contact
back to a lead event, tied to the lead by the external id `hubspot`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from scoring.spec import PipelineSpec, TraitSource
from service.errors import InvalidEvent, InvalidSignature
from service.webhooks.base import (
    EventBuilder,
    Mapped,
    RequestLine,
    SourceConfig,
    Unmappable,
    Verified,
    check_count,
    digest,
    email_or_none,
    external_id,
    first_time,
    load_json,
    matches_any,
    parse_time,
    require_secrets,
    scalar_traits,
    subject,
)

NAMESPACE = "hubspot"
# Contact properties enrichment reads for every contact: they name the person (email) and who they
# are to sales.
DEFAULT_PROPERTIES = ("email", "firstname", "lastname", "company")
# A HubSpot property's internal name; a pipeline trait with spaces ("Lead Origin") cannot be one
# (the source's mapping says which property becomes it).
_PROPERTY_NAME = re.compile(r"^[A-Za-z0-9_-]{1,100}$")

# HubSpot decodes these percent-escapes (and only these) in the URI before signing it (its v3
# validation guide's table); an escape outside the table, such as %20, stays as sent.
_DECODED = re.compile(r"%(3A|2F|3F|40|21|24|27|28|29|2A|2C|3B)", re.IGNORECASE)


def signed_uri(request: RequestLine) -> str:
    """The URI HubSpot signed: the public URL of the request with HubSpot's table decoded."""
    return _DECODED.sub(lambda m: chr(int(m.group(1), 16)), request.public_url())


class HubSpotSignature:
    name = "hubspot"

    def new_secret(self) -> str | None:
        return None  # HubSpot signs with the app's client secret: it is given, never made here

    def verify(
        self,
        *,
        headers: Mapping[str, str],
        body: bytes,
        secrets: Sequence[str],
        now: dt.datetime,
        tolerance: dt.timedelta,
        request: RequestLine,
        config: SourceConfig,
    ) -> Verified:
        v3 = headers.get("x-hubspot-signature-v3")
        if v3 is not None and "v3" in config.signature_versions:
            return self._verify_v3(v3, headers, body, secrets, now, tolerance, request)
        legacy = headers.get("x-hubspot-signature")
        version = (headers.get("x-hubspot-signature-version") or "").lower()
        if legacy is not None and version in ("v1", "v2") and version in config.signature_versions:
            return self._verify_legacy(version, legacy, body, secrets, request)
        accepted = ", ".join(config.signature_versions)
        raise InvalidSignature(f"no HubSpot signature of an accepted version ({accepted})")

    def _verify_v3(
        self,
        signature: str,
        headers: Mapping[str, str],
        body: bytes,
        secrets: Sequence[str],
        now: dt.datetime,
        tolerance: dt.timedelta,
        request: RequestLine,
    ) -> Verified:
        timestamp = headers.get("x-hubspot-request-timestamp")
        if not timestamp:
            raise InvalidSignature("missing X-HubSpot-Request-Timestamp header")
        if not timestamp.isascii() or not timestamp.isdigit() or len(timestamp) > 15:
            raise InvalidSignature("X-HubSpot-Request-Timestamp is not a number of milliseconds")
        signed_at = dt.datetime.fromtimestamp(int(timestamp) / 1000, dt.UTC)
        if abs(now - signed_at) > tolerance:
            raise InvalidSignature("X-HubSpot-Request-Timestamp is outside the tolerance window")
        require_secrets(secrets)
        try:
            candidate = base64.b64decode(signature, validate=True)
        except binascii.Error:
            raise InvalidSignature("X-HubSpot-Signature-v3 is not base64") from None
        message = request.method.encode() + signed_uri(request).encode() + body + timestamp.encode()
        expected = [hmac.new(s.encode(), message, hashlib.sha256).digest() for s in secrets if s]
        if not matches_any(expected, candidate):
            raise InvalidSignature("no signature matches a live secret of this source")
        return Verified(webhook_id=None, signed_at=signed_at)

    def _verify_legacy(
        self, version: str, signature: str, body: bytes, secrets: Sequence[str], request: RequestLine
    ) -> Verified:
        require_secrets(secrets)
        try:
            candidate = bytes.fromhex(signature)
        except ValueError:
            raise InvalidSignature("X-HubSpot-Signature is not hex") from None
        signed = body if version == "v1" else request.method.encode() + signed_uri(request).encode() + body
        expected = [hashlib.sha256(s.encode() + signed).digest() for s in secrets if s]
        if not matches_any(expected, candidate):
            raise InvalidSignature("no signature matches a live secret of this source")
        return Verified(webhook_id=None, signed_at=None)


# subscriptionType (after the object type) -> canonical activity name
_ACTIVITIES = {
    "deletion": "Contact Deleted",
    "privacyDeletion": "Contact Deleted",
    "restore": "Contact Restored",
    "merge": "Contacts Merged",
    "associationChange": "Association Changed",
}
# Changes after which the contact's record is fetched (with an API token): its properties may be new.
_FETCH_AFTER = frozenset({"creation", "propertyChange", "restore"})
# Fields of an app webhook event kept as the properties of the activity it maps to.
_EVENT_DETAILS = (
    "subscriptionType",
    "changeSource",
    "sourceId",
    "portalId",
    "eventId",
    "mergedObjectIds",
    "primaryObjectId",
    "newObjectId",
    "associationType",
    "fromObjectId",
    "toObjectId",
    "associationRemoved",
)
# Keys of a workflow body that describe the record rather than being its properties.
_WORKFLOW_META = {
    "vid",
    "canonical-vid",
    "merged-vids",
    "portal-id",
    "is-contact",
    "profile-token",
    "profile-url",
    "identity-profiles",
    "form-submissions",
    "list-memberships",
    "merge-audits",
    "associated-company",
    "objectId",
    "objectType",
    "id",
    "createdAt",
    "updatedAt",
    "archived",
    "properties",
}


class HubSpotMapper:
    """App webhook bodies (JSON arrays) event by event; anything else as a workflow webhook body."""

    def map(
        self, body: bytes, *, verified: Verified, config: SourceConfig, now: dt.datetime, max_events: int
    ) -> Mapped:
        data = load_json(body)
        out = EventBuilder(config=config, now=now)
        if isinstance(data, list):
            check_count(data, max_events)
            for index, item in enumerate(data):
                try:
                    key, event, fetch, changed = _app_event(item)
                except Unmappable as exc:
                    out.skip(index, str(exc))
                    continue
                out.add(index, key, event, fetch=fetch, changed=changed)
        elif isinstance(data, dict):
            try:
                key, event = _workflow_event(data, default_at=verified.signed_at or now)
            except Unmappable as exc:
                raise InvalidEvent([{"loc": "", "msg": str(exc), "type": "unmappable"}]) from None
            out.add(0, key, event)
        else:
            raise InvalidEvent([{"loc": "", "msg": "expected a JSON array of events or an object", "type": "type"}])
        return out.result()


def _app_event(item: Any) -> tuple[str, dict[str, Any], str | None, str | None]:
    """An app webhook event: its deduplication key, its canonical event, the contact id to fetch in
    full after it (None when the change says nothing new about the contact's properties) and, for a
    property change, the property (the fetch is worth it only when the source reads that one)."""
    if not isinstance(item, dict):
        raise Unmappable("not an object")
    kind = item.get("subscriptionType")
    if not isinstance(kind, str) or "." not in kind:
        raise Unmappable("no subscriptionType")
    object_type, _, change = kind.partition(".")
    # Generic webhooks say `object.<change>` with the type's id; 0-1 is the contact.
    if not (object_type == "contact" or (object_type == "object" and item.get("objectTypeId") == "0-1")):
        raise Unmappable(f"{kind} is not about a contact")
    object_id = external_id(item.get("objectId"))
    if object_id is None:
        raise Unmappable("no objectId")
    event_id = external_id(item.get("eventId"))
    if event_id is None:
        raise Unmappable("no eventId")
    occurred_at = parse_time(item.get("occurredAt"), what="occurredAt")
    # HubSpot documents eventId as not guaranteed unique on its own: a retry repeats all four parts.
    key = f"{item.get('portalId')}:{item.get('subscriptionId')}:{object_id}:{event_id}"
    event: dict[str, Any] = {
        "occurred_at": occurred_at.isoformat(),
        "subject": subject(**{NAMESPACE: object_id}),
    }
    changed: str | None = None
    if change == "creation":
        event |= {"type": "lead.identified", "traits": {}}
    elif change == "propertyChange":
        name = item.get("propertyName")
        if not isinstance(name, str) or not name:
            raise Unmappable("a propertyChange without propertyName")
        value = item.get("propertyValue")
        if value is not None and not isinstance(value, str | int | float | bool):
            value = str(value)
        event |= {"type": "lead.updated", "traits": {name: value}}
        changed = name
        if name == "email" and (address := email_or_none(value)):
            event["subject"]["email"] = address
    else:
        details = {k: item[k] for k in _EVENT_DETAILS if k in item}
        event |= {"type": "lead.activity", "name": _ACTIVITIES.get(change, f"HubSpot {kind}"), "properties": details}
    return key, event, object_id if change in _FETCH_AFTER else None, changed


def _workflow_event(data: dict[str, Any], *, default_at: dt.datetime) -> tuple[str, dict[str, Any]]:
    """A workflow's "Send a webhook" body: the legacy contact JSON (`vid`, `properties.<name>.value`),
    a CRM object (`id`, `properties.<name>`) or a flat body of chosen properties."""
    raw = data.get("properties")
    if isinstance(raw, dict):
        values = {k: (v.get("value") if isinstance(v, dict) else v) for k, v in raw.items()}
    else:
        values = {k: v for k, v in data.items() if k not in _WORKFLOW_META}
    object_id = next(
        (
            found
            for found in (
                external_id(data.get("canonical-vid")),
                external_id(data.get("vid")),
                external_id(data.get("objectId")),
                external_id(data.get("id")),
                external_id(values.get("hs_object_id")),
            )
            if found is not None
        ),
        None,
    )
    occurred_at = first_time(
        [("properties.lastmodifieddate", values.get("lastmodifieddate")), ("updatedAt", data.get("updatedAt"))],
        default=default_at,
    )
    event = {
        "type": "lead.identified",
        "occurred_at": occurred_at.isoformat(),
        "subject": subject(values.get("email"), **{NAMESPACE: object_id}),
        "traits": scalar_traits(values),
    }
    # No event id in a workflow body: the same body twice is the same fact.
    return f"workflow:{digest(data)}", event


def contact_record(
    object_id: str,
    properties: Mapping[str, Any],
    *,
    updated_at: str | None,
    config: SourceConfig,
    now: dt.datetime,
) -> Mapped:
    """A contact read through HubSpot's CRM API (enrichment) as one `lead.identified` event: every
    scalar property a trait (through the source's mapping), named by the external id `hubspot` and
    the `email` property, at the contact's `updatedAt`. Its key is the contact id, `updatedAt` and a
    digest of the properties, so reading the same state again is a repeat and a changed one is not."""
    out = EventBuilder(config=config, now=now)
    try:
        occurred_at = first_time(
            [("updatedAt", updated_at), ("properties.lastmodifieddate", properties.get("lastmodifieddate"))],
            default=now,
        )
        event = {
            "type": "lead.identified",
            "occurred_at": occurred_at.isoformat(),
            "subject": subject(properties.get("email"), **{NAMESPACE: object_id}),
            "traits": scalar_traits(properties),
        }
    except Unmappable as exc:
        out.skip(0, str(exc))
        return out.result()
    out.add(0, f"contact:{object_id}:{updated_at or ''}:{digest(dict(properties))[:16]}", event)
    return out.result()


def pipeline_traits(spec: PipelineSpec) -> list[str]:
    """The traits a pipeline reads (its trait features' sources)."""
    return sorted({f.source.trait for f in spec.features if isinstance(f.source, TraitSource)})


def contact_properties(config: SourceConfig, traits: Iterable[str] = ()) -> list[str]:
    """The contact properties a source reads (enrichment asks HubSpot for these): the defaults, the
    source's `properties`, every property its mapping renames (not those it drops), and the pipeline's
    `traits` no mapping produces (when they can be HubSpot property names)."""
    wanted = set(DEFAULT_PROPERTIES) | set(config.properties)
    wanted |= {name for name, target in config.mapping.items() if target is not None}
    produced = {target for target in config.mapping.values() if target is not None}
    wanted |= {t for t in traits if t not in produced and _PROPERTY_NAME.match(t)}
    return sorted(wanted)
