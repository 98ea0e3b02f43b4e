"""Marketo sources: the documented webhook template, rendered as Marketo renders it, maps to the
canonical event; the per-source token header authenticates it.

Marketo has no library that renders webhook templates: the test renders `{{token}}`s itself, with
JSON token encoding as the template's instructions require.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import httpx
import pytest

from service.settings import Settings
from tests.conftest import REPO_ROOT, Db
from tests.service.sources_support import EMPTY, create_source, identities, lead_traits, stored_events

pytestmark = pytest.mark.anyio

DOC = REPO_ROOT / "docs" / "marketo-webhook.md"
PATH = "/v1/webhooks/marketo"
LEAD = {
    "lead.Id": "1001",
    "lead.Email Address": "Ana@Acme.io",
    "system.dateTime": "2026-11-20 04:00:00",
    "campaign.name": 'Score on "form fill"',
    "lead.First Name": "Ana",
    "lead.Last Name": "",  # an empty Marketo field
    "lead.Job Title": "CTO",
    "company.Company Name": "Acme",
    "company.Industry": "Software",
    "company.Country": "Portugal",
    "lead.Lead Source": "Webinar",
    "lead.Lead Score": "42",
}


def template() -> str:
    """The template exactly as documented."""
    match = re.search(r"<!-- marketo-template -->\s*```json\n(.*?)```", DOC.read_text(), re.DOTALL)
    assert match, "docs/marketo-webhook.md lost its template"
    return match.group(1)


def render(values: dict[str, str], text: str | None = None) -> bytes:
    """As Marketo does with Request Token Encoding = JSON: each token's value JSON-escaped in place;
    a token without a value renders empty."""

    def value(m: re.Match[str]) -> str:
        return json.dumps(values.get(m.group(1), ""))[1:-1]

    return re.sub(r"\{\{([^}]+)\}\}", value, text or template()).encode()


def headers(token: str) -> dict[str, str]:
    return {"content-type": "application/json", "x-leadscore-token": token}


@pytest.fixture
async def token(settings: Settings) -> str:
    return await create_source(settings, "marketo", "marketo")


async def test_the_documented_template_maps_to_a_lead_update(client: httpx.AsyncClient, token: str, db: Db) -> None:
    body = render(LEAD)
    response = await client.post(PATH, content=body, headers=headers(token))
    assert response.status_code == 202, response.text
    [event] = await stored_events(db)
    assert (event["type"], event["name"]) == ("lead.updated", None)
    assert event["key"].startswith("marketo:")
    assert await identities(db) == {("email", "ana@acme.io"), ("marketo", "1001")}
    assert await lead_traits(db, event["lead_id"]) == {
        "First Name": "Ana",
        "Last Name": None,
        "Job Title": "CTO",
        "Company": "Acme",
        "Industry": "Software",
        "Country": "Portugal",
        "Lead Source": "Webinar",
        "Lead Score": "42",
    }


async def test_an_activity_webhook(client: httpx.AsyncClient, token: str, db: Db) -> None:
    data: dict[str, Any] = json.loads(render(LEAD))
    data |= {"activity": "Webinar Attended", "properties": {"webinar": "Scoring 101"}}
    response = await client.post(PATH, content=json.dumps(data).encode(), headers=headers(token))
    assert response.status_code == 202, response.text
    [event] = await stored_events(db)
    assert (event["type"], event["name"]) == ("lead.activity", "Webinar Attended")
    assert event["payload"]["properties"] == {"campaign": 'Score on "form fill"', "webinar": "Scoring 101"}


async def test_the_same_call_twice_is_one_event(client: httpx.AsyncClient, token: str, db: Db) -> None:
    body = render(LEAD)
    first = await client.post(PATH, content=body, headers=headers(token))
    before = await db.counts()
    again = await client.post(PATH, content=body, headers=headers(token))
    later = await client.post(
        PATH, content=render(LEAD | {"system.dateTime": "2026-11-20 04:00:01"}), headers=headers(token)
    )
    assert (first.status_code, again.status_code, later.status_code) == (202, 200, 202)
    assert again.json()["event_ids"] == first.json()["event_ids"]
    assert (await db.counts())["inbound_event"] == before["inbound_event"] + 1


@pytest.mark.parametrize("value", [None, "", "wrong", "Bearer TOKEN", "TOKENx"])
async def test_without_the_token_is_401(client: httpx.AsyncClient, token: str, db: Db, value: str | None) -> None:
    hdrs = {"content-type": "application/json"}
    if value is not None:
        hdrs["x-leadscore-token"] = value.replace("TOKEN", token)
    response = await client.post(PATH, content=render(LEAD), headers=hdrs)
    assert response.status_code == 401, response.text
    assert await db.counts() == EMPTY


async def test_another_sources_token_is_401(client: httpx.AsyncClient, token: str, settings: Settings) -> None:
    other = await create_source(settings, "marketo-2", "marketo")
    assert other != token
    response = await client.post(PATH, content=render(LEAD), headers=headers(other))
    assert response.status_code == 401
    assert (
        await client.post(PATH, content=render(LEAD), headers=headers(secrets.token_urlsafe(32)))
    ).status_code == 401


@pytest.mark.parametrize(
    ("change", "msg"),
    [
        pytest.param({"lead.Id": "", "lead.Email Address": ""}, "names no one", id="no-identity"),
        pytest.param({"occurred_at": "2026-11-20 04:00:00"}, "UTC offset", id="time-without-offset"),
    ],
)
async def test_a_call_that_cannot_map_is_422(
    client: httpx.AsyncClient, token: str, db: Db, change: dict[str, str], msg: str
) -> None:
    data = json.loads(render(LEAD | change))
    if "occurred_at" in change:
        data["occurred_at"] = change["occurred_at"]
    response = await client.post(PATH, content=json.dumps(data).encode(), headers=headers(token))
    assert response.status_code == 422, response.text
    assert msg in response.json()["detail"][0]["msg"]
    assert await db.counts() == EMPTY


async def test_an_occurred_at_with_an_offset_is_the_event_time(client: httpx.AsyncClient, token: str, db: Db) -> None:
    data = json.loads(render(LEAD)) | {"occurred_at": "2026-11-20T04:00:00-06:00"}
    response = await client.post(PATH, content=json.dumps(data).encode(), headers=headers(token))
    assert response.status_code == 202, response.text
    [event] = await stored_events(db)
    assert event["occurred_at"].isoformat() == "2026-11-20T10:00:00+00:00"
