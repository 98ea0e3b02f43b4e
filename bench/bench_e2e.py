"""End-to-end latency: from the start of a signed webhook POST to the CRM's receipt of the handoff.

The whole path with real processes on one PostgreSQL database: `leadscore serve` (`--api-processes`
uvicorn processes), the X Education demo pipeline, an MQL threshold policy, round-robin routing,
the outbox and `--workers` `leadscore worker` processes delivering signed webhooks to the CRM peer
of the tests (`tests/peers/crm_peer.py`, one uvicorn process answering at once, which logs when it
read each request). The setup is the pipeline end-to-end test's (`tests/e2e/support.py`).

Events go out open-loop: an asyncio/httpx sender starts each POST at its time on the clock
(`--rate` per second for `--duration` seconds), whatever the answers to earlier ones are doing. A
share (`--qualifying`) are a new lead with a profile that qualifies as MQL, one lead each, so each
yields one delivery; the others update or add page views to a pool of leads that stay below the
line. For each qualifying event: the time from the start of its POST to the peer's receipt of the
delivery carrying its lead's email, and that time in three parts by the stamps the service
writes: to the start of the event's group-commit batch, from there until a worker starts sending
(commit, the worker's wake-up or poll, the claim), and the send. Prints each run (achieved send
rate, webhook answer latency, the end-to-end figures, qualifying events never delivered, CPU per
event of the API processes), then medians and spread (min-max) across runs.

    .venv/bin/python bench/bench_e2e.py [--runs 3] [--rate 200] [--duration 20] [--qualifying 0.1]

Needs PostgreSQL (LEADSCORE_BENCH_DATABASE_URL, default the local `test` server); it creates and
drops its own database. `--poll-seconds` sets LEADSCORE_DELIVERY_POLL_SECONDS (default: the
service's own default).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
from httpx_aiohttp import AiohttpTransport
from sqlalchemy.engine import make_url
from standardwebhooks import Webhook

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.settings import Settings  # noqa: E402
from tests.conftest import lead_event, train_demo  # noqa: E402
from tests.e2e.support import BIN, Server, Workers, delivery_env, set_up, signed_headers  # noqa: E402
from tests.peers.process import CrmPeer  # noqa: E402
from tests.service.test_scoring_service import GOOD, POOR  # noqa: E402

DEFAULT_PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


async def pg_admin(base: str, sql: str) -> None:
    conn = await asyncpg.connect(make_url(base).set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@dataclass
class Event:
    msg_id: str
    body: str
    email: str
    qualifying: bool


@dataclass
class Sent:
    event: Event
    due: float  # on the loop's clock
    started: float  # the same clock
    started_wall: float  # Unix seconds, the clock the peer logs with
    answer_s: float
    status: int
    stage: str | None


@dataclass
class RunResult:
    sent: list[Sent] = field(default_factory=list)
    send_seconds: float = 0.0
    sender_cpu: float = 0.0  # the sender's CPU time over the wall time of sending: near 1, it is the limit
    api_cpu_ms: float = 0.0  # per event sent, from the first send to the last delivery
    worker_cpu_ms: float = 0.0  # per qualifying event
    e2e_s: list[float] = field(default_factory=list)
    # The end-to-end time in three parts, by the stamps the service writes (same machine, same clock):
    to_batch_s: list[float] = field(default_factory=list)  # POST start -> its group commit batch begins
    outbox_s: list[float] = field(default_factory=list)  # batch begins -> a worker sends (commit, wake-up, claim)
    send_s: list[float] = field(default_factory=list)  # the worker starts sending -> the peer has read it
    undelivered: int = 0
    other_deliveries: int = 0


def make_events(run: int, count: int, qualifying: float, people: int, seed: int) -> list[Event]:
    """`count` events: a `qualifying` share each a new lead with the GOOD profile (it enters MQL), the
    rest lead updates (POOR profile) and page views of `people` other leads (they stay leads)."""
    rng = random.Random(seed)
    now = dt.datetime.now(dt.UTC).isoformat()
    events = []
    for i in range(count):
        msg_id = f"bench-{run}-{i}"
        if rng.random() < qualifying:
            email = f"r{run}-q{i}@qualifies.example"
            event = lead_event(id=msg_id, email=email, traits=GOOD, occurred_at=now)
            events.append(Event(msg_id, json.dumps(event), email, True))
            continue
        email = f"person{rng.randrange(people)}@stays-a-lead.example"
        if rng.random() < 0.5:
            event = lead_event(id=msg_id, email=email, type="lead.updated", traits=POOR, occurred_at=now)
        else:
            event = {
                "id": msg_id,
                "type": "lead.activity",
                "name": "Page Viewed",
                "occurred_at": now,
                "subject": {"email": email},
                "properties": {"url": "/pricing" if i % 4 == 0 else "/blog/how-to-upskill"},
            }
        events.append(Event(msg_id, json.dumps(event), email, False))
    return events


async def send_open_loop(base: str, secret: str, events: list[Event], rate: float) -> tuple[list[Sent], float]:
    """POST each event at its own time on the clock (open loop: a slow answer delays nobody else's
    start). Returns what was sent and the seconds from the first start to the last."""
    signer = Webhook(secret)
    loop = asyncio.get_running_loop()
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    # The sender shares the machine with what it measures: on httpcore's own pool its CPU per
    # request grew with the requests in flight (up to 92 % of a core when the API lagged), which
    # fed the lag. aiohttp's connections under the same httpx API, as the delivery workers use.
    transport = AiohttpTransport(limits=limits)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits, transport=transport) as client:

        async def one(event: Event, due: float) -> Sent:
            headers = signed_headers(signer, event.msg_id, event.body)
            started, started_wall = loop.time(), time.time()
            try:
                response = await client.post("/v1/webhooks/map", content=event.body, headers=headers)
            except httpx.HTTPError:
                return Sent(event, due, started, started_wall, loop.time() - started, 0, None)
            answer_s = loop.time() - started
            stage = response.json().get("stage") if response.status_code == 202 else None
            return Sent(event, due, started, started_wall, answer_s, response.status_code, stage)

        tasks = []
        begin = loop.time() + 0.05
        for i, event in enumerate(events):
            due = begin + i / rate
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(event, due)))
        sent = list(await asyncio.gather(*tasks))
    return sent, max(s.started for s in sent) - min(s.started for s in sent)


async def delivery_stamps(db_url: str, emails: set[str]) -> dict[str, tuple[float, float]]:
    """Lead email -> (outbox row's `created_at`: when the ingest batch that enqueued it began; the
    first attempt's `started_at`), for the delivered handoffs among `emails`."""
    dsn = make_url(db_url).set(drivername="postgresql").render_as_string(hide_password=False)
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT d.payload->>'email' AS email, d.created_at, min(a.started_at) AS sent_at "
            "FROM delivery d JOIN delivery_attempt a ON a.delivery_id = d.id "
            "WHERE d.status = 'delivered' AND d.payload->>'email' = ANY($1::text[]) GROUP BY d.id",
            sorted(emails),
        )
    finally:
        await conn.close()
    return {r["email"]: (r["created_at"].timestamp(), r["sent_at"].timestamp()) for r in rows}


