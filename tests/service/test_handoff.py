"""From a qualifying event to the CRM outbox: the stage change, the assignment and one delivery per
destination are written in the ingest transaction; repeats, unqualified leads and re-evaluations
without `trigger_downstream` hand nothing off."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.auth import SYSTEM
from service.change_requests import bootstrap_routing
from service.change_schemas import RoutingRulesChange
from service.db import create_engine
from service.settings import Settings
from tests.conftest import Db, Sender, lead_event
from tests.service.qualification_env import Env, open_env, policy, score_line, scores_of
from tests.service.test_scoring_service import GOOD, POOR

pytestmark = pytest.mark.anyio

DESTINATIONS = [
    {"name": "crm", "kind": "webhook", "url": "http://127.0.0.1:9/hooks", "secret_env": "LEADSCORE_TEST_HOOK"},
    {"name": "hubspot", "kind": "hubspot", "base_url": "http://127.0.0.1:9", "token_env": "LEADSCORE_TEST_TOKEN"},
]
ROUTING = {
    "spec_version": 1,
    "name": "test routing",
    "pools": [{"id": "sdr", "strategy": "round_robin", "members": [{"owner": "o-1"}, {"owner": "o-2"}]}],
    "rules": [{"id": "mql-to-sdr", "when": {"field": "stage", "op": "eq", "value": "mql"}, "target": {"pool": "sdr"}}],
    "fallback": {"queue": "unassigned"},
}


@pytest.fixture
async def env(settings: Settings, trained: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    monkeypatch.setenv("LEADSCORE_TEST_HOOK", "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=")
    monkeypatch.setenv("LEADSCORE_TEST_TOKEN", "pat-test")
    # No worker: these tests read the outbox as the ingest transaction left it.
    configured = settings.model_copy(
        update={"delivery_destinations": json.dumps(DESTINATIONS), "delivery_in_process": False}
    )
    async with open_env(configured, trained) as opened:
        yield opened


async def activate_routing(settings: Settings) -> None:
    """The first routing rules, made active by a bootstrap change request."""
    engine = create_engine(settings.database_url)
    try:
        await bootstrap_routing(
            engine,
            RoutingRulesChange(kind="routing_rules", spec=ROUTING),
            principal=SYSTEM,
            reason="first rules",
            now=dt.datetime.now(dt.UTC),
        )
    finally:
        await engine.dispose()


async def qualify_above_the_middle(env: Env, trained: Any) -> None:
    good, poor = scores_of(trained, GOOD, POOR)
    await env.activate_policy(policy(score_line("score", "gte", (good + poor) / 2)))


async def test_a_lead_that_becomes_mql_is_assigned_and_handed_to_every_destination(
    env: Env, sender: Sender, db: Db, trained: Any
) -> None:
    await activate_routing(env.settings)
    await qualify_above_the_middle(env, trained)

    answer = (await sender.post(env.client, lead_event(id="g", email="Ana@Acme.io", traits=GOOD))).json()
    assert answer["stage"] == "mql"
    lead_id = answer["lead_id"]

    [assignment] = await db.rows("SELECT id, owner_id, pool_id, rule_id, stage FROM assignment")
    assert (assignment.owner_id, assignment.pool_id, assignment.rule_id, assignment.stage) == (
        "o-1",
        "sdr",
        "mql-to-sdr",
        "mql",
    )
    [transition] = await db.rows("SELECT id FROM stage_transition WHERE to_stage = 'mql'")
    transition_id = uuid.UUID(str(transition.id))  # SQLite hands back the hex form
    rows = await db.rows("SELECT destination, idempotency_key, status, payload FROM delivery ORDER BY destination")
    assert [(r.destination, r.idempotency_key, r.status) for r in rows] == [
        ("crm", f"crm:{transition_id}", "pending"),
        ("hubspot", f"hubspot:{transition_id}", "pending"),
    ]
    payload = rows[0].payload if isinstance(rows[0].payload, dict) else json.loads(rows[0].payload)
    assert payload["lead_id"] == lead_id
    assert payload["email"] == "ana@acme.io"
    assert payload["owner_id"] == "o-1"
    assert payload["stage"] == "mql"
    assert payload["score"] == answer["score"]
    assert payload["grade"] == answer["grade"]
    assert payload["assignment"]["rule_id"] == "mql-to-sdr"
    assert payload["traits"]["What is your current occupation"] == GOOD["What is your current occupation"]

    lead = (await env.client.get(f"/v1/leads/{lead_id}", headers=env.viewer)).json()
    assert (lead["assignment"]["owner_id"], lead["stage"]) == ("o-1", "mql")

    # The same event again, a further event of the now-MQL lead, and an unqualified lead: no more handoffs.
    assert (await sender.post(env.client, lead_event(id="g", email="ana@acme.io", traits=GOOD))).status_code == 200
    assert (await sender.post(env.client, lead_event(id="g2", email="ana@acme.io", traits=GOOD))).status_code == 202
    poor = (await sender.post(env.client, lead_event(id="p", email="bo@acme.io", traits=POOR))).json()
    assert poor["stage"] == "lead"
    assert await db.scalar("SELECT count(*) FROM delivery") == 2
    assert await db.scalar("SELECT count(*) FROM assignment") == 1

    # The next qualified lead takes the next turn in the pool.
    await sender.post(env.client, lead_event(id="c", email="cy@other.io", traits=GOOD))
    owners = [r.owner_id for r in await db.rows("SELECT owner_id FROM assignment ORDER BY assigned_at, id")]
    assert owners == ["o-1", "o-2"]
    assert await db.scalar("SELECT count(*) FROM delivery") == 4


async def test_without_active_routing_a_qualified_lead_is_not_handed_off(
    env: Env, sender: Sender, db: Db, trained: Any
) -> None:
    await qualify_above_the_middle(env, trained)
    answer = (await sender.post(env.client, lead_event(id="g", traits=GOOD))).json()
    assert answer["stage"] == "mql"
    assert await db.scalar("SELECT count(*) FROM assignment") == 0
    assert await db.scalar("SELECT count(*) FROM delivery") == 0


async def test_an_ops_move_hands_off_only_when_it_says_so(env: Env, sender: Sender, db: Db) -> None:
    await activate_routing(env.settings)
    first = (await sender.post(env.client, lead_event(id="a", email="a@acme.io"))).json()
    second = (await sender.post(env.client, lead_event(id="b", email="b@beta.io"))).json()
    assert (first["stage"], second["stage"]) == ("lead", "lead")

    quiet = {"stage": "mql", "reason": "met at the fair", "trigger_downstream": False}
    moved = await env.client.post(f"/v1/leads/{first['lead_id']}/stage", json=quiet, headers=env.ops)
    assert moved.status_code == 200, moved.text
    assert await db.scalar("SELECT count(*) FROM delivery") == 0

    loud = {"stage": "mql", "reason": "met at the fair", "trigger_downstream": True}
    moved = await env.client.post(f"/v1/leads/{second['lead_id']}/stage", json=loud, headers=env.ops)
    assert moved.status_code == 200, moved.text
    rows = await db.rows("SELECT lead_id, destination FROM delivery ORDER BY destination")
    assert [(str(uuid.UUID(str(r.lead_id))), r.destination) for r in rows] == [
        (second["lead_id"], "crm"),
        (second["lead_id"], "hubspot"),
    ]
