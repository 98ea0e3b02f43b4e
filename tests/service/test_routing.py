"""Routing in the service, on a real database: assignments with every strategy, capacity windows,
pauses and fallbacks, account owners, exact counts under concurrency (tasks and OS processes),
previews that store nothing, the routes, the CLI, and immutable versions."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from scoring.routing import RoutingLead, load_routing_spec
from service.auth import create_key
from service.cli import main
from service.db import create_engine, writer_connection
from service.repositories.tables import account_owner, assignment, lead, lead_identity
from service.routing import (
    Assignment,
    activate_version_in,
    assign_leads,
    create_version_in,
    set_account_owner,
)
from service.settings import Settings
from tests.conftest import REPO_ROOT, Db, Sender, lead_event

pytestmark = pytest.mark.anyio

NOW = dt.datetime(2026, 11, 29, 15, 0, tzinfo=dt.UTC)

THREE = [{"owner": "a"}, {"owner": "b"}, {"owner": "c"}]
WEIGHTED = [{"owner": "x", "weight": 2}, {"owner": "y"}, {"owner": "z"}]


def routing_spec(
    pools: list[dict[str, Any]],
    rules: list[dict[str, Any]] | None = None,
    fallback: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A spec whose rules send segment `<pool id>` to that pool, unless rules are given."""
    return {
        "name": "test routing",
        "pools": pools,
        "rules": rules
        if rules is not None
        else [
            {
                "id": f"to-{p['id']}",
                "when": {"field": "segment", "op": "eq", "value": p["id"]},
                "target": {"pool": p["id"]},
            }
            for p in pools
        ],
        "fallback": fallback or {"queue": "unassigned"},
        **extra,
    }


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    made = create_engine(settings.database_url)
    try:
        yield made
    finally:
        await made.dispose()


async def load(engine: AsyncEngine, data: dict[str, Any], *, activate: bool = True) -> int:
    """Store a version (and make it active), as an applied change request does in its transaction."""
    async with engine.begin() as conn:
        version = await create_version_in(conn, load_routing_spec(data), actor="test", now=NOW)
        if activate:
            await activate_version_in(conn, version, actor="test", now=NOW)
    return version


async def make_leads(engine: AsyncEngine, n: int, *, emails: Sequence[str | None] = ()) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(n)]
    async with engine.begin() as conn:
        await conn.execute(
            lead.insert(),
            [{"id": i, "created_at": NOW, "updated_at": NOW, "traits": {}, "trait_times": {}} for i in ids],
        )
        identities = [
            {"lead_id": i, "namespace": "email", "value": e, "created_at": NOW}
            for i, e in zip(ids, emails, strict=False)
            if e
        ]
        if identities:
            await conn.execute(lead_identity.insert(), identities)
    return ids


async def assign(engine: AsyncEngine, leads: Sequence[RoutingLead], *, now: dt.datetime = NOW) -> list[Assignment]:
    conn = await writer_connection(engine)
    try:
        async with conn.begin():
            return await assign_leads(conn, leads, now=now)
    finally:
        await conn.close()


def to(ids: Sequence[uuid.UUID], segment: str | None = None, **fields: Any) -> list[RoutingLead]:
    stage = fields.pop("stage", "mql")
    return [RoutingLead(lead_id=i, segment=segment, stage=stage, **fields) for i in ids]


async def stored(db: Db) -> dict[uuid.UUID, Any]:
    """Stored assignments by lead (typed columns on both backends)."""
    async with db.engine.connect() as conn:
        return {row.lead_id: row for row in await conn.execute(sa.select(assignment))}


# ---------------------------------------------------------------------------------------- assigning


