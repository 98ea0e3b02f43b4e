"""Each CRM adapter's requests against the CRM peer process, and how answers become errors."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from service.crm import (
    CrmRateLimited,
    CrmRejected,
    CrmTransportError,
    Handoff,
    InvalidDestinations,
    build_adapter,
    parse_destinations,
)
from service.crm.config import load_destinations
from tests.peers.process import CrmPeer, free_port

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(b"a test signing key of 32 bytes!!").decode()
TOKEN = "pat-na1-test-token-3b1f"
NOW = dt.datetime(2026, 11, 29, 22, 0, tzinfo=dt.UTC)
LEAD = uuid.UUID("0192f0c4-5a4e-7d3e-9a51-6c2f0e8b1a01")


@pytest.fixture
def fresh_peer(crm_peer: CrmPeer) -> CrmPeer:
    crm_peer.control("reset")
    return crm_peer


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0, connect=2.0)) as c:
        yield c


def payload(**overrides: Any) -> dict[str, Any]:
    handoff = Handoff(
        lead_id=LEAD,
        email="ana@acme.io",
        owner_id="31337",
        stage="mql",
        score=88.4,
        grade="A2",
        probability=0.93,
        pipeline_version=3,
        traits={"company": "Acme", "last_name": "Silva", "country": "PT"},
    )
    return {**handoff.to_payload(), **overrides}


def destination(peer: CrmPeer, kind: str, **extra: Any) -> Any:
    base: dict[str, Any] = {"name": f"test-{kind}", "kind": kind}
    if kind == "webhook":
        base |= {"url": f"{peer.url}/hooks/leads", "secret": SECRET}
    elif kind == "hubspot":
        base |= {"base_url": peer.url, "token": TOKEN}
    else:
        base |= {"base_url": peer.url, "token": TOKEN}
    return parse_destinations([base | extra])[base["name"]]


def last_request(peer: CrmPeer) -> dict[str, Any]:
    return peer.requests()[-1]


async def test_webhook_is_signed_so_the_standardwebhooks_library_verifies_it(
    fresh_peer: CrmPeer, client: httpx.AsyncClient
) -> None:
    adapter = build_adapter(destination(fresh_peer, "webhook"))
    now = dt.datetime.now(dt.UTC)
    receipt = await adapter.deliver(client, payload(), idempotency_key="crm:assignment-1", now=now)
    assert receipt.status_code == 200
    seen = last_request(fresh_peer)
    assert seen["method"] == "POST"
    assert seen["path"] == "/hooks/leads"
    assert seen["headers"]["webhook-id"] == "crm:assignment-1"
    assert seen["headers"]["idempotency-key"] == "crm:assignment-1"
    verified = Webhook(SECRET).verify(seen["body"], seen["headers"])
    assert verified["type"] == "lead.handoff"
    assert verified["data"] == json.loads(json.dumps(payload()))
    # A body changed on the way is refused by the receiver's library.
    with pytest.raises(Exception, match="(?i)signature"):
        Webhook(SECRET).verify(seen["body"].replace("ana@acme.io", "eve@evil.io"), seen["headers"])


async def test_webhook_maps_fields_when_configured(fresh_peer: CrmPeer, client: httpx.AsyncClient) -> None:
    config = destination(
        fresh_peer,
        "webhook",
        fields={"contact_email": "email", "owner": "owner_id", "stage": "stage", "org": "traits.company"},
        stage_values={"mql": "MQL"},
    )
    await build_adapter(config).deliver(client, payload(), idempotency_key="k-map", now=dt.datetime.now(dt.UTC))
    data = json.loads(last_request(fresh_peer)["body"])["data"]
    assert data == {"contact_email": "ana@acme.io", "owner": "31337", "stage": "MQL", "org": "Acme"}


async def test_hubspot_upserts_the_contact_by_email_with_owner_and_lifecycle_stage(
    fresh_peer: CrmPeer, client: httpx.AsyncClient
) -> None:
    adapter = build_adapter(destination(fresh_peer, "hubspot"))
    receipt = await adapter.deliver(client, payload(), idempotency_key="hs:1", now=NOW)
    assert receipt.status_code == 200
    seen = last_request(fresh_peer)
    assert (seen["method"], seen["path"]) == ("POST", "/crm/v3/objects/contacts/batch/upsert")
    assert seen["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert seen["headers"]["idempotency-key"] == "hs:1"
    assert json.loads(seen["body"]) == {
        "inputs": [
            {
                "idProperty": "email",
                "id": "ana@acme.io",
                "properties": {
                    "email": "ana@acme.io",
                    "hubspot_owner_id": "31337",
                    "lifecyclestage": "marketingqualifiedlead",
                    "leadscore_score": "88.4",
                    "leadscore_grade": "A2",
                },
            }
        ]
    }


async def test_hubspot_without_an_email_is_rejected_before_sending(
    fresh_peer: CrmPeer, client: httpx.AsyncClient
) -> None:
    before = fresh_peer.count()
    adapter = build_adapter(destination(fresh_peer, "hubspot"))
    with pytest.raises(CrmRejected, match="email"):
        await adapter.deliver(
            client, {k: v for k, v in payload().items() if k != "email"}, idempotency_key="x", now=NOW
        )
    assert fresh_peer.count() == before


async def test_hubspot_multi_status_answer_is_a_rejection(fresh_peer: CrmPeer, client: httpx.AsyncClient) -> None:
    fresh_peer.control("script", {"steps": [{"action": "status", "status": 207, "body": {"errors": [{"x": 1}]}}]})
    with pytest.raises(CrmRejected) as caught:
        await build_adapter(destination(fresh_peer, "hubspot")).deliver(client, payload(), idempotency_key="k", now=NOW)
    assert caught.value.status_code == 207


async def test_salesforce_upserts_the_lead_by_external_id_without_auto_assignment(
    fresh_peer: CrmPeer, client: httpx.AsyncClient
) -> None:
    adapter = build_adapter(destination(fresh_peer, "salesforce", api_version="v61.0"))
    receipt = await adapter.deliver(client, payload(), idempotency_key="sf:1", now=NOW)
    assert receipt.status_code == 201
    seen = last_request(fresh_peer)
    assert seen["method"] == "PATCH"
    assert seen["path"] == f"/services/data/v61.0/sobjects/Lead/Leadscore_Id__c/{LEAD}"
    assert seen["headers"]["sforce-auto-assign"] == "FALSE"
    assert seen["headers"]["authorization"] == f"Bearer {TOKEN}"
    assert json.loads(seen["body"]) == {
        "Email": "ana@acme.io",
        "OwnerId": "31337",
        "LastName": "Silva",
        "Company": "Acme",
        "Leadscore_Stage__c": "mql",
        "Leadscore_Score__c": 88.4,
        "Leadscore_Grade__c": "A2",
    }


async def test_salesforce_without_an_owner_leaves_assignment_to_salesforce(
    fresh_peer: CrmPeer, client: httpx.AsyncClient
) -> None:
    data = payload(traits={})
    del data["owner_id"]
    await build_adapter(destination(fresh_peer, "salesforce")).deliver(client, data, idempotency_key="k", now=NOW)
    seen = last_request(fresh_peer)
    assert "sforce-auto-assign" not in seen["headers"]
    body = json.loads(seen["body"])
    assert "OwnerId" not in body
    assert (body["LastName"], body["Company"]) == ("ana@acme.io", "Unknown")  # fallbacks of the mapping


async def test_salesforce_request_limit_is_a_rate_limit_not_a_rejection(
    fresh_peer: CrmPeer, client: httpx.AsyncClient
) -> None:
    limit = [{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]
    fresh_peer.control("script", {"steps": [{"action": "status", "status": 403, "body": limit}]})
    with pytest.raises(CrmRateLimited):
        await build_adapter(destination(fresh_peer, "salesforce")).deliver(
            client, payload(), idempotency_key="k", now=NOW
        )


@pytest.mark.parametrize(
    ("step", "error", "status_code"),
    [
        ({"action": "status", "status": 500}, CrmTransportError, 500),
        ({"action": "status", "status": 503}, CrmTransportError, 503),
        ({"action": "status", "status": 408}, CrmTransportError, 408),
        ({"action": "status", "status": 400}, CrmRejected, 400),
        ({"action": "status", "status": 401}, CrmRejected, 401),
        ({"action": "status", "status": 422}, CrmRejected, 422),
        ({"action": "drop"}, CrmTransportError, None),
        ({"action": "slow", "seconds": 3}, CrmTransportError, None),
    ],
)
async def test_answers_become_the_documented_errors(
    fresh_peer: CrmPeer,
    client: httpx.AsyncClient,
    step: dict[str, Any],
    error: type[Exception],
    status_code: int | None,
) -> None:
    fresh_peer.control("script", {"steps": [step]})
    adapter = build_adapter(destination(fresh_peer, "webhook"))
    with pytest.raises(error) as caught:
        await adapter.deliver(client, payload(), idempotency_key="k", now=dt.datetime.now(dt.UTC))
    assert getattr(caught.value, "status_code", None) == status_code


@pytest.mark.parametrize(("header", "seconds"), [("7", 7.0), ("Sun, 29 Nov 2026 22:00:30 GMT", 30.0), (None, None)])
async def test_429_carries_the_retry_after(
    fresh_peer: CrmPeer, client: httpx.AsyncClient, header: str | None, seconds: float | None
) -> None:
    fresh_peer.control("script", {"steps": [{"action": "status", "status": 429, "retry_after": header}]})
    with pytest.raises(CrmRateLimited) as caught:
        await build_adapter(destination(fresh_peer, "hubspot")).deliver(client, payload(), idempotency_key="k", now=NOW)
    assert caught.value.retry_after == seconds


async def test_a_closed_port_is_a_transport_error(client: httpx.AsyncClient) -> None:
    config = parse_destinations(
        [{"name": "gone", "kind": "webhook", "url": f"http://127.0.0.1:{free_port()}/x", "secret": SECRET}]
    )["gone"]
    with pytest.raises(CrmTransportError, match="transport"):
        await build_adapter(config).deliver(client, payload(), idempotency_key="k", now=NOW)


def test_secrets_come_from_the_environment_and_never_show(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HUBSPOT_TOKEN_FOR_TEST", TOKEN)
    file = tmp_path / "destinations.yaml"
    file.write_text("- name: hubspot\n  kind: hubspot\n  token_env: HUBSPOT_TOKEN_FOR_TEST\n")
    config = load_destinations(None, file)["hubspot"]
    assert TOKEN not in repr(config)
    assert TOKEN not in str(config.model_dump())
    assert config.bearer().get_secret_value() == TOKEN
    monkeypatch.delenv("HUBSPOT_TOKEN_FOR_TEST")
    with pytest.raises(InvalidDestinations, match="HUBSPOT_TOKEN_FOR_TEST is not set"):
        build_adapter(config)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([{"name": "a", "kind": "ftp"}], "kind"),
        ([{"name": "a", "kind": "webhook", "url": "http://x"}], "secret"),
        ([{"name": "Bad Name", "kind": "hubspot", "token": "t"}], "name"),
        ([{"name": "a", "kind": "hubspot", "token": "t"}, {"name": "a", "kind": "hubspot", "token": "t"}], "twice"),
        ([{"name": "a", "kind": "salesforce", "token": "t"}], "base_url"),
    ],
)
def test_bad_destinations_are_refused_with_the_reason(data: Any, message: str) -> None:
    with pytest.raises(InvalidDestinations, match=message):
        parse_destinations(data)
