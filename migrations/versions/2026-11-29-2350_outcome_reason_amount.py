"""Keep what the CRM says with an outcome: its reason, and the deal's amount and currency.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29 23:50:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('outcome') as batch:
        batch.add_column(sa.Column('reason', sa.String(length=500), nullable=True))
        batch.add_column(sa.Column('amount', sa.Numeric(precision=18, scale=2), nullable=True))
        batch.add_column(sa.Column('currency', sa.String(length=3), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('outcome') as batch:
        batch.drop_column('currency')
        batch.drop_column('amount')
        batch.drop_column('reason')
