"""Mautic sources: every sample payload Mautic ships maps to the expected canonical event.

Mautic publishes no library that signs webhooks; the test signs with its own implementation of
Mautic's scheme (`Webhook-Signature`: base64 HMAC-SHA256 of the body).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from service.settings import Settings
from tests.conftest import SHARED, Db
from tests.service.sources_support import EMPTY, client_for, create_source, identities, lead_traits, stored_events

pytestmark = pytest.mark.anyio

FIXTURES = SHARED / "fixtures" / "mautic"
PATH = "/v1/webhooks/mautic"


def utc(text_: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text_).astimezone(dt.UTC)


# Per sample file (`mautic.<file name>` is the event type): the canonical event it must become.
EXPECTED: dict[str, dict[str, Any]] = {
    "email_on_open": {
        "type": "lead.activity",
        "name": "Email Opened",
        "occurred_at": utc("2015-08-26T01:35:53+00:00"),
        "identities": {("email", "test@test.com"), ("mautic", "26")},
        "properties": {
            "email": {"id": 5, "name": "Email", "subject": "Email", "language": "en"},
            "openCount": 1,
            "source": "email",
            "sourceId": 5,
            "viewedInBrowser": False,
        },
        "traits": {"email": "test@test.com", "points": 10, "firstname": None, "country": None},
    },
    "form_on_submit": {
        "type": "lead.activity",
        "name": "Form Submitted",
        "occurred_at": utc("2015-08-26T01:30:34+00:00"),
        "identities": {("email", "email@formsubmit.com"), ("mautic", "26")},
        "properties": {
            "form": {"id": 4, "name": "lead points", "alias": "leadpoints"},
            "results": {"email": "email@formsubmit.com"},
            "id": 13,
            "referer": "http://mautic-gh.com/s/forms/preview/4",
            "trackingId": "dd4adafdabe75184bc206037a15d9f840adb5ec0",
            "page": {},
        },
        "traits": {"email": "email@formsubmit.com", "points": 10},
    },
    "lead_channel_subscription_changed": {
        "type": "lead.activity",
        "name": "Channel Subscription Changed",
        "occurred_at": utc("2017-12-01T00:05:18-06:00"),
        "identities": {("email", "test@email.com"), ("mautic", "38186")},
        "properties": {"channel": "email", "old_status": "contactable", "new_status": "manual"},
        "traits": {"firstname": "Test", "lastname": "Contact", "email": "Test@email.com", "points": 0},
    },
    "lead_points_change": {
        "type": "lead.updated",
        "name": None,
        "occurred_at": utc("2017-06-19T09:33:59+00:00"),
        "identities": {("email", "john@doe.name"), ("mautic", "52")},
        "traits": {"points": 5, "firstname": "John", "company": "Mautic", "city": "Prague"},
    },
    "lead_post_delete": {
        "type": "lead.activity",
        "name": "Contact Deleted",
        "occurred_at": utc("2017-06-19T09:34:55+00:00"),
        "identities": {("email", "john@doe.name"), ("mautic", "52")},
        "properties": {"mautic_id": 52},
        "traits": {},
    },
    "lead_post_save_new": {
        "type": "lead.identified",
        "name": None,
        "occurred_at": utc("2017-06-19T09:31:18+00:00"),
        "identities": {("email", "john@doe.name"), ("mautic", "52")},
        "traits": {
            "firstname": "John",
            "lastname": "Doe",
            "country": "Czech Republic",
            "attribution": 32,
            "multiselect": "php|js",
            "company": None,
            "points": 0,
        },
    },
    "lead_post_save_update": {
        "type": "lead.updated",
        "name": None,
        "occurred_at": utc("2017-06-19T09:32:24+00:00"),
        "identities": {("email", "john@doe.name"), ("mautic", "52")},
        "traits": {"company": "Mautic", "mobile": "333444555", "attribution": 32, "points": 0},
    },
    "page_on_hit": {
        "type": "lead.activity",
        "name": "Page Viewed",
        "occurred_at": utc("2015-08-26T01:32:39+00:00"),
        "identities": {("email", "email@formsubmit.com"), ("mautic", "26")},
        "properties": {
            "page": {"id": 1, "title": "PageHit", "alias": "pagehit"},
            "url": "http://mautic-gh.com/pagehit",
            "urlTitle": None,
            "referer": None,
            "source": None,
            "sourceId": None,
            "code": 200,
            "pageLanguage": "en",
        },
        "traits": {"email": "email@formsubmit.com"},
    },
}

SAMPLES = sorted(FIXTURES.glob("*.json"))


def sign(body: bytes, secret: str) -> dict[str, str]:
    signature = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    return {"content-type": "application/json", "webhook-signature": signature}


def payload(*samples: Path) -> bytes:
    """A webhook body as Mautic builds it: the items of each event type under `mautic.<type>`."""
    body: dict[str, Any] = {}
    for sample in samples:
        items = json.loads(sample.read_text())
        body[f"mautic.{sample.stem}"] = items if isinstance(items, list) else [items]
    body["timestamp"] = "2026-11-20T10:00:00+00:00"
    return json.dumps(body).encode()


@pytest.fixture
async def secret(settings: Settings) -> str:
    return await create_source(settings, "mautic", "mautic")


def test_every_sample_has_an_expectation() -> None:
    assert {p.stem for p in SAMPLES} == set(EXPECTED), "a Mautic sample without an expected event, or the reverse"


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.stem)
async def test_each_mautic_sample_maps_to_its_canonical_event(
    client: httpx.AsyncClient, secret: str, db: Db, sample: Path
) -> None:
    expected = EXPECTED[sample.stem]
    body = payload(sample)
    response = await client.post(PATH, content=body, headers=sign(body, secret))
    assert response.status_code == 202, response.text
    assert "skipped" not in response.json()
    [event] = await stored_events(db)
    assert event["key"].startswith(f"mautic.{sample.stem}:")
    assert (event["type"], event["name"], event["occurred_at"]) == (
        expected["type"],
        expected["name"],
        expected["occurred_at"],
    )
    assert await identities(db) == expected["identities"]
    if "properties" in expected:
        assert event["payload"]["properties"] == expected["properties"]
    traits = await lead_traits(db, event["lead_id"])
    assert {k: traits.get(k, "<absent>") for k in expected["traits"]} == expected["traits"]
    if not expected["traits"]:
        assert traits == {}


async def test_all_samples_in_one_body_and_a_redelivery(client: httpx.AsyncClient, secret: str, db: Db) -> None:
    body = payload(*SAMPLES)
    first = await client.post(PATH, content=body, headers=sign(body, secret))
    assert first.status_code == 202, first.text
    assert len(first.json()["event_ids"]) == len(SAMPLES)
    before = await db.counts()
    # One lead per Mautic contact (52, 26, 38186), whichever samples and emails named it.
    assert before["lead"] == 3
    again = await client.post(PATH, content=body, headers=sign(body, secret))
    assert again.status_code == 200
    assert again.json()["event_ids"] == first.json()["event_ids"]
    assert await db.counts() == before
    # Mautic batches differently on a retry: the items, not the body, are the unit.
    one = payload(SAMPLES[0])
    repeat = await client.post(PATH, content=one, headers=sign(one, secret))
    assert repeat.status_code == 200
    assert await db.counts() == before


async def test_unmappable_items_are_skipped_and_the_rest_stored(client: httpx.AsyncClient, secret: str, db: Db) -> None:
    good = json.loads((FIXTURES / "lead_post_save_new.json").read_text())
    body = json.dumps(
        {
            "mautic.lead_post_save_new": [{"no": "contact"}, *good],
            "mautic.lead_company_change": [
                {"company": {"id": 3, "name": "Acme"}, "contact": good[0]["contact"], "added": True}
            ],
            "timestamp": "2026-11-20T10:00:00+00:00",
        }
    ).encode()
    response = await client.post(PATH, content=body, headers=sign(body, secret))
    assert response.status_code == 202, response.text
    assert response.json()["skipped"] == [
        {"index": "mautic.lead_post_save_new.0", "reason": "a lead_post_save_new item without a contact"}
    ]
    names = sorted((e["type"], e["name"] or "") for e in await stored_events(db))
    assert names == [("lead.activity", "Company Changed"), ("lead.identified", "")]


async def test_a_body_of_no_events_is_stored_and_answered_2xx(client: httpx.AsyncClient, secret: str, db: Db) -> None:
    body = b'{"timestamp": "2026-11-20T10:00:00+00:00"}'
    response = await client.post(PATH, content=body, headers=sign(body, secret))
    assert response.status_code == 202
    assert (await db.counts())["inbound_request"] == 1


@pytest.mark.parametrize("case", ["missing", "not-base64", "wrong-secret", "tampered-body", "hex-instead-of-base64"])
async def test_every_way_a_mautic_signature_can_be_wrong_is_401(
    client: httpx.AsyncClient, secret: str, db: Db, case: str
) -> None:
    body = payload(FIXTURES / "lead_post_save_new.json")
    headers = sign(body, secret)
    if case == "missing":
        del headers["webhook-signature"]
    elif case == "not-base64":
        headers["webhook-signature"] = "***"
    elif case == "wrong-secret":
        headers = sign(body, secrets.token_urlsafe(32))
    elif case == "tampered-body":
        body = body.replace(b"Prague", b"Brno")
    elif case == "hex-instead-of-base64":
        headers["webhook-signature"] = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    response = await client.post(PATH, content=body, headers=headers)
    assert response.status_code == 401, response.text
    assert await db.counts() == EMPTY


async def test_mautic_is_never_answered_410(client: httpx.AsyncClient, secret: str, settings: Settings, db: Db) -> None:
    """Mautic disables a webhook that is answered 410: no path may answer it."""
    good = payload(FIXTURES / "lead_post_save_new.json")
    statuses: dict[str, int] = {}

    async def post(name: str, body: bytes, headers: dict[str, str], path: str = PATH) -> None:
        statuses[name] = (await client.post(path, content=body, headers=headers)).status_code

    await post("stored", good, sign(good, secret))
    await post("duplicate", good, sign(good, secret))
    await post("unknown source", good, sign(good, secret), "/v1/webhooks/gone")
    await post("bad signature", good, sign(good, "other"))
    await post("no signature", good, {"content-type": "application/json"})
    await post("not json media type", good, sign(good, secret) | {"content-type": "text/plain"})
    await post("not json", b"{nope", sign(b"{nope", secret))
    await post("not an object", b"[1]", sign(b"[1]", secret))
    big = b'{"x": "' + b"y" * settings.max_body_bytes + b'"}'
    await post("too large", big, sign(big, secret))
    async with db.engine.begin() as conn:
        await conn.execute(text("UPDATE source SET enabled = false WHERE name = 'mautic'"))
    await post("disabled source", good, sign(good, secret))

    dead = Settings(
        database_url=(
            "postgresql+asyncpg://postgres@127.0.0.1:9/none"
            if "postgresql" in settings.database_url
            else "sqlite+aiosqlite:////nonexistent-dir/leadscore.db"
        ),
        _env_file=None,  # type: ignore[call-arg]
    )
    async with client_for(dead) as c:
        statuses["storage down"] = (await c.post(PATH, content=good, headers=sign(good, secret))).status_code

    assert 410 not in statuses.values(), statuses
    assert statuses["stored"] == 202
    assert statuses["duplicate"] == 200
    assert statuses["storage down"] == 503
