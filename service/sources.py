"""Webhook sources: the per-process cache the ingest path reads, and the admin use cases."""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.audit import append_audit
from service.auth import SYSTEM, Principal
from service.db import write_transaction
from service.errors import StorageUnavailable
from service.metrics import DB_ERRORS
from service.repositories import enrichment as enrichment_repo
from service.repositories import sources as repo
from service.repositories.sources import SourceRow
from service.webhooks import SCHEMES, SourceConfig, scheme_for


class SourceError(ValueError):
    """A source admin command cannot be done (unknown scheme, name taken, no such source)."""


@dataclass(frozen=True)
class CreatedSource:
    name: str
    scheme: str
    secret: str


class SourceRegistry:
    """Sources by name, cached for `ttl` seconds so the ingest path does not query for them on
    every request. Unknown names are cached too, so a flood of bad names costs no queries. When an
    entry is missing or stale, one lookup runs and every request for that name waits on it: under
    load an expiry otherwise sent each request in flight to the database at once (on a connection
    beyond the pool's, opened and closed for it)."""

    def __init__(self, engine: AsyncEngine, *, ttl: float, retry_after: int) -> None:
        self._engine = engine
        self._ttl = ttl
        self._retry_after = retry_after
        self._cache: dict[str, tuple[float, SourceRow | None]] = {}
        self._lookups: dict[str, asyncio.Task[SourceRow | None]] = {}

    async def get(self, name: str) -> SourceRow | None:
        hit = self._cache.get(name)
        if hit is not None and time.monotonic() - hit[0] < self._ttl:
            return hit[1]
        lookup = self._lookups.get(name)
        if lookup is None:
            lookup = asyncio.create_task(self._lookup(name), name=f"source-lookup-{name}")
            self._lookups[name] = lookup
            lookup.add_done_callback(functools.partial(self._finished, name))
        # A request that goes away (its client disconnected) must not cancel the others' lookup.
        return await asyncio.shield(lookup)

    def _finished(self, name: str, lookup: asyncio.Task[SourceRow | None]) -> None:
        if self._lookups.get(name) is lookup:
            del self._lookups[name]
        if not lookup.cancelled():
            lookup.exception()  # retrieved, even when every request that waited on it has gone

    async def _lookup(self, name: str) -> SourceRow | None:
        started = time.monotonic()
        try:
            async with self._engine.connect() as conn:
                row = await repo.get_source(conn, name)
        except (DBAPIError, OSError, TimeoutError) as exc:
            DB_ERRORS.labels(operation="source_lookup").inc()
            raise StorageUnavailable("the database is unavailable; retry later", retry_after=self._retry_after) from exc
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[name] = (started, row)
        return row


def _state(row: SourceRow) -> dict[str, object]:
    # Counts and configuration only: secrets and tokens never go into the audit log.
    state: dict[str, object] = {
        "name": row.name,
        "scheme": row.scheme,
        "enabled": row.enabled,
        "live_secrets": len(row.secrets),
        "config": row.config.model_dump(mode="json", exclude_defaults=True),
    }
    if row.api_token is not None:
        state["api_token"] = True
    return state


async def _audit(
    conn: AsyncConnection,
    *,
    actor: Principal,
    action: str,
    name: str,
    before: SourceRow | None,
    after: SourceRow | None,
    reason: str | None,
    now: dt.datetime,
    effects: Mapping[str, object] | None = None,
) -> None:
    await append_audit(
        conn,
        actor=actor.subject,
        role=actor.role,
        action=action,
        entity="source",
        entity_id=name,
        before=None if before is None else _state(before),
        after=None if after is None else _state(after) | dict(effects or {}),
        reason=reason,
        now=now,
    )


async def _existing(conn: AsyncConnection, name: str) -> SourceRow:
    row = await repo.get_source(conn, name)
    if row is None:
        raise SourceError(f"no source named {name!r}")
    return row


