"""What every webhook source shares: the request a scheme verifies, the source's configuration,
what a mapper returns, and the helpers the vendor mappers build canonical events with.

A source is a pair: a **signature scheme** (does this request come from the sender?) and a **body
mapper** (which canonical `LeadEvent`s does its body say happened, and under which deduplication
keys?). Both are chosen by the source's `scheme` name.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from service.errors import InvalidEvent, InvalidJson, InvalidSignature
from service.events import LeadEvent

TraitName = Annotated[str, StringConstraints(min_length=1, max_length=200)]
# A HubSpot property's internal name (HubSpot makes them of lower-case letters, digits and
# underscores): nothing that could not go into the `properties` query parameter as it is.
PropertyName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,100}$")]
HUBSPOT_API = "https://api.hubapi.com"


class SourceConfig(BaseModel):
    """A source's settings, kept in `source.config` (JSON)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mapping: dict[TraitName, TraitName | None] = Field(
        default_factory=dict,
        description="Vendor property -> canonical trait name; null drops the property. Properties not "
        "named keep their vendor name.",
    )
    signature_versions: tuple[Literal["v1", "v2", "v3"], ...] = Field(
        default=("v3",),
        min_length=1,
        description="HubSpot only: which signature versions are accepted. v1 and v2 carry no timestamp "
        "(a captured request can be replayed), so they are accepted only when listed here.",
    )
    properties: tuple[PropertyName, ...] = Field(
        default=(),
        max_length=200,
        description="HubSpot only: contact properties enrichment reads besides the defaults (the traits the "
        "active pipeline reads, the properties the mapping names, email, firstname, lastname, company).",
    )
    api_base_url: str = Field(
        default=HUBSPOT_API,
        max_length=500,
        description="HubSpot only: the API's base URL enrichment calls (with the source's API token): "
        "https, or http to this machine (localhost, 127.0.0.1, ::1); no user, query or fragment.",
    )

    @field_validator("api_base_url")
    @classmethod
    def _check_api_base_url(cls, value: str) -> str:
        problem = api_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


# Plain http only to this machine: the API token travels in the Authorization header.
_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def api_url_problem(url: str) -> str | None:
    """Why `url` cannot be an API base URL that a bearer token is sent to, or None when it can."""
    if any(c.isspace() or not c.isprintable() for c in url):
        return "the URL has whitespace or control characters"
    try:
        parts = urlsplit(url)
        _ = parts.port  # a bad port is refused here, not at the first fetch
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return "give an https:// URL with a host"
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        return "the API token is sent to this URL: https only (http only to localhost, 127.0.0.1 or ::1)"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "the URL must not carry a user or password"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return "the URL must not have a query or fragment"
    return None


DEFAULT_CONFIG = SourceConfig()


@dataclass(frozen=True, slots=True)
class RequestLine:
    """Where the request was sent: what a scheme that signs the URL needs (HubSpot)."""

    method: str
    scheme: str
    host: str | None
    raw_path: str
    query: str
    public_base_url: str | None = None

    def public_url(self) -> str:
        """The URL as the sender addressed it: `LEADSCORE_PUBLIC_BASE_URL` (scheme, host and any path
        prefix a proxy strips) when set, else the scheme and `Host` this process saw, then the path and
        query exactly as received (still percent-encoded)."""
        if self.public_base_url:
            base = self.public_base_url.rstrip("/")
        else:
            base = f"{self.scheme}://{self.host or 'localhost'}"
        return base + self.raw_path + (f"?{self.query}" if self.query else "")


@dataclass(frozen=True, slots=True)
class Verified:
    """What a valid signature vouches for."""

    webhook_id: str | None
    signed_at: dt.datetime | None


