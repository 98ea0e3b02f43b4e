"""The whole path with real processes: signed webhooks into `leadscore serve` (two server processes
on PostgreSQL), scoring, qualification by the active policy, round-robin routing, the outbox, and
`leadscore worker` processes delivering to the CRM peer process while it fails, is down for a while
and a worker is killed with SIGKILL. Every qualified lead reaches the CRM, each delivery is recorded
as delivered exactly once, and the round robin stays exact across the processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import signal
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

from tests.conftest import lead_event
from tests.e2e.support import OWNERS, Database, Server, Workers, delivery_env, set_up, signed_headers, wait_until
from tests.peers.process import CrmPeer
from tests.service.test_scoring_service import GOOD, POOR

pytestmark = pytest.mark.e2e

EVENTS = 1000


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
                headers = signed_headers(signer, f"msg-{i}", body)
                async with gate:
                    response = await client.post("/v1/webhooks/map", content=body, headers=headers)
                assert response.status_code == 202, response.text
                answer: dict[str, Any] = response.json()
                return answer

            return await asyncio.gather(*(one(i) for i in range(EVENTS)))

    return asyncio.run(go())


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
    env = delivery_env(db_url, tmp_path, peer.url) | {
        "LEADSCORE_DELIVERY_POLL_SECONDS": "0.05",
        "LEADSCORE_DELIVERY_TIMEOUT_SECONDS": "0.5",
        "LEADSCORE_DELIVERY_LEASE_SECONDS": "2",
        "LEADSCORE_DELIVERY_MAX_ATTEMPTS": "60",
        "LEADSCORE_DELIVERY_BACKOFF_BASE_SECONDS": "0.02",
        "LEADSCORE_DELIVERY_BACKOFF_MAX_SECONDS": "0.3",
        "LEADSCORE_DELIVERY_RETRY_AFTER_MAX_SECONDS": "2",
        "LEADSCORE_DELIVERY_CIRCUIT_FAILURES": "8",
        "LEADSCORE_DELIVERY_CIRCUIT_OPEN_SECONDS": "0.5",
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
        # The worker to kill must have delivered some: on a loaded machine it can still be starting
        # while the other takes the first rows.
        wait_until(
            "deliveries under way, the first worker's among them",
            lambda: (peer.count() >= 60 or sent.done()) and db.attempts_by(workers.procs[0]) > 0,
            timeout=180,
            logs=logs,
        )
        workers.procs[0].send_signal(signal.SIGKILL)
        assert workers.procs[0].wait(timeout=10) == -signal.SIGKILL
        replacement = workers.start(log_level="INFO")
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
        # The replacement can still be starting (importing the CLI takes seconds on a busy machine)
        # when the others have delivered everything: the stop below is for running workers, which
        # finish what they have in flight. (A worker stopped while starting: test_worker_signals.)
        workers.wait_started(replacement)
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
