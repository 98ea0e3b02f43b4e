"""`POST /v1/webhooks/crm-outcomes`: outcomes signed by the CRM with Standard Webhooks (the vendor's
own library signs), verified like the lead webhook, stored once, moving the lead's stage."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY

from service.db import create_engine
from service.repositories.tables import lead, stage_transition
from service.repositories.tables import outcome as outcome_table
from service.settings import Settings
from service.sources import add_source, enable_source, rotate_source
from tests.conftest import Db, Sender, lead_event

pytestmark = pytest.mark.anyio

URL = "/v1/webhooks/crm-outcomes"
AT = "2026-11-25T09:00:00Z"


@pytest.fixture
async def crm(settings: Settings) -> Sender:
    """The CRM: the source `crm-outcomes` (`leadscore sources add crm-outcomes --scheme standard`)."""
    engine = create_engine(settings.database_url)
    try:
        created = await add_source(engine, name="crm-outcomes", scheme="standard", now=dt.datetime.now(dt.UTC))
    finally:
        await engine.dispose()
    return Sender(source=created.name, secret=created.secret)


async def new_lead(client: httpx.AsyncClient, sender: Sender, email: str, **subject: Any) -> str:
    answer = await sender.post(client, lead_event(email=email, subject=subject))
    assert answer.status_code == 202, answer.text
    lead_id: str = answer.json()["lead_id"]
    return lead_id


def outcome(kind: str, event_id: str, **who: Any) -> dict[str, Any]:
    return {"id": event_id, "outcome": kind, "occurred_at": AT, **who}


def counted(kind: str) -> float:
    return REGISTRY.get_sample_value("leadscore_crm_outcomes_total", {"outcome": kind}) or 0.0


async def stage_of(db: Db, lead_id: str) -> str:
    async with db.engine.connect() as conn:
        value: str = (await conn.execute(sa.select(lead.c.stage).where(lead.c.id == uuid.UUID(lead_id)))).scalar_one()
    return value


async def select(db: Db, query: sa.Select[Any]) -> list[Any]:
    async with db.engine.connect() as conn:
        return list(await conn.execute(query))


async def test_each_outcome_moves_the_stage_and_is_stored(
    client: httpx.AsyncClient, sender: Sender, crm: Sender, db: Db
) -> None:
    leads = [await new_lead(client, sender, f"o{i}@acme.io") for i in range(4)]
    kinds = ["accepted", "converted", "won", "lost"]
    before = {kind: counted(kind) for kind in kinds}
    body = [
        outcome(kind, f"crm-{i}", lead_id=lead, reason="no budget" if kind == "lost" else None)
        for i, (kind, lead) in enumerate(zip(kinds, leads, strict=True))
    ]
    for item in body:
        if item["reason"] is None:
            del item["reason"]
    body[2].update(amount=1200.5, currency="eur")
    answer = await crm.post(client, body)
    assert answer.status_code == 202, answer.text
    payload = answer.json()
    assert payload["duplicate"] is False
    assert [(r["id"], r["lead_id"], r["outcome"], r["duplicate"]) for r in payload["results"]] == [
        (f"crm-{i}", lead, kind, False) for i, (kind, lead) in enumerate(zip(kinds, leads, strict=True))
    ]
    expected = ["sql", "opportunity", "customer", "recycled"]
    assert [(r["from_stage"], r["to_stage"], r["stage"]) for r in payload["results"]] == [
        ("lead", stage, stage) for stage in expected
    ]
    # Committed before the answer: another connection sees the stages and the outcomes.
    assert [await stage_of(db, lead) for lead in leads] == expected
    stored = await select(db, sa.select(outcome_table).order_by(outcome_table.c.id))
    assert [(str(r.lead_id), r.kind, r.source, r.external_id) for r in stored] == [
        (lead, kind, "crm-outcomes", f"crm-{i}") for i, (kind, lead) in enumerate(zip(kinds, leads, strict=True))
    ]
    assert [r["outcome_id"] for r in payload["results"]] == [r.id for r in stored]
    assert [(r.reason, r.amount, r.currency) for r in stored] == [(None, None, None)] * 2 + [
        (None, decimal.Decimal("1200.50"), "EUR"),
        ("no budget", None, None),
    ]
    transition = await select(
        db,
        sa.select(stage_transition)
        .where(stage_transition.c.lead_id == uuid.UUID(leads[3]))
        .order_by(stage_transition.c.id.desc()),
    )
    assert (transition[0].cause, transition[0].actor, transition[0].reason, transition[0].outcome_id) == (
        "crm",
        "crm:crm-outcomes",
        "CRM outcome lost (crm-3): no budget",
        stored[3].id,
    )
    assert {kind: counted(kind) - before[kind] for kind in kinds} == dict.fromkeys(kinds, 1)


async def test_a_repeat_is_answered_200_and_stores_nothing(
    client: httpx.AsyncClient, sender: Sender, crm: Sender, db: Db
) -> None:
    lead = await new_lead(client, sender, "rep@acme.io")
    first = await crm.post(client, outcome("won", "deal-1", lead_id=lead))
    assert first.status_code == 202
    won = counted("won")
    # The CRM retries with a new signature (a new webhook-id): the event id is what deduplicates.
    again = await crm.post(client, outcome("won", "deal-1", lead_id=lead))
    assert again.status_code == 200, again.text
    result = again.json()
    assert result["duplicate"] is True
    assert [(r["duplicate"], r["outcome_id"], r["to_stage"], r["stage"]) for r in result["results"]] == [
        (True, None, None, "customer")
    ]
    assert await db.scalar("SELECT count(*) FROM outcome") == 1
    assert await db.scalar("SELECT count(*) FROM stage_transition WHERE cause = 'crm'") == 1
    assert counted("won") == won
    # A list with one repeat and one new outcome is not a pure repeat: 202, the new one stored.
    mixed = await crm.post(client, [outcome("won", "deal-1", lead_id=lead), outcome("lost", "deal-2", lead_id=lead)])
    assert mixed.status_code == 202
    assert [r["duplicate"] for r in mixed.json()["results"]] == [True, False]
    # A customer stays one when the CRM later reports it lost (the outcome is still a label).
    assert mixed.json()["results"][1]["to_stage"] is None
    assert await stage_of(db, lead) == "customer"
    assert await db.scalar("SELECT count(*) FROM outcome") == 2


async def test_the_lead_is_found_by_email_or_external_id(
    client: httpx.AsyncClient, sender: Sender, crm: Sender, db: Db
) -> None:
    by_email = await new_lead(client, sender, "Mia@Acme.io")
    by_id = await new_lead(client, sender, "zoe@acme.io", external_ids={"hubspot": "501"})
    answer = await crm.post(
        client,
        [
            outcome("accepted", "e-1", email="  MIA@acme.IO "),
            outcome("converted", "e-2", external_ids={"hubspot": "501"}),
        ],
    )
    assert answer.status_code == 202, answer.text
    assert [(r["lead_id"], r["stage"]) for r in answer.json()["results"]] == [
        (by_email, "sql"),
        (by_id, "opportunity"),
    ]
    assert await db.scalar("SELECT count(*) FROM outcome") == 2


async def test_an_unknown_lead_refuses_the_whole_request(
    client: httpx.AsyncClient, sender: Sender, crm: Sender, db: Db
) -> None:
    known = await new_lead(client, sender, "known@acme.io")
    other = await new_lead(client, sender, "other@acme.io")
    identities = await db.scalar("SELECT count(*) FROM lead_identity")
    answer = await crm.post(
        client,
        [
            outcome("won", "u-1", lead_id=known),
            outcome("won", "u-2", lead_id=str(uuid.uuid4())),
            outcome("won", "u-3", email="nobody@acme.io"),
            outcome("won", "u-4", lead_id=known, email="other@acme.io"),
        ],
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "UnknownLead"
    assert [(d["loc"], d["type"]) for d in answer.json()["detail"]] == [
        ("1", "unknown_lead"),
        ("2", "unknown_lead"),
        ("3", "ambiguous_lead"),
    ]
    # Nothing stored, nothing moved, no identity made up.
    assert await db.scalar("SELECT count(*) FROM outcome") == 0
    assert (await stage_of(db, known), await stage_of(db, other)) == ("lead", "lead")
    assert await db.scalar("SELECT count(*) FROM lead_identity") == identities
    single = await crm.post(client, outcome("won", "u-5", external_ids={"hubspot": "nope"}))
    assert (single.status_code, single.json()["detail"]) == (
        422,
        [{"loc": "", "msg": "no lead has this lead_id, email or external id", "type": "unknown_lead"}],
    )


@pytest.mark.parametrize(
    ("item", "loc"),
    [
        pytest.param({"id": "x", "outcome": "won", "occurred_at": AT}, "", id="names-no-lead"),
        pytest.param({"id": "x", "outcome": "closed", "occurred_at": AT, "email": "a@b.io"}, "outcome", id="kind"),
        pytest.param({"outcome": "won", "occurred_at": AT, "email": "a@b.io"}, "id", id="no-event-id"),
        pytest.param(
            {"id": "x", "outcome": "won", "occurred_at": "2026-11-25T09:00:00", "email": "a@b.io"},
            "occurred_at",
            id="naive-time",
        ),
        pytest.param({"id": "x", "outcome": "won", "occurred_at": AT, "email": "a@b.io", "x": 1}, "x", id="extra"),
        pytest.param(
            {"id": "x", "outcome": "won", "occurred_at": AT, "email": "a@b.io", "amount": -1}, "amount", id="amount"
        ),
        pytest.param(
            {"id": "x", "outcome": "won", "occurred_at": AT, "email": "a@b.io", "currency": "euro"},
            "currency",
            id="currency",
        ),
        pytest.param({"id": "x", "outcome": "won", "occurred_at": AT, "email": "nope"}, "", id="bad-email"),
    ],
)
async def test_an_invalid_outcome_is_422_naming_the_field(
    client: httpx.AsyncClient, crm: Sender, db: Db, item: dict[str, Any], loc: str
) -> None:
    answer = await crm.post(client, item)
    assert answer.status_code == 422
    assert answer.json()["error"] == "InvalidEvent"
    assert loc in [d["loc"] for d in answer.json()["detail"]]
    assert await db.scalar("SELECT count(*) FROM outcome") == 0


async def test_signature_checks_are_the_lead_webhooks(
    client: httpx.AsyncClient, sender: Sender, crm: Sender, db: Db, settings: Settings
) -> None:
    lead = await new_lead(client, sender, "sig@acme.io")
    body = json.dumps(outcome("won", "s-1", lead_id=lead)).encode()
    unsigned = await client.post(URL, content=body, headers={"content-type": "application/json"})
    assert (unsigned.status_code, unsigned.json()["error"]) == (401, "InvalidSignature")
    stale = crm.headers(body, at=dt.datetime.now(dt.UTC) - dt.timedelta(minutes=6))
    assert (await client.post(URL, content=body, headers=stale)).status_code == 401
    # The lead source's secret is not the CRM's.
    assert (await client.post(URL, content=body, headers=crm.headers(body, secret=sender.secret))).status_code == 401
    tampered = crm.headers(body)
    assert (await client.post(URL, content=body.replace(b"won", b"lost"), headers=tampered)).status_code == 401
    as_text = {**crm.headers(body), "content-type": "text/plain"}
    assert (await client.post(URL, content=body, headers=as_text)).status_code == 415
    huge = b"[" + b" " * settings.max_body_bytes + b"]"
    assert (await client.post(URL, content=huge, headers=crm.headers(huge))).status_code == 413
    assert await db.scalar("SELECT count(*) FROM outcome") == 0
    # A rotated secret: the old and the new one both sign until the old one is retired.
    engine = create_engine(settings.database_url)
    try:
        rotated = await rotate_source(engine, name="crm-outcomes", now=dt.datetime.now(dt.UTC))
        assert (
            await client.post(URL, content=body, headers=crm.headers(body, secret=rotated.secret))
        ).status_code == 202
        await enable_source(engine, name="crm-outcomes", enabled=False)
    finally:
        await engine.dispose()
    disabled = await client.post(URL, content=body, headers=crm.headers(body))
    assert (disabled.status_code, disabled.json()["error"]) == (404, "UnknownSource")
    assert await db.scalar("SELECT count(*) FROM outcome") == 1


async def test_without_the_source_the_route_is_404(client: httpx.AsyncClient, sender: Sender, db: Db) -> None:
    lead = await new_lead(client, sender, "nosrc@acme.io")
    body = json.dumps(outcome("won", "n-1", lead_id=lead)).encode()
    answer = await client.post(URL, content=body, headers=sender.headers(body))
    assert (answer.status_code, answer.json()["error"]) == (404, "UnknownSource")
    assert await db.scalar("SELECT count(*) FROM outcome") == 0


async def test_other_sources_still_take_lead_events(
    client: httpx.AsyncClient, sender: Sender, crm: Sender, db: Db
) -> None:
    answer = await sender.post(client, lead_event(email="still@acme.io"))
    assert answer.status_code == 202
    assert answer.json()["stage"] == "lead"
    assert await db.scalar("SELECT count(*) FROM inbound_event") == 1
    # A lead event signed by the CRM's source is not a lead event for the outcomes route.
    misrouted = await crm.post(client, lead_event(email="still@acme.io"))
    assert misrouted.status_code == 422
    # The CRM's source name, percent-encoded, does not reach the lead webhook either.
    body = json.dumps(lead_event(email="sneak@acme.io")).encode()
    sneaky = await client.post("/v1/webhooks/crm%252Doutcomes", content=body, headers=crm.headers(body))
    assert sneaky.status_code == 404
    assert await db.scalar("SELECT count(*) FROM inbound_event") == 1
    assert await db.scalar("SELECT count(*) FROM outcome") == 0


async def test_openapi_describes_the_route(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    post = schema["paths"][URL]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert body[0] == {"$ref": "#/components/schemas/CrmOutcome"}
    assert {"202", "200", "401", "404", "413", "415", "422"} <= set(post["responses"])
    assert set(schema["components"]["schemas"]["CrmOutcome"]["properties"]) >= {
        "id",
        "outcome",
        "occurred_at",
        "lead_id",
        "email",
        "external_ids",
        "reason",
    }