async def test_assignments_are_stored_with_version_rule_and_reason(engine: AsyncEngine, db: Db) -> None:
    version = await load(engine, routing_spec([{"id": "rr", "strategy": "round_robin", "members": THREE}]))
    ids = await make_leads(engine, 4)
    assigned = await assign(engine, to(ids[:3], "rr") + to(ids[3:], "other", stage="sql"))
    assert [(a.lead_id, a.kind, a.owner_id, a.pool_id, a.queue) for a in assigned] == [
        (ids[0], "pool", "a", "rr", None),
        (ids[1], "pool", "b", "rr", None),
        (ids[2], "pool", "c", "rr", None),
        (ids[3], "queue", None, None, "unassigned"),
    ]
    rows = await stored(db)
    columns = ("id", "kind", "owner_id", "pool_id", "queue", "routing_version_id", "rule_id", "matched_by", "stage")
    assert {i: tuple(getattr(rows[i], c) for c in columns) for i in ids} == {
        ids[0]: (assigned[0].id, "pool", "a", "rr", None, version, "to-rr", "rule", "mql"),
        ids[1]: (assigned[1].id, "pool", "b", "rr", None, version, "to-rr", "rule", "mql"),
        ids[2]: (assigned[2].id, "pool", "c", "rr", None, version, "to-rr", "rule", "mql"),
        ids[3]: (assigned[3].id, "queue", None, None, "unassigned", version, None, "fallback", "sql"),
    }
    assert rows[ids[0]].reason == "rule 'to-rr' matched: pool 'rr' (round robin) chose 'a', next in turn"
    assert rows[ids[0]].assigned_at == NOW
    counters = await db.rows("SELECT owner_id, last_turn, window_count, assigned_total FROM routing_pool_member")
    assert sorted(tuple(r) for r in counters) == [("a", 1, 1, 1), ("b", 2, 1, 1), ("c", 3, 1, 1)]


async def test_nothing_is_routed_without_an_active_version(engine: AsyncEngine, db: Db) -> None:
    await load(engine, routing_spec([]), activate=False)
    ids = await make_leads(engine, 2)
    assert await assign(engine, to(ids)) == []
    assert await db.scalar("SELECT count(*) FROM assignment") == 0


async def test_counters_carry_over_between_transactions_and_versions(engine: AsyncEngine, db: Db) -> None:
    await load(engine, routing_spec([{"id": "w", "strategy": "weighted_round_robin", "members": WEIGHTED}]))
    ids = await make_leads(engine, 12)
    first = [a.owner_id for lead_ in to(ids[:5], "w") for a in await assign(engine, [lead_])]
    # A new version that pauses y: the same pool id keeps its counters.
    paused = [{"owner": "x", "weight": 2}, {"owner": "y", "paused": True}, {"owner": "z"}]
    await load(engine, routing_spec([{"id": "w", "strategy": "weighted_round_robin", "members": paused}]))
    second = [a.owner_id for a in await assign(engine, to(ids[5:], "w"))]
    assert first == ["x", "y", "z", "x", "x"]
    assert second == ["z", "x", "x", "z", "x", "x", "z"]
    assert await db.scalar("SELECT count(DISTINCT routing_version_id) FROM assignment") == 2


async def test_capacity_windows_pauses_and_fallbacks(engine: AsyncEngine, db: Db) -> None:
    pools = [
        {
            "id": "p",
            "strategy": "least_loaded",
            "capacity": 2,
            "members": [{"owner": "a"}, {"owner": "b", "paused": True}, {"owner": "c", "capacity": 1}],
        },
    ]
    rules = [{"id": "to-p", "target": {"pool": "p"}, "fallback": {"queue": "overflow"}}]
    await load(engine, routing_spec(pools, rules))
    ids = await make_leads(engine, 6)
    today = [(a.owner_id, a.queue, a.matched_by) for a in await assign(engine, to(ids[:4]))]
    assert today == [("a", None, "rule"), ("c", None, "rule"), ("a", None, "rule"), (None, "overflow", "rule_fallback")]
    [overflow] = [r for r in (await stored(db)).values() if r.queue == "overflow"]
    assert overflow.reason == (
        "rule 'to-p' matched, rule fallback: queue 'overflow'; nobody available in pool 'p' "
        "(a at capacity (2/2 this window), b paused, c at capacity (1/1 this window))"
    )
    tomorrow = await assign(engine, to(ids[4:]), now=NOW + dt.timedelta(days=1))
    assert [a.owner_id for a in tomorrow] == ["c", "a"]
    counters = await db.rows("SELECT owner_id, window_count, assigned_total FROM routing_pool_member ORDER BY owner_id")
    assert [tuple(r) for r in counters] == [("a", 1, 3), ("b", 0, 0), ("c", 1, 2)]


