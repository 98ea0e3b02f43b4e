"""Segment (X-Signature, hex HMAC-SHA1 of the body) and RudderStack (bearer token) sources.

Segment publishes no library that signs webhook requests, so the test signs with its own
implementation of Segment's documented scheme (independent of the service's).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.conftest import Db
from tests.service.sources_support import EMPTY, create_source, identities, lead_traits, stored_events

pytestmark = pytest.mark.anyio


def segment_headers(body: bytes, secret: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "x-signature": hmac.new(secret.encode(), body, hashlib.sha1).hexdigest(),
    }


def message(kind: str, message_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "messageId": message_id,
        "userId": "u-42",
        "anonymousId": "anon-7",
        "timestamp": "2026-11-20T10:00:00.000Z",
        "context": {"traits": {"email": "Ana@Acme.io"}, "ip": "203.0.113.9"},
        **fields,
    }


IDENTIFY = message(
    "identify",
    "m-1",
    traits={"email": "ana@acme.io", "title": "CTO", "address": {"country": "PT"}, "tags": ["a", "b"]},
)
TRACK = message("track", "m-2", event="Demo Requested", properties={"plan": "pro"})
PAGE = message("page", "m-3", name="Pricing", properties={"url": "https://acme.io/pricing"})
GROUP = message("group", "m-4", groupId="acme", traits={"industry": "Software", "employees": 120})
ALIAS = message("alias", "m-5", previousId="anon-7")


@pytest.fixture
async def segment(settings: Settings) -> str:
    return await create_source(settings, "segment", "segment")


@pytest.fixture
async def rudder(settings: Settings) -> str:
    return await create_source(settings, "rudder", "rudderstack")


async def test_segment_spec_calls_map_to_lead_events(client: httpx.AsyncClient, segment: str, db: Db) -> None:
    body = json.dumps({"batch": [IDENTIFY, TRACK, PAGE, GROUP, ALIAS]}).encode()
    response = await client.post("/v1/webhooks/segment", content=body, headers=segment_headers(body, segment))
    assert response.status_code == 202, response.text
    assert response.json()["skipped"] == [
        {"index": 4, "reason": "'alias' calls are not mapped (identify, track, page, screen and group are)"}
    ]
    events = await stored_events(db)
    assert [(e["key"], e["type"], e["name"]) for e in events] == [
        ("m-1", "lead.identified", None),
        ("m-2", "lead.activity", "Demo Requested"),
        ("m-3", "lead.activity", "Page Viewed"),
        ("m-4", "lead.updated", None),
    ]
    assert len({e["lead_id"] for e in events}) == 1
    assert events[1]["payload"]["properties"] == {"plan": "pro"}
    assert events[2]["payload"]["properties"] == {"name": "Pricing", "url": "https://acme.io/pricing"}
    assert await identities(db) == {("email", "ana@acme.io"), ("segment", "u-42"), ("segment_anonymous", "anon-7")}
    assert await lead_traits(db, events[0]["lead_id"]) == {
        "email": "ana@acme.io",
        "title": "CTO",
        "address.country": "PT",
        "group.industry": "Software",
        "group.employees": 120,
        "group.id": "acme",
    }


async def test_segment_duplicates_by_message_id(client: httpx.AsyncClient, segment: str, db: Db) -> None:
    body = json.dumps(TRACK).encode()
    first = await client.post("/v1/webhooks/segment", content=body, headers=segment_headers(body, segment))
    before = await db.counts()
    # A retry may carry another sentAt: the messageId is what names the message.
    retry = json.dumps(TRACK | {"sentAt": "2026-11-20T10:05:00Z"}).encode()
    again = await client.post("/v1/webhooks/segment", content=retry, headers=segment_headers(retry, segment))
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["event_ids"] == first.json()["event_ids"]
    assert await db.counts() == before


@pytest.mark.parametrize(
    "case", ["missing", "not-hex", "wrong-secret", "tampered-body", "sha256-instead-of-sha1", "empty"]
)
async def test_every_way_a_segment_signature_can_be_wrong_is_401(
    client: httpx.AsyncClient, segment: str, db: Db, case: str
) -> None:
    body = json.dumps(TRACK).encode()
    headers = segment_headers(body, segment)
    if case == "missing":
        del headers["x-signature"]
    elif case == "not-hex":
        headers["x-signature"] = "zz" + headers["x-signature"][2:]
    elif case == "wrong-secret":
        headers = segment_headers(body, secrets.token_urlsafe(32))
    elif case == "tampered-body":
        body = body.replace(b"pro", b"free")
    elif case == "sha256-instead-of-sha1":
        headers["x-signature"] = hmac.new(segment.encode(), body, hashlib.sha256).hexdigest()
    elif case == "empty":
        headers["x-signature"] = ""
    response = await client.post("/v1/webhooks/segment", content=body, headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "InvalidSignature"
    assert await db.counts() == EMPTY


async def test_rudderstack_authenticates_with_its_bearer_token(client: httpx.AsyncClient, rudder: str, db: Db) -> None:
    body = json.dumps(IDENTIFY | {"rudderId": "r-1"}).encode()
    ok = await client.post(
        "/v1/webhooks/rudder",
        content=body,
        headers={"content-type": "application/json", "authorization": f"Bearer {rudder}"},
    )
    again = await client.post(
        "/v1/webhooks/rudder",
        content=body,
        headers={"content-type": "application/json", "authorization": f"bearer {rudder}"},
    )
    assert (ok.status_code, again.status_code) == (202, 200)
    assert [(e["key"], e["type"]) for e in await stored_events(db)] == [("m-1", "lead.identified")]


@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "TOKEN", "Bearer wrong-token", "Bearer TOKEN-and-more"],
)
async def test_rudderstack_without_its_token_is_401(
    client: httpx.AsyncClient, rudder: str, db: Db, authorization: str | None
) -> None:
    body = json.dumps(TRACK).encode()
    headers = {"content-type": "application/json"}
    if authorization is not None:
        headers["authorization"] = authorization.replace("TOKEN", rudder)
    response = await client.post("/v1/webhooks/rudder", content=body, headers=headers)
    assert response.status_code == 401, response.text
    assert await db.counts() == EMPTY


async def test_rudderstack_token_rotates_like_any_secret(
    client: httpx.AsyncClient, rudder: str, settings: Settings
) -> None:
    import datetime as dt

    from service.db import create_engine
    from service.sources import retire_source_secrets, rotate_source

    engine = create_engine(settings.database_url)
    try:
        new = (await rotate_source(engine, name="rudder", now=dt.datetime.now(dt.UTC))).secret
        await retire_source_secrets(engine, name="rudder", now=dt.datetime.now(dt.UTC))
    finally:
        await engine.dispose()

    async def post(token: str, message_id: str) -> int:
        body = json.dumps(TRACK | {"messageId": message_id}).encode()
        headers = {"content-type": "application/json", "authorization": f"Bearer {token}"}
        return (await client.post("/v1/webhooks/rudder", content=body, headers=headers)).status_code

    assert await post(rudder, "a") == 401
    assert await post(new, "b") == 202


async def test_a_segment_token_does_not_open_a_rudderstack_source(
    client: httpx.AsyncClient, segment: str, rudder: str
) -> None:
    body = json.dumps(TRACK).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {segment}"}
    assert rudder != segment
    assert (await client.post("/v1/webhooks/rudder", content=body, headers=headers)).status_code == 401


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param({k: v for k, v in TRACK.items() if k != "messageId"}, "no messageId", id="no-message-id"),
        pytest.param(
            {k: v for k, v in TRACK.items() if k not in ("userId", "anonymousId", "context")},
            "names no one: no email and no id",
            id="no-identity",
        ),
        pytest.param(TRACK | {"event": ""}, "a track call without an event name", id="no-event-name"),
        pytest.param(TRACK | {"timestamp": "yesterday"}, "timestamp is not a time: 'yesterday'", id="bad-time"),
    ],
)
async def test_an_unmappable_message_is_skipped_with_its_reason(
    client: httpx.AsyncClient, segment: str, db: Db, payload: dict[str, Any], reason: str
) -> None:
    body = json.dumps({"batch": [payload, IDENTIFY]}).encode()
    response = await client.post("/v1/webhooks/segment", content=body, headers=segment_headers(body, segment))
    assert response.status_code == 202, response.text
    assert response.json()["skipped"] == [{"index": 0, "reason": reason}]
    assert [e["key"] for e in await stored_events(db)] == ["m-1"]


async def test_a_batch_over_the_limit_is_422(
    client: httpx.AsyncClient, segment: str, settings: Settings, db: Db
) -> None:
    batch = [TRACK | {"messageId": f"m{i}"} for i in range(settings.max_events_per_request + 1)]
    body = json.dumps({"batch": batch}).encode()
    response = await client.post("/v1/webhooks/segment", content=body, headers=segment_headers(body, segment))
    assert response.status_code == 422
    assert await db.counts() == EMPTY


async def test_a_plain_array_of_messages_and_a_long_message_id(client: httpx.AsyncClient, segment: str, db: Db) -> None:
    long_id = "m-" + "x" * 300
    body = json.dumps([TRACK, PAGE | {"messageId": long_id}]).encode()
    response = await client.post("/v1/webhooks/segment", content=body, headers=segment_headers(body, segment))
    assert response.status_code == 202, response.text
    keys = [e["key"] for e in await stored_events(db)]
    assert "m-2" in keys
    [hashed] = [k for k in keys if k != "m-2"]
    assert hashed.startswith("sha256:")
    again = await client.post("/v1/webhooks/segment", content=body, headers=segment_headers(body, segment))
    assert again.status_code == 200
