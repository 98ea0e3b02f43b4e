"""Ingest load benchmark: durable webhook ingest against the framework's ceiling, on PostgreSQL.

For each worker count (1 and 2) and each run, in the same session:
- `ceiling`: a bare FastAPI route validating the same body (bench/ceiling_app.py), storing nothing;
- `ingest`: `leadscore serve` verifying the Standard Webhooks signature, deduplicating, resolving
  the lead and committing (group commit) before it answers 202.
Load: wrk on this machine, 64 connections, ~1 KB signed lead events, each with a unique id.
Prints events/s and p50/p99 latency per run, then medians, spread and the ingest/ceiling ratio.

    .venv/bin/python bench/bench_ingest.py [--runs 3] [--duration 10] [--workers 1 2]

Needs wrk (Debian package `wrk`) and PostgreSQL (LEADSCORE_BENCH_DATABASE_URL, default the local
`test` server); it creates and drops its own database.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
from sqlalchemy.engine import make_url
from standardwebhooks import Webhook

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEFAULT_PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


OCCUPATIONS = ["Working Professional", "Unemployed", "Student", "Select", "Businessman"]
ORIGINS = ["Landing Page Submission", "API", "Lead Add Form", "Lead Import"]


def make_event(i: int) -> dict[str, object]:
    """A ~1 KB lead event of a person out of 20,000 (so some events hit existing leads), with the
    traits the demo pipeline scores (X Education's form fields); every 4th is a page view."""
    person = i % 20_000
    subject = {"email": f"person{person}@example.com", "external_ids": {"hubspot": str(100000 + person)}}
    now = dt.datetime.now(dt.UTC).isoformat()
    if i % 4 == 3:
        return {
            "id": f"bench-{uuid.uuid4().hex}",
            "type": "lead.activity",
            "name": "Page Viewed",
            "occurred_at": now,
            "subject": subject,
            "properties": {
                "url": "/pricing" if i % 8 == 3 else "/blog/how-to-upskill",
                "seconds": i % 300,
                "referrer": "https://www.google.com/",
                "title": "x" * 500,
            },
        }
    return {
        "id": f"bench-{uuid.uuid4().hex}",
        "type": "lead.updated" if i % 3 else "lead.identified",
        "occurred_at": now,
        "subject": subject,
        "traits": {
            "Lead Origin": ORIGINS[i % len(ORIGINS)],
            "Lead Source": "Google",
            "Do Not Email": "No",
            "Do Not Call": "No",
            "TotalVisits": str(i % 17),
            "Total Time Spent on Website": str((i * 37) % 2000),
            "Page Views Per Visit": "2.5",
            "Country": "India",
            "Specialization": "Operations Management",
            "What is your current occupation": OCCUPATIONS[i % len(OCCUPATIONS)],
            "What matters most to you in choosing a course": "Better Career Prospects",
            "City": "Mumbai",
            "A free copy of Mastering The Interview": "No",
            "first_name": "Ana",
            "company": "Acme Learning Ltd",
            "utm_campaign": "winter-2026-upskilling",
            "notes": "x" * 240,
        },
    }


def write_requests(path: Path, secret: str, count: int) -> int:
    wh = Webhook(secret)
    now = dt.datetime.now(dt.UTC)
    size = 0
    with path.open("w") as f:
        for i in range(count):
            body = json.dumps(make_event(i), separators=(",", ":"))
            size += len(body)
            msg_id = f"msg_{uuid.uuid4().hex}"
            f.write(f"{msg_id}\t{int(now.timestamp())}\t{wh.sign(msg_id, now, body)}\t{body}\n")
    return size // count


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} not ready")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def run_wrk(url: str, requests_file: Path, duration: int, connections: int = 64) -> dict[str, float]:
    threads = 2
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration}s",
            "--timeout",
            "10s",
            "-s",
            str(ROOT / "bench" / "wrk_requests.lua"),
            url,
            "--",
            str(requests_file),
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"RESULT requests=(\d+) duration_us=(\d+) p50_us=(\d+) p99_us=(\d+) errors=(\d+)", out)
    if not m:
        raise RuntimeError(out)
    requests, duration_us, p50, p99, errors = (int(x) for x in m.groups())
    return {
        "rps": requests / (duration_us / 1e6),
        "p50_ms": p50 / 1000,
        "p99_ms": p99 / 1000,
        "errors": errors,
        "requests": requests,
    }


def train_demo(env: dict[str, str]) -> None:
    """Train the X Education demo pipeline into the database of `env` (version 1 of a new one)."""
    subprocess.run(
        [
            BIN / "leadscore",
            "train",
            "--spec",
            ROOT / "pipelines" / "x-education.yaml",
            "--data",
            ROOT.parent / "shared" / "data" / "x-education" / "leads_train.csv",
            "--label",
            "Converted",
        ],
        env=env,
        check=True,
        capture_output=True,
    )


