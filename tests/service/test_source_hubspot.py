"""HubSpot sources: requests signed by `hubspot-api-client`'s own signature helper."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import httpx
import pytest
from hubspot.utils.signature import Signature

from service.settings import Settings
from service.webhooks.base import DEFAULT_CONFIG, Verified
from service.webhooks.hubspot import HubSpotMapper
from tests.conftest import Db
from tests.service.sources_support import EMPTY, client_for, create_source, identities, lead_traits, stored_events

pytestmark = pytest.mark.anyio

PATH = "/v1/webhooks/hubspot"
LOCAL_URI = "http://test" + PATH
OCCURRED_MS = 1_764_400_000_000  # 2025-11-29T07:06:40Z


def app_events(*events: dict[str, Any]) -> bytes:
    return json.dumps(list(events)).encode()


def hs_event(event_id: int, kind: str = "contact.propertyChange", **fields: Any) -> dict[str, Any]:
    event = {
        "eventId": event_id,
        "subscriptionId": 4242,
        "portalId": 62515,
        "appId": 54321,
        "occurredAt": OCCURRED_MS,
        "subscriptionType": kind,
        "attemptNumber": 0,
        "objectId": 123,
        "changeSource": "CRM",
    }
    return event | fields


def signed(
    body: bytes,
    secret: str,
    *,
    uri: str = LOCAL_URI,
    at: dt.datetime | None = None,
    method: str = "POST",
) -> dict[str, str]:
    """Headers as HubSpot sends them, the v3 signature made by HubSpot's own client library."""
    timestamp = str(int((at or dt.datetime.now(dt.UTC)).timestamp() * 1000))
    signature = Signature.get_signature(secret, body.decode(), "v3", uri, method, timestamp)
    return {
        "content-type": "application/json",
        "x-hubspot-signature-v3": signature,
        "x-hubspot-request-timestamp": timestamp,
    }


def legacy_signed(body: bytes, secret: str, version: str, *, uri: str = LOCAL_URI) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "x-hubspot-signature": Signature.get_signature(secret, body.decode(), version, uri, "POST"),
        "x-hubspot-signature-version": version,
    }


@pytest.fixture
async def secret(settings: Settings) -> str:
    # HubSpot's client secrets are UUIDs issued by HubSpot; the source is given one.
    return await create_source(settings, "hubspot", "hubspot", secret=str(uuid.uuid4()))


BODY = app_events(
    hs_event(1, "contact.creation"),
    hs_event(2, propertyName="email", propertyValue="Ana@Acme.io"),
    hs_event(3, propertyName="jobtitle", propertyValue="CTO"),
    hs_event(4, "contact.deletion", objectId=999),
    hs_event(5, "deal.creation", objectId=777),
)


async def test_app_webhook_events_are_stored_against_the_hubspot_contact(
    client: httpx.AsyncClient, secret: str, db: Db
) -> None:
    response = await client.post(PATH, content=BODY, headers=signed(BODY, secret))
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["skipped"] == [{"index": 4, "reason": "deal.creation is not about a contact"}]
    assert len(answer["event_ids"]) == 4

    events = await stored_events(db)
    at = dt.datetime.fromtimestamp(OCCURRED_MS / 1000, dt.UTC)
    assert [(e["key"], e["type"], e["name"], e["occurred_at"]) for e in events] == [
        ("62515:4242:123:1", "lead.identified", None, at),
        ("62515:4242:123:2", "lead.updated", None, at),
        ("62515:4242:123:3", "lead.updated", None, at),
        ("62515:4242:999:4", "lead.activity", "Contact Deleted", at),
    ]
    # One person for contact 123: the email property change names it too.
    assert len({e["lead_id"] for e in events[:3]}) == 1
    assert await identities(db) == {("hubspot", "123"), ("email", "ana@acme.io"), ("hubspot", "999")}
    traits = await lead_traits(db, events[0]["lead_id"])
    assert traits == {"email": "Ana@Acme.io", "jobtitle": "CTO"}
    assert events[3]["payload"]["properties"]["subscriptionType"] == "contact.deletion"
    # The raw body is kept as it came.
    [raw] = await db.rows("SELECT body FROM inbound_request")
    assert bytes(raw.body) == BODY


async def test_a_redelivery_is_200_and_stores_nothing(client: httpx.AsyncClient, secret: str, db: Db) -> None:
    first = await client.post(PATH, content=BODY, headers=signed(BODY, secret))
    before = await db.counts()
    # HubSpot retries with a new timestamp and attempt number: the same events all the same.
    again_body = app_events(*[e | {"attemptNumber": 1} for e in json.loads(BODY)])
    again = await client.post(PATH, content=again_body, headers=signed(again_body, secret))
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["event_ids"] == first.json()["event_ids"]
    assert again.json()["duplicate"] is True
    assert await db.counts() == before


