"""A HubSpot v3 request through the real server, as behind a proxy: uvicorn's own path and query
(not a test transport's) rebuild the URL HubSpot signed."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hubspot.utils.signature import Signature

from tests.e2e.test_serve import BIN, free_port

pytestmark = pytest.mark.e2e

PUBLIC = "https://leads.example.com/crm"


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """`leadscore serve` (no dev mode) with a public base URL, and a HubSpot source's client secret."""
    port = free_port()
    env = os.environ | {
        "LEADSCORE_DATABASE_URL": db_url,
        "LEADSCORE_VAR_DIR": str(tmp_path / "var"),
        "LEADSCORE_PORT": str(port),
        "LEADSCORE_PUBLIC_BASE_URL": PUBLIC,
    }
    subprocess.run([BIN / "leadscore", "migrate"], env=env, check=True, capture_output=True)
    secret = str(uuid.uuid4())
    subprocess.run(
        [BIN / "leadscore", "sources", "add", "hubspot", "--scheme", "hubspot", "--secret-stdin"],
        env=env,
        input=secret + "\n",
        text=True,
        check=True,
        capture_output=True,
    )
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([BIN / "leadscore", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # a bound, not a timing: over 30 s seen on a loaded machine
        while True:
            try:
                if httpx.get(f"{base}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("server did not become ready:\n" + (tmp_path / "serve.log").read_text())
            time.sleep(0.1)
        yield base, secret
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=15) in (0, -signal.SIGTERM)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()


def test_a_v3_signed_request_with_an_encoded_query_through_the_server(served: tuple[str, str]) -> None:
    base, secret = served
    body = json.dumps(
        [
            {
                "eventId": 1,
                "subscriptionId": 7,
                "portalId": 62515,
                "occurredAt": 1_764_400_000_000,
                "subscriptionType": "contact.propertyChange",
                "objectId": 123,
                "propertyName": "jobtitle",
                "propertyValue": "CTO",
            }
        ]
    ).encode()
    query = "next=https%3A%2F%2Fx.io%2Fa%20b&tag=%28a%29"
    # The URL HubSpot called, with the escapes of HubSpot's table decoded (%20 is not in it).
    uri = f"{PUBLIC}/v1/webhooks/hubspot?next=https://x.io/a%20b&tag=(a)"
    timestamp = str(int(dt.datetime.now(dt.UTC).timestamp() * 1000))
    headers = {
        "content-type": "application/json",
        "x-hubspot-request-timestamp": timestamp,
        "x-hubspot-signature-v3": Signature.get_signature(secret, body.decode(), "v3", uri, "POST", timestamp),
    }
    accepted = httpx.post(f"{base}/v1/webhooks/hubspot?{query}", content=body, headers=headers)
    assert accepted.status_code == 202, accepted.text
    elsewhere = httpx.post(f"{base}/v1/webhooks/hubspot?{query}&x=1", content=body, headers=headers)
    assert elsewhere.status_code == 401