@dataclass(frozen=True)
class Mapped:
    """A body mapped to canonical events, each with its deduplication key, and the items of the body
    that carry no lead event (`{"index", "reason"}`); those are kept in the stored raw body."""

    events: list[LeadEvent]
    keys: list[str]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    # Events after which the vendor's full record is worth fetching (a HubSpot app event carries ids
    # only): index in `events` -> the record's id. Fetched only when the source has an API token.
    fetch: dict[int, str] = field(default_factory=dict)
    # Of those, the ones asked by a change to one vendor property: index -> the property. Fetched only
    # when the source reads that property (see `wanted_fetches`).
    changed: dict[int, str] = field(default_factory=dict)

    def wanted_fetches(self, reads: Callable[[], Collection[str]]) -> dict[int, str]:
        """The records to fetch: every one asked by a creation or the like, and those asked by a change
        to a property in `reads()` (called only when a change asked). A change to a property nobody
        reads (one our own CRM delivery wrote, echoed back) would only fetch what is already known."""
        if not self.changed:
            return dict(self.fetch)
        read = reads()
        return {i: record for i, record in self.fetch.items() if i not in self.changed or self.changed[i] in read}


class SignatureScheme(Protocol):
    name: str

    def new_secret(self) -> str | None:
        """A fresh secret in the scheme's own format, or None when the vendor issues it (HubSpot's app
        client secret) and it has to be given."""
        ...

    def verify(
        self,
        *,
        headers: Mapping[str, str],
        body: bytes,
        secrets: Sequence[str],
        now: dt.datetime,
        tolerance: dt.timedelta,
        request: RequestLine,
        config: SourceConfig,
    ) -> Verified:
        """Return what the signature vouches for, or raise `InvalidSignature`."""
        ...


class BodyMapper(Protocol):
    def map(
        self, body: bytes, *, verified: Verified, config: SourceConfig, now: dt.datetime, max_events: int
    ) -> Mapped:
        """The canonical events of a verified body; raises `InvalidJson` / `InvalidEvent` when the body
        is not the vendor's shape at all. Items that cannot be mapped are listed in `skipped`."""
        ...


# --- helpers for schemes -------------------------------------------------------------------------


def matches_any(expected: Iterable[bytes], candidate: bytes) -> bool:
    """Whether `candidate` equals any of `expected`, comparing against every one in constant time so
    the time taken does not tell which secret (if any) matched."""
    matched = False
    for value in expected:
        matched |= hmac.compare_digest(value, candidate)
    return matched


def require_secrets(secrets: Sequence[str]) -> None:
    # An empty secret list means the source accepts nothing, never "accept all".
    if not any(secrets):
        raise InvalidSignature("the source has no live secret")


# --- helpers for mappers -------------------------------------------------------------------------

# Traits keep the value with the latest event time, so an event dated far ahead would pin them.
MAX_FUTURE = dt.timedelta(days=1)
_KEY_LIMIT = 200  # inbound_event.external_id


class Unmappable(ValueError):
    """One item of a vendor body that carries no lead event; it is skipped, with this reason."""


def load_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"the body is not valid JSON: {exc}") from None


def check_count(items: Sized, max_events: int, *, allow_empty: bool = False) -> None:
    """Refuse a body with more items than one request may carry (as for canonical lists)."""
    if not items and not allow_empty:
        raise InvalidEvent([{"loc": "", "msg": "the body carries no events", "type": "too_short"}])
    if len(items) > max_events:
        raise InvalidEvent([{"loc": "", "msg": f"at most {max_events} events per request", "type": "too_long"}])


def digest(value: Any) -> str:
    """sha256 of a JSON value in a canonical form (sorted keys): equal content, equal digest."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


def bounded_key(key: str) -> str:
    """A deduplication key that fits the column: longer ones are replaced by their digest."""
    if len(key) <= _KEY_LIMIT:
        return key
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def parse_time(value: Any, *, what: str) -> dt.datetime:
    """A vendor time: epoch milliseconds (int or digit string) or ISO 8601. A time without offset is
    taken as UTC (vendors that send one mean UTC)."""
    if isinstance(value, bool) or value is None or value == "":
        raise Unmappable(f"{what} is missing")
    if isinstance(value, int | float) or (isinstance(value, str) and value.isdigit()):
        try:
            return dt.datetime.fromtimestamp(float(value) / 1000, dt.UTC)
        except (OverflowError, ValueError, OSError):
            raise Unmappable(f"{what} is not a time: {value!r}") from None
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise Unmappable(f"{what} is not a time: {value!r}") from None
        return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)
    raise Unmappable(f"{what} is not a time: {value!r}")


def first_time(candidates: Iterable[tuple[str, Any]], *, default: dt.datetime) -> dt.datetime:
    """The first candidate that is present and parses; `default` when none is present."""
    for what, value in candidates:
        if value not in (None, ""):
            return parse_time(value, what=what)
    return default


def scalar_traits(values: Mapping[str, Any], *, prefix: str = "", empty_is_none: bool = False) -> dict[str, Any]:
    """Flat scalar traits: nested objects become dotted names (`address.city`); lists are left out
    (they stay in the raw body)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if not key or len(key) > 200:
            continue
        if isinstance(value, dict):
            out.update(scalar_traits(value, prefix=f"{key}.", empty_is_none=empty_is_none))
        elif value is None or isinstance(value, str | int | float | bool):
            out[key] = None if empty_is_none and value == "" else value
    return out