async def test_only_non_contact_events_are_stored_raw_and_answered_202(
    client: httpx.AsyncClient, secret: str, db: Db
) -> None:
    body = app_events(hs_event(9, "company.creation"))
    response = await client.post(PATH, content=body, headers=signed(body, secret))
    assert response.status_code == 202, response.text
    assert response.json()["event_ids"] == []
    assert response.json()["duplicate"] is False
    assert (await db.counts())["inbound_request"] == 1
    assert (await db.counts())["inbound_event"] == 0


def _without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != name}


@pytest.mark.parametrize(
    "case",
    [
        "missing-signature",
        "missing-timestamp",
        "signature-not-base64",
        "timestamp-not-a-number",
        "wrong-secret",
        "stale",
        "far-ahead",
        "tampered-body",
        "wrong-uri",
        "wrong-method",
        "timestamp-not-the-signed-one",
    ],
)
async def test_every_way_a_v3_signature_can_be_wrong_is_401(
    client: httpx.AsyncClient, secret: str, db: Db, case: str
) -> None:
    body = BODY
    now = dt.datetime.now(dt.UTC)
    headers = signed(body, secret)
    if case == "missing-signature":
        headers = _without(headers, "x-hubspot-signature-v3")
    elif case == "missing-timestamp":
        headers = _without(headers, "x-hubspot-request-timestamp")
    elif case == "signature-not-base64":
        headers["x-hubspot-signature-v3"] = "not base64!"
    elif case == "timestamp-not-a-number":
        headers["x-hubspot-request-timestamp"] = "12a4"
    elif case == "wrong-secret":
        headers = signed(body, str(uuid.uuid4()))
    elif case == "stale":
        headers = signed(body, secret, at=now - dt.timedelta(minutes=6))
    elif case == "far-ahead":
        headers = signed(body, secret, at=now + dt.timedelta(minutes=6))
    elif case == "tampered-body":
        body = BODY.replace(b"CTO", b"CEO")
    elif case == "wrong-uri":
        headers = signed(body, secret, uri="http://test/v1/webhooks/other")
    elif case == "wrong-method":
        headers = signed(body, secret, method="PUT")
    elif case == "timestamp-not-the-signed-one":
        headers["x-hubspot-request-timestamp"] = str(int(headers["x-hubspot-request-timestamp"]) - 1000)
    response = await client.post(PATH, content=body, headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "InvalidSignature"
    assert await db.counts() == EMPTY


async def test_within_the_window_is_accepted(client: httpx.AsyncClient, secret: str) -> None:
    at = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=4)
    response = await client.post(PATH, content=BODY, headers=signed(BODY, secret, at=at))
    assert response.status_code == 202, response.text


async def test_behind_a_proxy_the_public_base_url_is_the_signed_one(settings: Settings, secret: str) -> None:
    # HubSpot called https://leads.example.com/crm/v1/webhooks/hubspot; a proxy that strips /crm
    # passed it on over plain http to this process, which sees http://test/v1/webhooks/hubspot.
    public = "https://leads.example.com/crm"
    proxied = settings.model_copy(update={"public_base_url": public})
    query = "portal=62515&next=https%3A%2F%2Fx.io%2Fa%20b%3Fc%3Dd&tag=%28a%2Cb%29"
    # HubSpot decodes the escapes of its table (: / ? ( ) , here) before signing, and keeps %20 and %3D.
    uri_signed = (
        "https://leads.example.com/crm/v1/webhooks/hubspot?portal=62515&next=https://x.io/a%20b?c%3Dd&tag=(a,b)"
    )
    async with client_for(proxied) as c:
        good = await c.post(f"{PATH}?{query}", content=BODY, headers=signed(BODY, secret, uri=uri_signed))
        local = await c.post(f"{PATH}?{query}", content=BODY, headers=signed(BODY, secret, uri=LOCAL_URI))
        raw_uri = await c.post(
            f"{PATH}?{query}", content=BODY, headers=signed(BODY, secret, uri=f"{public}{PATH}?{query}")
        )
    assert good.status_code == 202, good.text
    assert local.status_code == 401
    assert raw_uri.status_code == 401


