"""Lead rows: lz4 for the traits (where the server has it) and room on each page for updates; an
index of activities.

Every ingested event rewrites its lead's row, and with its traits and their times that row is past
PostgreSQL's compression threshold: the default pglz compressed it on every update (and
decompressed it on every read), several times the CPU of lz4. A fill factor of 70 leaves room on
the page for the new version, so the update can be HOT (no index entry) instead of moving the row.
Both apply to rows as they are next written. PostgreSQL only; SQLite has neither.

Scoring reads a lead's activities for every event; through the (lead, time) index of all events
it also visited every trait update of the lead in the table, to drop it. A partial index of the
activities alone (both databases) leaves those out.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 05:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = ("traits", "trait_times")


def _has_lz4() -> bool:
    # Servers built without lz4 do not list it among default_toast_compression's values.
    return bool(
        op.get_bind()
        .execute(sa.text("SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"))
        .scalar()
    )


_ACTIVITY_INDEX = "ix_inbound_event_activity_lead_id_occurred_at"
_ACTIVITIES = sa.text("type = 'lead.activity'")


def upgrade() -> None:
    op.create_index(
        _ACTIVITY_INDEX,
        "inbound_event",
        ["lead_id", "occurred_at"],
        postgresql_where=_ACTIVITIES,
        sqlite_where=_ACTIVITIES,
    )
    if op.get_bind().dialect.name != "postgresql":
        return
    if _has_lz4():
        for column in _COLUMNS:
            op.execute(f"ALTER TABLE lead ALTER COLUMN {column} SET COMPRESSION lz4")
    op.execute("ALTER TABLE lead SET (fillfactor = 70)")


def downgrade() -> None:
    op.drop_index(_ACTIVITY_INDEX, table_name="inbound_event")
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("ALTER TABLE lead RESET (fillfactor)")
    if _has_lz4():
        for column in _COLUMNS:
            op.execute(f"ALTER TABLE lead ALTER COLUMN {column} SET COMPRESSION default")
