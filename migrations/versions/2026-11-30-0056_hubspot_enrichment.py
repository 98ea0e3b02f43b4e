"""HubSpot enrichment: a source's API token, and the fetch jobs and their attempts.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 00:56:53+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import models.types

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'source_api_token',
        sa.Column('source_id', sa.Integer(), nullable=False),
        sa.Column('token', sa.String(length=500), nullable=False),
        sa.Column('created_at', models.types.UtcDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['source_id'], ['source.id'], name=op.f('fk_source_api_token_source_id_source')),
        sa.PrimaryKeyConstraint('source_id', name=op.f('pk_source_api_token')),
    )

    op.create_table(
        'enrichment_job',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('source_id', sa.Integer(), nullable=False),
        sa.Column('object_id', sa.String(length=200), nullable=False),
        sa.Column('lead_id', sa.Uuid(), nullable=False),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('requests', sa.Integer(), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', models.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column('claimed_by', sa.String(length=100), nullable=True),
        sa.Column('claim_token', sa.Uuid(), nullable=True),
        sa.Column('lease_expires_at', models.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column('claimed_requests', sa.Integer(), nullable=True),
        sa.Column('created_at', models.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column('updated_at', models.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column('requested_at', models.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column('fetched_at', models.types.UtcDateTime(timezone=True), nullable=True),
        sa.Column('event_id', sa.Uuid(), nullable=True),
        sa.Column('last_status_code', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.String(length=1000), nullable=True),
        sa.CheckConstraint("status IN ('pending', 'in_flight', 'done', 'dead')", name=op.f('ck_enrichment_job_status')),
        sa.ForeignKeyConstraint(['source_id'], ['source.id'], name=op.f('fk_enrichment_job_source_id_source')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_enrichment_job')),
        sa.UniqueConstraint('source_id', 'object_id', name='uq_enrichment_job_source_id_object_id'),
    )
    with op.batch_alter_table('enrichment_job', schema=None) as batch_op:
        batch_op.create_index('ix_enrichment_job_status_next_attempt_at', ['status', 'next_attempt_at'], unique=False)

    op.create_table(
        'enrichment_attempt',
        sa.Column('id', sa.Uuid(), nullable=False),
        sa.Column('job_id', sa.Uuid(), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('worker', sa.String(length=100), nullable=False),
        sa.Column('started_at', models.types.UtcDateTime(timezone=True), nullable=False),
        sa.Column('duration_ms', sa.Float(), nullable=False),
        sa.Column('outcome', sa.String(length=16), nullable=False),
        sa.Column('status_code', sa.Integer(), nullable=True),
        sa.Column('error', sa.String(length=1000), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['enrichment_job.id'],
                                name=op.f('fk_enrichment_attempt_job_id_enrichment_job')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_enrichment_attempt')),
    )
    with op.batch_alter_table('enrichment_attempt', schema=None) as batch_op:
        batch_op.create_index('ix_enrichment_attempt_job_id_started_at', ['job_id', 'started_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('enrichment_attempt', schema=None) as batch_op:
        batch_op.drop_index('ix_enrichment_attempt_job_id_started_at')
    op.drop_table('enrichment_attempt')
    with op.batch_alter_table('enrichment_job', schema=None) as batch_op:
        batch_op.drop_index('ix_enrichment_job_status_next_attempt_at')
    op.drop_table('enrichment_job')
    op.drop_table('source_api_token')
