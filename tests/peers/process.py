"""Run the CRM peer (`tests.peers.crm_peer`) as a real uvicorn process and talk to it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class CrmPeer:
    """The peer process; its request log survives `stop()`/`start()`."""

    def __init__(self, workdir: Path, *, processes: int = 1, record: bool = True) -> None:
        """`processes` > 1 (benchmarks) runs several uvicorn workers, whose behaviour can then not
        be scripted consistently; `record=False` keeps no request log."""
        self.processes = processes
        self.record = record
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "crm-peer-requests.jsonl"
        self.out_path = workdir / "crm-peer.out"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = self.out_path.open("a")
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "tests.peers.crm_peer:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
                "--log-level",
                "warning",
                "--workers",
                str(self.processes),
            ],
            cwd=REPO_ROOT,
            env=os.environ | ({"CRM_PEER_LOG": str(self.log_path)} if self.record else {}),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.post(f"{self.url}/_control/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("CRM peer did not start:\n" + self.out_path.read_text())
            time.sleep(0.05)

    def stop(self) -> None:
        if self._proc is None:
            return
        # Write the request log out first: on a loaded machine a graceful stop can outlast the wait
        # below, and a killed peer would lose what it had not flushed.
        with contextlib.suppress(httpx.HTTPError):
            self.flush()
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None

    def control(self, path: str, body: dict[str, Any] | None = None, *, method: str = "POST") -> None:
        response = httpx.request(method, f"{self.url}/_control/{path}", json=body or {}, timeout=5)
        response.raise_for_status()

    def flush(self) -> None:
        if self._proc is not None:
            self.control("flush")

    def requests(self) -> list[dict[str, Any]]:
        """Every request the peer received (in this process and before its restarts)."""
        self.flush()
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def count(self) -> int:
        self.flush()
        if not self.log_path.exists():
            return 0
        with self.log_path.open("rb") as f:
            return sum(1 for _ in f)
