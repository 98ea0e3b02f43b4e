"""A stand-in CRM for tests, run as its own uvicorn process: `uvicorn tests.peers.crm_peer:app`.

It answers like the CRMs the adapters speak to (HubSpot batch upsert, Salesforce Lead upsert, a
plain webhook receiver), records every request it receives as a JSON line in `$CRM_PEER_LOG`
(written every 50 ms, on `POST /_control/flush` and at shutdown; kept across restarts: "down for
a while" is this process stopped and started again), and can be told through `/_control/...` to
misbehave. Each line has `at`, when the whole body had been read (Unix seconds), and `answer`: the
status sent, `slow`, `drop`, or `disconnected` (the client went away before its body was read; no
body is logged and nothing is answered).

- `POST /_control/script` `{"steps": [{"action": "status", "status": 500, "times": 3}, ...]}`: the
  next requests get these answers in order. Actions: `status` (with `retry_after` for a
  `Retry-After` header and `body` for the answer), `slow` (`seconds` before a 200), `drop` (the
  connection is cut in the middle of the answer).
- `POST /_control/chaos` `{"requests": 300, "weights": {"ok": 1, "500": 1, "429": 1, "slow": 1,
  "drop": 1}, "retry_after": "1", "slow_seconds": 2, "seed": 7}`: the next requests each get an
  answer drawn at random by weight.
- `POST /_control/reject` `{"contains": "text", "status": 422}`: requests whose body contains the
  text are refused with that status, until `DELETE /_control/reject`.
- `POST /_control/reset`: behave again.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from typing import Any

Scope = dict[str, Any]


class _State:
    def __init__(self) -> None:
        self.script: list[dict[str, Any]] = []
        self.chaos: dict[str, Any] | None = None
        self.chaos_left = 0
        self.rng = random.Random(0)
        self.rejects: list[dict[str, Any]] = []
        self.log_path = os.environ.get("CRM_PEER_LOG")
        self.pending: list[str] = []
        self.flushed = 0

    def record(self, entry: dict[str, Any]) -> None:
        self.pending.append(json.dumps(entry) + "\n")

    def flush(self) -> None:
        # Written in batches: a write per request cost more than the rest of the request here.
        lines, self.pending = self.pending, []
        if lines and self.log_path:
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.writelines(lines)
        self.flushed += len(lines)

    async def flush_often(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            self.flush()

    def next_action(self, body: bytes) -> dict[str, Any]:
        for rule in self.rejects:
            if rule["contains"].encode() in body:
                return {"action": "status", "status": rule.get("status", 422)}
        if self.script:
            step = self.script[0]
            step["times"] = step.get("times", 1) - 1
            if step["times"] <= 0:
                self.script.pop(0)
            return step
        if self.chaos is not None and self.chaos_left > 0:
            self.chaos_left -= 1
            weights: dict[str, float] = self.chaos["weights"]
            pick = self.rng.choices(list(weights), weights=list(weights.values()))[0]
            if pick == "ok":
                return {"action": "ok"}
            if pick == "slow":
                return {"action": "slow", "seconds": self.chaos.get("slow_seconds", 2.0)}
            if pick == "drop":
                return {"action": "drop"}
            return {"action": "status", "status": int(pick), "retry_after": self.chaos.get("retry_after")}
        return {"action": "ok"}


STATE = _State()


async def _read_body(receive: Any) -> bytes | None:
    """The request's body, or None when the client went away first (uvicorn then reports a
    disconnect, even if the body had arrived: a sender timing out on a busy peer)."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _answer(send: Any, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body).encode() if body is not None else b""
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


def _success(method: str, path: str, body: bytes) -> tuple[int, Any]:
    if path.endswith("/crm/v3/objects/contacts/batch/upsert"):
        inputs = json.loads(body)["inputs"]
        return 200, {
            "status": "COMPLETE",
            "results": [
                {"id": str(1000 + i), "properties": item["properties"], "new": True} for i, item in enumerate(inputs)
            ],
        }
    if "/sobjects/Lead/" in path and method == "PATCH":
        return 201, {"id": "00Q" + uuid.uuid4().hex[:15], "success": True, "errors": [], "created": True}
    return 200, {"received": True}


async def _control(path: str, method: str, body: bytes, send: Any) -> None:
    data = json.loads(body) if body else {}
    if path == "/_control/script":
        STATE.script.extend(data["steps"])
    elif path == "/_control/chaos":
        STATE.chaos = data
        STATE.chaos_left = int(data["requests"])
        STATE.rng = random.Random(data.get("seed", 0))
    elif path == "/_control/reject" and method == "DELETE":
        STATE.rejects = []
    elif path == "/_control/reject":
        STATE.rejects.append(data)
    elif path == "/_control/flush":
        STATE.flush()
    elif path == "/_control/reset":
        STATE.script, STATE.chaos, STATE.rejects = [], None, []
    elif path != "/_control/health":
        await _answer(send, 404, {"error": "unknown control"})
        return
    await _answer(send, 200, {"ok": True})


async def app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                flusher = asyncio.create_task(STATE.flush_often())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                flusher.cancel()
                STATE.flush()
                await send({"type": "lifespan.shutdown.complete"})
                return
    path, method = scope["path"], scope["method"]
    received = await _read_body(receive)
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    if received is None:
        # Not received, so not answered: logged apart, and taking no scripted answer.
        STATE.record(
            {
                "at": time.time(),
                "method": method,
                "path": path,
                "headers": headers,
                "key": headers.get("idempotency-key") or headers.get("webhook-id"),
                "answer": "disconnected",
            }
        )
        return
    body = received
    if path.startswith("/_control/"):
        await _control(path, method, body, send)
        return
    action = STATE.next_action(body)
    status, answer = _success(method, path, body)
    if action["action"] == "status":
        status = action["status"]
        answer = action.get("body", {"error": f"scripted {status}"})
    STATE.record(
        {
            "at": time.time(),
            "method": method,
            "path": path,
            "query": scope.get("query_string", b"").decode(),
            "headers": headers,
            "body": body.decode(),
            "key": headers.get("idempotency-key") or headers.get("webhook-id"),
            "answer": action["action"] if action["action"] in ("slow", "drop") else status,
        }
    )
    if action["action"] == "slow":
        await asyncio.sleep(float(action["seconds"]))
    if action["action"] == "drop":
        data = json.dumps(answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data) + 100).encode())],
            }
        )
        await send({"type": "http.response.body", "body": data[:5], "more_body": True})
        # An exception after the answer started makes uvicorn cut the connection mid-body.
        raise ConnectionAbortedError("peer told to drop the connection")
    extra = {}
    if status == 429 and action.get("retry_after") is not None:
        extra["retry-after"] = str(action["retry_after"])
    await _answer(send, status, answer, extra)
