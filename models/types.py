"""Column types shared by the tables."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect


class UtcDateTime(sa.TypeDecorator[dt.datetime]):
    """A timezone-aware UTC timestamp on every backend.

    SQLite has no timezone type and hands back naive values; this type refuses naive input
    (a naive datetime is a bug in the caller) and attaches UTC on the way out.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UtcDateTime column")
        value = value.astimezone(dt.UTC)
        if dialect.name == "sqlite":
            # Stored without offset so that string ordering is time ordering.
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:  # noqa: ARG002
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def json_type() -> sa.types.TypeEngine[Any]:
    """JSON on SQLite, JSONB on PostgreSQL."""
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def json_document() -> sa.types.TypeEngine[Any]:
    """JSON stored as written (PostgreSQL `json`, not `jsonb`): for write-once documents that no
    hot-path SQL looks inside (event payloads, score explanations; the offline training export
    reads an event's traits); it skips jsonb's binary conversion."""
    return sa.JSON()
