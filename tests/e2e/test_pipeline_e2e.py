"""The whole path with real processes: signed webhooks into `leadscore serve` (two server processes
on PostgreSQL), scoring, qualification by the active policy, round-robin routing, the outbox, and
`leadscore worker` processes delivering to the CRM peer process while it fails, is down for a while
and a worker is killed with SIGKILL. Every qualified lead reaches the CRM, each delivery is recorded
as delivered exactly once, and the round robin stays exact across the processes."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime as dt
import json
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from standardwebhooks import Webhook

from service.auth import SYSTEM
from service.change_requests import bootstrap_routing
from service.change_schemas import RoutingRulesChange
from service.db import create_engine, write_transaction
from service.repositories import qualification as qualification_repo
from service.settings import Settings
from service.sources import add_source
from tests.conftest import lead_event
from tests.e2e.support import BIN, Database, Workers, wait_until
from tests.peers.process import CrmPeer, free_port
from tests.service.test_scoring_service import GOOD, POOR, register

pytestmark = pytest.mark.e2e

EVENTS = 1000
OWNERS = ["rep-a", "rep-b", "rep-c"]
CRM_SECRET = "whsec_" + base64.b64encode(b"end-to-end pipeline signing key!").decode()
ROUTING = {
    "spec_version": 1,
    "name": "e2e",
    "account_match": {"enabled": False},
    "pools": [{"id": "reps", "strategy": "round_robin", "members": [{"owner": o} for o in OWNERS]}],
    "rules": [{"id": "mql", "when": {"field": "stage", "op": "eq", "value": "mql"}, "target": {"pool": "reps"}}],
    "fallback": {"queue": "nobody"},
}


def set_up(db_url: str, trained: Any) -> str:
    """Pipeline, policy (MQL halfway between the good and the poor profile) and routing active; a
    signed source. Returns the source's secret."""
    settings = Settings(database_url=db_url, _env_file=None)  # type: ignore[call-arg]
    now = dt.datetime.now(dt.UTC)
    good, poor = (trained.compiled.score(trained.profile(t), now=now).value for t in (GOOD, POOR))
    line = {"field": "score", "op": "gte", "value": (good + poor) / 2}

    async def go() -> str:
        await register(settings, trained)
        engine = create_engine(db_url)
        try:
            async with write_transaction(engine) as conn:
                spec = {"name": "e2e", "default": {"mql": line}}
                policy_id = await qualification_repo.insert_policy(
                    conn, name="e2e", spec=spec, change_request_id=None, created_by="test", now=now
                )
                await qualification_repo.set_active_policy(conn, policy_id=policy_id, actor="test", now=now)
            await bootstrap_routing(
                engine,
                RoutingRulesChange(kind="routing_rules", spec=ROUTING),
                principal=SYSTEM,
                reason="first rules",
                now=now,
            )
            return (await add_source(engine, name="map", scheme="standard", now=now)).secret
        finally:
            await engine.dispose()

    return asyncio.run(go())


def send_events(base: str, secret: str) -> list[dict[str, Any]]:
    """EVENTS signed events, every other one a profile that qualifies, 16 in flight at a time."""

    async def go() -> list[dict[str, Any]]:
        signer = Webhook(secret)
        gate = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:

            async def one(i: int) -> dict[str, Any]:
                body = json.dumps(
                    lead_event(id=f"e{i}", email=f"lead{i}@company{i}.io", traits=GOOD if i % 2 else POOR)
                )
                now = dt.datetime.now(dt.UTC)
                headers = {
                    "content-type": "application/json",
                    "webhook-id": f"msg-{i}",
                    "webhook-timestamp": str(int(now.timestamp())),
                    "webhook-signature": signer.sign(f"msg-{i}", now, body),
                }
                async with gate:
                    response = await client.post("/v1/webhooks/map", content=body, headers=headers)
                assert response.status_code == 202, response.text
                answer: dict[str, Any] = response.json()
                return answer

            return await asyncio.gather(*(one(i) for i in range(EVENTS)))

    return asyncio.run(go())


class Server:
    def __init__(self, env: dict[str, str], workdir: Path, workers: int) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "serve.log"
        env = env | {"LEADSCORE_PORT": str(self.port), "LEADSCORE_WORKERS": str(workers)}
        log = self.log_path.open("w")
        self.proc = subprocess.Popen([BIN / "leadscore", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_ready(self) -> None:
        def ready() -> bool:
            try:
                return httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200
            except httpx.TransportError:
                return self.proc.poll() is not None

        wait_until("the server", ready, timeout=120, logs=[self.log_path])
        assert self.proc.poll() is None, self.log_path.read_text()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


async def workers_seen(engine: Any) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(sa.text("SELECT count(DISTINCT worker) FROM delivery_attempt"))).scalar_one())


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    try:
        yield database
    finally:
        database.close()


