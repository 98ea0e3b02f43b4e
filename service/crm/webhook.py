"""A generic JSON webhook, signed with Standard Webhooks (standardwebhooks.com).

Body: `{"type": "lead.handoff", "timestamp": ..., "data": {...}}` where `data` is the payload (or
its mapped fields, when the destination maps fields). Headers: `webhook-id` (the delivery's
idempotency key, the same on every retry, so the receiver can deduplicate), `webhook-timestamp`
(of this attempt) and `webhook-signature` (`v1,<base64 HMAC-SHA256>` of
`"{id}.{timestamp}.{body}"`, keyed by the base64 part of the `whsec_` secret).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import httpx
import orjson

from service.crm.base import CrmReceipt, excerpt, map_fields, raise_for_status, send
from service.crm.config import InvalidDestinations, WebhookDestination


def signing_key(secret: str) -> bytes:
    try:
        return base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except binascii.Error:
        raise InvalidDestinations("a webhook secret must be `whsec_` followed by base64") from None


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


class WebhookAdapter:
    def __init__(self, config: WebhookDestination) -> None:
        self.destination = config.name
        self._config = config
        self._key = signing_key(config.signing_secret().get_secret_value())

    def body(self, payload: Mapping[str, Any], now: dt.datetime) -> bytes:
        data = map_fields(payload, self._config.fields, self._config.stage_values) if self._config.fields else payload
        return orjson.dumps(
            {"type": self._config.event_type, "timestamp": now.isoformat().replace("+00:00", "Z"), "data": data}
        )

    async def deliver(
        self, client: httpx.AsyncClient, payload: Mapping[str, Any], *, idempotency_key: str, now: dt.datetime
    ) -> CrmReceipt:
        body = self.body(payload, now)
        timestamp = int(now.timestamp())
        headers = {
            "webhook-id": idempotency_key,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(self._key, idempotency_key, timestamp, body),
            "idempotency-key": idempotency_key,
        }
        response, took = await send(client, "POST", self._config.url, body=body, headers=headers)
        raise_for_status(response, now)
        return CrmReceipt(status_code=response.status_code, excerpt=excerpt(response), duration_s=took)