def _secret(scheme: str, given: str | None) -> str:
    if given is not None:
        given = given.strip()
        if not given or len(given) > 200:
            raise SourceError("a secret is 1 to 200 characters")
        return given
    made = scheme_for(scheme).new_secret()
    if made is None:
        raise SourceError(f"{scheme} sources sign with a secret the vendor issues (the app's client secret): give it")
    return made


def source_config(
    current: SourceConfig | None = None,
    *,
    mapping: Mapping[str, Any] | None = None,
    signature_versions: Sequence[str] | None = None,
    properties: Sequence[str] | None = None,
    api_base_url: str | None = None,
) -> SourceConfig:
    """A validated source configuration: `current` with the given parts replaced."""
    data = (current or SourceConfig()).model_dump()
    if mapping is not None:
        data["mapping"] = dict(mapping)
    if signature_versions is not None:
        data["signature_versions"] = tuple(signature_versions)
    if properties is not None:
        data["properties"] = tuple(properties)
    if api_base_url is not None:
        data["api_base_url"] = api_base_url
    try:
        return SourceConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False))
        raise SourceError(f"invalid source configuration: {problems}") from None


def _check_applies(scheme: str, config: SourceConfig | None) -> None:
    if config is None or scheme == "hubspot":
        return
    default = SourceConfig()
    if config.signature_versions != default.signature_versions:
        raise SourceError("signature versions are a HubSpot setting; this source's scheme has one way to sign")
    if config.properties != default.properties or config.api_base_url != default.api_base_url:
        raise SourceError("enrichment (properties, API base URL) is a HubSpot setting")


def _api_token(scheme: str, token: str) -> str:
    if scheme != "hubspot":
        raise SourceError("an API token is a HubSpot setting (enrichment reads contacts with it)")
    token = token.strip()
    # It goes into an Authorization header: no whitespace or control characters.
    if not token or len(token) > 500 or not token.isascii() or not token.isprintable() or " " in token:
        raise SourceError("an API token is 1 to 500 printable characters without spaces")
    return token


def _stored(config: SourceConfig) -> dict[str, Any]:
    return config.model_dump(mode="json", exclude_defaults=True)


async def add_source(
    engine: AsyncEngine,
    *,
    name: str,
    scheme: str,
    now: dt.datetime,
    secret: str | None = None,
    config: SourceConfig | None = None,
    actor: Principal = SYSTEM,
    reason: str | None = None,
) -> CreatedSource:
    """Create a source with its first secret (the one given, else a new one in the scheme's
    format); audited as `source.created`."""
    if scheme not in SCHEMES:
        raise SourceError(f"unknown scheme {scheme!r}; known: {', '.join(sorted(SCHEMES))}")
    _check_applies(scheme, config)
    secret = _secret(scheme, secret)
    async with write_transaction(engine) as conn:
        if await repo.get_source(conn, name) is not None:
            raise SourceError(f"a source named {name!r} exists")
        await repo.create_source(
            conn, name=name, scheme=scheme, secret=secret, now=now, config=_stored(config or SourceConfig())
        )
        after = await _existing(conn, name)
        await _audit(
            conn, actor=actor, action="source.created", name=name, before=None, after=after, reason=reason, now=now
        )
    return CreatedSource(name=name, scheme=scheme, secret=secret)