async def test_account_owners_claimed_looked_up_and_set_by_ops(engine: AsyncEngine, db: Db) -> None:
    await load(
        engine,
        routing_spec(
            [{"id": "rr", "strategy": "round_robin", "members": THREE}],
            rules=[{"id": "sql", "when": {"field": "stage", "op": "eq", "value": "sql"}, "target": {"pool": "rr"}}],
        ),
    )
    ids = await make_leads(
        engine, 6, emails=["ana@acme.io", "bo@acme.io", "cy@gmail.com", "di@gmail.com", "ed@beta.io", "fi@beta.io"]
    )
    # Emails are read from the leads' identities when the caller does not pass them.
    first = await assign(engine, to([ids[0], ids[2]], stage="sql"))
    assert [(a.owner_id, a.matched_by) for a in first] == [("a", "rule"), ("b", "rule")]
    async with db.engine.connect() as conn:
        claimed = list(await conn.execute(sa.select(account_owner)))
    assert [(r.kind, r.key, r.owner_id, r.source, r.assignment_id) for r in claimed] == [
        ("domain", "acme.io", "a", "assignment", first[0].id)
    ]

    # In a later transaction: acme.io follows its owner even with no rule matching; gmail never matches.
    later = await assign(engine, to([ids[1], ids[3]], stage="mql") + to([ids[3]], stage="sql"))
    assert [(a.owner_id, a.queue, a.matched_by) for a in later] == [
        ("a", None, "account"),
        (None, "unassigned", "fallback"),
        ("c", None, "rule"),
    ]
    assert "account domain 'acme.io' belongs to 'a'" in later[0].reason

    # Ops give beta.io to someone outside the pool before its first lead; an ops owner replaces a claim.
    await set_account_owner(engine, kind="domain", key="Beta.IO", owner_id="enterprise-ae", now=NOW)
    await set_account_owner(engine, kind="domain", key="acme.io", owner_id="new-owner", now=NOW)
    last = await assign(engine, to([ids[4], ids[0]], stage="sql"))
    assert [a.owner_id for a in last] == ["enterprise-ae", "new-owner"]
    with pytest.raises(ValueError, match="free-mail"):
        await set_account_owner(engine, kind="domain", key="gmail.com", owner_id="x", now=NOW)


async def test_the_callers_transaction_decides(engine: AsyncEngine, db: Db) -> None:
    await load(engine, routing_spec([{"id": "rr", "strategy": "round_robin", "members": THREE}]))
    ids = await make_leads(engine, 2)
    conn = await writer_connection(engine)

    async def assign_then_fail() -> None:
        async with conn.begin():
            await assign_leads(conn, to(ids, "rr"), now=NOW)
            raise RuntimeError("handoff failed")

    try:
        with pytest.raises(RuntimeError, match="handoff failed"):
            await assign_then_fail()
    finally:
        await conn.close()
    assert await db.scalar("SELECT count(*) FROM assignment") == 0
    assert await db.scalar("SELECT coalesce(sum(assigned_total), 0) FROM routing_pool_member") == 0
    assert [a.owner_id for a in await assign(engine, to(ids, "rr"))] == ["a", "b"]


# -------------------------------------------------------------------------------------- concurrency

FIGURES = routing_spec(
    [
        {"id": "rr", "strategy": "round_robin", "members": THREE},
        {"id": "w", "strategy": "weighted_round_robin", "members": WEIGHTED},
    ]
)
EXPECTED = {"a": 334, "b": 333, "c": 333, "x": 500, "y": 250, "z": 250}


async def figures_leads(engine: AsyncEngine) -> list[tuple[uuid.UUID, str]]:
    ids = await make_leads(engine, 2000)
    # Interleaved, so transactions lock both pools (in one order) as often as one.
    return [(i, "rr" if n % 2 else "w") for n, i in enumerate(ids)]


async def test_exact_counts_with_concurrent_transactions(engine: AsyncEngine, db: Db) -> None:
    await load(engine, FIGURES)
    leads = await figures_leads(engine)
    queue = list(leads)
    rng = random.Random(7)

    async def client() -> int:
        conn = await writer_connection(engine)
        done = 0
        try:
            while queue:
                batch = [queue.pop() for _ in range(min(len(queue), rng.randint(1, 9)))]
                async with conn.begin():
                    await assign_leads(conn, [RoutingLead(lead_id=i, segment=s) for i, s in batch], now=NOW)
                done += len(batch)
        finally:
            await conn.close()
        return done

    assert sum(await asyncio.wait_for(asyncio.gather(*(client() for _ in range(4))), timeout=300)) == 2000
    counts = await db.rows("SELECT owner_id, count(*) FROM assignment GROUP BY owner_id")
    assert {r[0]: r[1] for r in counts} == EXPECTED
    assert await db.scalar("SELECT count(DISTINCT lead_id) FROM assignment") == 2000


