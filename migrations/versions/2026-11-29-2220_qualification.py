"""Qualification: threshold policy versions (immutable) and the active one, the lead's stage and
its transitions, change requests, outcomes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 22:07:28.721227+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from sqlalchemy.dialects import postgresql

import models.types

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('change_request',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('reason', sa.String(length=2000), nullable=False),
    sa.Column('author', sa.String(length=200), nullable=False),
    sa.Column('created_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('bootstrap', sa.Boolean(), nullable=False),
    sa.Column('reevaluate', sa.Boolean(), nullable=False),
    sa.Column('trigger_downstream', sa.Boolean(), nullable=False),
    sa.Column('window_days', sa.Integer(), nullable=False),
    sa.Column('apply_at', models.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('approved_by', sa.String(length=200), nullable=True),
    sa.Column('approved_at', models.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('closed_by', sa.String(length=200), nullable=True),
    sa.Column('closed_at', models.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('close_reason', sa.String(length=2000), nullable=True),
    sa.Column('applied_by', sa.String(length=200), nullable=True),
    sa.Column('applied_at', models.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('before', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('result', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('impact', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_change_request'))
    )
    with op.batch_alter_table('change_request', schema=None) as batch_op:
        batch_op.create_index('ix_change_request_status_apply_at', ['status', 'apply_at'], unique=False)

    op.create_table('stage_transition',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('lead_id', sa.Uuid(), nullable=False),
    sa.Column('from_stage', sa.String(length=16), nullable=False),
    sa.Column('to_stage', sa.String(length=16), nullable=False),
    sa.Column('transitioned_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('cause', sa.String(length=16), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('reason', sa.String(length=2000), nullable=True),
    sa.Column('policy_id', sa.Integer(), nullable=True),
    sa.Column('segment', sa.String(length=64), nullable=True),
    sa.Column('score_record_id', sa.Uuid(), nullable=True),
    sa.Column('change_request_id', sa.Integer(), nullable=True),
    sa.Column('outcome_id', sa.Integer(), nullable=True),
    sa.Column('downstream', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_stage_transition'))
    )
    with op.batch_alter_table('stage_transition', schema=None) as batch_op:
        batch_op.create_index('ix_stage_transition_lead_id_transitioned_at', ['lead_id', 'transitioned_at'], unique=False)

    op.create_table('threshold_policy',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('spec', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('change_request_id', sa.Integer(), nullable=True),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('created_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_threshold_policy'))
    )
    op.create_table('outcome',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('lead_id', sa.Uuid(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('occurred_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('external_id', sa.String(length=200), nullable=True),
    sa.Column('recorded_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], name=op.f('fk_outcome_lead_id_lead')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outcome')),
    sa.UniqueConstraint('source', 'external_id', name='uq_outcome_source_external_id')
    )
    with op.batch_alter_table('outcome', schema=None) as batch_op:
        batch_op.create_index('ix_outcome_lead_id_occurred_at', ['lead_id', 'occurred_at'], unique=False)

    op.create_table('threshold_policy_slot',
    sa.Column('slot', sa.String(length=16), nullable=False),
    sa.Column('policy_id', sa.Integer(), nullable=False),
    sa.Column('assigned_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('assigned_by', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['policy_id'], ['threshold_policy.id'], name=op.f('fk_threshold_policy_slot_policy_id_threshold_policy')),
    sa.PrimaryKeyConstraint('slot', name=op.f('pk_threshold_policy_slot'))
    )
    with op.batch_alter_table('lead', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stage', sa.String(length=16), server_default='lead', nullable=False))
        batch_op.add_column(sa.Column('stage_changed_at', models.types.UtcDateTime(timezone=True), nullable=True))

    # Applied policy versions are immutable: the database itself refuses to change or delete one.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION threshold_policy_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'threshold policy versions are immutable'; END $$
            """
        )
        op.execute(
            "CREATE TRIGGER threshold_policy_immutable BEFORE UPDATE OR DELETE ON threshold_policy "
            "FOR EACH ROW EXECUTE FUNCTION threshold_policy_immutable()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER threshold_policy_no_{action.lower()} BEFORE {action} ON threshold_policy "
                "BEGIN SELECT RAISE(ABORT, 'threshold policy versions are immutable'); END"
            )



def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER threshold_policy_immutable ON threshold_policy")
        op.execute("DROP FUNCTION threshold_policy_immutable()")
    else:
        op.execute("DROP TRIGGER threshold_policy_no_update")
        op.execute("DROP TRIGGER threshold_policy_no_delete")

    with op.batch_alter_table('lead', schema=None) as batch_op:
        batch_op.drop_column('stage_changed_at')
        batch_op.drop_column('stage')

    op.drop_table('threshold_policy_slot')
    with op.batch_alter_table('outcome', schema=None) as batch_op:
        batch_op.drop_index('ix_outcome_lead_id_occurred_at')

    op.drop_table('outcome')
    op.drop_table('threshold_policy')
    with op.batch_alter_table('stage_transition', schema=None) as batch_op:
        batch_op.drop_index('ix_stage_transition_lead_id_transitioned_at')

    op.drop_table('stage_transition')
    with op.batch_alter_table('change_request', schema=None) as batch_op:
        batch_op.drop_index('ix_change_request_status_apply_at')

    op.drop_table('change_request')
