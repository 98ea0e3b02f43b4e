"""Delivery throughput: handoffs/s from the outbox to a local CRM peer that answers at once.

Starts `--workers` `leadscore worker` processes (idle), then enqueues `--handoffs` deliveries in
one transaction and measures the time from that commit until every row is recorded as delivered.
The peer is `tests/peers/crm_peer.py` (uvicorn, `--peer-processes` of it, keeping no log), behind
a signed Standard Webhooks destination. Prints each run, then the median and spread.

    .venv/bin/python bench/bench_delivery.py [--runs 3] [--handoffs 5000] [--workers 2] [--concurrency 16]

Needs PostgreSQL (LEADSCORE_BENCH_DATABASE_URL, default the local `test` server); it creates and
drops its own database. `--sqlite` measures one worker on a SQLite file instead.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import sqlalchemy as sa
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.crm import Handoff  # noqa: E402
from service.db import create_engine, write_transaction  # noqa: E402
from service.delivery import enqueue_deliveries, handoff_item  # noqa: E402
from tests.peers.process import CrmPeer  # noqa: E402

BIN = Path(sys.executable).parent
DEFAULT_PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
SECRET = "whsec_" + base64.b64encode(b"benchmark signing key, 32 bytes!").decode()


async def pg_admin(base: str, sql: str) -> None:
    conn = await asyncpg.connect(make_url(base).set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def run_once(db_url: str, handoffs: int, run: int) -> float:
    engine = create_engine(db_url)
    try:
        items = [
            handoff_item(
                Handoff(lead_id=uuid.uuid4(), email=f"b{run}-{i}@example.com", owner_id="1", stage="mql", score=80.0),
                "crm",
                handoff_key=f"run{run}-{i}",
            )
            for i in range(handoffs)
        ]
        async with write_transaction(engine) as conn:
            await enqueue_deliveries(conn, items, now=dt.datetime.now(dt.UTC))
        started = time.perf_counter()
        deadline = started + 600
        query = sa.text("SELECT count(*) FROM delivery WHERE status = 'delivered' AND idempotency_key LIKE :p")
        while True:
            async with engine.connect() as conn:
                done = (await conn.execute(query, {"p": f"crm:run{run}-%"})).scalar_one()
            if done == handoffs:
                return time.perf_counter() - started
            if time.perf_counter() > deadline:
                raise SystemExit(f"only {done} of {handoffs} delivered after 10 minutes")
            await asyncio.sleep(0.02)
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--handoffs", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--peer-processes", type=int, default=2, help="uvicorn workers of the CRM peer")
    parser.add_argument("--sqlite", action="store_true", help="one worker on a SQLite file instead of PostgreSQL")
    args = parser.parse_args()
    # SIGTERM (kill, a CI timeout) ends the run through its `finally`: the servers it started are
    # stopped and its database dropped, instead of being left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    tmp = Path(tempfile.mkdtemp(prefix="leadscore-bench-delivery-"))
    base = os.environ.get("LEADSCORE_BENCH_DATABASE_URL", DEFAULT_PG)
    db_name = f"leadscore_bench_delivery_{os.getpid()}"
    if args.sqlite:
        db_url = f"sqlite+aiosqlite:///{tmp / 'bench.db'}"
        args.workers = 1
    else:
        asyncio.run(pg_admin(base, f'CREATE DATABASE "{db_name}"'))
        db_url = make_url(base).set(database=db_name).render_as_string(hide_password=False)
    peer = CrmPeer(tmp, processes=args.peer_processes, record=False)
    env = os.environ | {
        "LEADSCORE_DATABASE_URL": db_url,
        "LEADSCORE_LOG_LEVEL": "WARNING",
        "LEADSCORE_DELIVERY_POLL_SECONDS": "0.05",
        "LEADSCORE_DELIVERY_DESTINATIONS": json.dumps(
            [{"name": "crm", "kind": "webhook", "url": f"{peer.url}/hooks/leads", "secret": SECRET}]
        ),
    }
    workers: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run([BIN / "leadscore", "migrate"], env=env, check=True, capture_output=True)
        peer.start()
        for i in range(args.workers):
            log = (tmp / f"worker-{i}.log").open("w")
            workers.append(
                subprocess.Popen(
                    [BIN / "leadscore", "worker", "--concurrency", str(args.concurrency)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        time.sleep(3)  # let the workers start
        rates = []
        for run in range(args.runs):
            seconds = asyncio.run(run_once(db_url, args.handoffs, run))
            rates.append(args.handoffs / seconds)
            print(f"run {run + 1}: {args.handoffs} handoffs in {seconds:.2f} s = {rates[-1]:,.0f}/s")
        backend = "SQLite" if args.sqlite else "PostgreSQL"
        print(
            f"{backend}, {args.workers} worker(s) x {args.concurrency}: median {statistics.median(rates):,.0f} "
            f"handoffs/s (min {min(rates):,.0f}, max {max(rates):,.0f})"
        )
    finally:
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        for proc in workers:
            proc.wait(timeout=30)
        peer.stop()
        if not args.sqlite:
            asyncio.run(pg_admin(base, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
