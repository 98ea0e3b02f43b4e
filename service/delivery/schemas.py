"""HTTP schemas of the delivery routes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

DeliveryStatus = Literal["pending", "in_flight", "delivered", "dead"]


class DeliveryRead(BaseModel):
    """A handoff of a lead to a CRM destination, and where it stands."""

    id: uuid.UUID
    lead_id: uuid.UUID
    destination: str
    idempotency_key: str = Field(description="Sent to the CRM with every attempt (`webhook-id` / `Idempotency-Key`).")
    status: DeliveryStatus
    attempts: int = Field(description="Attempts since it was enqueued or last replayed.")
    replays: int
    next_attempt_at: dt.datetime = Field(description="Pending: when it is due. In flight: when the claim expires.")
    claimed_by: str | None
    lease_expires_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime
    delivered_at: dt.datetime | None
    replayed_at: dt.datetime | None
    last_status_code: int | None
    last_error: str | None


class DeliveryAttemptRead(BaseModel):
    attempt: int
    worker: str
    started_at: dt.datetime
    duration_ms: float
    outcome: Literal["delivered", "retry", "dead", "stale"] = Field(
        description="`stale`: the worker's claim had run out and another worker held the row; it changed nothing."
    )
    status_code: int | None
    error: str | None
    response_excerpt: str | None


class DeliveryDetail(DeliveryRead):
    """A delivery with its payload and every attempt, oldest first."""

    payload: dict[str, Any]
    attempt_history: list[DeliveryAttemptRead]


class DeliveryPage(BaseModel):
    items: list[DeliveryRead]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class DeliveryReplayed(BaseModel):
    id: uuid.UUID
    status: DeliveryStatus


class BulkReplayRequest(BaseModel):
    """Which dead letters to replay (all filters optional, combined with AND)."""

    model_config = ConfigDict(extra="forbid")

    destination: str | None = None
    status_code: int | None = Field(default=None, description="The last answer's HTTP status, e.g. 400.")
    created_after: AwareDatetime | None = None
    created_before: AwareDatetime | None = None
    limit: int = Field(default=1000, ge=1, le=100_000)


class BulkReplayed(BaseModel):
    replayed: int
