"""The CRM outbox: one `delivery` row per handoff of a lead to a destination, one
`delivery_attempt` row per try.

A row is written in the transaction that decided the handoff and is then owned by the delivery
worker. States: `pending` (waiting for `next_attempt_at`), `in_flight` (claimed by a worker until
`lease_expires_at`; after that any worker may claim it again), `delivered`, `dead` (a dead letter:
rejected by the CRM, or out of attempts or time; `replay` makes it pending again).
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime, json_type

DELIVERY_STATUSES = ("pending", "in_flight", "delivered", "dead")


def _ts(*, nullable: bool = False) -> Any:
    return Field(sa_column=sa.Column(UtcDateTime(), nullable=nullable))


class Delivery(SQLModel, table=True):
    """A handoff of one lead to one CRM destination, delivered at least once."""

    __tablename__ = "delivery"
    __table_args__ = (
        sa.CheckConstraint(f"status IN {DELIVERY_STATUSES!r}", name="status"),
        # The worker's claim: due rows by status and time.
        sa.Index("ix_delivery_status_next_attempt_at", "status", "next_attempt_at"),
        sa.Index("ix_delivery_destination_status", "destination", "status"),
    )

    id: uuid.UUID = Field(primary_key=True)
    lead_id: uuid.UUID = Field(nullable=False, index=True)
    destination: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    # Sent to the CRM with every attempt; a repeat enqueue of the same key is ignored.
    idempotency_key: str = Field(sa_column=sa.Column(sa.String(200), nullable=False, unique=True))
    payload: dict[str, Any] = Field(sa_column=sa.Column(json_type(), nullable=False))
    status: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    # Attempts since the row was enqueued or last replayed (the retry budget); `replays` counts replays.
    attempts: int = Field(default=0, nullable=False)
    replays: int = Field(default=0, nullable=False)
    next_attempt_at: dt.datetime = _ts()
    # The current claim: which worker holds the row, under which token, until when.
    claimed_by: str | None = Field(default=None, sa_column=sa.Column(sa.String(100), nullable=True))
    claim_token: uuid.UUID | None = Field(default=None, nullable=True)
    lease_expires_at: dt.datetime | None = _ts(nullable=True)
    created_at: dt.datetime = _ts()
    updated_at: dt.datetime = _ts()
    delivered_at: dt.datetime | None = _ts(nullable=True)
    replayed_at: dt.datetime | None = _ts(nullable=True)
    last_status_code: int | None = Field(default=None, nullable=True)
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.String(1000), nullable=True))


class DeliveryAttempt(SQLModel, table=True):
    """One try of a delivery: what was answered, how long it took, and what the worker made of it.

    `outcome` is `delivered`, `retry`, `dead` or `stale` (the worker's claim had expired and
    another worker had taken the row, so this try changed nothing).
    """

    __tablename__ = "delivery_attempt"
    __table_args__ = (sa.Index("ix_delivery_attempt_delivery_id_started_at", "delivery_id", "started_at"),)

    id: uuid.UUID = Field(primary_key=True)
    delivery_id: uuid.UUID = Field(foreign_key="delivery.id", nullable=False)
    attempt: int = Field(nullable=False)
    worker: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    started_at: dt.datetime = _ts()
    duration_ms: float = Field(nullable=False)
    outcome: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    status_code: int | None = Field(default=None, nullable=True)
    error: str | None = Field(default=None, sa_column=sa.Column(sa.String(1000), nullable=True))
    response_excerpt: str | None = Field(default=None, sa_column=sa.Column(sa.String(1000), nullable=True))