async def test_exact_counts_from_several_processes(engine: AsyncEngine, db: Db, db_url: str, tmp_path: Path) -> None:
    await load(engine, FIGURES)
    leads = await figures_leads(engine)
    leads_file = tmp_path / "leads.json"
    leads_file.write_text(json.dumps([{"id": str(i), "segment": s} for i, s in leads]))
    count = 3
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.service.routing_load",
                db_url,
                str(leads_file),
                str(n),
                str(count),
                str(tmp_path),
            ],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(count)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{n}").exists() for n in range(count)):
            assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
            assert time.monotonic() < deadline, "routing processes did not start"
            await asyncio.sleep(0.05)
        (tmp_path / "go").touch()
        outputs = [p.communicate(timeout=300) for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert [p.returncode for p in processes] == [0] * count, outputs
    assert sum(int(out) for out, _ in outputs) == 2000
    counts = await db.rows("SELECT owner_id, count(*) FROM assignment GROUP BY owner_id")
    assert {r[0]: r[1] for r in counts} == EXPECTED
    totals = await db.rows("SELECT owner_id, assigned_total FROM routing_pool_member")
    assert {r[0]: r[1] for r in totals} == EXPECTED


async def test_leads_of_a_new_account_at_once_all_follow_the_first(engine: AsyncEngine, db: Db) -> None:
    await load(engine, routing_spec([{"id": "rr", "strategy": "round_robin", "members": THREE}]))
    ids = await make_leads(engine, 12, emails=[f"p{n}@newco.io" for n in range(12)])

    async def client(part: list[uuid.UUID]) -> None:
        for i in part:
            await assign(engine, to([i], "rr"))

    await asyncio.wait_for(asyncio.gather(*(client(ids[n::4]) for n in range(4))), timeout=120)
    rows = await db.rows("SELECT owner_id, matched_by FROM assignment")
    assert len({r.owner_id for r in rows}) == 1
    assert Counter(r.matched_by for r in rows) == {"rule": 1, "account": 11}


# ------------------------------------------------------------------------------------------ the API


@pytest.fixture
async def viewer(settings: Settings) -> dict[str, str]:
    engine = create_engine(settings.database_url)
    try:
        key = (await create_key(engine, name="v", role="viewer", now=dt.datetime.now(dt.UTC))).key
    finally:
        await engine.dispose()
    return {"authorization": f"Bearer {key}"}


async def test_preview_answers_and_stores_nothing(
    client: httpx.AsyncClient, viewer: dict[str, str], engine: AsyncEngine, db: Db
) -> None:
    none = await client.post("/v1/routing/preview", json={"score": 90}, headers=viewer)
    assert none.status_code == 409
    assert none.json()["error"] == "NoActiveRouting"

    rules = [
        {"id": "hot", "when": {"field": "score", "op": "gte", "value": 80}, "target": {"pool": "rr"}},
        {
            "id": "emea",
            "when": {"field": "traits.Region", "op": "eq", "value": "EMEA"},
            "target": {"owner": "emea-lead"},
        },
    ]
    version = await load(engine, routing_spec([{"id": "rr", "strategy": "round_robin", "members": THREE}], rules))
    [one] = await make_leads(engine, 1)
    await assign(engine, to([one], score=95.0))  # a took the first turn: b is next
    before = await db.rows("SELECT * FROM routing_pool_member ORDER BY owner_id")

    body = {"score": 91.5, "grade": "A1", "stage": "sql", "email": "Ana@Acme.io", "traits": {"Region": "EMEA"}}
    answers = [await client.post("/v1/routing/preview", json=body, headers=viewer) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 200]
    assert (
        answers[0].json()
        == answers[1].json()
        == {
            "routing_version": version,
            "kind": "pool",
            "owner_id": "b",
            "pool_id": "rr",
            "queue": None,
            "rule_id": "hot",
            "matched_by": "rule",
            "reason": "rule 'hot' matched: pool 'rr' (round robin) chose 'b', next in turn",
            "account": None,
        }
    )
    emea = await client.post("/v1/routing/preview", json={"traits": {"Region": "EMEA"}}, headers=viewer)
    assert (emea.json()["owner_id"], emea.json()["rule_id"]) == ("emea-lead", "emea")
    await set_account_owner(engine, kind="domain", key="acme.io", owner_id="z", now=NOW)
    owned = (await client.post("/v1/routing/preview", json=body, headers=viewer)).json()
    assert (owned["owner_id"], owned["matched_by"], owned["account"]) == (
        "z",
        "account",
        {"kind": "domain", "key": "acme.io"},
    )

    assert await db.scalar("SELECT count(*) FROM assignment") == 1
    assert await db.rows("SELECT * FROM routing_pool_member ORDER BY owner_id") == before
    assert await db.scalar("SELECT count(*) FROM account_owner WHERE source = 'assignment'") == 0

    bad = await client.post("/v1/routing/preview", json={"score": "high", "colour": "red"}, headers=viewer)
    assert bad.status_code == 422
    assert {e["loc"] for e in bad.json()["detail"]} == {"body.score", "body.colour"}
    missing = await client.post("/v1/routing/preview", json={"version": 99}, headers=viewer)
    assert (missing.status_code, missing.json()["error"]) == (404, "RoutingVersionNotFound")
    assert (await client.post("/v1/routing/preview", json={})).status_code == 401


async def test_rules_list_shows_active_and_past_versions(
    client: httpx.AsyncClient, viewer: dict[str, str], engine: AsyncEngine
) -> None:
    empty = await client.get("/v1/routing/rules", headers=viewer)
    assert empty.json() == {"active_version": None, "versions": [], "activations": []}
    first = await load(engine, routing_spec([]))
    second = await load(engine, {**routing_spec([]), "name": "second"}, activate=False)
    listed = (await client.get("/v1/routing/rules", headers=viewer)).json()
    assert listed["active_version"] == first
    assert [(v["version"], v["name"], v["active"]) for v in listed["versions"]] == [
        (first, "test routing", True),
        (second, "second", False),
    ]
    assert listed["versions"][0]["spec"]["fallback"] == {"owner": None, "pool": None, "queue": "unassigned"}
    async with engine.begin() as conn:
        await activate_version_in(conn, second, actor="ops:ana", now=NOW)
    again = (await client.get("/v1/routing/rules", headers=viewer)).json()
    assert again["active_version"] == second
    assert [(a["version"], a["activated_by"]) for a in again["activations"]] == [(first, "test"), (second, "ops:ana")]
    assert (await client.get("/v1/routing/rules")).status_code == 401


async def test_lead_shows_its_current_assignment(
    client: httpx.AsyncClient, sender: Sender, viewer: dict[str, str], engine: AsyncEngine
) -> None:
    accepted = await sender.post(client, lead_event("ana@acme.io"))
    lead_id = uuid.UUID(accepted.json()["lead_id"])
    assert (await client.get(f"/v1/leads/{lead_id}", headers=viewer)).json()["assignment"] is None
    version = await load(engine, routing_spec([{"id": "rr", "strategy": "round_robin", "members": THREE}]))
    await assign(engine, to([lead_id], "rr"))
    await assign(engine, to([lead_id], "rr", stage="sql"), now=NOW + dt.timedelta(hours=1))
    shown = (await client.get(f"/v1/leads/{lead_id}", headers=viewer)).json()["assignment"]
    assert {k: v for k, v in shown.items() if k not in ("id", "assigned_at")} == {
        "kind": "owner",
        "owner_id": "a",
        "pool_id": None,
        "queue": None,
        "routing_version": version,
        "rule_id": "to-rr",
        "matched_by": "account",
        "reason": "account domain 'acme.io' belongs to 'a'; rule 'to-rr' matched, and account owners take its leads",
        "stage": "sql",
    }


async def test_versions_are_immutable(engine: AsyncEngine) -> None:
    version = await load(engine, routing_spec([]))
    for statement in (
        "UPDATE routing_rules_version SET name = 'changed' WHERE id = :id",
        "DELETE FROM routing_rules_version WHERE id = :id",
    ):
        with pytest.raises(DBAPIError, match="immutable"):
            async with engine.begin() as conn:
                await conn.execute(sa.text(statement), {"id": version})


# ------------------------------------------------------------------------------------------ the CLI


@pytest.fixture
def cli(db_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("LEADSCORE_DATABASE_URL", db_url)
    return CliRunner()


def run(cli: CliRunner, *args: str) -> Any:
    result = cli.invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_cli_loads_versions_and_activates_them_by_change_request(cli: CliRunner, tmp_path: Path) -> None:
    example = REPO_ROOT / "pipelines" / "routing.example.yaml"
    assert run(cli, "routing", "load", str(example)) == {"version": 1, "name": "example routing"}
    assert run(cli, "routing", "list")["active_version"] is None  # loading never activates
    # Nothing was ever active: the first activation is a bootstrap change request, applied at once.
    first = run(cli, "routing", "activate", "1")
    assert (first["kind"], first["status"], first["bootstrap"]) == ("routing_rules", "applied", True)
    assert first["result"] == {"target": "routing_rules", "version": 1}
    listed = run(cli, "routing", "list")
    assert listed["active_version"] == 1
    assert [(v["version"], v["active"]) for v in listed["versions"]] == [(1, True)]
    assert "spec" not in listed["versions"][0]
    # Activation made the pools' counter rows.
    assert {(c["pool_id"], c["owner_id"]) for c in run(cli, "routing", "pools")} >= {
        ("ae", "ae-senior"),
        ("sdr-rest", "sdr-austin"),
    }

    # From now on, every activation is a change request that another identity approves.
    changed = tmp_path / "changed.yaml"
    changed.write_text(example.read_text().replace("name: example routing", "name: changed routing"))
    assert cli.invoke(main, ["routing", "propose", str(changed)]).exit_code == 1  # a reason is needed
    proposed = run(cli, "routing", "propose", str(changed), "--reason", "new pools")
    assert (proposed["kind"], proposed["status"], proposed["bootstrap"]) == ("routing_rules", "pending", False)
    assert proposed["impact"]["leads_considered"] == 0
    again = run(cli, "routing", "activate", "1", "--reason", "same again")
    assert again["status"] == "pending"
    listed = run(cli, "routing", "list")
    assert (listed["active_version"], len(listed["versions"])) == (1, 1)  # a proposal stores no version
    # The CLI acts as one identity: it cannot approve its own proposal.
    refused = cli.invoke(main, ["change-requests", "approve", str(proposed["id"])])
    assert (refused.exit_code, "SelfApprovalRefused" in refused.output) == (1, True)
    assert run(cli, "routing", "rollback", "1", "--reason", "back")["status"] == "pending"
    assert cli.invoke(main, ["routing", "rollback", "7", "--reason", "never active"]).exit_code == 1

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrules: [{id: r, target: {pool: nope}}]\nfallback: {pool: nope}\n")
    for command in ("load", "propose"):
        refused = cli.invoke(main, ["routing", command, str(bad), *(["--reason", "x"] if command == "propose" else [])])
        assert refused.exit_code == 1
        assert "rules[0].target.pool" in refused.output
        assert "fallback must always be available" in refused.output
    assert cli.invoke(main, ["routing", "activate", "9", "--reason", "x"]).exit_code == 1
    assert run(cli, "routing", "list")["active_version"] == 1


def test_cli_account_owners(cli: CliRunner) -> None:
    assert run(cli, "routing", "accounts", "set", "domain", "@Acme.io", "005A1") == {
        "kind": "domain",
        "key": "@Acme.io",
        "owner_id": "005A1",
    }
    run(cli, "routing", "accounts", "set", "company", "C-42", "005A2")
    listed = run(cli, "routing", "accounts", "list")
    assert [(a["kind"], a["key"], a["owner_id"], a["source"]) for a in listed] == [
        ("company", "C-42", "005A2", "ops"),
        ("domain", "acme.io", "005A1", "ops"),
    ]
    assert run(cli, "routing", "accounts", "remove", "domain", "acme.io")["removed"] is True
    assert cli.invoke(main, ["routing", "accounts", "remove", "domain", "acme.io"]).exit_code == 1
    refused = cli.invoke(main, ["routing", "accounts", "set", "domain", "outlook.com", "x"])
    assert refused.exit_code == 1
    assert "free-mail" in refused.output