def test_signed_events_become_exactly_routed_crm_handoffs_through_failures(
    db_url: str, db: Database, tmp_path: Path, trained: Any
) -> None:
    postgres = db_url.startswith("postgresql")
    secret = set_up(db_url, trained)
    peer = CrmPeer(tmp_path)
    peer.start()
    env = os.environ | {
        "LEADSCORE_DATABASE_URL": db_url,
        "LEADSCORE_VAR_DIR": str(tmp_path / "var"),
        "LEADSCORE_SOURCE_CACHE_SECONDS": "0",
        "LEADSCORE_DELIVERY_IN_PROCESS": "false",
        "LEADSCORE_DELIVERY_DESTINATIONS": json.dumps(
            [{"name": "crm", "kind": "webhook", "url": f"{peer.url}/hooks/leads", "secret_env": "CRM_HOOK_SECRET"}]
        ),
        "CRM_HOOK_SECRET": CRM_SECRET,
        "LEADSCORE_DELIVERY_POLL_SECONDS": "0.05",
        "LEADSCORE_DELIVERY_TIMEOUT_SECONDS": "0.5",
        "LEADSCORE_DELIVERY_LEASE_SECONDS": "2",
        "LEADSCORE_DELIVERY_MAX_ATTEMPTS": "60",
        "LEADSCORE_DELIVERY_BACKOFF_BASE_SECONDS": "0.02",
        "LEADSCORE_DELIVERY_BACKOFF_MAX_SECONDS": "0.3",
        "LEADSCORE_DELIVERY_RETRY_AFTER_MAX_SECONDS": "2",
        "LEADSCORE_DELIVERY_CIRCUIT_FAILURES": "8",
        "LEADSCORE_DELIVERY_CIRCUIT_OPEN_SECONDS": "0.5",
        "LEADSCORE_LOG_LEVEL": "WARNING",
    }
    server = Server(env, tmp_path, workers=2 if postgres else 1)
    workers = Workers(env, tmp_path)
    try:
        server.wait_ready()
        peer.control(
            "chaos",
            {
                "requests": 150,
                "weights": {"ok": 5, "500": 1, "503": 1, "429": 1, "slow": 1, "drop": 1},
                "retry_after": "1",
                "slow_seconds": 1.0,
                "seed": 11,
            },
        )
        for _ in range(2 if postgres else 1):
            workers.start()
        # The events go in while deliveries are under way: a worker is killed in the middle of them.
        sending = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        sent = sending.submit(send_events, server.base, secret)
        logs = [server.log_path, peer.out_path, *workers.logs]
        wait_until("deliveries under way", lambda: peer.count() >= 60 or sent.done(), timeout=180, logs=logs)
        workers.procs[0].send_signal(signal.SIGKILL)
        assert workers.procs[0].wait(timeout=10) == -signal.SIGKILL
        workers.start()
        peer.stop()  # the CRM is down for a while
        time.sleep(1.5)
        peer.start()
        answers = sent.result(timeout=300)
        sending.shutdown()

        qualified = {a["lead_id"] for a in answers if a["stage"] == "mql"}
        assert len(qualified) == EVENTS // 2
        assert all(a["stage"] == "lead" for a in answers if a["lead_id"] not in qualified)
        logs = [server.log_path, peer.out_path, *workers.logs]
        wait_until(
            "every handoff delivered",
            lambda: db.counts() == {"delivered": len(qualified)},
            timeout=240,
            logs=logs,
        )
        # The killed worker had delivered, and another process finished its work. (Which of the others
        # did is up to the race for rows: on PostgreSQL the second worker may take them all.)
        assert db.run(workers_seen) >= 2
    finally:
        codes = workers.stop_all()
        server.stop()
        peer.stop()
    assert codes[1:] == [0] * (len(codes) - 1)  # the workers still running stop cleanly on SIGTERM

    async def stored(engine: Any) -> dict[str, Any]:
        async with engine.connect() as conn:

            async def rows(sql: str) -> list[Any]:
                return list(await conn.execute(sa.text(sql)))

            return {
                "assignments": await rows("SELECT lead_id, owner_id FROM assignment"),
                "mql": await rows("SELECT id FROM lead WHERE stage = 'mql'"),
                "transitions": await rows("SELECT id, lead_id FROM stage_transition WHERE to_stage = 'mql'"),
                "deliveries": await rows("SELECT idempotency_key, lead_id FROM delivery"),
                "delivered_attempts": await rows(
                    "SELECT delivery_id, count(*) AS n FROM delivery_attempt WHERE outcome = 'delivered' "
                    "GROUP BY delivery_id"
                ),
            }

    found = db.run(stored)

    def ids(values: list[Any]) -> set[str]:
        return {str(uuid.UUID(str(v))) for v in values}

    # Each qualified lead: one stage change, one assignment, one delivery, recorded delivered once.
    assert ids([r.id for r in found["mql"]]) == qualified
    assert ids([r.lead_id for r in found["assignments"]]) == qualified
    assert len(found["assignments"]) == len(qualified)
    assert sorted(r.n for r in found["delivered_attempts"]) == [1] * len(qualified)
    keys = {f"crm:{uuid.UUID(str(r.id))}" for r in found["transitions"]}
    assert {r.idempotency_key for r in found["deliveries"]} == keys

    # Exact round robin over the three reps, whatever the number of server processes.
    shares = Counter(r.owner_id for r in found["assignments"])
    assert set(shares) == set(OWNERS)
    assert max(shares.values()) - min(shares.values()) <= 1

    # The CRM saw every key answered with success at least once, after failures of every kind, with
    # the owner routing chose for that lead.
    owner_of = {str(uuid.UUID(str(r.lead_id))): r.owner_id for r in found["assignments"]}
    seen = peer.requests()
    succeeded = [r for r in seen if r["answer"] == 200]
    assert {r["key"] for r in succeeded} == keys
    for request in succeeded:
        body = json.loads(request["body"])
        assert body["data"]["owner_id"] == owner_of[body["data"]["lead_id"]]
    failures = Counter(str(r["answer"]) for r in seen)
    for failure in ("500", "503", "429", "slow", "drop"):
        assert failures[failure] > 0, failures
