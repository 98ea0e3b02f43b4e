"""lz4 for the write-once documents: raw request bodies, event payloads, score explanations.

A score record's row (its explanation is about 1.8 KB of JSON) is past PostgreSQL's compression
threshold, so the default pglz compressed every explanation as it was inserted: about 10 us of
server CPU per score record, one per ingested event, measured against lz4 (which took no more than
storing it uncompressed, and still saves about a sixth of the bytes). Request bodies and event
payloads are under the threshold at the usual sizes, but a vendor's batch body is not. Applies to
rows as they are written; PostgreSQL servers built with lz4 only, SQLite has no such setting.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 17:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0012'
down_revision: str | None = '0011'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = (("inbound_request", "body"), ("inbound_event", "payload"), ("score_record", "explanation"))


def _has_lz4() -> bool:
    # Servers built without lz4 do not list it among default_toast_compression's values.
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    query = sa.text("SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'")
    return bool(bind.execute(query).scalar())


def upgrade() -> None:
    if _has_lz4():
        for table, column in COLUMNS:
            op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION lz4")


def downgrade() -> None:
    if _has_lz4():
        for table, column in COLUMNS:
            op.execute(f"ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION default")
