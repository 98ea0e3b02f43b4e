"""Webhook sources: the per-process cache the ingest path reads, and the admin use cases."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.audit import append_audit
from service.auth import SYSTEM, Principal
from service.db import write_transaction
from service.errors import StorageUnavailable
from service.metrics import DB_ERRORS
from service.repositories import sources as repo
from service.repositories.sources import SourceRow
from service.webhooks import SCHEMES, scheme_for


class SourceError(ValueError):
    """A source admin command cannot be done (unknown scheme, name taken, no such source)."""


@dataclass(frozen=True)
class CreatedSource:
    name: str
    scheme: str
    secret: str


class SourceRegistry:
    """Sources by name, cached for `ttl` seconds so the ingest path does not query for them on
    every request. Unknown names are cached too, so a flood of bad names costs no queries."""

    def __init__(self, engine: AsyncEngine, *, ttl: float, retry_after: int) -> None:
        self._engine = engine
        self._ttl = ttl
        self._retry_after = retry_after
        self._cache: dict[str, tuple[float, SourceRow | None]] = {}

    async def get(self, name: str) -> SourceRow | None:
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1]
        try:
            async with self._engine.connect() as conn:
                row = await repo.get_source(conn, name)
        except (DBAPIError, OSError, TimeoutError) as exc:
            DB_ERRORS.labels(operation="source_lookup").inc()
            raise StorageUnavailable("the database is unavailable; retry later", retry_after=self._retry_after) from exc
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[name] = (now, row)
        return row


def _state(row: SourceRow) -> dict[str, object]:
    # Counts only: secrets never go into the audit log.
    return {"name": row.name, "scheme": row.scheme, "enabled": row.enabled, "live_secrets": len(row.secrets)}


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
) -> None:
    await append_audit(
        conn,
        actor=actor.subject,
        role=actor.role,
        action=action,
        entity="source",
        entity_id=name,
        before=None if before is None else _state(before),
        after=None if after is None else _state(after),
        reason=reason,
        now=now,
    )


async def _existing(conn: AsyncConnection, name: str) -> SourceRow:
    row = await repo.get_source(conn, name)
    if row is None:
        raise SourceError(f"no source named {name!r}")
    return row


async def add_source(
    engine: AsyncEngine,
    *,
    name: str,
    scheme: str,
    now: dt.datetime,
    actor: Principal = SYSTEM,
    reason: str | None = None,
) -> CreatedSource:
    """Create a source with its first secret; audited as `source.created`."""
    if scheme not in SCHEMES:
        raise SourceError(f"unknown scheme {scheme!r}; known: {', '.join(sorted(SCHEMES))}")
    secret = scheme_for(scheme).new_secret()
    async with write_transaction(engine) as conn:
        if await repo.get_source(conn, name) is not None:
            raise SourceError(f"a source named {name!r} exists")
        await repo.create_source(conn, name=name, scheme=scheme, secret=secret, now=now)
        after = await _existing(conn, name)
        await _audit(
            conn, actor=actor, action="source.created", name=name, before=None, after=after, reason=reason, now=now
        )
    return CreatedSource(name=name, scheme=scheme, secret=secret)


async def rotate_source(
    engine: AsyncEngine, *, name: str, now: dt.datetime, actor: Principal = SYSTEM, reason: str | None = None
) -> CreatedSource:
    """Add a new secret; the old ones stay valid until `retire_source_secrets`. Audited as
    `source.secret_rotated`."""
    async with write_transaction(engine) as conn:
        before = await _existing(conn, name)
        secret = scheme_for(before.scheme).new_secret()
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
