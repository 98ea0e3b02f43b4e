"""The migrations are the only schema path: they build what the models describe, and go back down."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

import models
from service import migrate
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
