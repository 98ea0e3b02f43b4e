"""Lighter ingest writes: no foreign keys on the append-only ingest tables (see models), drop two
indexes nothing reads; event payloads and score explanations as `json` (write-once documents SQL
never looks inside) instead of `jsonb`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 12:36:15.204476+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sqlalchemy.dialects import postgresql

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


_FOREIGN_KEYS = [
    ("inbound_request", "fk_inbound_request_source_id_source", "source", "source_id", "id"),
    ("inbound_event", "fk_inbound_event_source_id_source", "source", "source_id", "id"),
    ("inbound_event", "fk_inbound_event_request_id_inbound_request", "inbound_request", "request_id", "id"),
    ("inbound_event", "fk_inbound_event_lead_id_lead", "lead", "lead_id", "id"),
    ("lead_identity", "fk_lead_identity_lead_id_lead", "lead", "lead_id", "id"),
    ("score_record", "fk_score_record_lead_id_lead", "lead", "lead_id", "id"),
    ("score_record", "fk_score_record_pipeline_version_id_pipeline_version", "pipeline_version",
     "pipeline_version_id", "id"),
]


def upgrade() -> None:
    for table, name, *_ in _FOREIGN_KEYS:
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(name, type_="foreignkey")
    op.drop_index("ix_inbound_event_request_id", table_name="inbound_event")
    op.drop_index("ix_inbound_request_source_id", table_name="inbound_request")
    if op.get_bind().dialect.name == "postgresql":
        for table, column in (("inbound_event", "payload"), ("score_record", "explanation")):
            op.alter_column(
                table,
                column,
                existing_type=postgresql.JSONB(astext_type=sa.Text()),
                type_=sa.JSON(),
                existing_nullable=False,
                postgresql_using=f"{column}::json",
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table, column in (("inbound_event", "payload"), ("score_record", "explanation")):
            op.alter_column(
                table,
                column,
                existing_type=sa.JSON(),
                type_=postgresql.JSONB(astext_type=sa.Text()),
                existing_nullable=False,
                postgresql_using=f"{column}::jsonb",
            )
    op.create_index("ix_inbound_request_source_id", "inbound_request", ["source_id"], unique=False)
    op.create_index("ix_inbound_event_request_id", "inbound_event", ["request_id"], unique=False)
    for table, name, referred, column, referred_column in _FOREIGN_KEYS:
        with op.batch_alter_table(table) as batch:
            batch.create_foreign_key(name, referred, [column], [referred_column])
