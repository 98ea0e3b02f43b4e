"""The migrations are the only schema path: they build what the models describe, and go back down."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
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


def test_write_once_documents_are_compressed_with_lz4(db_url: str) -> None:
    """Migration 0012: on PostgreSQL servers with lz4, request bodies, event payloads and score
    explanations are lz4 (a stored explanation past the threshold comes back lz4-compressed). Down
    gives them the server's default again. SQLite has no such setting, and nothing changes there."""
    columns = {("inbound_request", "body"), ("inbound_event", "payload"), ("score_record", "explanation")}

    async def compression() -> tuple[dict[tuple[str, str], str], str | None, bool]:
        engine = create_engine(db_url)
        try:
            async with engine.begin() as conn:
                if conn.dialect.name != "postgresql":
                    return {}, None, False
                rows = await conn.execute(
                    sa.text(
                        "SELECT c.relname, a.attname, a.attcompression::text FROM pg_attribute a "
                        "JOIN pg_class c ON c.oid = a.attrelid "
                        "WHERE (c.relname, a.attname) IN (('inbound_request', 'body'), "
                        "('inbound_event', 'payload'), ('score_record', 'explanation'))"
                    )
                )
                settings = {(row[0], row[1]): row[2] for row in rows}
                has_lz4 = (
                    await conn.execute(
                        sa.text(
                            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
                        )
                    )
                ).scalar()
                # An explanation the size of a real one, with the digits that keep it from being trivial.
                explanation = json.dumps({"features": [[f"feature_{n}", n * 0.123456789, n / 7] for n in range(60)]})
                record = uuid.uuid4()
                await conn.execute(
                    sa.text(
                        "INSERT INTO score_record (id, lead_id, pipeline_version_id, shadow, scored_at, "
                        "inputs_digest, score, fit, engagement, probability, grade, explanation) VALUES "
                        "(:id, :lead, 1, false, now(), 'x', 1, 1, 1, 0.5, 'A1', CAST(:e AS json))"
                    ),
                    {"id": record, "lead": uuid.uuid4(), "e": explanation},
                )
                stored = (
                    await conn.execute(
                        sa.text("SELECT pg_column_compression(explanation) FROM score_record WHERE id = :id"),
                        {"id": record},
                    )
                ).scalar()
                await conn.rollback()
                return settings, stored, bool(has_lz4)
        finally:
            await engine.dispose()

    settings, stored, has_lz4 = asyncio.run(compression())
    if not db_url.startswith("postgresql"):
        assert settings == {}
        return
    assert set(settings) == columns
    assert set(settings.values()) == ({"l"} if has_lz4 else {""})
    assert stored == ("lz4" if has_lz4 else "pglz")
    migrate.downgrade(db_url, "0011")
    try:
        settings, stored, _ = asyncio.run(compression())
        assert set(settings.values()) == {""}
        assert stored == "pglz"
    finally:
        migrate.upgrade(db_url)
