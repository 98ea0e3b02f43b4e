"""Leadscore's tables: SQLModel classes and nothing else.

`models.metadata` is what Alembic compares migrations against. No API schemas and no logic live
here; queries live in `service.repositories`.

The append-only ingest tables (`inbound_request`, `inbound_event`, `lead_identity`,
`score_record`) carry no foreign keys: their rows are written only by the ingest transaction, which
inserts or locks every row they point at in that same transaction, and the checks cost PostgreSQL
more than the inserts themselves (measured: 196 vs 120 us of server time per event). Tests check
for orphans after concurrent ingest.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from models.types import UtcDateTime, json_document, json_type

metadata = SQLModel.metadata
metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _ts(*, nullable: bool = False, index: bool = False) -> Any:
    return Field(sa_column=sa.Column(UtcDateTime(), nullable=nullable, index=index))


class Source(SQLModel, table=True):
    """A webhook sender (a marketing automation platform) and how its requests are verified."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=sa.Column(sa.String(64), nullable=False, unique=True))
    scheme: str = Field(sa_column=sa.Column(sa.String(32), nullable=False))
    enabled: bool = Field(default=True, nullable=False)
    config: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(json_type(), nullable=False))
    created_at: dt.datetime = _ts()


class SourceSecret(SQLModel, table=True):
    """A signing secret of a source. Several may be live at once while a secret is rotated."""

    __tablename__ = "source_secret"

    id: int | None = Field(default=None, primary_key=True)
    source_id: int = Field(foreign_key="source.id", nullable=False, index=True)
    # Kept in clear: HMAC verification needs the secret itself, not a hash of it.
    secret: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    created_at: dt.datetime = _ts()
    retired_at: dt.datetime | None = _ts(nullable=True)


class ApiKey(SQLModel, table=True):
    """An API credential for people and tools calling the HTTP API. Only a hash is stored."""

    __tablename__ = "api_key"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    role: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    prefix: str = Field(sa_column=sa.Column(sa.String(16), nullable=False))
    key_hash: str = Field(sa_column=sa.Column(sa.String(64), nullable=False, unique=True))
    created_at: dt.datetime = _ts()
    expires_at: dt.datetime | None = _ts(nullable=True)
    revoked_at: dt.datetime | None = _ts(nullable=True)
    last_used_at: dt.datetime | None = _ts(nullable=True)


class Lead(SQLModel, table=True):
    """One person. `traits` is the latest value of each attribute by event time."""

    id: uuid.UUID = Field(primary_key=True)
    created_at: dt.datetime = _ts()
    updated_at: dt.datetime = _ts()
    # Event time of each trait's value, so that events applied in any order give the same traits.
    traits: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(json_type(), nullable=False))
    trait_times: dict[str, str] = Field(default_factory=dict, sa_column=sa.Column(json_type(), nullable=False))
    first_event_at: dt.datetime | None = _ts(nullable=True)
    last_event_at: dt.datetime | None = _ts(nullable=True)
    merged_into_id: uuid.UUID | None = Field(default=None, foreign_key="lead.id", nullable=True)
    # The lifecycle stage (see `scoring.lifecycle`), kept on the row the ingest batch locks and
    # updates anyway; its history is `stage_transition`.
    stage: str = Field(default="lead", sa_column=sa.Column(sa.String(16), nullable=False, server_default="lead"))
    stage_changed_at: dt.datetime | None = _ts(nullable=True)


class LeadIdentity(SQLModel, table=True):
    """A key that names a person: a normalised email, or an id in another system (`hubspot`, ...)."""

    __tablename__ = "lead_identity"
    __table_args__ = (sa.UniqueConstraint("namespace", "value", name="uq_lead_identity_namespace_value"),)

    id: int | None = Field(default=None, primary_key=True)
    lead_id: uuid.UUID = Field(nullable=False, index=True)
    namespace: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    value: str = Field(sa_column=sa.Column(sa.String(320), nullable=False))
    created_at: dt.datetime = _ts()


class InboundRequest(SQLModel, table=True):
    """The raw body of an accepted webhook request, as received, for audit and replay."""

    __tablename__ = "inbound_request"

    id: uuid.UUID = Field(primary_key=True)
    source_id: int = Field(nullable=False)
    webhook_id: str | None = Field(default=None, sa_column=sa.Column(sa.String(200), nullable=True))
    content_type: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    body: bytes = Field(sa_column=sa.Column(sa.LargeBinary(), nullable=False))
    received_at: dt.datetime = _ts()


