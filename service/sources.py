"""Webhook sources: the per-process cache the ingest path reads, and the admin use cases."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

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


async def add_source(engine: AsyncEngine, *, name: str, scheme: str, now: dt.datetime) -> CreatedSource:
    if scheme not in SCHEMES:
        raise SourceError(f"unknown scheme {scheme!r}; known: {', '.join(sorted(SCHEMES))}")
    secret = scheme_for(scheme).new_secret()
    async with engine.begin() as conn:
        if await repo.get_source(conn, name) is not None:
            raise SourceError(f"a source named {name!r} exists")
        await repo.create_source(conn, name=name, scheme=scheme, secret=secret, now=now)
    return CreatedSource(name=name, scheme=scheme, secret=secret)


async def rotate_source(engine: AsyncEngine, *, name: str, now: dt.datetime) -> CreatedSource:
    """Add a new secret; the old ones stay valid until `retire_source_secrets`."""
    async with engine.begin() as conn:
        row = await repo.get_source(conn, name)
        if row is None:
            raise SourceError(f"no source named {name!r}")
        secret = scheme_for(row.scheme).new_secret()
        await repo.add_secret(conn, source_id=row.id, secret=secret, now=now)
    return CreatedSource(name=name, scheme=row.scheme, secret=secret)


async def retire_source_secrets(engine: AsyncEngine, *, name: str, now: dt.datetime) -> int:
    async with engine.begin() as conn:
        row = await repo.get_source(conn, name)
        if row is None:
            raise SourceError(f"no source named {name!r}")
        return await repo.retire_old_secrets(conn, source_id=row.id, now=now)


async def enable_source(engine: AsyncEngine, *, name: str, enabled: bool) -> None:
    """Turn a source on or off; a disabled source's requests are answered 404 and nothing is stored."""
    async with engine.begin() as conn:
        row = await repo.get_source(conn, name)
        if row is None:
            raise SourceError(f"no source named {name!r}")
        await repo.set_enabled(conn, source_id=row.id, enabled=enabled)


async def list_all(engine: AsyncEngine) -> list[SourceRow]:
    async with engine.connect() as conn:
        return await repo.list_sources(conn)
