"""CPU per event of one group-commit batch, in the client and in PostgreSQL, by statement.

`bench_ingest.py` measures the whole service under load, where every cost is mixed with the HTTP
server's, wrk's and the other worker's. This script runs the ingest writer's own transaction
(`service.ingest.write_batch`, on the writer's connection, as `IngestWriter` runs it) in one
process, batch after batch of the same events `bench_ingest.py` sends, and reads two clocks: this
process's CPU time and the CPU time of its PostgreSQL backend (from /proc, so PostgreSQL must run on
this machine). With `--by-statement` each repository call is timed the same way (a little overhead
is added to the client figures).

    .venv/bin/python bench/bench_ingest_batch.py [--batch 16] [--batches 300] [--runs 5] [--no-score] [--by-statement]

Needs PostgreSQL (LEADSCORE_BENCH_DATABASE_URL, default the local `test` server); it creates and
drops its own database. Before measuring it gives each of the 20,000 people a lead.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import datetime as dt
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from sqlalchemy.engine import make_url

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_ingest import DEFAULT_PG, make_event, pg_admin, set_active, train_demo  # noqa: E402

BIN = Path(sys.executable).parent
TICKS = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process on this machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Clocks:
    """Client and backend CPU per repository call, when asked for."""

    def __init__(self, backend: int) -> None:
        self.backend = backend
        self.spent: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])

    def wrap(self, module: Any, name: str) -> None:
        original: Callable[..., Awaitable[Any]] = getattr(module, name)

        @functools.wraps(original)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            client, server = time.process_time(), backend_cpu(self.backend)
            try:
                return await original(*args, **kwargs)
            finally:
                entry = self.spent[name]
                entry[0] += 1
                entry[1] += time.process_time() - client
                entry[2] += backend_cpu(self.backend) - server

        setattr(module, name, timed)

    def report(self, events: int) -> None:
        for name, (calls, client, server) in sorted(self.spent.items(), key=lambda kv: -kv[1][1] - kv[1][2]):
            print(
                f"    {name:24s} {calls:5.0f} calls  client {client / events * 1e6:6.1f} us/event  "
                f"PostgreSQL {server / events * 1e6:6.1f} us/event"
            )
        self.spent.clear()


async def measure(db_url: str, args: argparse.Namespace) -> None:
    os.environ["LEADSCORE_DATABASE_URL"] = db_url
    from service.db import create_engine
    from service.ingest import IngestJob, _writer_connection, event_keys, write_batch
    from service.pipelines import PipelineRegistry
    from service.repositories import enrichment, pipelines
    from service.repositories import ingest as ingest_repo
    from service.webhooks.standard import parse_events

    plain = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    admin = await asyncpg.connect(plain)
    try:
        source_id = await admin.fetchval("SELECT id FROM source WHERE name = 'bench'")
    finally:
        await admin.close()
    engine = create_engine(db_url)
    current = await PipelineRegistry(engine, refresh_seconds=60).refresh()
    conn = await _writer_connection(engine)
    raw: Any = (await conn.get_raw_connection()).driver_connection
    backend = await raw.fetchval("SELECT pg_backend_pid()")
    clocks = Clocks(backend)
    if args.by_statement:
        for name in ("lock_names", "find_events_and_leads", "lock_leads", "write_rows", "record_merges"):
            clocks.wrap(ingest_repo, name)
        clocks.wrap(pipelines, "lead_activities")
        clocks.wrap(enrichment, "request_fetches")

    def jobs(first: int, count: int) -> list[IngestJob]:
        made = []
        for i in range(first, first + count):
            body = json.dumps(make_event(i), separators=(",", ":")).encode()
            events = parse_events(body, max_events=100)
            made.append(
                IngestJob(
                    source_id=source_id,
                    webhook_id=f"msg_{i}",
                    content_type="application/json",
                    body=body,
                    events=events,
                    event_keys=event_keys(events, f"msg_{i}"),
                    received_at=dt.datetime.now(dt.UTC),
                )
            )
        return made

    async def write(batch: list[IngestJob]) -> None:
        # As `IngestWriter` does: the batch's first statement begins the transaction on the driver.
        await write_batch(conn, batch, dt.datetime.now(dt.UTC), pipelines=current)
        if raw.is_in_transaction():
            await raw.execute("COMMIT")

    try:
        for start in range(0, 20_000, 100):
            await write(jobs(start, 100))
        clocks.spent.clear()
        figures: list[tuple[float, float, float]] = []
        first = 1_000_000
        for run in range(args.runs):
            batches = [jobs(first + (run * args.batches + b) * args.batch, args.batch) for b in range(args.batches)]
            client, server, wall = time.process_time(), backend_cpu(backend), time.perf_counter()
            for batch in batches:
                await write(batch)
            events = args.batch * args.batches
            figures.append(
                (
                    (time.process_time() - client) / events * 1e6,
                    (backend_cpu(backend) - server) / events * 1e6,
                    (time.perf_counter() - wall) / events * 1e6,
                )
            )
            print(
                f"run {run + 1}: client {figures[-1][0]:5.0f} us/event  PostgreSQL {figures[-1][1]:5.0f} us/event  "
                f"wall {figures[-1][2]:5.0f} us/event",
                flush=True,
            )
            if args.by_statement:
                clocks.report(events)
        client_us, server_us, wall_us = (statistics.median(f[i] for f in figures) for i in range(3))
        spread = [f"{min(f[i] for f in figures):.0f}-{max(f[i] for f in figures):.0f}" for i in range(3)]
        print(
            f"\nmedian of {args.runs} runs, batches of {args.batch} events, {'with' if current.active else 'no'} "
            f"pipeline: client {client_us:.0f} us/event ({spread[0]}), PostgreSQL {server_us:.0f} us/event "
            f"({spread[1]}), wall {wall_us:.0f} us/event ({spread[2]})"
        )
    finally:
        with contextlib.suppress(Exception):
            await conn.close()
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="events per batch (under load most carry 10-20)")
    parser.add_argument("--batches", type=int, default=300, help="batches per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-score", action="store_true", help="no pipeline active: ingest only")
    parser.add_argument("--by-statement", action="store_true", help="also time each repository call")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    base = os.environ.get("LEADSCORE_BENCH_DATABASE_URL", DEFAULT_PG)
    db_name = f"leadscore_bench_batch_{os.getpid()}"
    asyncio.run(pg_admin(base, f'CREATE DATABASE "{db_name}"'))
    db_url = make_url(base).set(database=db_name).render_as_string(hide_password=False)
    env = os.environ | {"LEADSCORE_DATABASE_URL": db_url, "LEADSCORE_LOG_LEVEL": "WARNING"}
    try:
        subprocess.run([BIN / "leadscore", "migrate"], env=env, check=True, capture_output=True)
        subprocess.run([BIN / "leadscore", "sources", "add", "bench"], env=env, check=True, capture_output=True)
        if not args.no_score:
            train_demo(env)
            asyncio.run(set_active(db_url, 1))
        # On uvloop, as `leadscore serve` runs (uvicorn picks it): on asyncio's own loop a bare round
        # trip to PostgreSQL cost the client 88 us of CPU instead of 52 (measured here).
        uvloop.run(measure(db_url, args))
    finally:
        asyncio.run(pg_admin(base, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
