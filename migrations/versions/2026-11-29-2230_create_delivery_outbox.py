"""Create the CRM outbox: deliveries and their attempts.

Revision ID: 0007
Revises: 0004
Create Date: 2026-11-29 22:30:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import models.types

revision: str = '0007'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'delivery',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('lead_id', sa.Uuid(), nullable=False),
        sa.Column('destination', sa.String(length=64), nullable=False),
        sa.Column('idempotency_key', sa.String(length=200), nullable=False),
        sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'),
                  nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('replays', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', models.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column('claimed_by', sa.String(length=100), nullable=True),
        sa.Column('claim_token', sa.Uuid(), nullable=True),
        sa.Column('lease_expires_at', models.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column('created_at', models.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column('updated_at', models.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column('delivered_at', models.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column('replayed_at', models.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column('last_status_code', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.String(length=1000), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'in_flight', 'delivered', 'dead')",
                           name=op.f('ck_delivery_status')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_delivery')),
        sa.UniqueConstraint('idempotency_key', name=op.f('uq_delivery_idempotency_key')),
    )
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.create_index('ix_delivery_status_next_attempt_at', ['status', 'next_attempt_at'], unique=False)
        batch_op.create_index('ix_delivery_destination_status', ['destination', 'status'], unique=False)
        batch_op.create_index(batch_op.f('ix_delivery_lead_id'), ['lead_id'], unique=False)

    op.create_table(
        'delivery_attempt',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('delivery_id', sa.Uuid(), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('worker', sa.String(length=100), nullable=False),
        sa.Column('started_at', models.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column('duration_ms', sa.Float(), nullable=False),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('error', sa.String(length=1000), nullable=True),
        sa.Column('response_excerpt', sa.String(length=1000), nullable=True),
        sa.ForeignKeyConstraint(['delivery_id'], ['delivery.id'], name=op.f('fk_delivery_attempt_delivery_id_delivery')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_delivery_attempt')),
    )
    with op.batch_alter_table('delivery_attempt', schema=None) as batch_op:
        batch_op.create_index('ix_delivery_attempt_delivery_id_started_at', ['delivery_id', 'started_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('delivery_attempt', schema=None) as batch_op:
        batch_op.drop_index('ix_delivery_attempt_delivery_id_started_at')
    op.drop_table('delivery_attempt')
    with op.batch_alter_table('delivery', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_delivery_lead_id'))
        batch_op.drop_index('ix_delivery_destination_status')
        batch_op.drop_index('ix_delivery_status_next_attempt_at')
    op.drop_table('delivery')
