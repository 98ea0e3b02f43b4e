"""Enrichment: fetching a vendor record's full properties after an id-only webhook event.

A HubSpot app webhook says only that contact 123 changed; with an API token on the source, the
ingest transaction puts a fetch of that contact in `enrichment_job`, and a worker fetches it and
feeds the properties back in as a lead event.

`enrichment_job` has one row per source and vendor record. States: `pending` (waiting for
`next_attempt_at`), `in_flight` (claimed by a worker until `lease_expires_at`, as deliveries are),
`done`, `dead` (HubSpot refused the fetch: not found, bad token; or attempts ran out). A new event
for the record makes a `done` or `dead` row `pending` again, and only counts `requests` on a row
that is already waiting, so a burst of events makes one fetch.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime

ENRICHMENT_STATUSES = ("pending", "in_flight", "done", "dead")


def _ts(*, nullable: bool = False) -> Any:
    return Field(sa_column=sa.Column(UtcDateTime(), nullable=nullable))


class SourceApiToken(SQLModel, table=True):
    """The vendor API credential of a source (a HubSpot private-app token): what enrichment fetches
    records with. At most one per source; never shown, listed or audited (only whether one is set)."""

    __tablename__ = "source_api_token"

    source_id: int = Field(foreign_key="source.id", primary_key=True)
    # Kept in clear, as signing secrets are: the vendor needs the token itself, not a hash of it.
    token: str = Field(sa_column=sa.Column(sa.String(500), nullable=False))
    created_at: dt.datetime = _ts()


class EnrichmentJob(SQLModel, table=True):
    """A fetch of one vendor record (a HubSpot contact) for one source, claimed like a delivery."""

    __tablename__ = "enrichment_job"
    __table_args__ = (
        sa.UniqueConstraint("source_id", "object_id", name="uq_enrichment_job_source_id_object_id"),
        sa.CheckConstraint(f"status IN {ENRICHMENT_STATUSES!r}", name="status"),
        # The worker's claim: due rows by status and time.
        sa.Index("ix_enrichment_job_status_next_attempt_at", "status", "next_attempt_at"),
    )

    id: uuid.UUID = Field(primary_key=True)
    source_id: int = Field(foreign_key="source.id", nullable=False)
    object_id: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    # The lead of the latest event that asked for the fetch (the fetched record names its own).
    lead_id: uuid.UUID = Field(nullable=False)
    status: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    # Events that asked for a fetch, ever; a claim remembers the count, so a request that arrives
    # while a fetch is in flight (which may have read the record before the change) fetches again.
    requests: int = Field(nullable=False)
    # Attempts since the row last became pending (the retry budget).
    attempts: int = Field(default=0, nullable=False)
    next_attempt_at: dt.datetime = _ts()
    claimed_by: str | None = Field(default=None, sa_column=sa.Column(sa.String(100), nullable=True))
    claim_token: uuid.UUID | None = Field(default=None, nullable=True)
    lease_expires_at: dt.datetime | None = _ts(nullable=True)
    claimed_requests: int | None = Field(default=None, nullable=True)
    created_at: dt.datetime = _ts()
    updated_at: dt.datetime = _ts()
    requested_at: dt.datetime = _ts()
    fetched_at: dt.datetime | None = _ts(nullable=True)
    # The lead event the last successful fetch was stored as.
    event_id: uuid.UUID | None = Field(default=None, nullable=True)
    last_status_code: int | None = Field(default=None, nullable=True)
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.String(1000), nullable=True))


class EnrichmentAttempt(SQLModel, table=True):
    """One try of a fetch. `outcome` is `fetched`, `retry`, `dead` or `stale` (the claim had run out
    and another worker held the row, so this try changed nothing)."""

    __tablename__ = "enrichment_attempt"
    __table_args__ = (sa.Index("ix_enrichment_attempt_job_id_started_at", "job_id", "started_at"),)

    id: uuid.UUID = Field(primary_key=True)
    job_id: uuid.UUID = Field(foreign_key="enrichment_job.id", nullable=False)
    attempt: int = Field(nullable=False)
    worker: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    started_at: dt.datetime = _ts()
    duration_ms: float = Field(nullable=False)
    outcome: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    status_code: int | None = Field(default=None, nullable=True)
    error: str | None = Field(default=None, sa_column=sa.Column(sa.String(1000), nullable=True))