def cpu_seconds(pids: list[int]) -> tuple[float, frozenset[int]]:
    """CPU time (user + system) of these processes and their descendants, from /proc (Linux), and
    which processes those were (uvicorn replaces a worker process that misses its health check)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, list(pids), set()
    while todo:
        pid = todo.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{pid}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        seen.add(pid)
    return total, frozenset(seen)


def cpu_ms_per(before: tuple[float, frozenset[int]], after: tuple[float, frozenset[int]], count: int) -> float:
    """CPU ms per item between two readings; NaN if a process came or went in between."""
    if before[1] != after[1]:
        return float("nan")
    return 1000 * (after[0] - before[0]) / max(1, count)


class PeerLog:
    """The CRM peer's request log, read on from where the last read stopped."""

    def __init__(self, peer: CrmPeer) -> None:
        self.peer = peer
        self.offset = 0
        self.received: dict[str, float] = {}  # lead email -> first receipt (Unix seconds)

    def read(self) -> None:
        self.peer.flush()
        if not self.peer.log_path.exists():
            return
        with self.peer.log_path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        self.offset += end
        for line in data[:end].splitlines():
            request = json.loads(line)
            if request["path"] != "/hooks/leads" or request["answer"] != 200:
                continue
            email = json.loads(request["body"])["data"].get("email")
            if email is not None and email not in self.received:
                self.received[email] = request["at"]


