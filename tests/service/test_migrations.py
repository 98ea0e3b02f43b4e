"""The migrations are the only schema path: they build what the models describe, and go back down."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

import models
from service import migrate
from service.db import create_engine
from service.repositories import tables
from tests.conftest import Db

pytestmark = pytest.mark.anyio


async def test_schema_from_migrations_matches_the_models(db: Db) -> None:
    def diff(conn: Connection) -> list[object]:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(context, models.metadata))

    async with db.engine.connect() as conn:
        assert await conn.run_sync(diff) == []
    assert await db.scalar("SELECT version_num FROM alembic_version") == migrate.head()


def test_downgrade_to_base_and_up_again(db_url: str) -> None:
    migrate.downgrade(db_url, "base")
    migrate.upgrade(db_url)


def test_outcomes_left_on_merged_leads_move_to_the_survivor(db_url: str) -> None:
    """Migration 0010: outcomes recorded before merges moved them are moved to the final survivor."""
    migrate.downgrade(db_url, "0009")
    survivor, middle, merged, other = (uuid.uuid4() for _ in range(4))
    at = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)

    async def seed_and_read(upgrade: bool) -> list[tuple[str, str]]:
        engine = create_engine(db_url)
        try:
            async with engine.begin() as conn:
                if not upgrade:
                    # A chain: `merged` went into `middle`, which then went into `survivor` (the
                    # second merge re-pointed `merged` at `survivor`, as record_merges does).
                    for lead_id, into in ((survivor, None), (other, None), (middle, survivor), (merged, survivor)):
                        await conn.execute(
                            tables.lead.insert().values(
                                id=lead_id, created_at=at, updated_at=at, traits={}, trait_times={}, merged_into_id=into
                            )
                        )
                    for n, lead_id in enumerate((merged, middle, other, survivor)):
                        await conn.execute(
                            tables.outcome.insert().values(
                                lead_id=lead_id,
                                kind="won",
                                occurred_at=at,
                                source="crm",
                                external_id=f"o{n}",
                                recorded_at=at,
                            )
                        )
                rows = await conn.execute(sa.select(tables.outcome.c.external_id, tables.outcome.c.lead_id))
                return sorted((row.external_id, str(row.lead_id)) for row in rows)
        finally:
            await engine.dispose()

    before = asyncio.run(seed_and_read(upgrade=False))
    assert before == [("o0", str(merged)), ("o1", str(middle)), ("o2", str(other)), ("o3", str(survivor))]
    migrate.upgrade(db_url)
    after = asyncio.run(seed_and_read(upgrade=True))
    assert after == [("o0", str(survivor)), ("o1", str(survivor)), ("o2", str(other)), ("o3", str(survivor))]


def test_lead_rows_have_room_for_updates_and_lz4_traits(db_url: str) -> None:
    """Migration 0011: the partial index of activities (both databases); on PostgreSQL a fill factor
    of 70 and, where the server has lz4, lz4 traits. Down removes them all."""
    activity_index = "ix_inbound_event_activity_lead_id_occurred_at"

    async def storage() -> tuple[list[str] | None, set[str], bool, bool]:
        engine = create_engine(db_url)
        try:
            async with engine.connect() as conn:
                indexes = await conn.run_sync(lambda sync: sa.inspect(sync).get_indexes("inbound_event"))
                indexed = any(index["name"] == activity_index for index in indexes)
                if conn.dialect.name != "postgresql":
                    return None, set(), False, indexed
                options = (
                    await conn.execute(sa.text("SELECT reloptions FROM pg_class WHERE relname = 'lead'"))
                ).scalar()
                compression = await conn.execute(
                    sa.text(
                        "SELECT attcompression::text FROM pg_attribute WHERE attrelid = 'lead'::regclass "
                        "AND attname IN ('traits', 'trait_times')"
                    )
                )
                has_lz4 = (
                    await conn.execute(
                        sa.text(
                            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
                        )
                    )
                ).scalar()
                return options, {str(row[0]) for row in compression}, bool(has_lz4), indexed
        finally:
            await engine.dispose()

    options, compression, has_lz4, indexed = asyncio.run(storage())
    assert indexed
    if db_url.startswith("postgresql"):
        assert options == ["fillfactor=70"]
        assert compression == ({"l"} if has_lz4 else {""})
    migrate.downgrade(db_url, "0010")
    try:
        options, compression, _, indexed = asyncio.run(storage())
        assert not indexed
        if db_url.startswith("postgresql"):
            assert options is None
            assert compression == {""}
    finally:
        migrate.upgrade(db_url)
