"""Shared by the end-to-end tests: a database handle for the test's own reads, bounded waits, and
`leadscore worker` processes."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from service.db import create_engine

BIN = Path(sys.executable).parent


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

    def start(self) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"worker-{len(self.procs)}.log").open("w")
        proc = subprocess.Popen(
            [BIN / "leadscore", "worker", "--concurrency", "16"], env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.procs.append(proc)
        return proc

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
