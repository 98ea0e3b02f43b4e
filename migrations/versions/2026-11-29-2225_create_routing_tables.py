"""Create routing: rules versions (immutable) and their activations, pool member counters,
assignments and account owners.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29 22:25:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import models.types

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('routing_rules_version',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('spec', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('spec_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=False),
    sa.Column('created_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_routing_rules_version'))
    )
    op.create_table('routing_activation',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('version_id', sa.Integer(), nullable=False),
    sa.Column('activated_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.Column('activated_by', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['version_id'], ['routing_rules_version.id'], name=op.f('fk_routing_activation_version_id_routing_rules_version')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_routing_activation'))
    )
    op.create_table('routing_pool_member',
    sa.Column('pool_id', sa.String(length=100), nullable=False),
    sa.Column('owner_id', sa.String(length=200), nullable=False),
    sa.Column('last_turn', sa.BigInteger(), nullable=False),
    sa.Column('current_weight', sa.BigInteger(), nullable=False),
    sa.Column('window_start', models.types.UtcDateTime(timezone=True), nullable=True),
    sa.Column('window_count', sa.Integer(), nullable=False),
    sa.Column('assigned_total', sa.BigInteger(), nullable=False),
    sa.Column('updated_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('pool_id', 'owner_id', name=op.f('pk_routing_pool_member'))
    )
    op.create_table('assignment',
    sa.Column('id', sa.Uuid(), nullable=False),
    sa.Column('lead_id', sa.Uuid(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('owner_id', sa.String(length=200), nullable=True),
    sa.Column('pool_id', sa.String(length=100), nullable=True),
    sa.Column('queue', sa.String(length=100), nullable=True),
    sa.Column('routing_version_id', sa.Integer(), nullable=False),
    sa.Column('rule_id', sa.String(length=100), nullable=True),
    sa.Column('matched_by', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('stage', sa.String(length=32), nullable=True),
    sa.Column('assigned_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['lead_id'], ['lead.id'], name=op.f('fk_assignment_lead_id_lead')),
    sa.ForeignKeyConstraint(['routing_version_id'], ['routing_rules_version.id'], name=op.f('fk_assignment_routing_version_id_routing_rules_version')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_assignment'))
    )
    with op.batch_alter_table('assignment', schema=None) as batch_op:
        batch_op.create_index('ix_assignment_lead_id_assigned_at', ['lead_id', 'assigned_at'], unique=False)
    op.create_table('account_owner',
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('key', sa.String(length=320), nullable=False),
    sa.Column('owner_id', sa.String(length=200), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('assignment_id', sa.Uuid(), nullable=True),
    sa.Column('updated_at', models.types.UtcDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('kind', 'key', name=op.f('pk_account_owner'))
    )

    # Rules versions are immutable: the database itself refuses to change or delete one.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION routing_rules_version_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN RAISE EXCEPTION 'routing rules versions are immutable'; END $$
            """
        )
        op.execute(
            "CREATE TRIGGER routing_rules_version_immutable BEFORE UPDATE OR DELETE ON routing_rules_version "
            "FOR EACH ROW EXECUTE FUNCTION routing_rules_version_immutable()"
        )
    else:
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER routing_rules_version_no_{action.lower()} BEFORE {action} ON routing_rules_version "
                "BEGIN SELECT RAISE(ABORT, 'routing rules versions are immutable'); END"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER routing_rules_version_immutable ON routing_rules_version")
        op.execute("DROP FUNCTION routing_rules_version_immutable()")
    else:
        op.execute("DROP TRIGGER routing_rules_version_no_update")
        op.execute("DROP TRIGGER routing_rules_version_no_delete")
    op.drop_table('account_owner')
    with op.batch_alter_table('assignment', schema=None) as batch_op:
        batch_op.drop_index('ix_assignment_lead_id_assigned_at')
    op.drop_table('assignment')
    op.drop_table('routing_pool_member')
    op.drop_table('routing_activation')
    op.drop_table('routing_rules_version')
