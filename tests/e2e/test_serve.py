"""The real server process: `leadscore migrate` then `leadscore serve --dev`, over real HTTP."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from tests.conftest import lead_event

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    env = os.environ | {
        "LEADSCORE_DATABASE_URL": db_url,
        "LEADSCORE_VAR_DIR": str(tmp_path / "var"),
        "LEADSCORE_PORT": str(port),
    }
    subprocess.run([BIN / "leadscore", "migrate"], env=env, check=True, capture_output=True)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([BIN / "leadscore", "serve", "--dev"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        # Dev mode trains the demo pipeline first: 10-20 s idle, over 100 s measured on a loaded 2-core machine.
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("server did not become ready:\n" + (tmp_path / "serve.log").read_text())
            time.sleep(0.1)
        yield base, tmp_path / "var"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            # uvicorn shuts down gracefully, then re-raises the signal it got.
            assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
            assert "Application shutdown complete" in (tmp_path / "serve.log").read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


def test_served_webhook_accepts_a_signed_event(server: tuple[str, Path]) -> None:
    base, var = server
    credentials = json.loads((var / "dev-credentials.json").read_text())
    assert oct((var / "dev-credentials.json").stat().st_mode & 0o777) == "0o600"
    body = json.dumps(lead_event(id="e2e-1")).encode()
    now = dt.datetime.now(dt.UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": "msg-e2e-1",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(credentials["webhook_secret"]).sign("msg-e2e-1", now, body.decode()),
    }
    accepted = httpx.post(
        credentials["webhook_url"].replace("http://127.0.0.1:8000", base), content=body, headers=headers
    )
    assert accepted.status_code == 202, accepted.text
    repeat = httpx.post(f"{base}/v1/webhooks/demo", content=body, headers=headers)
    assert repeat.status_code == 200
    lead_id = accepted.json()["lead_id"]
    lead = httpx.get(f"{base}/v1/leads/{lead_id}", headers={"authorization": f"Bearer {credentials['ops_api_key']}"})
    assert lead.status_code == 200
    assert lead.json()["identities"] == [{"namespace": "email", "value": "ana@acme.io"}]
    metrics = httpx.get(f"{base}/metrics").text
    assert 'leadscore_webhook_events_total{outcome="accepted",source="demo"} 1.0' in metrics
