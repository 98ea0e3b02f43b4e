"""Standard Webhooks verification, against signatures made by the `standardwebhooks` library."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from standardwebhooks import Webhook

from service.db import create_engine
from service.settings import Settings
from service.sources import retire_source_secrets, rotate_source
from tests.conftest import Db, Sender, lead_event

pytestmark = pytest.mark.anyio

BODY = json.dumps(lead_event(id="evt-1")).encode()
EMPTY = {"lead": 0, "lead_identity": 0, "inbound_request": 0, "inbound_event": 0, "lead_merge": 0}


async def test_a_signed_event_is_accepted(client: httpx.AsyncClient, sender: Sender, db: Db) -> None:
    response = await sender.post(client, BODY)
    assert response.status_code == 202, response.text
    assert response.json()["duplicate"] is False
    assert (await db.counts())["inbound_event"] == 1


def _mutate(headers: dict[str, str], change: dict[str, str | None]) -> dict[str, str]:
    out = dict(headers)
    for key, value in change.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"webhook-id": None}, id="missing-id"),
        pytest.param({"webhook-timestamp": None}, id="missing-timestamp"),
        pytest.param({"webhook-signature": None}, id="missing-signature"),
        pytest.param({"webhook-timestamp": "12a4"}, id="non-numeric-timestamp"),
        pytest.param({"webhook-timestamp": "-100"}, id="negative-timestamp"),
        pytest.param({"webhook-signature": "v1,not-base64!!"}, id="garbage-signature"),
        pytest.param({"webhook-signature": "v2,AAAA"}, id="unknown-version"),
        pytest.param({"webhook-id": "another-id"}, id="id-not-the-signed-one"),
    ],
)
async def test_bad_headers_are_401_and_store_nothing(
    client: httpx.AsyncClient, sender: Sender, db: Db, change: dict[str, str | None]
) -> None:
    headers = _mutate(sender.headers(BODY), change)
    response = await client.post("/v1/webhooks/demo", content=BODY, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == "InvalidSignature"
    assert await db.counts() == EMPTY


@pytest.mark.parametrize(
    ("offset", "status"),
    [
        pytest.param(dt.timedelta(minutes=-6), 401, id="stale"),
        pytest.param(dt.timedelta(minutes=6), 401, id="future"),
        pytest.param(dt.timedelta(minutes=-4), 202, id="old-within-tolerance"),
        pytest.param(dt.timedelta(minutes=4), 202, id="ahead-within-tolerance"),
    ],
)
async def test_timestamp_tolerance_both_ways(
    client: httpx.AsyncClient, sender: Sender, offset: dt.timedelta, status: int
) -> None:
    at = dt.datetime.now(dt.UTC) + offset
    response = await client.post("/v1/webhooks/demo", content=BODY, headers=sender.headers(BODY, at=at))
    assert response.status_code == status, response.text


async def test_wrong_secret_is_401(client: httpx.AsyncClient, sender: Sender) -> None:
    other = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    response = await client.post("/v1/webhooks/demo", content=BODY, headers=sender.headers(BODY, secret=other))
    assert response.status_code == 401


async def test_body_reserialised_after_signing_is_401(client: httpx.AsyncClient, sender: Sender) -> None:
    headers = sender.headers(BODY)
    reserialised = json.dumps(json.loads(BODY), indent=2).encode()
    assert json.loads(reserialised) == json.loads(BODY)
    response = await client.post("/v1/webhooks/demo", content=reserialised, headers=headers)
    assert response.status_code == 401


async def test_one_of_several_signatures_valid_is_enough(client: httpx.AsyncClient, sender: Sender) -> None:
    headers = sender.headers(BODY)
    other_secret = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    other = Webhook(other_secret).sign(
        headers["webhook-id"], dt.datetime.fromtimestamp(int(headers["webhook-timestamp"]), dt.UTC), BODY.decode()
    )
    headers["webhook-signature"] = f"v1a,xyz {other} {headers['webhook-signature']}"
    response = await client.post("/v1/webhooks/demo", content=BODY, headers=headers)
    assert response.status_code == 202, response.text


async def test_svix_header_names_are_accepted(client: httpx.AsyncClient, sender: Sender) -> None:
    headers = {k.replace("webhook-", "svix-"): v for k, v in sender.headers(BODY).items()}
    response = await client.post("/v1/webhooks/demo", content=BODY, headers=headers)
    assert response.status_code == 202, response.text


async def test_rotated_secret_old_and_new_valid_until_retired(
    client: httpx.AsyncClient, sender: Sender, settings: Settings
) -> None:
    engine = create_engine(settings.database_url)
    try:
        new = (await rotate_source(engine, name="demo", now=dt.datetime.now(dt.UTC))).secret
        r_old = await sender.post(client, lead_event(id="a"))
        r_new = await sender.post(client, lead_event(id="b"), secret=new)
        assert (r_old.status_code, r_new.status_code) == (202, 202)
        assert await retire_source_secrets(engine, name="demo", now=dt.datetime.now(dt.UTC)) == 1
    finally:
        await engine.dispose()
    assert (await sender.post(client, lead_event(id="c"))).status_code == 401
    assert (await sender.post(client, lead_event(id="d"), secret=new)).status_code == 202


async def test_unknown_source_is_404(client: httpx.AsyncClient, sender: Sender) -> None:
    response = await client.post("/v1/webhooks/nope", content=BODY, headers=sender.headers(BODY))
    assert response.status_code == 404
    assert response.json()["error"] == "UnknownSource"


async def test_disabled_source_is_404(client: httpx.AsyncClient, sender: Sender, db: Db) -> None:
    async with db.engine.begin() as conn:
        from sqlalchemy import text

        await conn.execute(text("UPDATE source SET enabled = false WHERE name = 'demo'"))
    response = await sender.post(client, BODY)
    assert response.status_code == 404


async def test_body_over_the_limit_is_413_by_declared_length(
    client: httpx.AsyncClient, sender: Sender, settings: Settings, db: Db
) -> None:
    big = json.dumps(lead_event(traits={"x": "y" * settings.max_body_bytes})).encode()
    response = await client.post("/v1/webhooks/demo", content=big, headers=sender.headers(big))
    assert response.status_code == 413
    assert response.json()["error"] == "PayloadTooLarge"
    assert await db.counts() == EMPTY


async def test_body_over_the_limit_is_413_while_streaming(
    client: httpx.AsyncClient, sender: Sender, settings: Settings
) -> None:
    chunk = b"x" * 65536
    sent = 0

    async def stream() -> Any:
        nonlocal sent
        # Far more than the limit: the server must stop reading long before the end.
        for _ in range(settings.max_body_bytes // len(chunk) * 4):
            sent += len(chunk)
            yield chunk

    headers = sender.headers(BODY)
    response = await client.post("/v1/webhooks/demo", content=stream(), headers=headers)
    assert "content-length" not in {k.lower() for k in headers}
    assert response.status_code == 413
    assert sent <= settings.max_body_bytes + 2 * len(chunk)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", ""])
async def test_not_json_is_415(client: httpx.AsyncClient, sender: Sender, content_type: str) -> None:
    headers = sender.headers(BODY) | {"content-type": content_type}
    response = await client.post("/v1/webhooks/demo", content=BODY, headers=headers)
    assert response.status_code == 415
    assert response.json()["error"] == "UnsupportedMediaType"


async def test_unparseable_json_is_422(client: httpx.AsyncClient, sender: Sender, db: Db) -> None:
    response = await sender.post(client, b'{"type": "lead.identified",')
    assert response.status_code == 422
    assert response.json()["error"] == "InvalidJson"
    assert await db.counts() == EMPTY


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        pytest.param(lead_event(occurred_at="2026-11-20T10:00:00"), "occurred_at", id="naive-time"),
        pytest.param(lead_event(email=None), "subject", id="no-identity"),
        pytest.param(lead_event(email="not-an-email"), "subject", id="bad-email"),
        pytest.param(lead_event(type="lead.deleted"), "type", id="unknown-type"),
        pytest.param(lead_event(type="lead.activity"), "", id="activity-without-name"),
        pytest.param(lead_event(traits={"nested": {"a": 1}}), "traits.nested", id="nested-trait"),
        pytest.param(lead_event(surprise=1), "surprise", id="unknown-field"),
        pytest.param([lead_event(), lead_event(type="x")], "1.type", id="second-of-list"),
        pytest.param([], "", id="empty-list"),
        pytest.param("just a string", "", id="not-an-object"),
        pytest.param(lead_event(occurred_at="2100-01-01T00:00:00Z"), "occurred_at", id="far-future"),
    ],
)
async def test_invalid_event_is_422_naming_the_field(
    client: httpx.AsyncClient, sender: Sender, db: Db, payload: Any, loc: str
) -> None:
    response = await sender.post(client, payload)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["error"] == "InvalidEvent"
    assert any(d["loc"] == loc or d["loc"].startswith(loc + ".") for d in body["detail"]), body
    assert await db.counts() == EMPTY


async def test_too_many_events_is_422(client: httpx.AsyncClient, sender: Sender, settings: Settings) -> None:
    events = [lead_event(id=f"e{i}") for i in range(settings.max_events_per_request + 1)]
    response = await sender.post(client, events)
    assert response.status_code == 422
    assert "at most" in response.json()["detail"][0]["msg"]


async def test_sender_gone_mid_body_stores_nothing(app: FastAPI, sender: Sender, db: Db) -> None:
    from service.api.webhooks import receive_webhook

    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "http.request", "body": BODY[:10], "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [(k.encode(), v.encode()) for k, v in sender.headers(BODY).items()]
    scope = {"type": "http", "method": "POST", "path": "/v1/webhooks/demo", "headers": headers}
    await receive_webhook(app.state.services, scope, receive, send)
    assert sent == []
    assert await db.counts() == EMPTY
