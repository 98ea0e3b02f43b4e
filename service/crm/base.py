"""What every adapter shares: field mapping, sending one request, and reading the answer."""

from __future__ import annotations

import datetime as dt
import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import httpx
import orjson

from service.crm.errors import CrmRateLimited, CrmRejected, CrmTransportError

EXCERPT_CHARS = 500


@dataclass(frozen=True, slots=True)
class CrmReceipt:
    """A CRM's acceptance of a record."""

    status_code: int
    excerpt: str | None
    duration_s: float


class CrmAdapter(Protocol):
    """Delivers handoff payloads to one configured destination."""

    destination: str

    async def deliver(
        self, client: httpx.AsyncClient, payload: Mapping[str, Any], *, idempotency_key: str, now: dt.datetime
    ) -> CrmReceipt:
        """Send one payload; return the receipt or raise a `service.crm.errors.CrmError`."""
        ...


MISSING = object()


def lookup(payload: Mapping[str, Any], path: str) -> Any:
    value: Any = payload
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return value


def map_fields(
    payload: Mapping[str, Any], fields: Mapping[str, str], stage_values: Mapping[str, str]
) -> dict[str, Any]:
    """The CRM's fields from a payload. Each source is a dotted path (`email`, `traits.company`),
    alternatives separated by `|` (first present and not null wins), or `=text` for a constant.
    `stage` values are translated by `stage_values`. Fields with no value are left out."""
    mapped: dict[str, Any] = {}
    for target, source in fields.items():
        for alternative in source.split("|"):
            alternative = alternative.strip()
            if alternative.startswith("="):
                value: Any = alternative[1:]
            else:
                value = lookup(payload, alternative)
                if value is MISSING or value is None:
                    continue
                if alternative == "stage":
                    value = stage_values.get(str(value), value)
            mapped[target] = value
            break
    return mapped


def excerpt(response: httpx.Response) -> str | None:
    text = response.text
    return text[:EXCERPT_CHARS] if text else None


def parse_retry_after(value: str | None, now: dt.datetime) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP date; None if absent
    or unreadable (then the worker's own backoff applies)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - now).total_seconds())


async def send(
    client: httpx.AsyncClient,
    method: str,
    url: str,
    *,
    body: Any,
    headers: Mapping[str, str],
) -> tuple[httpx.Response, float]:
    """Send one JSON request; transport failures become `CrmTransportError`. Returns the answer
    (any status) and how long it took."""
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    started = time.perf_counter()
    try:
        response = await client.request(
            method, url, content=content, headers={"content-type": "application/json", **headers}
        )
    except (httpx.TimeoutException, TimeoutError) as exc:
        raise CrmTransportError(f"timed out: {type(exc).__name__}") from None
    except (httpx.TransportError, aiohttp.ClientError) as exc:
        # The aiohttp transport maps aiohttp's errors to httpx's, but not every one of them.
        raise CrmTransportError(f"transport error: {type(exc).__name__}: {exc}") from None
    return response, time.perf_counter() - started


def raise_for_status(response: httpx.Response, now: dt.datetime) -> None:
    """Classify a non-2xx answer: 429 rate limited, 408 and 5xx transport, other 4xx (and 1xx/3xx,
    which a JSON API answers only when misconfigured) rejected."""
    status = response.status_code
    if 200 <= status < 300:
        return
    text = excerpt(response)
    if status == 429:
        raise CrmRateLimited(
            "rate limited",
            retry_after=parse_retry_after(response.headers.get("retry-after"), now),
            status_code=status,
            excerpt=text,
        )
    if status == 408 or status >= 500:
        raise CrmTransportError(f"server answered {status}", status_code=status, excerpt=text)
    raise CrmRejected(f"rejected with {status}", status_code=status, excerpt=text)


def json_body(response: httpx.Response) -> Any:
    try:
        return orjson.loads(response.content) if response.content else None
    except orjson.JSONDecodeError:
        return None
