"""Qualification on ingest: the active policy moves stages after each score, forward only unless it
demotes (with hysteresis); ops moves; the stage in the webhook answer and on the lead."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from service.settings import Settings
from tests.conftest import Db, Sender, lead_event
from tests.service.qualification_env import Env, open_env, policy, score_line, scores_of
from tests.service.test_scoring_service import GOOD, POOR

pytestmark = pytest.mark.anyio

TO_MQL = ("leadscore_stage_transitions_total", {"from_stage": "lead", "to_stage": "mql"})


@pytest.fixture
async def env(settings: Settings, trained: Any) -> AsyncIterator[Env]:
    async with open_env(settings, trained) as opened:
        yield opened


async def test_the_policy_qualifies_on_ingest_and_the_answer_has_the_stage(
    env: Env, sender: Sender, db: Db, trained: Any
) -> None:
    good, poor = scores_of(trained, GOOD, POOR)
    line = (good + poor) / 2
    policy_id = await env.activate_policy(policy(score_line("score", "gte", line)))
    counted = REGISTRY.get_sample_value(*TO_MQL) or 0.0
    a = (await sender.post(env.client, lead_event(id="g", traits=GOOD))).json()
    b = (await sender.post(env.client, lead_event(id="p", email="bo@acme.io", traits=POOR))).json()
    assert (a["stage"], b["stage"]) == ("mql", "lead")
    assert a["stages"] == {a["lead_id"]: "mql"}
    lead = (await env.client.get(f"/v1/leads/{a['lead_id']}", headers=env.viewer)).json()
    assert lead["stage"] == "mql"
    assert lead["stage_changed_at"] is not None
    [transition] = lead["transitions"]
    assert transition | {"id": None, "transitioned_at": None} == {
        "id": None,
        "lead_id": a["lead_id"],
        "from_stage": "lead",
        "to_stage": "mql",
        "transitioned_at": None,
        "cause": "policy",
        "actor": f"policy:{policy_id}",
        "reason": None,
        "policy_id": policy_id,
        "segment": "default",
        "score_record_id": lead["score"]["id"],
        "change_request_id": None,
        "outcome_id": None,
        "downstream": True,
    }
    assert (await env.client.get(f"/v1/leads/{b['lead_id']}", headers=env.viewer)).json()["transitions"] == []
    assert REGISTRY.get_sample_value(*TO_MQL) == counted + 1
    # A repeat answers with the current stage and changes nothing.
    again = await sender.post(env.client, lead_event(id="g", traits=GOOD))
    assert (again.status_code, again.json()["stage"]) == (200, "mql")
    assert await db.scalar("SELECT count(*) FROM stage_transition") == 1


async def test_list_body_answers_every_leads_stage(env: Env, sender: Sender, trained: Any) -> None:
    good, poor = scores_of(trained, GOOD, POOR)
    await env.activate_policy(policy(score_line("score", "gte", (good + poor) / 2)))
    answer = (
        await sender.post(
            env.client,
            [lead_event(id="1", traits=GOOD), lead_event(id="2", email="bo@acme.io", traits=POOR)],
        )
    ).json()
    assert answer["stage"] is None
    assert [answer["stages"][lead_id] for lead_id in answer["lead_ids"]] == ["mql", "lead"]


async def test_without_a_policy_leads_stay_leads(env: Env, sender: Sender, db: Db) -> None:
    answer = (await sender.post(env.client, lead_event(traits=GOOD))).json()
    assert answer["stage"] == "lead"
    assert await db.scalar("SELECT count(*) FROM stage_transition") == 0


# Later events change only these traits of a GOOD lead (traits keep the latest value per name).
WEAKER = {"Lead Origin": "API"}
STRONG_AGAIN = {"Lead Origin": "Lead Add Form"}
COLD = {"Lead Origin": "API", "Do Not Email": "Yes", "What is your current occupation": "Unemployed"}


async def test_forward_only_by_default(env: Env, sender: Sender, trained: Any) -> None:
    good, cold = scores_of(trained, GOOD, {**GOOD, **COLD})
    await env.activate_policy(policy(score_line("score", "gte", (good + cold) / 2)))
    first = (await sender.post(env.client, lead_event(id="1", traits=GOOD))).json()
    worse = (await sender.post(env.client, lead_event(id="2", traits=COLD, occurred_at="2026-11-21T10:00:00Z"))).json()
    assert worse["scores"][first["lead_id"]]["score"] == cold
    assert (first["stage"], worse["stage"]) == ("mql", "mql")


async def test_demotion_with_hysteresis(env: Env, sender: Sender, db: Db, trained: Any) -> None:
    good, weaker, cold = scores_of(trained, GOOD, {**GOOD, **WEAKER}, {**GOOD, **COLD})
    assert good > weaker > cold + 20
    # SQL at the good lead's score; the margin keeps a lead that falls to the weaker score in SQL,
    # and the cold lead, far below both lines, still within MQL's loosened line.
    margin = good - weaker + 5
    await env.activate_policy(
        policy(
            score_line("score", "gte", cold + margin - 1),
            score_line("score", "gte", good),
            hysteresis={"score": margin},
            allow_demotion=True,
        )
    )
    stages = []
    for i, traits in enumerate((GOOD, WEAKER, STRONG_AGAIN, COLD)):
        at = f"2026-11-2{i}T10:00:00Z"
        stages.append(
            (await sender.post(env.client, lead_event(id=f"e{i}", traits=traits, occurred_at=at))).json()["stage"]
        )
    assert stages == ["sql", "sql", "sql", "mql"]
    rows = await db.rows("SELECT from_stage, to_stage FROM stage_transition ORDER BY transitioned_at")
    assert [tuple(r) for r in rows] == [("lead", "sql"), ("sql", "mql")]


async def test_ops_moves_forward_freely_and_back_with_a_reason(env: Env, sender: Sender, db: Db) -> None:
    lead_id = (await sender.post(env.client, lead_event(traits=GOOD))).json()["lead_id"]
    url = f"/v1/leads/{lead_id}/stage"
    up = await env.client.post(url, json={"stage": "sql", "reason": "talked at the fair"}, headers=env.ops)
    assert up.status_code == 200
    assert up.json() | {"id": None} == up.json() | {
        "id": None,
        "from_stage": "lead",
        "to_stage": "sql",
        "cause": "ops",
        "actor": "key:1",
        "reason": "talked at the fair",
        "downstream": True,
    }
    missing_reason = await env.client.post(url, json={"stage": "lead", "reason": " "}, headers=env.ops)
    assert missing_reason.status_code == 422
    same = await env.client.post(url, json={"stage": "sql", "reason": "again"}, headers=env.ops)
    assert (same.status_code, same.json()["error"]) == (422, "InvalidStageMove")
    back = await env.client.post(
        url, json={"stage": "disqualified", "reason": "competitor", "trigger_downstream": False}, headers=env.ops
    )
    assert (back.status_code, back.json()["downstream"]) == (200, False)
    assert (await env.client.post(url, json={"stage": "mql", "reason": "x"}, headers=env.viewer)).status_code == 403
    assert (await env.client.post(url, json={"stage": "mql", "reason": "x"})).status_code == 401
    unknown = await env.client.post(
        f"/v1/leads/{uuid.uuid4()}/stage", json={"stage": "mql", "reason": "x"}, headers=env.ops
    )
    assert unknown.status_code == 404
    lead = (await env.client.get(f"/v1/leads/{lead_id}", headers=env.viewer)).json()
    assert lead["stage"] == "disqualified"
    audited = await db.rows("SELECT actor, action, entity_id, before, after, reason FROM audit_entry ORDER BY id")
    moves = [r for r in audited if r.action == "lead.stage_moved"]
    assert [(r.actor, r.entity_id, r.reason) for r in moves] == [
        ("key:1", lead_id, "talked at the fair"),
        ("key:1", lead_id, "competitor"),
    ]
    assert [(t["from_stage"], t["to_stage"]) for t in lead["transitions"]] == [("sql", "disqualified"), ("lead", "sql")]


async def test_the_policy_leaves_ops_stages_alone(env: Env, sender: Sender, trained: Any) -> None:
    good, poor = scores_of(trained, GOOD, POOR)
    await env.activate_policy(policy(score_line("score", "gte", (good + poor) / 2)))
    lead_id = (await sender.post(env.client, lead_event(id="1", traits=POOR))).json()["lead_id"]
    await env.client.post(
        f"/v1/leads/{lead_id}/stage", json={"stage": "disqualified", "reason": "spam"}, headers=env.ops
    )
    answer = (await sender.post(env.client, lead_event(id="2", traits=GOOD, occurred_at="2026-11-22T10:00:00Z"))).json()
    assert answer["stage"] == "disqualified"


async def test_a_merged_lead_further_on_passes_its_stage_to_the_survivor(env: Env, sender: Sender) -> None:
    older = (await sender.post(env.client, lead_event(email=None, subject={"external_ids": {"hubspot": "1"}}))).json()
    newer = (await sender.post(env.client, lead_event(email="ana@acme.io"))).json()
    await env.client.post(
        f"/v1/leads/{newer['lead_id']}/stage", json={"stage": "customer", "reason": "won"}, headers=env.ops
    )
    both = lead_event(
        email="ana@acme.io", subject={"external_ids": {"hubspot": "1"}}, occurred_at="2026-11-21T10:00:00Z"
    )
    merged = (await sender.post(env.client, both)).json()
    assert (merged["lead_id"], merged["stage"]) == (older["lead_id"], "customer")
    lead = (await env.client.get(f"/v1/leads/{older['lead_id']}", headers=env.viewer)).json()
    [transition] = lead["transitions"]
    assert (transition["cause"], transition["from_stage"], transition["to_stage"], transition["downstream"]) == (
        "merge",
        "lead",
        "customer",
        False,
    )