async def configure_source(
    engine: AsyncEngine,
    *,
    name: str,
    mapping: Mapping[str, Any] | None = None,
    signature_versions: Sequence[str] | None = None,
    properties: Sequence[str] | None = None,
    api_base_url: str | None = None,
    api_token: str | None = None,
    clear_api_token: bool = False,
    now: dt.datetime | None = None,
    actor: Principal = SYSTEM,
    reason: str | None = None,
) -> SourceConfig:
    """Replace the parts given of a source's configuration; returns the whole new configuration.
    `api_token` sets (or replaces) a HubSpot source's private-app token, which turns enrichment on and
    revives the fetches a refused token (401/403) gave up on; `clear_api_token` removes it (off). A
    new API base URL needs the token given again or cleared in the same call: the token is never sent
    to a host it was not given for. Audited as `source.configured` (whether a token is set, never the
    token; `fetches_revived` when a new token revived any)."""
    now = now or dt.datetime.now(dt.UTC)
    if api_token is not None and clear_api_token:
        raise SourceError("set an API token or clear it, not both")
    async with write_transaction(engine) as conn:
        before = await _existing(conn, name)
        config = source_config(
            before.config,
            mapping=mapping,
            signature_versions=signature_versions,
            properties=properties,
            api_base_url=api_base_url,
        )
        _check_applies(before.scheme, config)
        moved = config.api_base_url != before.config.api_base_url
        if moved and before.api_token is not None and api_token is None and not clear_api_token:
            raise SourceError(
                "a new API base URL would receive the API token set for the old one: give the token again "
                "(--api-token-stdin) or clear it (--clear-api-token) in the same command"
            )
        await repo.set_config(conn, source_id=before.id, config=_stored(config))
        effects: dict[str, object] = {}
        if api_token is not None:
            await repo.set_api_token(conn, source_id=before.id, token=_api_token(before.scheme, api_token), now=now)
            if revived := await enrichment_repo.revive_token_refused(conn, source_id=before.id, now=now):
                effects["fetches_revived"] = revived
        elif clear_api_token:
            await repo.clear_api_token(conn, source_id=before.id)
        after = await _existing(conn, name)
        await _audit(
            conn,
            actor=actor,
            action="source.configured",
            name=name,
            before=before,
            after=after,
            reason=reason,
            now=now,
            effects=effects,
        )
    return config


async def rotate_source(
    engine: AsyncEngine,
    *,
    name: str,
    now: dt.datetime,
    secret: str | None = None,
    actor: Principal = SYSTEM,
    reason: str | None = None,
) -> CreatedSource:
    """Add a new secret (the one given, else a new one); the old ones stay valid until
    `retire_source_secrets`. Audited as `source.secret_rotated`."""
    async with write_transaction(engine) as conn:
        before = await _existing(conn, name)
        secret = _secret(before.scheme, secret)
        await repo.add_secret(conn, source_id=before.id, secret=secret, now=now)
        after = await _existing(conn, name)
        await _audit(
            conn,
            actor=actor,
            action="source.secret_rotated",
            name=name,
            before=before,
            after=after,
            reason=reason,
            now=now,
        )
    return CreatedSource(name=name, scheme=before.scheme, secret=secret)


async def retire_source_secrets(
    engine: AsyncEngine, *, name: str, now: dt.datetime, actor: Principal = SYSTEM, reason: str | None = None
) -> int:
    """Retire every live secret but the newest; audited as `source.secrets_retired` when any was."""
    async with write_transaction(engine) as conn:
        before = await _existing(conn, name)
        retired = await repo.retire_old_secrets(conn, source_id=before.id, now=now)
        if retired:
            after = await _existing(conn, name)
            await _audit(
                conn,
                actor=actor,
                action="source.secrets_retired",
                name=name,
                before=before,
                after=after,
                reason=reason,
                now=now,
            )
        return retired


async def enable_source(
    engine: AsyncEngine,
    *,
    name: str,
    enabled: bool,
    now: dt.datetime | None = None,
    actor: Principal = SYSTEM,
    reason: str | None = None,
) -> None:
    """Turn a source on or off; a disabled source's requests are answered 404 and nothing is stored.
    Audited as `source.enabled` / `source.disabled` when it changes."""
    now = now or dt.datetime.now(dt.UTC)
    async with write_transaction(engine) as conn:
        before = await _existing(conn, name)
        if before.enabled == enabled:
            return
        await repo.set_enabled(conn, source_id=before.id, enabled=enabled)
        after = await _existing(conn, name)
        action = "source.enabled" if enabled else "source.disabled"
        await _audit(conn, actor=actor, action=action, name=name, before=before, after=after, reason=reason, now=now)


async def list_all(engine: AsyncEngine) -> list[SourceRow]:
    async with engine.connect() as conn:
        return await repo.list_sources(conn)
