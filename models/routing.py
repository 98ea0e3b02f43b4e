"""Routing tables: rules versions and their activations, pool counters, assignments, account owners."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime, json_type


def _ts(*, nullable: bool = False) -> Any:
    return Field(sa_column=sa.Column(UtcDateTime(), nullable=nullable))


class RoutingRulesVersion(SQLModel, table=True):
    """An immutable routing spec (the database refuses updates and deletes)."""

    __tablename__ = "routing_rules_version"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    spec: dict[str, Any] = Field(sa_column=sa.Column(json_type(), nullable=False))
    spec_sha256: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    created_by: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    created_at: dt.datetime = _ts()


class RoutingActivation(SQLModel, table=True):
    """Append-only history of which rules version routes; the latest row is the active version."""

    __tablename__ = "routing_activation"

    id: int | None = Field(default=None, primary_key=True)
    version_id: int = Field(foreign_key="routing_rules_version.id", nullable=False)
    activated_at: dt.datetime = _ts()
    activated_by: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))


class RoutingPoolMember(SQLModel, table=True):
    """A pool member's counters, kept across rules versions (keyed by pool id and owner id).

    Routing locks a pool's rows (`SELECT ... FOR UPDATE`, in key order) and writes them back in the
    transaction that stores its assignments, so any number of processes distribute exactly.
    """

    __tablename__ = "routing_pool_member"

    pool_id: str = Field(sa_column=sa.Column(sa.String(100), primary_key=True))
    owner_id: str = Field(sa_column=sa.Column(sa.String(200), primary_key=True))
    last_turn: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))
    current_weight: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))
    window_start: dt.datetime | None = _ts(nullable=True)
    window_count: int = Field(sa_column=sa.Column(sa.Integer(), nullable=False))
    assigned_total: int = Field(sa_column=sa.Column(sa.BigInteger(), nullable=False))
    updated_at: dt.datetime = _ts()


class Assignment(SQLModel, table=True):
    """Where a lead was routed, by which rules version and rule, and why. The latest is current."""

    __tablename__ = "assignment"
    __table_args__ = (sa.Index("ix_assignment_lead_id_assigned_at", "lead_id", "assigned_at"),)

    id: uuid.UUID = Field(primary_key=True)
    lead_id: uuid.UUID = Field(foreign_key="lead.id", nullable=False)
    kind: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    owner_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(200), nullable=True))
    pool_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(100), nullable=True))
    queue: str | None = Field(default=None, sa_column=sa.Column(sa.String(100), nullable=True))
    routing_version_id: int = Field(foreign_key="routing_rules_version.id", nullable=False)
    rule_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(100), nullable=True))
    matched_by: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    reason: str = Field(sa_column=sa.Column(sa.Text(), nullable=False))
    stage: str | None = Field(default=None, sa_column=sa.Column(sa.String(32), nullable=True))
    assigned_at: dt.datetime = _ts()


class AccountOwner(SQLModel, table=True):
    """Who owns an account (`kind` `domain` or `company`): set by ops, or claimed by the first
    assignment of one of its leads to an owner."""

    __tablename__ = "account_owner"

    kind: str = Field(sa_column=sa.Column(sa.String(16), primary_key=True))
    key: str = Field(sa_column=sa.Column(sa.String(320), primary_key=True))
    owner_id: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    source: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    assignment_id: uuid.UUID | None = Field(default=None, nullable=True)
    updated_at: dt.datetime = _ts()
