"""Create the ingest tables: sources, API keys, leads and identities, raw requests and events.

Revision ID: 0001
Revises: 
Create Date: 2026-11-22 11:53:53.518911+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import models.types

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table('api_key',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('expires_at', models.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('revoked_at', models.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('last_used_at', models.types.UtcDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_key')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_key_key_hash'))
    )
    op.create_table('lead',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('created_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('traits', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('trait_times', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('first_event_at', models.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('last_event_at', models.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('merged_into_id', sa.Uuid(), nullable=True),
    sa.ForeignKeyConstraint(['merged_into_id'], ['lead.id'], name=op.f('fk_lead_merged_into_id_lead')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_lead'))
    )
    op.create_table('source',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('scheme', sa.String(length=32), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('config', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_source')),
    sa.UniqueConstraint('name', name=op.f('uq_source_name'))
    )
    op.create_table('inbound_request',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('source_id', sa.Integer(), nullable=False),
    sa.Column('webhook_id', sa.String(length=200), nullable=True),
    sa.Column('content_type', sa.String(length=200), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('received_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['source_id'], ['source.id'], name=op.f('fk_inbound_request_source_id_source')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_inbound_request'))
    )
    with op.batch_alter_table('inbound_request', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_inbound_request_source_id'), ['source_id'], unique=False)

    op.create_table('lead_identity',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('lead_id', sa.Uuid(), nullable=False),
    sa.Column('namespace', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=320), nullable=False),
    sa.Column('created_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], name=op.f('fk_lead_identity_lead_id_lead')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_lead_identity')),
    sa.UniqueConstraint('namespace', 'value', name='uq_lead_identity_namespace_value')
    )
    with op.batch_alter_table('lead_identity', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lead_identity_lead_id'), ['lead_id'], unique=False)

    op.create_table('lead_merge',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('survivor_id', sa.Uuid(), nullable=False),
    sa.Column('merged_id', sa.Uuid(), nullable=False),
    sa.Column('event_id', sa.Uuid(), nullable=False),
    sa.Column('merged_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('identities', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.ForeignKeyConstraint(['merged_id'], ['lead.id'], name=op.f('fk_lead_merge_merged_id_lead')),
    sa.ForeignKeyConstraint(['survivor_id'], ['lead.id'], name=op.f('fk_lead_merge_survivor_id_lead')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_lead_merge'))
    )
    with op.batch_alter_table('lead_merge', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_lead_merge_merged_id'), ['merged_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_lead_merge_survivor_id'), ['survivor_id'], unique=False)

    op.create_table('source_secret',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('source_id', sa.Integer(), nullable=False),
    sa.Column('secret', sa.String(length=200), nullable=False),
    sa.Column('created_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('retired_at', models.types.UtcDateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['source_id'], ['source.id'], name=op.f('fk_source_secret_source_id_source')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_source_secret'))
    )
    with op.batch_alter_table('source_secret', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_source_secret_source_id'), ['source_id'], unique=False)

    op.create_table('inbound_event',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('source_id', sa.Integer(), nullable=False),
    sa.Column('external_id', sa.String(length=200), nullable=False),
    sa.Column('request_id', sa.Uuid(), nullable=False),
    sa.Column('lead_id', sa.Uuid(), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=True),
    sa.Column('occurred_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('received_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('payload', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], name=op.f('fk_inbound_event_lead_id_lead')),
    sa.ForeignKeyConstraint(['request_id'], ['inbound_request.id'], name=op.f('fk_inbound_event_request_id_inbound_request')),
    sa.ForeignKeyConstraint(['source_id'], ['source.id'], name=op.f('fk_inbound_event_source_id_source')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_inbound_event')),
    sa.UniqueConstraint('source_id', 'external_id', name='uq_inbound_event_source_id_external_id')
    )
    with op.batch_alter_table('inbound_event', schema=None) as batch_op:
        batch_op.create_index('ix_inbound_event_lead_id_occurred_at', ['lead_id', 'occurred_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_inbound_event_request_id'), ['request_id'], unique=False)




def downgrade() -> None:

    with op.batch_alter_table('inbound_event', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inbound_event_request_id'))
        batch_op.drop_index('ix_inbound_event_lead_id_occurred_at')

    op.drop_table('inbound_event')
    with op.batch_alter_table('source_secret', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_source_secret_source_id'))

    op.drop_table('source_secret')
    with op.batch_alter_table('lead_merge', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lead_merge_survivor_id'))
        batch_op.drop_index(batch_op.f('ix_lead_merge_merged_id'))

    op.drop_table('lead_merge')
    with op.batch_alter_table('lead_identity', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_lead_identity_lead_id'))

    op.drop_table('lead_identity')
    with op.batch_alter_table('inbound_request', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_inbound_request_source_id'))

    op.drop_table('inbound_request')
    op.drop_table('source')
    op.drop_table('lead')
    op.drop_table('api_key')

