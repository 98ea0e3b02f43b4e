"""Outcomes follow merges: move those recorded on a lead that was later merged to its survivor.

Until this release a merge moved a lead's identities and events but left its CRM outcomes behind,
where reports and training labels (which read live leads only) never saw them. `merged_into_id`
always names the final survivor (a merge re-points the leads merged into the lead it merges away).
Data only; the schema does not change. Not undone by a downgrade: the old place was the defect.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 02:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0010'
down_revision: str | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        "UPDATE outcome SET lead_id = ("
        "SELECT lead.merged_into_id FROM lead WHERE lead.id = outcome.lead_id) "
        "WHERE lead_id IN (SELECT id FROM lead WHERE merged_into_id IS NOT NULL)"
    )


def downgrade() -> None:
    pass
