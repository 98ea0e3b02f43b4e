"""A stand-in for HubSpot's CRM API (reading contacts), served by uvicorn in a thread of the test
process, so a test can give it contacts and script its answers directly.

`GET /crm/v3/objects/contacts/{id}?properties=a,b` answers like HubSpot: 401 without the private-app
token it was made with, 404 for a contact it was not given, else 200 with the contact's id,
`createdAt`, `updatedAt`, `archived` and, of its properties, those asked for (plus the three HubSpot
always returns: `hs_object_id`, `createdate`, `lastmodifieddate`). `script(...)` makes the next
requests answer a status (with headers) or stall first. `hold(...)` keeps answers back (each computed
when its request arrives, as HubSpot reads the contact then) until `release()`, or until that many
requests are held at once. Every request is kept in `requests`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import uvicorn

from tests.peers.process import free_port

CONTACT_PATH = "/crm/v3/objects/contacts/"
CREATED_AT = "2026-11-01T09:00:00.000Z"


@dataclass
class Step:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    stall_seconds: float = 0.0


class HubSpotApi:
    def __init__(self, token: str) -> None:
        self.token = token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.contacts: dict[str, dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self._script: list[Step] = []
        self._lock = threading.Lock()
        self._holding = False
        self._hold_until: int | None = None
        self._held = 0
        self._released = threading.Event()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def add_contact(self, contact_id: str, properties: dict[str, Any], *, updated_at: str) -> None:
        with self._lock:
            self.contacts[contact_id] = {"properties": dict(properties), "updatedAt": updated_at}

    def script(self, *steps: Step) -> None:
        with self._lock:
            self._script.extend(steps)

    def hold(self, until: int | None = None) -> None:
        """Keep the answers back from now on until `release()` (or, with `until`, until that many
        requests are held at once); a held answer is let go after a minute whatever happens."""
        with self._lock:
            self._holding, self._hold_until = True, until
            self._released.clear()

    def release(self) -> None:
        with self._lock:
            self._holding = False
            self._released.set()

    def held(self) -> int:
        """How many requests wait for their answer now."""
        with self._lock:
            return self._held

    async def _wait_if_held(self) -> None:
        with self._lock:
            if not self._holding:
                return
            self._held += 1
        deadline = time.monotonic() + 60
        try:
            while not self._released.is_set() and time.monotonic() < deadline:
                with self._lock:
                    if self._hold_until is not None and self._held >= self._hold_until:
                        self._holding = False
                        self._released.set()
                await asyncio.sleep(0.01)
        finally:
            with self._lock:
                self._held -= 1

    def seen(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.requests)

    def _answer(self, method: str, path: str, query: str, headers: dict[str, str]) -> tuple[Step, Any]:
        params = parse_qs(query, keep_blank_values=True)
        asked = [p for value in params.get("properties", []) for p in value.split(",") if p]
        with self._lock:
            self.requests.append({"method": method, "path": path, "properties": asked, "headers": headers})
            if self._script:
                step = self._script.pop(0)
                return step, {"status": "error", "message": f"scripted {step.status}"}
            if headers.get("authorization") != f"Bearer {self.token}":
                return Step(401), {"status": "error", "category": "INVALID_AUTHENTICATION"}
            contact_id = path.removeprefix(CONTACT_PATH)
            if method != "GET" or not path.startswith(CONTACT_PATH) or contact_id not in self.contacts:
                return Step(404), {"status": "error", "message": "Object not found.", "category": "OBJECT_NOT_FOUND"}
            contact = self.contacts[contact_id]
        defined = contact["properties"]
        properties = {p: defined[p] for p in asked if p in defined}
        properties |= {"hs_object_id": contact_id, "createdate": CREATED_AT, "lastmodifieddate": contact["updatedAt"]}
        return Step(200), {
            "id": contact_id,
            "properties": properties,
            "createdAt": CREATED_AT,
            "updatedAt": contact["updatedAt"],
            "archived": False,
        }

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        step, body = self._answer(scope["method"], scope["path"], scope["query_string"].decode(), headers)
        await self._wait_if_held()
        if step.stall_seconds:
            await asyncio.sleep(step.stall_seconds)
        data = json.dumps(body).encode()
        raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in step.headers.items()]
        await send({"type": "http.response.start", "status": step.status, "headers": raw})
        await send({"type": "http.response.body", "body": data})

    def start(self) -> None:
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, interface="asgi3", lifespan="off", log_level="warning"
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="hubspot-api-peer", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise AssertionError("the HubSpot API peer did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._server = None
        self._thread = None
