"""`GET /v1/reports/routing` on real state: qualified leads routed by active rules (a round-robin
pool with a paused member, a weighted pool, a fixed owner, a queue), handed off to two CRM
destinations by the delivery worker (one rejects some leads), a merged lead, and handoffs still
waiting; checked against what the test observed of each lead and delivery through the API."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import statistics
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from service.auth import SYSTEM
from service.change_requests import bootstrap_routing
from service.change_schemas import RoutingRulesChange
from service.crm import build_adapter, parse_destinations
from service.db import create_engine
from service.delivery import DeliveryWorker
from service.settings import Settings
from tests.conftest import Sender, lead_event
from tests.service.qualification_env import Env, open_env, policy, score_line, scores_of
from tests.service.test_auth import IdentityProvider, idp, oidc_client, oidc_settings, published  # noqa: F401  (fixtures)
from tests.service.test_delivery import SECRET, config, wait_for
from tests.service.test_scoring_service import GOOD, POOR

pytestmark = pytest.mark.anyio

ROUTE = "/v1/reports/routing"
DESTINATIONS = [
    {"name": "crm", "kind": "webhook", "url": "http://crm.test/hooks/crm", "secret": SECRET},
    {"name": "backup", "kind": "webhook", "url": "http://crm.test/hooks/backup", "secret": SECRET},
]
ROUTING = {
    "spec_version": 1,
    "name": "report test routing",
    "account_match": {"enabled": False},
    "pools": [
        {
            "id": "sdr",
            "strategy": "round_robin",
            "members": [{"owner": "o-1"}, {"owner": "o-2"}, {"owner": "o-3", "paused": True}],
        },
        {
            "id": "ae",
            "strategy": "weighted_round_robin",
            "members": [{"owner": "a-1", "weight": 2}, {"owner": "a-2", "weight": 1}],
        },
    ],
    "rules": [
        {"id": "vip", "when": {"field": "traits.Tier", "op": "eq", "value": "vip"}, "target": {"owner": "boss"}},
        {"id": "emea", "when": {"field": "traits.Region", "op": "eq", "value": "EMEA"}, "target": {"pool": "ae"}},
        {"id": "mql", "when": {"field": "stage", "op": "eq", "value": "mql"}, "target": {"pool": "sdr"}},
    ],
    "fallback": {"queue": "unassigned"},
}


@pytest.fixture
async def env(settings: Settings, trained: Any) -> AsyncIterator[Env]:
    # The test runs its own worker, against a mock CRM.
    configured = settings.model_copy(
        update={"delivery_destinations": json.dumps(DESTINATIONS), "delivery_in_process": False}
    )
    async with open_env(configured, trained) as opened:
        yield opened


def crm(request: httpx.Request) -> httpx.Response:
    """Both destinations accept every lead, except that `backup` rejects leads whose email starts with `dead`."""
    email = json.loads(request.content)["data"]["email"] or ""
    if request.url.path.endswith("/backup") and email.startswith("dead"):
        return httpx.Response(400, json={"error": "rejected"})
    return httpx.Response(200, json={"ok": True})


@dataclass(frozen=True)
class Seen:
    """An assignment as the lead API showed it right after it was made."""

    lead: str
    kind: str
    pool_id: str | None
    owner_id: str | None
    queue: str | None
    assigned_at: dt.datetime


@dataclass
class Story:
    env: Env
    ids: dict[str, str] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    merged: set[str] = field(default_factory=set)
    since: dt.datetime = dt.datetime.min
    until: dt.datetime = dt.datetime.min

    async def observe(self, name: str) -> Seen:
        answer = await self.env.client.get(f"/v1/leads/{self.ids[name]}", headers=self.env.viewer)
        a = answer.json()["assignment"]
        seen = Seen(name, a["kind"], a["pool_id"], a["owner_id"], a["queue"], at(a["assigned_at"]))
        self.seen.append(seen)
        return seen

    def live_in_period(self) -> list[Seen]:
        return [s for s in self.seen if s.lead not in self.merged and self.since <= s.assigned_at < self.until]


def at(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


async def tell(env: Env, sender: Sender, trained: Any) -> Story:
    """Before the period: P0 to the sdr pool. In it (from S1's assignment): S1-S4 to sdr, E1-E4
    (EMEA) to ae, V1 (vip) to boss, S1 again at sql to the queue, MNEW to sdr and then merged into
    the older MOLD; the worker delivers these (backup rejects E4) and stops; then P1 to sdr, whose
    handoffs wait. At the end instant: Z to sdr."""
    engine = create_engine(env.settings.database_url)
    try:
        await bootstrap_routing(
            engine,
            RoutingRulesChange(kind="routing_rules", spec=ROUTING),
            principal=SYSTEM,
            reason="report test",
            now=dt.datetime.now(dt.UTC),
        )
    finally:
        await engine.dispose()
    good, poor = scores_of(trained, GOOD, POOR)
    await env.activate_policy(policy(score_line("score", "gte", (good + poor) / 2)))
    story = Story(env)

    async def send(name: str, email: str | None, traits: dict[str, str], **fields: Any) -> str:
        answer = await sender.post(env.client, lead_event(id=f"evt-{name}", email=email, traits=traits, **fields))
        assert answer.status_code == 202, answer.text
        story.ids.setdefault(name, answer.json()["lead_id"])
        return str(answer.json()["stage"])

    async def qualify(name: str, email: str, **traits: str) -> Seen:
        assert await send(name, email, GOOD | traits) == "mql"
        return await story.observe(name)

    await qualify("P0", "p0@acme.io")
    story.since = (await qualify("S1", "s1@acme.io")).assigned_at
    for n in (2, 3, 4):
        await qualify(f"S{n}", f"s{n}@acme.io")
    for n in (1, 2, 3):
        await qualify(f"E{n}", f"e{n}@emea.io", Region="EMEA")
    await qualify("E4", "dead-e4@emea.io", Region="EMEA")
    await qualify("V1", "v1@big.io", Tier="vip")
    moved = await env.client.post(
        f"/v1/leads/{story.ids['S1']}/stage",
        json={"stage": "sql", "reason": "sales call", "trigger_downstream": True},
        headers=env.ops,
    )
    assert moved.status_code == 200, moved.text
    await story.observe("S1")
    assert await send("MOLD", None, POOR, subject={"external_ids": {"hubspot": "88"}}) == "lead"
    await qualify("MNEW", "mnew@acme.io")
    await send("MERGE", "mnew@acme.io", POOR, subject={"external_ids": {"hubspot": "88"}})
    survivor = (await env.client.get(f"/v1/leads/{story.ids['MNEW']}", headers=env.viewer)).json()
    assert survivor["id"] == story.ids["MOLD"]
    assert story.ids["MNEW"] in survivor["merged_ids"]
    story.merged.add("MNEW")

    engine = create_engine(env.settings.database_url)
    adapters = {name: build_adapter(d) for name, d in parse_destinations(DESTINATIONS).items()}
    try:
        async with httpx.AsyncClient(transport=httpx.MockTransport(crm)) as client:
            worker = DeliveryWorker(engine, adapters, client, config())
            worker.start()
            try:
                await wait_for(lambda: nothing_waits(env))
            finally:
                await worker.stop()
    finally:
        await engine.dispose()

    await qualify("P1", "p1@acme.io")
    story.until = (await qualify("Z", "z@acme.io")).assigned_at
    return story


async def deliveries(env: Env) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params = {"limit": 500} | ({"cursor": cursor} if cursor else {})
        page = (await env.client.get("/v1/deliveries", params=params, headers=env.viewer)).json()
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def nothing_waits(env: Env) -> bool:
    return all(d["status"] in ("delivered", "dead") for d in await deliveries(env))


async def report(env: Env, **params: Any) -> dict[str, Any]:
    answer = await env.client.get(ROUTE, params=params, headers=env.viewer)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def period(story: Story) -> dict[str, str]:
    return {"since": story.since.isoformat(), "until": story.until.isoformat()}


async def test_assignments_and_pool_fairness_match_what_was_routed(env: Env, sender: Sender, trained: Any) -> None:
    story = await tell(env, sender, trained)
    body = await report(env, **period(story))

    # What the lead API showed, counted here: P0 is before the period, Z at its end, MNEW merged.
    seen = story.live_in_period()
    by_target = Counter((s.kind, s.pool_id, s.owner_id, s.queue) for s in seen)
    # Round robin with o-3 paused went o-1 (P0), o-2 (S1), o-1, o-2, o-1, o-2 (MNEW), o-1 (P1), o-2 (Z);
    # smooth weighted round robin 2:1 gives a-1, a-2, a-1, a-1.
    assert by_target == {
        ("pool", "sdr", "o-1", None): 3,
        ("pool", "sdr", "o-2", None): 2,
        ("pool", "ae", "a-1", None): 3,
        ("pool", "ae", "a-2", None): 1,
        ("owner", None, "boss", None): 1,
        ("queue", None, None, "unassigned"): 1,
    }
    assert body["assignments"] == len(seen) == 11
    assert body["warnings"] == []
    assert body["active_routing_version"] == 1

    def expected_member(pool: str, owner: str, share: float | None, weight: int, status: str) -> dict[str, Any]:
        n = by_target[("pool", pool, owner, None)]
        in_pool = sum(v for (kind, p, _, _), v in by_target.items() if p == pool)
        expected = share * in_pool if share is not None else None
        return {
            "kind": "pool",
            "pool_id": pool,
            "owner_id": owner,
            "queue": None,
            "assignments": n,
            "share_of_all": n / len(seen),
            "share_of_pool": n / in_pool,
            "member_status": status,
            "weight": weight,
            "expected_share": share,
            "expected_assignments": expected,
            "deviation": n - expected if expected is not None else None,
            "load": n / expected if expected else None,
        }

    def plain(kind: str, owner: str | None, queue: str | None) -> dict[str, Any]:
        n = by_target[(kind, None, owner, queue)]
        nulls = dict.fromkeys(
            ("share_of_pool", "member_status", "weight", "expected_share", "expected_assignments", "deviation", "load")
        )
        return (
            {"kind": kind, "pool_id": None, "owner_id": owner, "queue": queue, "assignments": n}
            | {"share_of_all": n / len(seen)}
            | nulls
        )

    expected_rows = [
        expected_member("sdr", "o-1", 0.5, 1, "active"),
        expected_member("sdr", "o-2", 0.5, 1, "active"),
        expected_member("sdr", "o-3", 0.0, 1, "paused"),
        expected_member("ae", "a-1", 2 / 3, 2, "active"),
        expected_member("ae", "a-2", 1 / 3, 1, "active"),
        plain("owner", "boss", None),
        plain("queue", None, "unassigned"),
    ]
    assert len(body["rows"]) == len(expected_rows)
    for got, want in zip(body["rows"], expected_rows, strict=True):
        assert got == pytest.approx(want)

    # sdr: loads 3/2.5 and 2/2.5; ae: 3/(8/3) and 1/(4/3).
    sdr_loads, ae_loads = [1.2, 0.8], [9 / 8, 3 / 4]
    pools = {p["pool_id"]: p for p in body["pools"]}
    assert list(pools) == ["sdr", "ae"]
    assert [pools[p].pop("routing_versions") for p in pools] == [[1], [1]]
    assert pools["sdr"] == pytest.approx(
        {
            "pool_id": "sdr",
            "strategy": "round_robin",
            "active_members": 2,
            "assignments": 5,
            "max_min_ratio": 1.5,
            "coefficient_of_variation": statistics.pstdev(sdr_loads) / statistics.fmean(sdr_loads),
            "excess_assignments": 0.5,
        }
    )
    assert pools["ae"] == pytest.approx(
        {
            "pool_id": "ae",
            "strategy": "weighted_round_robin",
            "active_members": 2,
            "assignments": 4,
            "max_min_ratio": 1.5,
            "coefficient_of_variation": statistics.pstdev(ae_loads) / statistics.fmean(ae_loads),
            "excess_assignments": 1 / 3,
        }
    )
    owners = {o["owner_id"]: (o["assignments"], o["from_pools"], o["direct"]) for o in body["owners"]}
    assert owners == {"a-1": (3, 3, 0), "a-2": (1, 1, 0), "boss": (1, 0, 1), "o-1": (3, 3, 0), "o-2": (2, 2, 0)}


def assert_same_rows(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Equal row by row, floats to a microsecond (the API's time resolution)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-6)


def seconds_to_delivery(detail: dict[str, Any]) -> float | None:
    done = [
        at(a["started_at"]) + dt.timedelta(milliseconds=a["duration_ms"])
        for a in detail["attempt_history"]
        if a["outcome"] == "delivered"
    ]
    return (min(done) - at(detail["created_at"])).total_seconds() if done else None


async def expected_deliveries(
    env: Env, story: Story, keep: Callable[[Seen], bool] = lambda _: True, *, since: dt.datetime | None = None
) -> list[dict[str, Any]]:
    """Per destination, from the deliveries API: handoffs of live leads enqueued in the period whose
    assignment then (the one the test saw made at that instant, or before it) passes `keep`."""
    start = story.since if since is None else since
    names = {lead_id: name for name, lead_id in story.ids.items()}
    rows = []
    for destination in ("backup", "crm"):
        mine = []
        for d in await deliveries(env):
            name, created = names[d["lead_id"]], at(d["created_at"])
            if d["destination"] != destination or name in story.merged or not start <= created < story.until:
                continue
            then = max(
                (s for s in story.seen if s.lead == name and s.assigned_at <= created), key=lambda s: s.assigned_at
            )
            if keep(then):
                mine.append(d)
        times = []
        for d in mine:
            detail = (await env.client.get(f"/v1/deliveries/{d['id']}", headers=env.viewer)).json()
            took = seconds_to_delivery(detail)
            if took is not None:
                times.append(took)
        times.sort()
        statuses = Counter(d["status"] for d in mine)
        rows.append(
            {
                "destination": destination,
                "handoffs": len(mine),
                "delivered": statuses["delivered"],
                "pending": statuses["pending"] + statuses["in_flight"],
                "dead": statuses["dead"],
                "median_seconds_to_delivery": statistics.median(times) if times else None,
                "p90_seconds_to_delivery": times[math.ceil(0.9 * len(times)) - 1] if times else None,
                "max_seconds_to_delivery": max(times) if times else None,
            }
        )
    return rows


async def test_time_to_delivery_and_waiting_handoffs_per_destination(env: Env, sender: Sender, trained: Any) -> None:
    story = await tell(env, sender, trained)
    body = await report(env, **period(story))
    want = await expected_deliveries(env, story)
    # One handoff per assignment (S1 has two); backup rejected E4; P1's are waiting.
    assert [(d["destination"], d["handoffs"], d["delivered"], d["pending"], d["dead"]) for d in want] == [
        ("backup", 11, 9, 1, 1),
        ("crm", 11, 10, 1, 0),
    ]
    assert_same_rows(body["deliveries"], want)
    assert all(d["median_seconds_to_delivery"] > 0 for d in body["deliveries"])


async def test_a_pool_filter_keeps_its_assignments_and_its_leads_handoffs(
    env: Env, sender: Sender, trained: Any
) -> None:
    story = await tell(env, sender, trained)
    body = await report(env, **period(story), pool="sdr")
    assert [(r["pool_id"], r["owner_id"], r["assignments"]) for r in body["rows"]] == [
        ("sdr", "o-1", 3),
        ("sdr", "o-2", 2),
        ("sdr", "o-3", 0),
    ]
    assert [p["pool_id"] for p in body["pools"]] == ["sdr"]
    assert (body["assignments"], body["owners"][0]["owner_id"], len(body["owners"])) == (5, "o-1", 2)
    # S1's second handoff went with its queue assignment, so it is not sdr's.
    want = await expected_deliveries(env, story, lambda s: s.pool_id == "sdr")
    assert [(d["destination"], d["handoffs"], d["delivered"], d["pending"]) for d in want] == [
        ("backup", 5, 4, 1),
        ("crm", 5, 4, 1),
    ]
    assert_same_rows(body["deliveries"], want)

    nowhere = await report(env, **period(story), pool="nope")
    assert (nowhere["rows"], nowhere["pools"], nowhere["deliveries"]) == ([], [], [])
    assert nowhere["warnings"] == ["no pool 'nope' in the active routing rules and no assignment from it in the period"]


async def test_the_period_is_half_open(env: Env, sender: Sender, trained: Any) -> None:
    story = await tell(env, sender, trained)
    tick = dt.timedelta(microseconds=1)

    def sdr(body: dict[str, Any]) -> dict[str, int]:
        return {r["owner_id"]: r["assignments"] for r in body["rows"] if r["pool_id"] == "sdr"}

    def handoffs(body: dict[str, Any]) -> list[int]:
        return [d["handoffs"] for d in body["deliveries"]]

    # From just after S1's first assignment: it (o-2) and its handoffs are out.
    later = await report(env, since=(story.since + tick).isoformat(), until=story.until.isoformat())
    assert (sdr(later), later["assignments"], handoffs(later)) == ({"o-1": 3, "o-2": 1, "o-3": 0}, 10, [10, 10])
    want = await expected_deliveries(env, story, since=story.since + tick)
    assert_same_rows(later["deliveries"], want)

    # To just after Z's assignment: Z (o-2) and its handoffs are in.
    longer = await report(env, since=story.since.isoformat(), until=(story.until + tick).isoformat())
    assert (sdr(longer), longer["assignments"], handoffs(longer)) == ({"o-1": 3, "o-2": 3, "o-3": 0}, 12, [12, 12])


async def test_expected_shares_follow_the_active_rules_and_say_when_they_changed(
    env: Env, sender: Sender, trained: Any
) -> None:
    story = await tell(env, sender, trained)
    # New rules, approved by another ops identity: o-3 back in the sdr pool, no ae pool any more.
    spec = ROUTING | {
        "pools": [{"id": "sdr", "strategy": "round_robin", "members": [{"owner": f"o-{n}"} for n in (1, 2, 3)]}],
        "rules": [ROUTING["rules"][0], ROUTING["rules"][2]],
    }
    body = {"change": {"kind": "routing_rules", "spec": spec}, "reason": "o-3 is back"}
    proposed = await env.client.post("/v1/change-requests", json=body, headers=env.ops)
    assert proposed.status_code == 201, proposed.text
    applied = await env.client.post(f"/v1/change-requests/{proposed.json()['id']}/approve", headers=env.ops2)
    assert applied.json()["status"] == "applied", applied.text

    report_body = await report(env, **period(story))
    assert report_body["active_routing_version"] == 2
    assert report_body["warnings"] == [
        "pool 'ae' is not in the active routing rules: its expected shares are unknown",
        "the period's assignments were made by routing rules versions 1; expected shares use the active version 2",
    ]
    rows = {(r["pool_id"], r["owner_id"]): r for r in report_body["rows"] if r["kind"] == "pool"}
    # sdr: 5 assignments, now expected a third each; o-3 got none, so there is no max/min ratio.
    for owner, n in (("o-1", 3), ("o-2", 2), ("o-3", 0)):
        row = rows[("sdr", owner)]
        assert (row["assignments"], row["member_status"]) == (n, "active")
        assert (row["expected_share"], row["expected_assignments"]) == pytest.approx((1 / 3, 5 / 3))
    loads = [3 / (5 / 3), 2 / (5 / 3), 0.0]
    pools = {p["pool_id"]: p for p in report_body["pools"]}
    assert pools["sdr"]["max_min_ratio"] is None
    assert pools["sdr"]["coefficient_of_variation"] == pytest.approx(statistics.pstdev(loads) / statistics.fmean(loads))
    assert pools["sdr"]["excess_assignments"] == pytest.approx((3 - 5 / 3 + 2 - 5 / 3 + 5 / 3) / 2)
    # ae is history now: its counts stand, with nothing to compare them with.
    assert [(r["owner_id"], r["assignments"], r["member_status"], r["expected_share"]) for r in rows.values()][3:] == [
        ("a-1", 3, None, None),
        ("a-2", 1, None, None),
    ]
    assert (pools["ae"]["strategy"], pools["ae"]["excess_assignments"], pools["ae"]["routing_versions"]) == (
        None,
        None,
        [1],
    )


async def test_csv_tables_are_the_json_tables(env: Env, sender: Sender, trained: Any) -> None:
    story = await tell(env, sender, trained)
    body = await report(env, **period(story))
    for table, key in (("assignments", "rows"), ("pools", "pools"), ("owners", "owners"), ("deliveries", "deliveries")):
        answer = await env.client.get(
            ROUTE, params={**period(story), "table": table}, headers={**env.viewer, "accept": "text/csv"}
        )
        assert answer.status_code == 200, answer.text
        assert f'filename="leadscore-routing-{table}.csv"' in answer.headers["content-disposition"]
        parsed = list(csv.DictReader(io.StringIO(answer.text)))
        assert parsed == [{k: cell(v) for k, v in row.items()} for row in body[key]], table


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


async def test_a_bad_period_or_table_is_422(env: Env) -> None:
    reversed_period = {"since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"}
    answer = await env.client.get(ROUTE, params=reversed_period, headers=env.viewer)
    assert (answer.status_code, answer.json()["error"]) == (422, "InvalidReportPeriod")
    answer = await env.client.get(ROUTE, params={"table": "teams"}, headers=env.viewer)
    assert (answer.status_code, answer.json()["error"]) == (422, "InvalidRequest")


async def test_readers_need_a_viewer_credential(
    env: Env,
    sender: Sender,
    settings: Settings,
    idp: IdentityProvider,  # noqa: F811  (the fixture, imported from test_auth)
) -> None:
    assert (await env.client.get(ROUTE, headers=env.viewer)).status_code == 200
    nobody = await env.client.get(ROUTE)
    assert (nobody.status_code, nobody.json()["error"]) == (401, "Unauthenticated")
    webhook = await env.client.get(ROUTE, headers={"authorization": f"Bearer {sender.secret}"})
    assert (webhook.status_code, webhook.json()["error"]) == (401, "Unauthenticated")
    async for client in oidc_client(oidc_settings(settings, idp.url)):
        roleless = await client.get(ROUTE, headers={"authorization": f"Bearer {idp.token(roles=['sales'])}"})
        assert (roleless.status_code, roleless.json()["error"]) == (403, "Forbidden")
