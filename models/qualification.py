"""Qualification tables: threshold policy versions, stage transitions, change requests, outcomes.

The lead's current stage lives on the `lead` row itself (`lead.stage`), which the ingest
transaction already locks and updates per batch; `stage_transition` is its append-only history.
Like the other append-only ingest tables, `stage_transition` carries no foreign keys: the
transaction that writes a transition holds the lead's row lock (see `models`).
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime, json_type


def _ts(*, nullable: bool = False) -> Any:
    return Field(sa_column=sa.Column(UtcDateTime(), nullable=nullable))


def _text(length: int, *, nullable: bool = False) -> Any:
    return Field(sa_column=sa.Column(sa.String(length), nullable=nullable))


class ThresholdPolicy(SQLModel, table=True):
    """An applied threshold policy version. Rows are only ever inserted (the database refuses
    updates and deletes); which one qualifies leads is `threshold_policy_slot`."""

    __tablename__ = "threshold_policy"

    id: int | None = Field(default=None, primary_key=True)
    name: str = _text(200)
    spec: dict[str, Any] = Field(sa_column=sa.Column(json_type(), nullable=False))
    change_request_id: int | None = Field(default=None, nullable=True)
    created_by: str = _text(200)
    created_at: dt.datetime = _ts()


class ThresholdPolicySlot(SQLModel, table=True):
    """Which policy version is `active`."""

    __tablename__ = "threshold_policy_slot"

    slot: str = Field(sa_column=sa.Column(sa.String(16), primary_key=True))
    policy_id: int = Field(foreign_key="threshold_policy.id", nullable=False)
    assigned_at: dt.datetime = _ts()
    assigned_by: str = _text(200)


class StageTransition(SQLModel, table=True):
    """One move of a lead between lifecycle stages, and why.

    `cause`: `policy` (after a score), `reevaluation` (a change request re-applied a policy),
    `ops` (a person), `crm` (an outcome) or `merge` (a lead merged into it was further on).
    `downstream`: whether this move may trigger downstream work (routing and CRM handoff of a newly
    qualified lead).
    """

    __tablename__ = "stage_transition"
    __table_args__ = (sa.Index("ix_stage_transition_lead_id_transitioned_at", "lead_id", "transitioned_at"),)

    id: uuid.UUID = Field(primary_key=True)
    lead_id: uuid.UUID = Field(nullable=False)
    from_stage: str = _text(16)
    to_stage: str = _text(16)
    transitioned_at: dt.datetime = _ts()
    cause: str = _text(16)
    actor: str = _text(200)
    reason: str | None = _text(2000, nullable=True)
    policy_id: int | None = Field(default=None, nullable=True)
    segment: str | None = _text(64, nullable=True)
    score_record_id: uuid.UUID | None = Field(default=None, nullable=True)
    change_request_id: int | None = Field(default=None, nullable=True)
    outcome_id: int | None = Field(default=None, nullable=True)
    downstream: bool = Field(nullable=False)


class ChangeRequest(SQLModel, table=True):
    """A proposed change to what qualifies or scores leads, and its life: proposed, approved,
    applied (now or at `apply_at`), rejected or withdrawn. `impact` is the preview computed when it
    was proposed; `result` what applying it did."""

    __tablename__ = "change_request"
    __table_args__ = (sa.Index("ix_change_request_status_apply_at", "status", "apply_at"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str = _text(32)
    status: str = _text(16)
    payload: dict[str, Any] = Field(sa_column=sa.Column(json_type(), nullable=False))
    reason: str = _text(2000)
    author: str = _text(200)
    created_at: dt.datetime = _ts()
    bootstrap: bool = Field(default=False, nullable=False)
    reevaluate: bool = Field(nullable=False)
    trigger_downstream: bool = Field(nullable=False)
    window_days: int = Field(nullable=False)
    apply_at: dt.datetime | None = _ts(nullable=True)
    approved_by: str | None = _text(200, nullable=True)
    approved_at: dt.datetime | None = _ts(nullable=True)
    closed_by: str | None = _text(200, nullable=True)
    closed_at: dt.datetime | None = _ts(nullable=True)
    close_reason: str | None = _text(2000, nullable=True)
    applied_by: str | None = _text(200, nullable=True)
    applied_at: dt.datetime | None = _ts(nullable=True)
    before: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(json_type(), nullable=True))
    result: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(json_type(), nullable=True))
    impact: dict[str, Any] | None = Field(default=None, sa_column=sa.Column(json_type(), nullable=True))


class Outcome(SQLModel, table=True):
    """What sales reported about a lead (accepted, converted, won, lost). `(source, external_id)`
    deduplicates repeats of the same report."""

    __tablename__ = "outcome"
    __table_args__ = (
        sa.UniqueConstraint("source", "external_id", name="uq_outcome_source_external_id"),
        sa.Index("ix_outcome_lead_id_occurred_at", "lead_id", "occurred_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    lead_id: uuid.UUID = Field(foreign_key="lead.id", nullable=False)
    kind: str = _text(16)
    occurred_at: dt.datetime = _ts()
    source: str = _text(64)
    external_id: str | None = _text(200, nullable=True)
    recorded_at: dt.datetime = _ts()
    # What the CRM said with it: why (a lost reason), and the deal's value in `currency` (ISO 4217).
    reason: str | None = _text(500, nullable=True)
    amount: decimal.Decimal | None = Field(default=None, sa_column=sa.Column(sa.Numeric(18, 2), nullable=True))
    currency: str | None = _text(3, nullable=True)
