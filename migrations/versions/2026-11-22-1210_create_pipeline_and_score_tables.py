"""Create pipeline versions, the active/shadow slots and score records.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 12:10:18.574440+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import models.types

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('pipeline_version',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('spec', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('artifact', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('metrics', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('sklearn_version', sa.String(length=32), nullable=False),
    sa.Column('training_data_sha256', sa.String(length=64), nullable=True),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('created_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pipeline_version'))
    )
    op.create_table('pipeline_slot',
    sa.Column('slot', sa.String(length=16), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('assigned_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('assigned_by', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['pipeline_version.id'], name=op.f('fk_pipeline_slot_version_id_pipeline_version')),
    sa.PrimaryKeyConstraint('slot', name=op.f('pk_pipeline_slot'))
    )
    op.create_table('score_record',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('lead_id', sa.Uuid(), nullable=False),
    sa.Column('pipeline_version_id', sa.Integer(), nullable=False),
    sa.Column('shadow', sa.Boolean(), nullable=False),
    sa.Column('event_id', sa.Uuid(), nullable=True),
    sa.Column('scored_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('inputs_digest', sa.String(length=64), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('fit', sa.Float(), nullable=False),
    sa.Column('engagement', sa.Float(), nullable=False),
    sa.Column('probability', sa.Float(), nullable=False),
    sa.Column('grade', sa.String(length=8), nullable=False),
    sa.Column('explanation', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], name=op.f('fk_score_record_lead_id_lead')),
    sa.ForeignKeyConstraint(['pipeline_version_id'], ['pipeline_version.id'], name=op.f('fk_score_record_pipeline_version_id_pipeline_version')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_score_record'))
    )
    with op.batch_alter_table('score_record', schema=None) as batch_op:
        batch_op.create_index('ix_score_record_lead_id_shadow_scored_at', ['lead_id', 'shadow', 'scored_at'], unique=False)
        batch_op.create_index('ix_score_record_version_id_lead_id', ['pipeline_version_id', 'lead_id'], unique=False)

    # Versions are immutable: the database itself refuses to change or delete one.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION pipeline_version_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'pipeline versions are immutable'; END $$
            """
        )
        op.execute(
            "CREATE TRIGGER pipeline_version_immutable BEFORE UPDATE OR DELETE ON pipeline_version "
            "FOR EACH ROW EXECUTE FUNCTION pipeline_version_immutable()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER pipeline_version_no_{action.lower()} BEFORE {action} ON pipeline_version "
                "BEGIN SELECT RAISE(ABORT, 'pipeline versions are immutable'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER pipeline_version_immutable ON pipeline_version")
        op.execute("DROP FUNCTION pipeline_version_immutable()")
    else:
        op.execute("DROP TRIGGER pipeline_version_no_update")
        op.execute("DROP TRIGGER pipeline_version_no_delete")

    with op.batch_alter_table('score_record', schema=None) as batch_op:
        batch_op.drop_index('ix_score_record_version_id_lead_id')
        batch_op.drop_index('ix_score_record_lead_id_shadow_scored_at')

    op.drop_table('score_record')
    op.drop_table('pipeline_slot')
    op.drop_table('pipeline_version')

