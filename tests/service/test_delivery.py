"""The outbox and its worker on a real database (both backends), delivering to the CRM peer process."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import create_app
from service.auth import create_key
from service.crm import Handoff, build_adapter, parse_destinations
from service.db import create_engine, write_transaction
from service.delivery import DeliveryWorker, enqueue_deliveries, handoff_item
from service.delivery.policy import RetryPolicy
from service.delivery.worker import WorkerConfig
from service.repositories import deliveries as repo
from service.settings import Settings
from tests.conftest import Db
from tests.peers.process import CrmPeer, free_port

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(b"delivery tests signing key 32 b!").decode()


def destination_list(peer_url: str, name: str = "crm") -> list[dict[str, Any]]:
    return [{"name": name, "kind": "webhook", "url": f"{peer_url}/hooks/{name}", "secret": SECRET}]


def config(**overrides: Any) -> WorkerConfig:
    values: dict[str, Any] = {
        "concurrency": 4,
        "batch_size": 50,
        "poll_s": 0.02,
        "lease": dt.timedelta(seconds=30),
        "policy": RetryPolicy(
            max_attempts=5,
            max_age=dt.timedelta(hours=1),
            backoff_base_s=0.01,
            backoff_max_s=0.05,
            retry_after_max_s=1.0,
        ),
        "circuit_failures": 50,
        "circuit_open_s": 30.0,
    }
    return WorkerConfig(**(values | overrides))


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    eng = create_engine(settings.database_url)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
def peer(crm_peer: CrmPeer) -> CrmPeer:
    crm_peer.control("reset")
    return crm_peer


def handoff(n: int, **extra: Any) -> Handoff:
    return Handoff(
        lead_id=uuid.uuid5(uuid.NAMESPACE_URL, f"lead-{n}"),
        email=f"lead{n}@acme.io",
        owner_id="31337",
        stage="mql",
        score=80.0 + n % 10,
        grade="A1",
        **extra,
    )


async def enqueue(engine: AsyncEngine, keys: list[str], *, destination: str = "crm", **extra: Any) -> list[uuid.UUID]:
    items = [handoff_item(handoff(i, **extra), destination, handoff_key=key) for i, key in enumerate(keys)]
    async with write_transaction(engine) as conn:
        return await enqueue_deliveries(conn, items, now=dt.datetime.now(dt.UTC))


async def wait_for(check: Callable[[], Awaitable[bool]], *, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def statuses(db: Db) -> dict[str, int]:
    return {r[0]: r[1] for r in await db.rows("SELECT status, count(*) FROM delivery GROUP BY status")}


async def all_settled(db: Db, expected: dict[str, int]) -> bool:
    return await statuses(db) == expected


def worker(
    engine: AsyncEngine, client: httpx.AsyncClient, destinations: list[dict[str, Any]], **kw: Any
) -> DeliveryWorker:
    adapters = {name: build_adapter(d) for name, d in parse_destinations(destinations).items()}
    return DeliveryWorker(engine, adapters, client, config(**kw))


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(1.0)) as client:
        yield client


# The outbox


async def test_enqueue_is_set_based_and_ignores_a_repeated_key(engine: AsyncEngine, db: Db) -> None:
    first = await enqueue(engine, ["a1", "a2", "a2"])
    assert first[1] == first[2]
    again = await enqueue(engine, ["a2", "a3"])
    assert again[0] == first[1]
    assert await db.scalar("SELECT count(*) FROM delivery") == 3
    row = (
        await db.rows(
            "SELECT destination, idempotency_key, status, attempts, payload FROM delivery "
            "WHERE idempotency_key = 'crm:a1'"
        )
    )[0]
    assert (row.destination, row.idempotency_key, row.status, row.attempts) == ("crm", "crm:a1", "pending", 0)
    payload = row.payload if isinstance(row.payload, dict) else json.loads(row.payload)
    assert payload["email"] == "lead0@acme.io"
    assert payload["stage"] == "mql"


async def test_enqueue_inside_a_rolled_back_transaction_leaves_nothing(engine: AsyncEngine, db: Db) -> None:
    async with engine.connect() as conn:
        transaction = await conn.begin()
        await enqueue_deliveries(conn, [handoff_item(handoff(1), "crm", handoff_key="rb")], now=dt.datetime.now(dt.UTC))
        await transaction.rollback()
    assert await db.scalar("SELECT count(*) FROM delivery") == 0


async def test_concurrent_claims_take_disjoint_rows(engine: AsyncEngine) -> None:
    await enqueue(engine, [f"c{i}" for i in range(10)])
    now = dt.datetime.now(dt.UTC)
    lease = dt.timedelta(seconds=30)
    if engine.dialect.name == "postgresql":
        # Both transactions open at once: the second skips the rows the first holds.
        async with engine.connect() as one, engine.connect() as two, one.begin(), two.begin():
            first = await repo.claim_due(one, destinations=["crm"], limit=6, worker="w1", now=now, lease=lease)
            second = await repo.claim_due(two, destinations=["crm"], limit=6, worker="w2", now=now, lease=lease)
    else:
        async with write_transaction(engine) as conn:
            first = await repo.claim_due(conn, destinations=["crm"], limit=6, worker="w1", now=now, lease=lease)
        async with write_transaction(engine) as conn:
            second = await repo.claim_due(conn, destinations=["crm"], limit=6, worker="w2", now=now, lease=lease)
    assert len(first) == 6
    assert len(second) == 4
    assert not {c.id for c in first} & {c.id for c in second}
    assert {c.attempt for c in first + second} == {1}


async def test_a_delivery_is_recorded_once_even_when_its_lease_ran_out_and_two_workers_sent_it(
    engine: AsyncEngine, db: Db
) -> None:
    [delivery_id] = await enqueue(engine, ["lease-1"])
    t0 = dt.datetime.now(dt.UTC)
    lease = dt.timedelta(seconds=5)

    async def claim(worker: str, at: dt.datetime) -> list[repo.Claimed]:
        async with write_transaction(engine) as conn:
            return await repo.claim_due(conn, destinations=["crm"], limit=10, worker=worker, now=at, lease=lease)

    async def record(claimed: repo.Claimed, worker: str, at: dt.datetime) -> set[uuid.UUID]:
        outcome = repo.Outcome(
            claimed=claimed,
            status="delivered",
            worker=worker,
            started_at=at,
            duration_ms=3.0,
            status_code=200,
            error=None,
            response_excerpt="{}",
        )
        async with write_transaction(engine) as conn:
            return await repo.record_outcomes(conn, [outcome], now=at)

    [slow] = await claim("slow-worker", t0)
    assert await claim("other", t0 + dt.timedelta(seconds=4)) == []  # the lease holds
    [retaken] = await claim("other", t0 + dt.timedelta(seconds=6))  # ...until it runs out
    assert retaken.attempt == 2
    assert await record(retaken, "other", t0 + dt.timedelta(seconds=7)) == {(delivery_id, retaken.claim_token)}
    assert await record(slow, "slow-worker", t0 + dt.timedelta(seconds=8)) == set()  # stale claim
    assert await record(retaken, "other", t0 + dt.timedelta(seconds=9)) == set()  # already done
    rows = await db.rows("SELECT outcome, worker FROM delivery_attempt ORDER BY started_at")
    assert [(r.outcome, r.worker) for r in rows] == [
        ("delivered", "other"),
        ("stale", "slow-worker"),
        ("stale", "other"),
    ]
    row = (await db.rows("SELECT status, delivered_at, claim_token FROM delivery"))[0]
    assert row.status == "delivered"
    assert row.claim_token is None
    assert await claim("late", t0 + dt.timedelta(hours=1)) == []


# The worker against the peer


async def test_worker_delivers_each_row_once_and_records_every_attempt(
    engine: AsyncEngine, db: Db, peer: CrmPeer, http: httpx.AsyncClient
) -> None:
    keys = [f"w-{uuid.uuid4().hex[:8]}-{i}" for i in range(40)]
    ids = await enqueue(engine, keys)
    peer.control("script", {"steps": [{"action": "status", "status": 500, "times": 3}, {"action": "drop"}]})
    w = worker(engine, http, destination_list(peer.url))
    w.start()
    try:
        await wait_for(lambda: all_settled(db, {"delivered": 40}))
    finally:
        await w.stop()
    seen = [r for r in peer.requests() if r["key"] in {f"crm:{k}" for k in keys}]
    assert {r["key"] for r in seen if r["answer"] == 200} == {f"crm:{k}" for k in keys}
    assert await db.scalar("SELECT count(*) FROM delivery_attempt WHERE outcome = 'delivered'") == 40
    assert await db.scalar("SELECT count(*) FROM delivery_attempt WHERE outcome = 'retry'") == 4
    assert await db.scalar("SELECT count(DISTINCT delivery_id) FROM delivery_attempt WHERE outcome = 'delivered'") == 40
    assert await db.scalar("SELECT count(*) FROM delivery WHERE delivered_at IS NULL OR claim_token IS NOT NULL") == 0
    assert len(ids) == 40


async def test_a_429_waits_for_its_retry_after(
    engine: AsyncEngine, db: Db, peer: CrmPeer, http: httpx.AsyncClient
) -> None:
    [_] = await enqueue(engine, [f"ra-{uuid.uuid4().hex[:8]}"])
    peer.control("script", {"steps": [{"action": "status", "status": 429, "retry_after": "1"}]})
    w = worker(engine, http, destination_list(peer.url))
    w.start()
    try:
        await wait_for(lambda: all_settled(db, {"delivered": 1}))
    finally:
        await w.stop()
    attempts = await db.rows("SELECT outcome, status_code, started_at FROM delivery_attempt ORDER BY started_at")
    assert [(a.outcome, a.status_code) for a in attempts] == [("retry", 429), ("delivered", 200)]
    started = [
        a.started_at if isinstance(a.started_at, dt.datetime) else dt.datetime.fromisoformat(a.started_at)
        for a in attempts
    ]
    assert (started[1] - started[0]).total_seconds() >= 1.0


async def test_rejections_become_dead_letters_and_replay_delivers_them(
    engine: AsyncEngine, db: Db, peer: CrmPeer, http: httpx.AsyncClient, app_client: tuple[httpx.AsyncClient, str]
) -> None:
    marker = f"reject-{uuid.uuid4().hex[:8]}"
    await enqueue(engine, [f"{marker}-{i}" for i in range(3)], traits={"tag": marker})
    await enqueue(engine, [f"fine-{uuid.uuid4().hex[:8]}"])
    peer.control("reject", {"contains": marker, "status": 422})
    w = worker(engine, http, destination_list(peer.url))
    w.start()
    try:
        await wait_for(lambda: all_settled(db, {"dead": 3, "delivered": 1}))
        dead = await db.rows("SELECT attempts, last_status_code, last_error FROM delivery WHERE status = 'dead'")
        assert {(r.attempts, r.last_status_code) for r in dead} == {(1, 422)}
        peer.control("reject", method="DELETE")
        client, ops = app_client
        replayed = await client.post("/v1/deliveries/replay", json={"status_code": 422}, headers=ops_headers(ops))
        assert replayed.status_code == 200, replayed.text
        assert replayed.json() == {"replayed": 3}
        w.wake()
        await wait_for(lambda: all_settled(db, {"delivered": 4}))
    finally:
        await w.stop()
    history = await db.rows(
        "SELECT d.replays, a.outcome FROM delivery d JOIN delivery_attempt a ON a.delivery_id = d.id "
        "WHERE d.replays > 0 ORDER BY d.id, a.started_at"
    )
    assert [(r.replays, r.outcome) for r in history] == [(1, "dead"), (1, "delivered")] * 3


async def test_exhausted_attempts_are_dead_letters(
    engine: AsyncEngine, db: Db, peer: CrmPeer, http: httpx.AsyncClient
) -> None:
    await enqueue(engine, [f"ex-{uuid.uuid4().hex[:8]}"])
    peer.control("script", {"steps": [{"action": "status", "status": 503, "times": 10}]})
    w = worker(engine, http, destination_list(peer.url))
    w.start()
    try:
        await wait_for(lambda: all_settled(db, {"dead": 1}))
    finally:
        await w.stop()
    outcomes = [r.outcome for r in await db.rows("SELECT outcome FROM delivery_attempt ORDER BY started_at")]
    assert outcomes == ["retry"] * 4 + ["dead"]


async def test_an_open_circuit_stops_sending_and_leaves_rows_pending(
    engine: AsyncEngine, db: Db, http: httpx.AsyncClient
) -> None:
    await enqueue(engine, [f"down-{i}" for i in range(20)])
    down = destination_list(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    w = worker(engine, http, down, concurrency=1, circuit_failures=3)
    w.start()
    try:
        await wait_for(lambda: _breaker_open(w))
        # Attempts are recorded in batches, a moment after they are made: wait for the three.
        await wait_for(lambda: _at_least(db, "SELECT count(*) FROM delivery_attempt", 3))
        await asyncio.sleep(0.3)  # many polls: none may send while the circuit is open
        assert await db.scalar("SELECT count(*) FROM delivery_attempt") == 3
    finally:
        await w.stop()
    assert await statuses(db) == {"pending": 20}


async def _breaker_open(w: DeliveryWorker) -> bool:
    return w.breakers["crm"].state == "open"


async def test_stopping_gives_back_claimed_rows_it_did_not_send(
    engine: AsyncEngine, db: Db, peer: CrmPeer, http: httpx.AsyncClient
) -> None:
    await enqueue(engine, [f"stop-{uuid.uuid4().hex[:8]}-{i}" for i in range(30)])
    peer.control("script", {"steps": [{"action": "slow", "seconds": 0.3, "times": 30}]})
    w = worker(engine, http, destination_list(peer.url), concurrency=2)
    w.start()
    try:
        # Two rows being sent and at least one more claimed, waiting for a sender.
        await wait_for(lambda: _at_least(db, "SELECT count(*) FROM delivery WHERE status = 'in_flight'", 3))
    finally:
        await w.stop()
    counts = await statuses(db)
    assert counts.get("in_flight", 0) == 0
    assert counts.get("delivered", 0) + counts["pending"] == 30
    assert await db.scalar("SELECT count(*) FROM delivery WHERE status = 'pending' AND attempts <> 0") == 0
    assert await db.scalar("SELECT count(*) FROM delivery WHERE claimed_by IS NOT NULL") == 0


async def _at_least(db: Db, sql: str, expected: int) -> bool:
    return bool(await db.scalar(sql) >= expected)


async def listeners(db: Db) -> set[int]:
    """The backends of this database listening for new deliveries (PostgreSQL)."""
    rows = await db.rows(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND state = 'idle' "
        "AND query LIKE 'LISTEN %'"
    )
    return {r.pid for r in rows}


async def test_a_commit_that_enqueues_wakes_an_idle_worker_on_postgresql(
    engine: AsyncEngine, db: Db, peer: CrmPeer, http: httpx.AsyncClient
) -> None:
    """On PostgreSQL the enqueuing transaction notifies the workers at commit: with a poll interval
    of a minute, a delivery committed while the worker idles is sent at once, and again once the
    listening connection was cut and the worker listened anew. SQLite has nothing to listen to (the
    worker and the service share one process there): the next poll takes it."""
    postgres = engine.dialect.name == "postgresql"
    w = worker(engine, http, destination_list(peer.url), poll_s=60.0 if postgres else 0.1)
    keys = [f"wake-{uuid.uuid4().hex[:8]}-{i}" for i in range(2)]
    w.start()
    try:
        if postgres:
            await wait_for(lambda: _listening(db, excluding=set()))
        await asyncio.sleep(0.2)  # past the worker's first claim, into its wait
        await enqueue(engine, keys[:1])
        await wait_for(lambda: all_settled(db, {"delivered": 1}))
        if postgres:
            # The listening connection goes (a database restart, a proxy's idle timeout).
            [first] = await listeners(db)
            assert await db.scalar("SELECT pg_terminate_backend(:pid)", pid=first)
            await wait_for(lambda: _listening(db, excluding={first}))
        await enqueue(engine, keys[1:])
        await wait_for(lambda: all_settled(db, {"delivered": 2}))
    finally:
        await w.stop()
    assert {r["key"] for r in peer.requests() if r["answer"] == 200} >= {f"crm:{k}" for k in keys}
    if postgres:
        assert await listeners(db) == set()  # stopping stops listening


async def _listening(db: Db, *, excluding: set[int]) -> bool:
    return bool(await listeners(db) - excluding)


# The app: routes, in-process worker, metrics


def ops_headers(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def app_client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """The app without a delivery worker of its own, and an ops key."""
    application = create_app(settings.model_copy(update={"delivery_in_process": False}))
    async with application.router.lifespan_context(application):
        ops = await create_key(application.state.services.engine, name="ops", role="ops", now=dt.datetime.now(dt.UTC))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url="http://test") as c:
            yield c, ops.key


async def test_delivery_routes_list_read_and_replay(
    engine: AsyncEngine, db: Db, app_client: tuple[httpx.AsyncClient, str]
) -> None:
    client, ops = app_client
    ids = await enqueue(engine, [f"r{i}" for i in range(5)])
    async with write_transaction(engine) as conn:
        await conn.execute(
            sa.text(
                "UPDATE delivery SET status = 'dead', last_status_code = 400 "
                "WHERE idempotency_key IN ('crm:r0', 'crm:r1')"
            )
        )
    page = (await client.get("/v1/deliveries", params={"limit": 2}, headers=ops_headers(ops))).json()
    assert len(page["items"]) == 2
    rest = (
        await client.get(
            "/v1/deliveries", params={"limit": 10, "cursor": page["next_cursor"]}, headers=ops_headers(ops)
        )
    ).json()
    assert rest["next_cursor"] is None
    assert {i["id"] for i in page["items"] + rest["items"]} == {str(i) for i in ids}
    dead = (
        await client.get("/v1/deliveries", params={"status": "dead", "destination": "crm"}, headers=ops_headers(ops))
    ).json()
    assert {i["idempotency_key"] for i in dead["items"]} == {"crm:r0", "crm:r1"}
    detail = (await client.get(f"/v1/deliveries/{ids[0]}", headers=ops_headers(ops))).json()
    assert detail["payload"]["email"] == "lead0@acme.io"
    assert detail["attempt_history"] == []
    replay = await client.post(f"/v1/deliveries/{ids[0]}/replay", headers=ops_headers(ops))
    assert replay.json() == {"id": str(ids[0]), "status": "pending"}
    again = await client.post(f"/v1/deliveries/{ids[0]}/replay", headers=ops_headers(ops))
    assert (again.status_code, again.json()["error"]) == (409, "DeliveryNotReplayable")
    missing = await client.get(f"/v1/deliveries/{uuid.uuid4()}", headers=ops_headers(ops))
    assert (missing.status_code, missing.json()["error"]) == (404, "DeliveryNotFound")
    bad = await client.get("/v1/deliveries", params={"cursor": "nonsense"}, headers=ops_headers(ops))
    assert (bad.status_code, bad.json()["error"]) == (422, "InvalidCursor")
    bad_status = await client.get("/v1/deliveries", params={"status": "lost"}, headers=ops_headers(ops))
    assert bad_status.status_code == 422
    row = (await db.rows("SELECT status, replays, attempts FROM delivery WHERE idempotency_key = 'crm:r0'"))[0]
    assert (row.status, row.replays, row.attempts) == ("pending", 1, 0)


async def test_readers_read_and_only_ops_replay(engine: AsyncEngine, app_client: tuple[httpx.AsyncClient, str]) -> None:
    client, _ = app_client
    [delivery_id] = await enqueue(engine, ["auth"])
    viewer = await create_key(engine, name="v", role="viewer", now=dt.datetime.now(dt.UTC))
    assert (await client.get("/v1/deliveries", headers=ops_headers(viewer.key))).status_code == 200
    assert (await client.get(f"/v1/deliveries/{delivery_id}", headers=ops_headers(viewer.key))).status_code == 200
    assert (
        await client.post(f"/v1/deliveries/{delivery_id}/replay", headers=ops_headers(viewer.key))
    ).status_code == 403
    assert (await client.post("/v1/deliveries/replay", json={}, headers=ops_headers(viewer.key))).status_code == 403
    assert (await client.get("/v1/deliveries")).status_code == 401


async def test_metrics_report_the_outbox(engine: AsyncEngine, app_client: tuple[httpx.AsyncClient, str]) -> None:
    client, _ = app_client
    await enqueue(engine, [f"m{i}" for i in range(3)], destination="metrics-dest")
    async with write_transaction(engine) as conn:
        await conn.execute(sa.text("UPDATE delivery SET status = 'dead' WHERE idempotency_key = 'metrics-dest:m0'"))
    text = (await client.get("/metrics")).text
    assert 'leadscore_outbox_pending{destination="metrics-dest"} 2.0' in text
    assert 'leadscore_dead_letters{destination="metrics-dest"} 1.0' in text
    assert 'leadscore_outbox_oldest_pending_age_seconds{destination="metrics-dest"}' in text


async def test_the_app_runs_a_delivery_worker_on_sqlite_by_default(
    settings: Settings, engine: AsyncEngine, db: Db, peer: CrmPeer
) -> None:
    configured = settings.model_copy(update={"delivery_destinations": json.dumps(destination_list(peer.url))})
    application: FastAPI = create_app(configured)
    async with application.router.lifespan_context(application):
        services = application.state.services
        if engine.dialect.name == "postgresql":
            assert services.delivery is None  # PostgreSQL runs `leadscore worker` processes
            return
        assert services.destinations == ("crm",)
        key = f"app-{uuid.uuid4().hex[:8]}"
        await enqueue(engine, [key])
        services.delivery.wake()
        await wait_for(lambda: all_settled(db, {"delivered": 1}))
    assert any(r["key"] == f"crm:{key}" and r["answer"] == 200 for r in peer.requests())