class InboundEvent(SQLModel, table=True):
    """One lead event; `(source_id, external_id)` is the sender's id and the deduplication key."""

    __tablename__ = "inbound_event"
    __table_args__ = (
        sa.UniqueConstraint("source_id", "external_id", name="uq_inbound_event_source_id_external_id"),
        sa.Index("ix_inbound_event_lead_id_occurred_at", "lead_id", "occurred_at"),
        # What scoring reads for every event: a lead's activities, without visiting its other events.
        sa.Index(
            "ix_inbound_event_activity_lead_id_occurred_at",
            "lead_id",
            "occurred_at",
            postgresql_where=sa.text("type = 'lead.activity'"),
            sqlite_where=sa.text("type = 'lead.activity'"),
        ),
    )

    id: uuid.UUID = Field(primary_key=True)
    source_id: int = Field(nullable=False)
    external_id: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    request_id: uuid.UUID = Field(nullable=False)
    lead_id: uuid.UUID = Field(nullable=False)
    type: str = Field(sa_column=sa.Column(sa.String(32), nullable=False))
    name: str | None = Field(default=None, sa_column=sa.Column(sa.String(200), nullable=True))
    occurred_at: dt.datetime = _ts()
    received_at: dt.datetime = _ts()
    payload: dict[str, Any] = Field(sa_column=sa.Column(json_document(), nullable=False))


class LeadMerge(SQLModel, table=True):
    """A record that two leads were found to be one person, and which one survived."""

    __tablename__ = "lead_merge"

    id: int | None = Field(default=None, primary_key=True)
    survivor_id: uuid.UUID = Field(foreign_key="lead.id", nullable=False, index=True)
    merged_id: uuid.UUID = Field(foreign_key="lead.id", nullable=False, index=True)
    event_id: uuid.UUID = Field(nullable=False)
    merged_at: dt.datetime = _ts()
    identities: list[dict[str, str]] = Field(default_factory=list, sa_column=sa.Column(json_type(), nullable=False))


class PipelineVersion(SQLModel, table=True):
    """An immutable scoring pipeline: spec, compiled artifact, training metrics and provenance.

    Rows are only ever inserted; which version scores is decided by `pipeline_slot`.
    """

    __tablename__ = "pipeline_version"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(sa_column=sa.Column(sa.String(100), nullable=False))
    spec: dict[str, Any] = Field(sa_column=sa.Column(json_type(), nullable=False))
    artifact: dict[str, Any] = Field(sa_column=sa.Column(json_type(), nullable=False))
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(json_type(), nullable=False))
    sklearn_version: str = Field(sa_column=sa.Column(sa.String(32), nullable=False))
    training_data_sha256: str | None = Field(default=None, sa_column=sa.Column(sa.String(64), nullable=True))
    created_by: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))
    created_at: dt.datetime = _ts()


class PipelineSlot(SQLModel, table=True):
    """Which version is `active` (scores, qualifies, routes) and which is `shadow` (scores only)."""

    __tablename__ = "pipeline_slot"

    slot: str = Field(sa_column=sa.Column(sa.String(16), primary_key=True))
    version_id: int = Field(foreign_key="pipeline_version.id", nullable=False)
    assigned_at: dt.datetime = _ts()
    assigned_by: str = Field(sa_column=sa.Column(sa.String(200), nullable=False))


class ScoreRecord(SQLModel, table=True):
    """One score of one lead by one pipeline version, with everything needed to explain it."""

    __tablename__ = "score_record"
    __table_args__ = (
        sa.Index("ix_score_record_lead_id_shadow_scored_at", "lead_id", "shadow", "scored_at"),
        sa.Index("ix_score_record_version_id_lead_id", "pipeline_version_id", "lead_id"),
    )

    id: uuid.UUID = Field(primary_key=True)
    lead_id: uuid.UUID = Field(nullable=False)
    pipeline_version_id: int = Field(nullable=False)
    shadow: bool = Field(nullable=False)
    event_id: uuid.UUID | None = Field(default=None, nullable=True)
    scored_at: dt.datetime = _ts()
    inputs_digest: str = Field(sa_column=sa.Column(sa.String(64), nullable=False))
    score: float = Field(nullable=False)
    fit: float = Field(nullable=False)
    engagement: float = Field(nullable=False)
    probability: float = Field(nullable=False)
    grade: str = Field(sa_column=sa.Column(sa.String(8), nullable=False))
    explanation: dict[str, Any] = Field(sa_column=sa.Column(json_document(), nullable=False))


from models import audit as audit  # noqa: E402,F401  (registers the audit tables on the metadata)
from models import delivery as delivery  # noqa: E402  (the CRM outbox: models/delivery.py)
from models import enrichment as enrichment  # noqa: E402,F401  (HubSpot enrichment: models/enrichment.py)
from models import qualification as qualification  # noqa: E402,F401  (registers the qualification tables)
from models import routing as routing  # noqa: E402  (routing tables, in their own module)