def measure(
    db_url: str,
    server: Server,
    workers: Workers,
    secret: str,
    peer_log: PeerLog,
    events: list[Event],
    rate: float,
    drain_s: float,
) -> RunResult:
    result = RunResult()
    seen_before = set(peer_log.received)
    api_pids, worker_pids = [server.proc.pid], [p.pid for p in workers.procs]
    api_cpu, worker_cpu = cpu_seconds(api_pids), cpu_seconds(worker_pids)
    cpu, wall = time.process_time(), time.monotonic()
    result.sent, result.send_seconds = asyncio.run(send_open_loop(server.base, secret, events, rate))
    result.sender_cpu = (time.process_time() - cpu) / (time.monotonic() - wall)
    expected = {s.event.email for s in result.sent if s.event.qualifying and s.status == 202 and s.stage == "mql"}
    deadline = time.monotonic() + drain_s
    while True:
        peer_log.read()
        if expected <= set(peer_log.received) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    result.api_cpu_ms = cpu_ms_per(api_cpu, cpu_seconds(api_pids), len(events))
    result.worker_cpu_ms = cpu_ms_per(worker_cpu, cpu_seconds(worker_pids), len(expected))
    delivered = expected & set(peer_log.received)
    while True:  # the workers record outcomes in batches, shortly after the peer answers
        stamps = asyncio.run(delivery_stamps(db_url, delivered))
        if len(stamps) == len(delivered) or time.monotonic() > deadline + 30:
            break
        time.sleep(0.2)
    for s in result.sent:
        if s.event.email not in expected:
            continue
        at = peer_log.received.get(s.event.email)
        if at is None:
            result.undelivered += 1
            continue
        result.e2e_s.append(at - s.started_wall)
        if s.event.email in stamps:
            batch_at, sent_at = stamps[s.event.email]
            result.to_batch_s.append(batch_at - s.started_wall)
            result.outbox_s.append(sent_at - batch_at)
            result.send_s.append(at - sent_at)
    result.other_deliveries = len(set(peer_log.received) - seen_before - expected)
    return result


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`, in ms."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return 1000 * ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": pct(values, 50),
        "p90": pct(values, 90),
        "p99": pct(values, 99),
        "max": pct(values, 100),
    }


def line(name: str, values: list[float]) -> str:
    s = summary(values)
    return (
        f"{name:13s} n={len(values):5d}  p50 {s['p50']:7.1f}  p90 {s['p90']:7.1f}  p99 {s['p99']:7.1f}  "
        f"max {s['max']:7.1f} ms"
    )


def report(run: str, r: RunResult) -> dict[str, float]:
    late = [s.started - s.due for s in r.sent]
    qualifying = [s for s in r.sent if s.event.qualifying]
    failed = [s for s in r.sent if s.status != 202]
    wrong = [s for s in r.sent if s.status == 202 and (s.stage == "mql") != s.event.qualifying]
    rate = (len(r.sent) - 1) / r.send_seconds if r.send_seconds else float("nan")
    print(
        f"{run}: sent {len(r.sent)} in {r.send_seconds:.2f} s = {rate:.1f}/s (start lateness p99 "
        f"{pct(late, 99):.1f} ms, max {pct(late, 100):.1f} ms, sender CPU {r.sender_cpu:.0%} of a core); "
        f"qualifying {len(qualifying)}; non-202 answers {len(failed)}; stage not as designed {len(wrong)}"
    )
    print("  " + line("webhook", [s.answer_s for s in r.sent if s.status == 202]))
    print("  " + line("end-to-end", r.e2e_s))
    print("  " + line("  to batch", r.to_batch_s))
    print("  " + line("  outbox wait", r.outbox_s))
    print("  " + line("  send", r.send_s))
    print(
        f"  qualifying events never delivered: {r.undelivered}; other deliveries: {r.other_deliveries}; "
        f"CPU: API {r.api_cpu_ms:.1f} ms per event, workers {r.worker_cpu_ms:.1f} ms per delivery",
        flush=True,
    )
    e2e, hook = summary(r.e2e_s), summary([s.answer_s for s in r.sent if s.status == 202])
    outbox = summary(r.outbox_s)
    return {
        "rate": rate,
        "webhook p50": hook["p50"],
        "webhook p99": hook["p99"],
        "e2e p50": e2e["p50"],
        "e2e p90": e2e["p90"],
        "e2e p99": e2e["p99"],
        "e2e max": e2e["max"],
        "outbox wait p50": outbox["p50"],
        "outbox wait p99": outbox["p99"],
        "API CPU/event": r.api_cpu_ms,
        "undelivered": r.undelivered,
        "non-202": len(failed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200, help="events/s offered")
    parser.add_argument("--duration", type=float, default=20, help="seconds of sending per run")
    parser.add_argument("--qualifying", type=float, default=0.1, help="share of events that qualify a new lead")
    parser.add_argument("--people", type=int, default=2000, help="leads the other events update")
    parser.add_argument("--api-processes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="`leadscore worker` processes")
    parser.add_argument("--concurrency", type=int, default=16, help="deliveries in flight per worker")
    parser.add_argument("--poll-seconds", type=float, default=None, help="LEADSCORE_DELIVERY_POLL_SECONDS")
    parser.add_argument("--warmup", type=float, default=3, help="seconds sent at the rate before the runs, unmeasured")
    parser.add_argument("--drain", type=float, default=60, help="seconds to wait for the last deliveries of a run")
    args = parser.parse_args()
    # SIGTERM (kill, a CI timeout) ends the run through its `finally`: the servers it started are
    # stopped and its database dropped, instead of being left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    base = os.environ.get("LEADSCORE_BENCH_DATABASE_URL", DEFAULT_PG)
    db_name = f"leadscore_bench_e2e_{os.getpid()}"
    db_url = make_url(base).set(database=db_name).render_as_string(hide_password=False)
    tmp = Path(tempfile.mkdtemp(prefix="leadscore-bench-e2e-"))
    asyncio.run(pg_admin(base, f'CREATE DATABASE "{db_name}"'))
    peer = CrmPeer(tmp)
    server: Server | None = None
    workers: Workers | None = None
    try:
        env = delivery_env(db_url, tmp, peer.url)
        # The tests read sources afresh on every request (cache 0); a deployment caches them (the
        # default), and without it every webhook costs a pool checkout and a query before any work.
        env.pop("LEADSCORE_SOURCE_CACHE_SECONDS")
        if args.poll_seconds is not None:
            env["LEADSCORE_DELIVERY_POLL_SECONDS"] = str(args.poll_seconds)
        subprocess.run([BIN / "leadscore", "migrate"], env=env, check=True, capture_output=True)
        secret = set_up(db_url, train_demo())
        peer.start()
        server = Server(env, tmp, workers=args.api_processes)
        workers = Workers(env, tmp)
        for _ in range(args.workers):
            workers.start()
        server.wait_ready()
        poll = args.poll_seconds or Settings(_env_file=None).delivery_poll_seconds  # type: ignore[call-arg]
        print(
            f"PostgreSQL; {args.api_processes} API processes, {args.workers} workers x {args.concurrency}, "
            f"poll {poll} s; {args.rate:g} events/s for {args.duration:g} s, {args.qualifying:.0%} qualifying",
            flush=True,
        )
        peer_log = PeerLog(peer)
        count = int(args.rate * args.duration)
        if args.warmup > 0:
            events = make_events(0, int(args.rate * args.warmup), args.qualifying, args.people, seed=0)
            report("warm-up", measure(db_url, server, workers, secret, peer_log, events, args.rate, args.drain))
        results = []
        for run in range(1, args.runs + 1):
            events = make_events(run, count, args.qualifying, args.people, seed=run)
            result = measure(db_url, server, workers, secret, peer_log, events, args.rate, args.drain)
            results.append(report(f"run {run}", result))
        print(f"\nmedian of {args.runs} runs (min-max):")
        for key in results[0]:
            values = [r[key] for r in results]
            unit = "/s" if key == "rate" else ("" if key in ("undelivered", "non-202") else " ms")
            print(f"  {key:17s} {statistics.median(values):8.1f}{unit} ({min(values):.1f}-{max(values):.1f})")
        if any(r["undelivered"] for r in results):
            sys.exit("some qualifying events were never delivered")
    finally:
        if workers is not None:
            workers.stop_all()
        if server is not None:
            server.stop()
        peer.stop()
        asyncio.run(pg_admin(base, f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