async def test_without_a_public_base_url_the_host_header_is_used(
    client: httpx.AsyncClient, secret: str, db: Db
) -> None:
    headers = signed(BODY, secret, uri="http://leads.internal:8000" + PATH) | {"host": "leads.internal:8000"}
    response = await client.post(PATH, content=BODY, headers=headers)
    assert response.status_code == 202, response.text
    assert (await db.counts())["inbound_event"] == 4


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_v1_and_v2_only_when_the_source_accepts_them(
    settings: Settings, client: httpx.AsyncClient, db: Db, version: str
) -> None:
    strict = await create_source(settings, "strict", "hubspot", secret=str(uuid.uuid4()))
    legacy = await create_source(
        settings, "legacy", "hubspot", secret=str(uuid.uuid4()), signature_versions=["v3", version]
    )
    body = app_events(hs_event(1, "contact.creation"))

    def uri(name: str) -> str:
        return f"http://test/v1/webhooks/{name}"

    refused = await client.post(
        "/v1/webhooks/strict", content=body, headers=legacy_signed(body, strict, version, uri=uri("strict"))
    )
    accepted = await client.post(
        "/v1/webhooks/legacy", content=body, headers=legacy_signed(body, legacy, version, uri=uri("legacy"))
    )
    wrong = await client.post(
        "/v1/webhooks/legacy", content=body, headers=legacy_signed(body, str(uuid.uuid4()), version, uri=uri("legacy"))
    )
    other_version = "v2" if version == "v1" else "v1"
    not_listed = await client.post(
        "/v1/webhooks/legacy", content=body, headers=legacy_signed(body, legacy, other_version, uri=uri("legacy"))
    )
    assert refused.status_code == 401
    assert accepted.status_code == 202, accepted.text
    assert wrong.status_code == 401
    assert not_listed.status_code == 401
    assert (await db.counts())["inbound_event"] == 1


async def test_a_workflow_webhook_contact_is_accepted(client: httpx.AsyncClient, secret: str, db: Db) -> None:
    contact = {
        "vid": 451,
        "canonical-vid": 451,
        "portal-id": 62515,
        "is-contact": True,
        "properties": {
            "email": {"value": "bo@acme.io", "versions": [{"value": "bo@acme.io", "source-type": "FORM"}]},
            "jobtitle": {"value": "Head of Ops", "versions": []},
            "lastmodifieddate": {"value": "1764400000000", "versions": []},
        },
        "form-submissions": [{"form-id": "abc", "timestamp": 1764399000000}],
        "identity-profiles": [{"vid": 451, "identities": [{"type": "EMAIL", "value": "bo@acme.io"}]}],
    }
    body = json.dumps(contact).encode()
    response = await client.post(PATH, content=body, headers=signed(body, secret))
    assert response.status_code == 202, response.text
    [event] = await stored_events(db)
    assert event["type"] == "lead.identified"
    assert event["key"].startswith("workflow:")
    assert event["occurred_at"] == dt.datetime.fromtimestamp(1_764_400_000, dt.UTC)
    assert event["payload"]["traits"] == {
        "email": "bo@acme.io",
        "jobtitle": "Head of Ops",
        "lastmodifieddate": "1764400000000",
    }
    assert await identities(db) == {("hubspot", "451"), ("email", "bo@acme.io")}
    again = await client.post(PATH, content=body, headers=signed(body, secret))
    assert again.status_code == 200


async def test_a_body_that_is_not_hubspot_is_422(client: httpx.AsyncClient, secret: str, db: Db) -> None:
    for body in (b"[]", b'"text"', b'{"nothing": "here"}', b"[{"):
        response = await client.post(PATH, content=body, headers=signed(body, secret))
        assert response.status_code == 422, (body, response.text)
    assert await db.counts() == EMPTY


async def test_a_hubspot_source_needs_the_client_secret_given(settings: Settings) -> None:
    from service.sources import SourceError

    with pytest.raises(SourceError, match="client secret"):
        await create_source(settings, "no-secret", "hubspot")


def test_the_mapper_names_the_contacts_worth_fetching_after_each_event() -> None:
    """What enrichment fetches (with an API token): the contact after a creation, a property change
    or a restore; not after a deletion, a merge or an association, nor for a workflow body."""
    body = app_events(
        hs_event(1, "contact.creation", objectId=7),
        hs_event(2, "deal.creation", objectId=8),
        hs_event(3, propertyName="jobtitle", propertyValue="CTO", objectId=3),
        hs_event(4, "contact.deletion", objectId=9),
        hs_event(5, "contact.merge", objectId=10),
        hs_event(6, "contact.restore", objectId=11),
        hs_event(7, "contact.associationChange", objectId=12),
    )
    now = dt.datetime.now(dt.UTC)
    verified = Verified(webhook_id=None, signed_at=now)
    mapped = HubSpotMapper().map(body, verified=verified, config=DEFAULT_CONFIG, now=now, max_events=100)
    # Indexes into the mapped events (the deal event was skipped): creation, property change, restore.
    assert mapped.fetch == {0: "7", 1: "3", 4: "11"}
    assert [mapped.events[i].subject.external_ids["hubspot"] for i in mapped.fetch] == ["7", "3", "11"]
    # The property change asks only if the source reads the property (`contact_properties` says which).
    assert mapped.changed == {1: "jobtitle"}
    assert mapped.wanted_fetches(lambda: {"email", "jobtitle"}) == {0: "7", 1: "3", 4: "11"}
    assert mapped.wanted_fetches(lambda: {"email", "lifecyclestage"}) == {0: "7", 4: "11"}
    workflow = json.dumps({"vid": 451, "properties": {"email": {"value": "bo@acme.io"}}}).encode()
    assert HubSpotMapper().map(workflow, verified=verified, config=DEFAULT_CONFIG, now=now, max_events=1).fetch == {}
