"""The per-process source cache of the ingest path: one database lookup per name at a time."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service import sources
from service.db import create_engine
from service.errors import StorageUnavailable
from service.settings import Settings
from service.sources import SourceRegistry, add_source

pytestmark = pytest.mark.anyio


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    made = create_engine(settings.database_url)
    try:
        await add_source(made, name="demo", scheme="standard", now=dt.datetime.now(dt.UTC))
        yield made
    finally:
        await made.dispose()


class HeldLookups:
    """Counts the registry's queries (run on the real database) and holds each until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.release = asyncio.Event()
        real = sources.repo.get_source

        async def counted(conn: Any, name: str) -> Any:
            self.calls += 1
            await self.release.wait()
            return await real(conn, name)

        monkeypatch.setattr(sources.repo, "get_source", counted)


async def test_concurrent_requests_for_a_name_share_one_database_lookup(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldLookups(monkeypatch)
    registry = SourceRegistry(engine, ttl=60, retry_after=5)
    waiting = [asyncio.create_task(registry.get("demo")) for _ in range(40)]
    unknown = [asyncio.create_task(registry.get("nobody")) for _ in range(10)]
    await asyncio.sleep(0.05)
    assert held.calls == 2  # one per name, however many requests wait
    held.release.set()
    rows = await asyncio.gather(*waiting)
    assert {row.name for row in rows if row is not None} == {"demo"}
    assert None not in rows
    assert await asyncio.gather(*unknown) == [None] * 10
    # Cached now, for known and unknown names alike.
    assert (await registry.get("demo")) is not None
    assert await registry.get("nobody") is None
    assert held.calls == 2


async def test_a_stale_entry_is_looked_up_again_once(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    held = HeldLookups(monkeypatch)
    held.release.set()
    registry = SourceRegistry(engine, ttl=0.05, retry_after=5)
    assert await registry.get("demo") is not None
    await asyncio.sleep(0.1)
    rows = await asyncio.gather(*(registry.get("demo") for _ in range(20)))
    assert all(row is not None for row in rows)
    assert held.calls == 2


async def test_a_request_that_goes_away_does_not_cancel_the_lookup_the_others_wait_on(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    held = HeldLookups(monkeypatch)
    registry = SourceRegistry(engine, ttl=60, retry_after=5)
    first = asyncio.create_task(registry.get("demo"))
    second = asyncio.create_task(registry.get("demo"))
    await asyncio.sleep(0.05)
    first.cancel()
    held.release.set()
    row = await second
    assert row is not None
    assert row.name == "demo"
    with pytest.raises(asyncio.CancelledError):
        await first
    assert held.calls == 1


async def test_a_failed_lookup_fails_every_waiter_with_503_and_is_not_cached() -> None:
    # Nothing listens on port 1: a real refused connection, not a stand-in.
    down = create_engine("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    try:
        registry = SourceRegistry(down, ttl=60, retry_after=7)
        results = await asyncio.gather(*(registry.get("demo") for _ in range(5)), return_exceptions=True)
        assert all(isinstance(r, StorageUnavailable) and r.retry_after == 7 for r in results)
        with pytest.raises(StorageUnavailable):
            await registry.get("demo")  # tried again, not answered from a cached failure
    finally:
        await down.dispose()