def as_object(value: Any) -> dict[str, Any]:
    """`value` when it is a JSON object, else an empty one (vendors send null or [] for "none")."""
    return value if isinstance(value, dict) else {}


def apply_mapping(traits: Mapping[str, Any], mapping: Mapping[str, str | None]) -> dict[str, Any]:
    """Rename traits by the source's mapping (vendor property -> canonical trait; None drops it)."""
    if not mapping:
        return dict(traits)
    out: dict[str, Any] = {}
    for name, value in traits.items():
        target = mapping.get(name, name)
        if target is not None:
            out[target] = value
    return out


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def email_or_none(value: Any) -> str | None:
    """An email address worth matching on, or None (vendors send empty strings and placeholders)."""
    if isinstance(value, str) and _EMAIL.match(value.strip()) and len(value) <= 320:
        return value.strip()
    return None


def external_id(value: Any) -> str | None:
    """A vendor id as the text an identity is stored as (numbers included), or None when absent."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip() and len(value.strip()) <= 200:
        return value.strip()
    return None


def subject(email: Any = None, **external_ids: Any) -> dict[str, Any]:
    """A canonical subject from what the vendor gave; raises `Unmappable` when it names nobody."""
    out: dict[str, Any] = {}
    address = email_or_none(email)
    if address:
        out["email"] = address
    ids = {ns: value for ns, raw in external_ids.items() if (value := external_id(raw)) is not None}
    if ids:
        out["external_ids"] = ids
    if not out:
        raise Unmappable("names no one: no email and no id")
    return out


class EventBuilder:
    """Collects a vendor body's events: each item is validated as a canonical event on its own, so one
    bad item is skipped (with its reason) without losing the others."""

    def __init__(self, *, config: SourceConfig, now: dt.datetime) -> None:
        self._mapping = config.mapping
        self._now = now
        self.events: list[LeadEvent] = []
        self.keys: list[str] = []
        self.skipped: list[dict[str, Any]] = []
        self.fetch: dict[int, str] = {}
        self.changed: dict[int, str] = {}

    def add(
        self,
        index: int | str,
        key: str,
        event: dict[str, Any],
        *,
        fetch: str | None = None,
        changed: str | None = None,
    ) -> None:
        """Add one item's event under its deduplication key; `fetch` names the vendor record to fetch
        in full after it, `changed` the one property whose change asks for it (see `Mapped`)."""
        if "traits" in event:
            event["traits"] = apply_mapping(event["traits"], self._mapping)
        try:
            parsed = LeadEvent.model_validate(event)
        except ValidationError as exc:
            errors = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'event'}: {e['msg']}" for e in exc.errors(include_url=False)
            )
            self.skip(index, f"not a valid lead event ({errors})")
            return
        if parsed.occurred_at > self._now + MAX_FUTURE:
            self.skip(index, "occurred more than a day in the future")
            return
        # The same key twice in one body is stored once; the writer answers the second as a duplicate.
        if fetch is not None:
            self.fetch[len(self.events)] = fetch
            if changed is not None:
                self.changed[len(self.events)] = changed
        self.events.append(parsed)
        self.keys.append(bounded_key(key))

    def skip(self, index: int | str, reason: str) -> None:
        self.skipped.append({"index": index, "reason": reason})

    def result(self) -> Mapped:
        return Mapped(events=self.events, keys=self.keys, skipped=self.skipped, fetch=self.fetch, changed=self.changed)
