"""Routing rules under change control: proposals with a routing impact preview, approval by another
identity, scheduled applies, rollbacks, the bootstrap of the first rules, and the audit trail."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from scoring.routing import RoutingLead
from service.auth import Principal
from service.change_requests import ChangeApplier, ChangeControl, InvalidChange, activate_routing, preview
from service.change_schemas import RoutingRulesChange
from service.db import create_engine
from service.repositories.tables import lead
from service.settings import Settings
from tests.conftest import Db
from tests.service.qualification_env import Env, now, open_env
from tests.service.test_routing import assign

pytestmark = pytest.mark.anyio

URL = "/v1/change-requests"
ANA = Principal(subject="ops:ana", role="ops", name="ana")

EMEA = {"field": "traits.Region", "op": "eq", "value": "EMEA"}
US = {"field": "traits.Region", "op": "eq", "value": "US"}


def emea_spec() -> dict[str, Any]:
    """EMEA leads to a fixed owner, the rest to a queue."""
    return {
        "name": "emea first",
        "rules": [{"id": "emea", "when": EMEA, "target": {"owner": "emea-1"}}],
        "fallback": {"queue": "unassigned"},
        "account_match": {"enabled": False},
    }


def us_spec() -> dict[str, Any]:
    """US leads to a round-robin pool, the rest to the queue."""
    return {
        "name": "us pool",
        "pools": [{"id": "us", "strategy": "round_robin", "members": [{"owner": "u1"}, {"owner": "u2"}]}],
        "rules": [{"id": "us", "when": US, "target": {"pool": "us"}}],
        "fallback": {"queue": "unassigned"},
        "account_match": {"enabled": False},
    }


def routing_change(spec: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"change": {"kind": "routing_rules", "spec": spec}, "reason": "new territories", **extra}


@pytest.fixture
async def env(settings: Settings, trained: Any) -> AsyncIterator[Env]:
    async with open_env(settings, trained) as opened:
        yield opened


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    made = create_engine(settings.database_url)
    try:
        yield made
    finally:
        await made.dispose()


async def propose(env: Env, body: dict[str, Any]) -> dict[str, Any]:
    response = await env.client.post(URL, json=body, headers=env.ops)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def approve(env: Env, request_id: int) -> dict[str, Any]:
    response = await env.client.post(f"{URL}/{request_id}/approve", headers=env.ops2)
    assert response.status_code == 200, response.text
    approved: dict[str, Any] = response.json()
    return approved


async def active_version(env: Env) -> int | None:
    listed = (await env.client.get("/v1/routing/rules", headers=env.viewer)).json()
    version: int | None = listed["active_version"]
    return version


async def bootstrap(engine: AsyncEngine, spec: dict[str, Any]) -> dict[str, Any]:
    """The first routing rules, applied at once (nothing was ever active)."""
    created = await activate_routing(
        engine,
        RoutingRulesChange(kind="routing_rules", spec=spec),
        principal=ANA,
        reason=None,
        control=ChangeControl(),
        now=now(),
    )
    return created.model_dump(mode="json")


async def test_the_first_rules_bootstrap_then_every_change_needs_approval(
    env: Env, engine: AsyncEngine, db: Db
) -> None:
    first = await bootstrap(engine, emea_spec())
    assert (first["kind"], first["status"], first["bootstrap"]) == ("routing_rules", "applied", True)
    assert first["before"] == {"target": "routing_rules", "version": None}
    version = first["result"]["version"]
    assert await active_version(env) == version
    bootstrapped = await db.rows(
        "SELECT actor, action, entity_id FROM audit_entry WHERE action = 'change_request.bootstrap'"
    )
    assert bootstrapped == [("ops:ana", "change_request.bootstrap", str(first["id"]))]

    # Once rules have been active, no second bootstrap: a change request, with a reason.
    with pytest.raises(InvalidChange, match="reason"):
        await bootstrap(engine, us_spec())
    proposed = await activate_routing(
        engine,
        RoutingRulesChange(kind="routing_rules", spec=us_spec()),
        principal=ANA,
        reason="US pool",
        control=ChangeControl(),
        now=now(),
    )
    assert (proposed.status, proposed.bootstrap) == ("pending", False)
    assert await active_version(env) == version


async def test_propose_approve_by_another_identity_applies_the_rules(env: Env, engine: AsyncEngine, db: Db) -> None:
    first = (await bootstrap(engine, emea_spec()))["result"]["version"]
    body = routing_change(us_spec())
    refused = await env.client.post(URL, json=body, headers=env.viewer)
    assert (refused.status_code, refused.json()["error"]) == (403, "Forbidden")

    created = await propose(env, body)
    assert (created["kind"], created["status"], created["author"]) == ("routing_rules", "pending", "key:1")
    assert created["impact"]["routing"]["leads_considered"] == 0
    assert await db.scalar("SELECT count(*) FROM routing_rules_version") == 1  # nothing stored yet

    self_approval = await env.client.post(f"{URL}/{created['id']}/approve", headers=env.ops)
    assert (self_approval.status_code, self_approval.json()["error"]) == (403, "SelfApprovalRefused")
    viewer_approval = await env.client.post(f"{URL}/{created['id']}/approve", headers=env.viewer)
    assert viewer_approval.status_code == 403
    assert await active_version(env) == first

    applied = await approve(env, created["id"])
    assert (applied["status"], applied["approved_by"], applied["applied_by"]) == ("applied", "key:2", "key:2")
    second = applied["result"]["version"]
    assert applied["before"] == {"target": "routing_rules", "version": first}
    assert second != first
    assert await active_version(env) == second
    listed = (await env.client.get("/v1/routing/rules", headers=env.viewer)).json()
    stored = {v["version"]: v for v in listed["versions"]}
    assert (stored[second]["name"], stored[second]["created_by"]) == ("us pool", "key:1")
    assert listed["activations"][-1]["activated_by"] == "key:2"
    # Applying made the new pool's counter rows in the same transaction.
    assert await db.rows("SELECT pool_id, owner_id FROM routing_pool_member ORDER BY owner_id") == [
        ("us", "u1"),
        ("us", "u2"),
    ]
    actions = await db.rows(
        "SELECT action, actor FROM audit_entry WHERE entity = 'change_request' AND entity_id = :id ORDER BY id",
        id=str(created["id"]),
    )
    assert actions == [
        ("change_request.proposed", "key:1"),
        ("change_request.approved", "key:2"),
        ("change_request.applied", "key:2"),
    ]

    # The same spec again activates the version that has it: no duplicate version.
    back = await propose(env, routing_change(emea_spec(), reason="back to EMEA"))
    assert (await approve(env, back["id"]))["result"]["version"] == first
    assert await db.scalar("SELECT count(*) FROM routing_rules_version") == 2


async def test_bad_routing_proposals_are_refused(env: Env, engine: AsyncEngine, db: Db) -> None:
    await bootstrap(engine, emea_spec())
    bad = {**us_spec(), "rules": [{"id": "r", "when": US, "target": {"pool": "nope"}}]}
    invalid = await env.client.post(URL, json=routing_change(bad), headers=env.ops)
    assert (invalid.status_code, invalid.json()["error"]) == (422, "InvalidRoutingSpec")
    assert "rules[0].target.pool" in {problem["loc"] for problem in invalid.json()["detail"]}

    both = {"change": {"kind": "routing_rules", "spec": us_spec(), "version": 1}, "reason": "x"}
    assert (await env.client.post(URL, json=both, headers=env.ops)).status_code == 422
    missing = {"change": {"kind": "routing_rules", "version": 99}, "reason": "x"}
    unknown = await env.client.post(URL, json=missing, headers=env.ops)
    assert (unknown.status_code, unknown.json()["error"]) == (422, "InvalidChange")
    reevaluate = await env.client.post(URL, json=routing_change(us_spec(), reevaluate=True), headers=env.ops)
    assert (reevaluate.status_code, reevaluate.json()["error"]) == (422, "InvalidChange")
    never = {"change": {"kind": "rollback", "target": "routing_rules", "version": 99}, "reason": "x"}
    assert (await env.client.post(URL, json=never, headers=env.ops)).json()["error"] == "InvalidChange"
    assert await db.scalar("SELECT count(*) FROM change_request WHERE kind <> 'active_pipeline'") == 1


async def test_scheduled_routing_change_applies_at_its_time(env: Env, engine: AsyncEngine) -> None:
    first = (await bootstrap(engine, emea_spec()))["result"]["version"]
    at = now() + dt.timedelta(hours=1)
    created = await propose(env, routing_change(us_spec(), apply_at=at.isoformat()))
    assert (await approve(env, created["id"]))["status"] == "approved"
    services = env.app.state.services

    def applier(at_time: dt.datetime) -> ChangeApplier:
        return ChangeApplier(services.engine, control=services.control, interval_seconds=60, clock=lambda: at_time)

    assert await applier(at - dt.timedelta(seconds=1)).run_once() == []
    assert await active_version(env) == first
    assert await applier(at).run_once() == [created["id"]]
    done = (await env.client.get(f"{URL}/{created['id']}", headers=env.viewer)).json()
    assert (done["status"], done["applied_by"]) == ("applied", "scheduler")
    assert await active_version(env) == done["result"]["version"] != first


async def test_rollback_restores_an_earlier_routing_version(env: Env, engine: AsyncEngine, db: Db) -> None:
    first = (await bootstrap(engine, emea_spec()))["result"]["version"]
    second = (await approve(env, (await propose(env, routing_change(us_spec())))["id"]))["result"]["version"]
    assert await active_version(env) == second
    rollback = {
        "change": {"kind": "rollback", "target": "routing_rules", "version": first},
        "reason": "US pool too slow",
    }
    created = await propose(env, rollback)
    assert created["impact"]["routing"] is not None
    applied = await approve(env, created["id"])
    assert (applied["before"], applied["result"]) == (
        {"target": "routing_rules", "version": second},
        {"target": "routing_rules", "version": first},
    )
    assert await active_version(env) == first
    assert await db.scalar("SELECT count(*) FROM routing_rules_version") == 2


async def routed_leads(engine: AsyncEngine, regions: list[str], *, at: dt.datetime) -> list[uuid.UUID]:
    """Leads with these regions, routed by the active rules at `at`."""
    ids = sorted(uuid.uuid4() for _ in regions)
    async with engine.begin() as conn:
        await conn.execute(
            lead.insert(),
            [
                {
                    "id": i,
                    "created_at": at,
                    "updated_at": at,
                    "traits": {"Region": r},
                    "trait_times": {},
                    "stage": "mql",
                }
                for i, r in zip(ids, regions, strict=True)
            ],
        )
    leads = [RoutingLead(lead_id=i, traits={"Region": r}, stage="mql") for i, r in zip(ids, regions, strict=True)]
    await assign(engine, leads, now=at)
    return ids


async def test_the_impact_preview_shows_where_routed_leads_would_go(env: Env, engine: AsyncEngine, db: Db) -> None:
    await bootstrap(engine, emea_spec())
    emea = await routed_leads(engine, ["EMEA", "EMEA"], at=now())
    us = await routed_leads(engine, ["US", "US"], at=now())
    await routed_leads(engine, ["EMEA"], at=now() - dt.timedelta(days=200))  # outside the window
    assignments = await db.scalar("SELECT count(*) FROM assignment")

    created = await propose(env, routing_change(us_spec()))
    impact = created["impact"]
    assert (impact["changes"], impact["moves"], impact["leads_considered"], impact["truncated"]) == (0, {}, 4, False)
    routing = impact["routing"]
    assert (routing["leads_considered"], routing["moved"], routing["retargeted"]) == (4, 4, 4)
    assert routing["before"] == {"owners": {"emea-1": 2}, "pools": {}, "queues": {"unassigned": 2}}
    assert routing["after"] == {"owners": {"u1": 1, "u2": 1}, "pools": {"us": 2}, "queues": {"unassigned": 2}}
    moves = {m["lead_id"]: (m["before"], m["after"], m["matched_by"]) for m in routing["sample"]}
    assert {moves[str(i)] for i in emea} == {("owner:emea-1", "queue:unassigned", "fallback")}
    assert sorted(moves[str(i)] for i in us) == [
        ("queue:unassigned", "owner:u1", "rule"),
        ("queue:unassigned", "owner:u2", "rule"),
    ]
    # Routed in process: no assignment, no counter row, no version.
    assert await db.scalar("SELECT count(*) FROM assignment") == assignments
    assert await db.scalar("SELECT count(*) FROM routing_pool_member") == 0
    assert await db.scalar("SELECT count(*) FROM routing_rules_version") == 1

    again = (await env.client.get(f"{URL}/{created['id']}/impact", headers=env.viewer)).json()
    assert again["routing"] == routing
    # Bounded: a smaller limit says it stopped.
    bounded = await preview(engine, created["id"], control=ChangeControl(impact_max_leads=3, batch_size=2), now=now())
    assert (bounded.truncated, bounded.routing is not None and bounded.routing.leads_considered) == (True, 3)
