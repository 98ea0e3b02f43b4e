"""Change control: proposals, approval by another identity, scheduled and immediate applies,
rejections, rollbacks, and impact previews that equal what applying then does."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.change_requests import ChangeApplier
from service.db import create_engine
from service.repositories import pipelines as pipelines_repo
from service.settings import Settings
from tests.conftest import Db, Sender, lead_event
from tests.service.qualification_env import Env, now, open_env, policy, score_line, scores_of
from tests.service.test_scoring_service import GOOD, POOR, register

pytestmark = pytest.mark.anyio

URL = "/v1/change-requests"


@pytest.fixture
async def env(settings: Settings, trained: Any) -> AsyncIterator[Env]:
    async with open_env(settings, trained) as opened:
        yield opened


def policy_change(spec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"change": {"kind": "threshold_policy", "policy": spec}, "reason": "tune MQL", **extra}


async def propose(env: Env, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = await env.client.post(URL, json=body, headers=headers or env.ops)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def approve(env: Env, request_id: int, headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = await env.client.post(f"{URL}/{request_id}/approve", headers=headers or env.ops2)
    assert response.status_code == 200, response.text
    approved: dict[str, Any] = response.json()
    return approved


async def test_viewer_cannot_propose_and_anonymous_cannot_read(env: Env) -> None:
    body = policy_change(policy(score_line("score", "gte", 50)))
    refused = await env.client.post(URL, json=body, headers=env.viewer)
    assert (refused.status_code, refused.json()["error"]) == (403, "Forbidden")
    assert (await env.client.get(URL)).status_code == 401
    assert (await env.client.get(URL, headers=env.viewer)).json() == []


async def test_self_approval_is_refused_and_another_identity_applies_it(env: Env, db: Db) -> None:
    created = await propose(env, policy_change(policy(score_line("score", "gte", 50))))
    assert (created["status"], created["author"], created["approved_by"]) == ("pending", "key:1", None)
    assert await db.scalar("SELECT count(*) FROM threshold_policy") == 0
    own = await env.client.post(f"{URL}/{created['id']}/approve", headers=env.ops)
    assert (own.status_code, own.json()["error"]) == (403, "SelfApprovalRefused")
    assert (await env.client.post(f"{URL}/{created['id']}/approve", headers=env.viewer)).status_code == 403
    applied = await approve(env, created["id"])
    assert (applied["status"], applied["approved_by"], applied["applied_by"]) == ("applied", "key:2", "key:2")
    assert applied["before"] == {"target": "threshold_policy", "version": None}
    assert applied["result"] == {"target": "threshold_policy", "version": 1}
    assert await db.scalar("SELECT policy_id FROM threshold_policy_slot WHERE slot = 'active'") == 1
    again = await env.client.post(f"{URL}/{created['id']}/approve", headers=env.ops2)
    assert (again.status_code, again.json()["error"]) == (409, "ChangeRequestConflict")
    # Every event is in the audit log; the refused ones changed nothing, so they are not.
    audited = await db.rows(
        "SELECT actor, role, action, entity_id, reason FROM audit_entry WHERE entity = 'change_request' ORDER BY id"
    )
    assert [tuple(r) for r in audited] == [
        ("key:1", "ops", "change_request.proposed", str(created["id"]), "tune MQL"),
        ("key:2", "ops", "change_request.approved", str(created["id"]), None),
        ("key:2", "ops", "change_request.applied", str(created["id"]), "tune MQL"),
    ]
    # An applied policy version is immutable in the database.
    with pytest.raises(Exception, match="immutable"):
        await db.scalar("UPDATE threshold_policy SET name = 'x'")


async def test_bad_proposals_are_refused_with_the_field(env: Env) -> None:
    bad_policy = await env.client.post(URL, json=policy_change(policy(score_line("visits", "gte", 1))), headers=env.ops)
    assert bad_policy.status_code == 422
    assert any("unknown score field 'visits'" in e["msg"] for e in bad_policy.json()["detail"])
    missing = await env.client.post(
        URL, json={"change": {"kind": "active_pipeline", "version": 99}, "reason": "x"}, headers=env.ops
    )
    assert (missing.status_code, missing.json()["error"]) == (422, "InvalidChange")
    no_rollback = await env.client.post(
        URL,
        json={"change": {"kind": "rollback", "target": "threshold_policy", "version": 7}, "reason": "x"},
        headers=env.ops,
    )
    assert no_rollback.status_code == 422
    downstream_alone = await env.client.post(
        URL, json=policy_change(policy(score_line("score", "gte", 1)), trigger_downstream=True), headers=env.ops
    )
    assert downstream_alone.status_code == 422


async def test_reject_and_withdraw(env: Env, db: Db) -> None:
    first = await propose(env, policy_change(policy(score_line("score", "gte", 50))))
    not_mine = await env.client.post(f"{URL}/{first['id']}/withdraw", json={"reason": "no"}, headers=env.ops2)
    assert (not_mine.status_code, not_mine.json()["error"]) == (403, "NotTheAuthor")
    rejected = await env.client.post(f"{URL}/{first['id']}/reject", json={"reason": "too low"}, headers=env.ops2)
    assert (rejected.json()["status"], rejected.json()["closed_by"], rejected.json()["close_reason"]) == (
        "rejected",
        "key:2",
        "too low",
    )
    late = await env.client.post(f"{URL}/{first['id']}/approve", headers=env.ops2)
    assert late.status_code == 409
    second = await propose(env, policy_change(policy(score_line("score", "gte", 60))))
    withdrawn = await env.client.post(f"{URL}/{second['id']}/withdraw", json={"reason": "typo"}, headers=env.ops)
    assert withdrawn.json()["status"] == "withdrawn"
    actions = await db.rows("SELECT action, reason FROM audit_entry WHERE entity = 'change_request' ORDER BY id")
    assert [tuple(r) for r in actions] == [
        ("change_request.proposed", "tune MQL"),
        ("change_request.rejected", "too low"),
        ("change_request.proposed", "tune MQL"),
        ("change_request.withdrawn", "typo"),
    ]
    listed = (await env.client.get(URL, params={"status": ["rejected"]}, headers=env.viewer)).json()
    assert [r["id"] for r in listed] == [first["id"]]
    both = (await env.client.get(URL, params={"status": ["rejected", "withdrawn"]}, headers=env.viewer)).json()
    assert [r["id"] for r in both] == [second["id"], first["id"]]
    assert (await env.client.get(f"{URL}/999", headers=env.viewer)).status_code == 404


async def test_scheduled_apply_happens_at_its_time(env: Env, db: Db) -> None:
    at = now() + dt.timedelta(hours=1)
    created = await propose(env, policy_change(policy(score_line("score", "gte", 50)), apply_at=at.isoformat()))
    approved = await approve(env, created["id"])
    assert approved["status"] == "approved"
    assert await db.scalar("SELECT count(*) FROM threshold_policy") == 0
    services = env.app.state.services

    def applier(at_time: dt.datetime) -> ChangeApplier:
        return ChangeApplier(services.engine, control=services.control, interval_seconds=60, clock=lambda: at_time)

    assert await applier(at - dt.timedelta(seconds=1)).run_once() == []
    assert await db.scalar("SELECT count(*) FROM threshold_policy") == 0
    # Two replicas at the due time: exactly one applies it.
    results = await asyncio.gather(applier(at).run_once(), applier(at + dt.timedelta(seconds=1)).run_once())
    assert sorted(results) == [[], [created["id"]]]
    done = (await env.client.get(f"{URL}/{created['id']}", headers=env.viewer)).json()
    assert (done["status"], done["applied_by"]) == ("applied", "scheduler")
    assert await db.scalar("SELECT actor FROM audit_entry WHERE action = 'change_request.applied'") == "scheduler"
    assert dt.datetime.fromisoformat(done["applied_at"]) in (at, at + dt.timedelta(seconds=1))
    assert await db.scalar("SELECT count(*) FROM threshold_policy") == 1


async def test_apply_now_overrides_the_schedule(env: Env) -> None:
    at = now() + dt.timedelta(days=1)
    created = await propose(env, policy_change(policy(score_line("score", "gte", 50)), apply_at=at.isoformat()))
    early = await env.client.post(f"{URL}/{created['id']}/apply", headers=env.ops)
    assert (early.status_code, early.json()["error"]) == (409, "ChangeRequestConflict")  # not approved yet
    await approve(env, created["id"])
    applied = await env.client.post(f"{URL}/{created['id']}/apply", headers=env.ops)
    assert (applied.status_code, applied.json()["status"]) == (200, "applied")


async def test_without_required_approval_a_proposal_applies_at_once(settings: Settings, trained: Any) -> None:
    async with open_env(settings.model_copy(update={"require_approval": False}), trained) as env:
        created = await propose(env, policy_change(policy(score_line("score", "gte", 50))))
        assert (created["status"], created["approved_by"]) == ("applied", "(approval not required)")


async def two_leads(env: Env, sender: Sender) -> tuple[str, str]:
    good = (await sender.post(env.client, lead_event(id="g", traits=GOOD))).json()["lead_id"]
    poor = (await sender.post(env.client, lead_event(id="p", email="bo@acme.io", traits=POOR))).json()["lead_id"]
    return good, poor


async def stage(env: Env, lead_id: str) -> str:
    value: str = (await env.client.get(f"/v1/leads/{lead_id}", headers=env.viewer)).json()["stage"]
    return value


async def test_a_policy_change_without_reevaluation_moves_leads_on_their_next_event(
    env: Env, sender: Sender, db: Db
) -> None:
    good, poor = await two_leads(env, sender)
    created = await propose(env, policy_change(policy(score_line("score", "gte", 1))))
    assert created["impact"]["moves"] == {"lead->mql": 1}  # the poor lead scores 0
    await approve(env, created["id"])
    await env.app.state.services.policies.refresh()
    assert (await stage(env, good), await stage(env, poor)) == ("lead", "lead")
    assert await db.scalar("SELECT count(*) FROM stage_transition") == 0
    await sender.post(env.client, lead_event(id="g2", traits=GOOD, occurred_at="2026-11-21T10:00:00Z"))
    assert (await stage(env, good), await stage(env, poor)) == ("mql", "lead")


@pytest.mark.parametrize("downstream", [False, True])
async def test_a_policy_change_with_reevaluation_moves_leads_at_apply(
    env: Env, sender: Sender, trained: Any, db: Db, downstream: bool
) -> None:
    good_score, poor_score = scores_of(trained, GOOD, POOR)
    good, poor = await two_leads(env, sender)
    line = score_line("score", "gte", (good_score + poor_score) / 2)
    created = await propose(env, policy_change(policy(line), reevaluate=True, trigger_downstream=downstream))
    applied = await approve(env, created["id"])
    assert (await stage(env, good), await stage(env, poor)) == ("mql", "lead")
    [row] = await db.rows("SELECT cause, actor, change_request_id, downstream, policy_id FROM stage_transition")
    assert tuple(row) == ("reevaluation", f"change_request:{created['id']}", created["id"], downstream, 1)
    assert applied["result"]["reevaluation"]["changes"] == 1


async def test_the_preview_equals_what_applying_does(env: Env, sender: Sender, trained: Any, db: Db) -> None:
    good_score, poor_score = scores_of(trained, GOOD, POOR)
    middle = (good_score + poor_score) / 2
    await env.activate_policy(policy(score_line("score", "gte", 101)))  # nobody qualifies yet
    leads = []
    for i in range(12):
        traits = GOOD if i % 3 else POOR
        company = {"company_size": "5000"} if i % 2 else {}
        answer = await sender.post(
            env.client, lead_event(id=f"e{i}", email=f"l{i}@acme.io", traits={**traits, **company})
        )
        leads.append(answer.json()["lead_id"])
    await env.client.post(f"/v1/leads/{leads[1]}/stage", json={"stage": "customer", "reason": "won"}, headers=env.ops)
    spec = policy(score_line("score", "gte", middle), score_line("score", "gte", good_score))
    spec["segments"] = [
        {
            "name": "enterprise",
            "when": {"field": "company_size", "op": "gte", "value": 1000},
            "mql": score_line("score", "gte", 0),
        }
    ]
    created = await propose(env, policy_change(spec, reevaluate=True))
    impact = created["impact"]
    recomputed = (await env.client.get(f"{URL}/{created['id']}/impact", headers=env.viewer)).json()
    assert {k: v for k, v in recomputed.items() if k != "computed_at"} == {
        k: v for k, v in impact.items() if k != "computed_at"
    }
    assert await db.scalar("SELECT count(*) FROM stage_transition WHERE cause = 'reevaluation'") == 0
    assert impact["leads_considered"] == 12
    # Default segment: 4 good leads -> sql, 2 poor stay; enterprise (odd i): 2 poor and 3 good -> mql
    # (lead 1 is a customer, which no policy moves).
    assert impact["moves"] == {"lead->mql": 5, "lead->sql": 4}
    assert impact["by_segment"]["enterprise"] == {"up": 5, "down": 0, "moves": {"lead->mql": 5}}
    applied = (await approve(env, created["id"]))["result"]["reevaluation"]
    assert applied.pop("status") == "done"
    assert applied == {k: impact[k] for k in ("leads_considered", "changes", "up", "down", "moves", "by_segment")}
    stored = await db.rows("SELECT from_stage, to_stage, segment FROM stage_transition WHERE cause = 'reevaluation'")
    assert len(stored) == impact["changes"]
    assert set(impact["sample"]) <= set(leads)
    # Applied: nothing left to change.
    assert (await env.client.get(f"{URL}/{created['id']}/impact", headers=env.viewer)).json()["changes"] == 0


async def test_a_pipeline_change_preview_rescores_and_equals_the_applied_result(
    env: Env, sender: Sender, trained: Any, settings: Settings, db: Db
) -> None:
    good_score, poor_score = scores_of(trained, GOOD, POOR)
    await env.activate_policy(policy(score_line("score", "gte", (good_score + poor_score) / 2), allow_demotion=True))
    for i in range(4):
        await sender.post(env.client, lead_event(id=f"e{i}", email=f"l{i}@acme.io", traits=GOOD if i % 2 else POOR))
    # The same model with every score 100 points lower: the qualified leads fall out.
    lower = {**trained.spec_dict, "combine": {**trained.spec_dict["combine"], "offset": -100.0}}
    engine = create_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            version = await pipelines_repo.insert_version(
                conn,
                name="lower",
                spec=lower,
                artifact=trained.result.artifact,
                metrics={},
                sklearn_version="t",
                training_data_sha256=None,
                created_by="test",
                now=now(),
            )
    finally:
        await engine.dispose()
    body = {"change": {"kind": "active_pipeline", "version": version}, "reason": "new model", "reevaluate": True}
    created = await propose(env, body)
    assert created["impact"]["moves"] == {"mql->lead": 2}
    assert await db.scalar("SELECT count(*) FROM score_record WHERE pipeline_version_id = :v", v=version) == 0
    applied = (await approve(env, created["id"]))["result"]
    assert applied["target"] == "active_pipeline"
    assert applied["reevaluation"]["moves"] == created["impact"]["moves"]
    assert await db.scalar("SELECT count(*) FROM score_record WHERE pipeline_version_id = :v", v=version) == 4


async def test_rollback_restores_an_earlier_policy(env: Env, db: Db) -> None:
    for line in (50, 60):
        await approve(env, (await propose(env, policy_change(policy(score_line("score", "gte", line)))))["id"])
    assert await db.scalar("SELECT policy_id FROM threshold_policy_slot") == 2
    rollback = await propose(
        env, {"change": {"kind": "rollback", "target": "threshold_policy", "version": 1}, "reason": "too strict"}
    )
    applied = await approve(env, rollback["id"])
    assert (applied["before"], applied["result"]) == (
        {"target": "threshold_policy", "version": 2},
        {"target": "threshold_policy", "version": 1},
    )
    assert await db.scalar("SELECT policy_id FROM threshold_policy_slot") == 1
    policies = (await env.client.get("/v1/thresholds/policies", headers=env.viewer)).json()
    assert [(p["version"], p["active"], p["change_request_id"], p["created_by"]) for p in policies] == [
        (1, True, 1, "key:1"),
        (2, False, 2, "key:1"),
    ]


async def test_shadow_pipeline_changes_go_through_change_requests(env: Env, settings: Settings, trained: Any) -> None:
    version = await register(settings, trained, slot=None)
    created = await propose(env, {"change": {"kind": "shadow_pipeline", "version": version}, "reason": "try it"})
    assert created["impact"]["note"].startswith("a shadow version")
    applied = await approve(env, created["id"])
    assert applied["result"] == {"target": "shadow_pipeline", "version": version}
    cleared = await approve(
        env, (await propose(env, {"change": {"kind": "shadow_pipeline", "version": None}, "reason": "done"}))["id"]
    )
    assert cleared["before"] == {"target": "shadow_pipeline", "version": version}


async def test_a_preview_stops_at_its_bound_and_says_so(settings: Settings, trained: Any, sender: Sender) -> None:
    async with open_env(
        settings.model_copy(update={"impact_max_leads": 2, "reevaluation_batch_size": 1}), trained
    ) as env:
        for i in range(3):
            await sender.post(env.client, lead_event(email=f"l{i}@acme.io", traits=GOOD))
        created = await propose(env, policy_change(policy(score_line("score", "gte", 1)), reevaluate=True))
        assert (created["impact"]["leads_considered"], created["impact"]["truncated"]) == (2, True)
        assert created["impact"]["changes"] == 2
        # Applying re-evaluates every lead of the window, in batches (here of one).
        applied = await approve(env, created["id"])
        assert applied["result"]["reevaluation"]["changes"] == 3
