"""The audit log: an append-only, hash-chained record of every change made by a person or tool."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime


class AuditEntry(SQLModel, table=True):
    """One change: who (actor, role), when, what (action on entity), the state before and after,
    and why. `hash` is SHA-256 over the entry's RFC 8785 canonical JSON including `prev_hash`, the
    previous entry's `hash`, so an edited or deleted entry breaks the chain.

    The database refuses UPDATE, DELETE (and on PostgreSQL TRUNCATE) of rows. Ids are assigned by
    the writer as the previous id + 1 under the append lock: a gap is a deleted entry.
    """

    __tablename__ = "audit_entry"
    # The API pages by id within a filter: each filter's index ends with the id.
    __table_args__ = (
        sa.Index("ix_audit_entry_action_id", "action", "id"),
        sa.Index("ix_audit_entry_actor_id", "actor", "id"),
        sa.Index("ix_audit_entry_entity_entity_id_id", "entity", "entity_id", "id"),
    )

    id: int = Field(sa_column=sa.Column(sa.Integer(), primary_key=True, autoincrement=False))
    recorded_at: dt.datetime = Field(sa_column=sa.Column(UtcDateTime(), nullable=False, index=True))
    actor: str = Field(sa_column=sa.Column(sa.String(300), nullable=False))
    role: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    action: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    entity: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    entity_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(200), nullable=True))
    # Stored as written (PostgreSQL `json`, not `jsonb`): `leadscore audit verify` re-hashes them.
    # No before (a creation) or after (a removal) is SQL NULL.
    before: Any = Field(default=None, sa_column=sa.Column(sa.JSON(none_as_null=True), nullable=True))
    after: Any = Field(default=None, sa_column=sa.Column(sa.JSON(none_as_null=True), nullable=True))
    reason: str | None = Field(default=None, sa_column=sa.Column(sa.Text(), nullable=True))
    prev_hash: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    hash: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
