"""How a source proves a request is its own.

A scheme checks the signature over the raw body exactly as received (never a re-serialisation),
with a constant-time comparison, and rejects timestamps outside the tolerance window both ways so a
captured request cannot be replayed later. A source with no live secret accepts nothing.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.errors import InvalidSignature


@dataclass(frozen=True, slots=True)
class Verified:
    """What a valid signature vouches for."""

    webhook_id: str | None
    signed_at: dt.datetime | None


class SignatureScheme(Protocol):
    name: str

    def new_secret(self) -> str:
        """A fresh secret in the scheme's own format."""
        ...

    def verify(
        self,
        *,
        headers: Mapping[str, str],
        body: bytes,
        secrets: Sequence[str],
        now: dt.datetime,
        tolerance: dt.timedelta,
    ) -> Verified:
        """Return what the signature vouches for, or raise `InvalidSignature`."""
        ...


class StandardWebhooks:
    """Standard Webhooks (standardwebhooks.com), also sent by Svix with `svix-` header names.

    `webhook-signature` holds space-separated `v1,<base64 HMAC-SHA256>` entries over
    `"{webhook-id}.{webhook-timestamp}.{body}"`, keyed by the base64 part of a `whsec_` secret.
    """

    name = "standard"
    _prefix = "whsec_"

    def new_secret(self) -> str:
        return self._prefix + base64.b64encode(secrets.token_bytes(32)).decode()

    @staticmethod
    def _header(headers: Mapping[str, str], name: str) -> str | None:
        return headers.get(f"webhook-{name}") or headers.get(f"svix-{name}")

    def _key(self, secret: str) -> bytes:
        raw = secret.removeprefix(self._prefix)
        return base64.b64decode(raw)

    def verify(
        self,
        *,
        headers: Mapping[str, str],
        body: bytes,
        secrets: Sequence[str],
        now: dt.datetime,
        tolerance: dt.timedelta,
    ) -> Verified:
        msg_id = self._header(headers, "id")
        timestamp = self._header(headers, "timestamp")
        signature = self._header(headers, "signature")
        if not msg_id or not timestamp or not signature:
            raise InvalidSignature("missing webhook-id, webhook-timestamp or webhook-signature header")
        if len(msg_id) > 200:
            raise InvalidSignature("webhook-id is longer than 200 characters")
        if not timestamp.isascii() or not timestamp.isdigit():
            raise InvalidSignature("webhook-timestamp is not a number of seconds")
        signed_at = dt.datetime.fromtimestamp(int(timestamp), dt.UTC)
        if abs(now - signed_at) > tolerance:
            raise InvalidSignature("webhook-timestamp is outside the tolerance window")
        if not secrets:
            raise InvalidSignature("the source has no live secret")

        candidates: list[bytes] = []
        for entry in signature.split():
            version, _, value = entry.partition(",")
            if version != "v1" or not value:
                continue
            try:
                candidates.append(base64.b64decode(value, validate=True))
            except binascii.Error:
                continue
        if not candidates:
            raise InvalidSignature("no v1 signature in webhook-signature")

        signed = f"{msg_id}.{timestamp}.".encode() + body
        for secret in secrets:
            expected = hmac.new(self._key(secret), signed, hashlib.sha256).digest()
            # Compare against every candidate so the time taken does not depend on which one matched.
            matched = False
            for candidate in candidates:
                matched |= hmac.compare_digest(expected, candidate)
            if matched:
                return Verified(webhook_id=msg_id, signed_at=signed_at)
        raise InvalidSignature("no signature matches a live secret of this source")


SCHEMES: dict[str, SignatureScheme] = {StandardWebhooks.name: StandardWebhooks()}


def scheme_for(name: str) -> SignatureScheme:
    """The scheme registered under `name`; raises KeyError for an unknown one."""
    return SCHEMES[name]