async def pg_admin(base: str, sql: str) -> None:
    u = make_url(base)
    conn = await asyncpg.connect(u.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def count_events(db_url: str) -> int:
    conn = await asyncpg.connect(make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM inbound_event"))
    finally:
        await conn.close()


async def set_active(db_url: str, version: int | None) -> None:
    conn = await asyncpg.connect(make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await conn.execute("DELETE FROM pipeline_slot WHERE slot = 'active'")
        if version is not None:
            await conn.execute(
                "INSERT INTO pipeline_slot (slot, version_id, assigned_at, assigned_by) "
                "VALUES ('active', $1, now(), 'bench')",
                version,
            )
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--requests", type=int, default=120_000, help="pre-signed requests per run")
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["ceiling", "ingest", "ingest+score"],
        help="ceiling (bare FastAPI), ingest (no pipeline active), ingest+score (demo pipeline active)",
    )
    args = parser.parse_args()
    # SIGTERM (kill, a CI timeout) ends the run through its `finally`: the servers it started are
    # stopped and its database dropped, instead of being left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")

    base = os.environ.get("LEADSCORE_BENCH_DATABASE_URL", DEFAULT_PG)
    db_name = f"leadscore_bench_{os.getpid()}"
    asyncio.run(pg_admin(base, f'CREATE DATABASE "{db_name}"'))
    db_url = make_url(base).set(database=db_name).render_as_string(hide_password=False)
    tmp = Path(tempfile.mkdtemp(prefix="leadscore-bench-"))
    env = os.environ | {
        "LEADSCORE_DATABASE_URL": db_url,
        "LEADSCORE_LOG_LEVEL": "WARNING",
        "LEADSCORE_VAR_DIR": str(tmp / "var"),
    }
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        subprocess.run([BIN / "leadscore", "migrate"], env=env, check=True, capture_output=True)
        created = json.loads(
            subprocess.run(
                [BIN / "leadscore", "sources", "add", "bench"], env=env, check=True, capture_output=True, text=True
            ).stdout
        )
        secret = created["secret"]
        if "ingest+score" in args.kinds:
            train_demo(env)
        for workers in args.workers:
            for run in range(args.runs):
                for kind in args.kinds:
                    asyncio.run(set_active(db_url, 1 if kind == "ingest+score" else None))
                    requests_file = tmp / f"requests-{kind}-{workers}-{run}.tsv"
                    size = write_requests(requests_file, secret, args.requests)
                    port = free_port()
                    if kind == "ceiling":
                        cmd = [
                            str(BIN / "uvicorn"),
                            "bench.ceiling_app:app",
                            "--port",
                            str(port),
                            "--workers",
                            str(workers),
                            "--no-access-log",
                            "--log-level",
                            "warning",
                        ]
                    else:
                        cmd = [
                            str(BIN / "leadscore"),
                            "serve",
                            "--port",
                            str(port),
                            "--workers",
                            str(workers),
                            "--no-dev",
                        ]
                    stored_before = asyncio.run(count_events(db_url))
                    proc = subprocess.Popen(cmd, env=env, cwd=ROOT)
                    try:
                        wait_ready(f"http://127.0.0.1:{port}/docs", proc)
                        time.sleep(0.5)
                        result = run_wrk(f"http://127.0.0.1:{port}/v1/webhooks/bench", requests_file, args.duration)
                    finally:
                        stop(proc)
                    requests_file.unlink()
                    result["body_bytes"] = size
                    # Every request carries a new event: ingest must store one event per 202.
                    result["stored"] = asyncio.run(count_events(db_url)) - stored_before
                    results.setdefault((kind, workers), []).append(result)
                    print(
                        f"workers={workers} run={run + 1} {kind:8s} {result['rps']:8.0f} req/s  "
                        f"p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:7.1f} ms  "
                        f"errors {result['errors']:.0f}  stored {result['stored']:.0f}  (body {size} B)",
                        flush=True,
                    )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        asyncio.run(pg_admin(base, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))

    print("\nmedian of runs (min-max):")
    for workers in args.workers:
        med = {}
        for kind in args.kinds:
            rs = results[(kind, workers)]
            rps = [r["rps"] for r in rs]
            med[kind] = statistics.median(rps)
            print(
                f"  workers={workers} {kind:12s} {med[kind]:8.0f} req/s ({min(rps):.0f}-{max(rps):.0f})  "
                f"p50 {statistics.median(r['p50_ms'] for r in rs):.1f} ms  "
                f"p99 {statistics.median(r['p99_ms'] for r in rs):.1f} ms  "
                f"errors {sum(r['errors'] for r in rs):.0f}"
            )
        for kind in args.kinds:
            if kind != "ceiling" and "ceiling" in med:
                print(f"  workers={workers} {kind}/ceiling = {med[kind] / med['ceiling']:.0%}")


if __name__ == "__main__":
    main()
