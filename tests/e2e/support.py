"""Shared by the end-to-end tests and the end-to-end benchmark (`bench/bench_e2e.py`): a database
handle for the test's own reads, bounded waits, the whole pipeline set up on a database (demo
pipeline, MQL policy, round-robin routing, a signed source), the environment of processes
delivering to the CRM peer, signed webhook headers, and `leadscore serve` / `leadscore worker`
processes."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from standardwebhooks import Webhook

from service.auth import SYSTEM
from service.change_requests import bootstrap_routing
from service.change_schemas import RoutingRulesChange
from service.db import create_engine, write_transaction
from service.repositories import qualification as qualification_repo
from service.settings import Settings
from service.sources import add_source
from tests.peers.process import free_port
from tests.service.test_scoring_service import GOOD, POOR, register

BIN = Path(sys.executable).parent
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
    """Pipeline, policy (MQL halfway between the `GOOD` and the `POOR` profile) and routing active; a
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


def delivery_env(db_url: str, workdir: Path, crm_url: str) -> dict[str, str]:
    """The environment of `leadscore serve` and `leadscore worker` processes on `db_url`: handoffs
    go to the CRM peer at `crm_url` as signed webhooks, delivered by separate worker processes."""
    return os.environ | {
        "LEADSCORE_DATABASE_URL": db_url,
        "LEADSCORE_VAR_DIR": str(workdir / "var"),
        "LEADSCORE_SOURCE_CACHE_SECONDS": "0",
        "LEADSCORE_DELIVERY_IN_PROCESS": "false",
        "LEADSCORE_DELIVERY_DESTINATIONS": json.dumps(
            [{"name": "crm", "kind": "webhook", "url": f"{crm_url}/hooks/leads", "secret_env": "CRM_HOOK_SECRET"}]
        ),
        "CRM_HOOK_SECRET": CRM_SECRET,
        "LEADSCORE_LOG_LEVEL": "WARNING",
    }


def signed_headers(signer: Webhook, msg_id: str, body: str) -> dict[str, str]:
    """Standard Webhooks headers for `body`, signed now."""
    now = dt.datetime.now(dt.UTC)
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signer.sign(msg_id, now, body),
    }


class Database:
    """One engine on one event loop for the test's own reads and writes (polling with a new engine
    each time cost more CPU than the workers on a busy machine)."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.engine = create_engine(url, pool_size=1)

    def run(self, fn: Callable[[Any], Any]) -> Any:
        return self.loop.run_until_complete(fn(self.engine))

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.dispose())
        self.loop.close()

    def counts(self) -> dict[str, int]:
        async def go(engine: Any) -> dict[str, int]:
            async with engine.connect() as conn:
                rows = await conn.execute(sa.text("SELECT status, count(*) FROM delivery GROUP BY status"))
                return {status: int(n) for status, n in rows}

        result: dict[str, int] = self.run(go)
        return result

    def attempts_by(self, proc: subprocess.Popen[bytes]) -> int:
        """Delivery attempts recorded by a worker process (worker names are host:pid:suffix)."""

        async def go(engine: Any) -> int:
            async with engine.connect() as conn:
                query = sa.text("SELECT count(*) FROM delivery_attempt WHERE worker LIKE :name")
                return int((await conn.execute(query, {"name": f"%:{proc.pid}:%"})).scalar_one())

        result: int = self.run(go)
        return result


def wait_until(what: str, check: Callable[[], bool], *, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.25)


class Workers:
    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.env = env
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def logs(self) -> list[Path]:
        return [self.workdir / f"worker-{i}.log" for i in range(len(self.procs))]

    def start(self, *, log_level: str | None = None) -> subprocess.Popen[bytes]:
        """A worker process; at `log_level` "INFO" its log says when it is up (`wait_started`), and
        logs each request it sends."""
        env = self.env if log_level is None else self.env | {"LEADSCORE_LOG_LEVEL": log_level}
        log = (self.workdir / f"worker-{len(self.procs)}.log").open("w")
        proc = subprocess.Popen(
            [BIN / "leadscore", "worker", "--concurrency", "16"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.procs.append(proc)
        return proc

    def wait_started(self, proc: subprocess.Popen[bytes]) -> None:
        """Until the log of `proc` (started at INFO level) says its delivery worker runs: a SIGTERM from
        then on stops a running worker, which finishes what it has in flight."""
        log = self.logs[self.procs.index(proc)]
        started = "delivery worker started"
        wait_until(started, lambda: proc.poll() is not None or started in log.read_text(), timeout=120, logs=[log])
        assert proc.poll() is None, log.read_text()

    def stop_all(self) -> list[int]:
        codes = []
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=20))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait(timeout=10))
        return codes


class Server:
    """`leadscore serve` with `workers` uvicorn processes."""

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
