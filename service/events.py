"""The canonical lead event every webhook source is mapped to, and the ingest answers.

These are the HTTP schemas of the webhook API; they are published in the OpenAPI description.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from service.routing_schemas import AssignmentRead

Scalar = str | int | float | bool | None
ShortStr = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200)]
Namespace = Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class Subject(BaseModel):
    """Who the event is about: an email, ids in other systems, or both."""

    model_config = ConfigDict(extra="forbid")

    email: Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, max_length=320)] | None = Field(
        default=None, description="Trimmed and lower-cased before matching.", examples=["ana@acme.io"]
    )
    external_ids: dict[Namespace, ShortStr] = Field(
        default_factory=dict,
        description="Ids of this person in other systems, by system name.",
        examples=[{"hubspot": "123", "segment": "u-42"}],
    )

    @model_validator(mode="after")
    def _has_a_key(self) -> Subject:
        if self.email is not None:
            if self.email == "":
                self.email = None
            else:
                local, sep, domain = self.email.rpartition("@")
                if not sep or not local or "." not in domain or " " in self.email:
                    raise ValueError("email is not an address")
        if self.email is None and not self.external_ids:
            raise ValueError("subject needs an email or at least one external id")
        return self

    def identities(self) -> list[tuple[str, str]]:
        """The `(namespace, value)` keys naming this person; `email` is a namespace of its own."""
        keys = [("email", self.email)] if self.email else []
        keys.extend(sorted(self.external_ids.items()))
        return keys


class LeadEvent(BaseModel):
    """One thing that happened to or about a lead."""

    model_config = ConfigDict(extra="forbid")

    id: ShortStr | None = Field(
        default=None,
        description="The sender's id of this event, unique per source; repeats are duplicates. "
        "When absent, the request's `webhook-id` (with the list index for a list body) is used.",
    )
    type: Literal["lead.identified", "lead.updated", "lead.activity"]
    occurred_at: AwareDatetime = Field(description="When it happened, with a UTC offset.")
    subject: Subject
    traits: dict[Annotated[str, StringConstraints(min_length=1, max_length=200)], Scalar] = Field(
        default_factory=dict,
        description="Flat attributes of the lead (job title, country, ...); values are scalars.",
    )
    name: ShortStr | None = Field(
        default=None, description="For `lead.activity`: what was done (`Page Viewed`, `Form Submitted`)."
    )
    properties: dict[str, Any] = Field(default_factory=dict, description="For `lead.activity`: its details.")

    @model_validator(mode="after")
    def _activity_has_name(self) -> LeadEvent:
        if self.type == "lead.activity" and not self.name:
            raise ValueError("a lead.activity event needs a name")
        if self.type != "lead.activity" and (self.name or self.properties):
            raise ValueError("name and properties belong to lead.activity events only")
        return self


class LeadScoreSummary(BaseModel):
    score: float = Field(description="0-100.")
    grade: str = Field(description="Fit letter A-D and engagement digit 1-4; A1 is best.")
    probability: float = Field(description="Calibrated probability of conversion.")
    pipeline_version: int


class SkippedItem(BaseModel):
    index: int | str = Field(description="The item's position in the body (`mautic.<event>.<n>` for Mautic).")
    reason: str


class EventAccepted(BaseModel):
    """The answer to an accepted (202) or duplicate (200) webhook request."""

    lead_id: uuid.UUID | None = Field(description="The lead of the events, or null when they name several.")
    score: float | None = Field(description="The lead's current score (single-lead requests; null if unscored).")
    grade: str | None = Field(description="The lead's current grade (single-lead requests).")
    stage: str | None = Field(description="The lead's lifecycle stage after these events (single-lead requests).")
    scores: dict[uuid.UUID, LeadScoreSummary] = Field(
        description="Current score of every lead named, by the active pipeline version."
    )
    stages: dict[uuid.UUID, str] = Field(description="Lifecycle stage of every lead named, after these events.")
    lead_ids: list[uuid.UUID] = Field(description="The lead of each event, in request order.")
    event_ids: list[uuid.UUID] = Field(description="Leadscore's id of each event, in request order.")
    duplicate: bool = Field(description="True when every event of the request had been received before.")
    duplicates: list[bool] = Field(description="Per event: had it been received before?")
    skipped: list[SkippedItem] | None = Field(
        default=None,
        description="Vendor sources only, and only when some: items of the body that carry no lead event "
        "(a HubSpot deal event, an unknown Segment call, ...). The raw body, with them, is stored.",
    )


class ErrorBody(BaseModel):
    """Every error answer."""

    error: str = Field(examples=["InvalidSignature"])
    detail: Any = None


class IdentityRead(BaseModel):
    namespace: str
    value: str


class EventRead(BaseModel):
    id: uuid.UUID
    source: str
    external_id: str
    type: str
    name: str | None
    occurred_at: dt.datetime
    received_at: dt.datetime
    payload: dict[str, Any]


class ScoreValues(BaseModel):
    """What a pipeline version says of a lead."""

    pipeline_version: int
    score: float = Field(description="0-100.")
    fit: float = Field(description="Fit rule points, after the group's cap.")
    engagement: float = Field(description="Engagement rule points, after the group's cap.")
    probability: float = Field(description="Calibrated probability of conversion.")
    grade: str = Field(description="Fit letter A-D and engagement digit 1-4; A1 is best.")
    inputs_digest: str = Field(description="sha256 of the resolved inputs: equal digests, equal inputs.")


class ScoreRead(ScoreValues):
    """One score of a lead, with its explanation."""

    id: uuid.UUID
    shadow: bool
    event_id: uuid.UUID | None
    scored_at: dt.datetime
    explanation: dict[str, Any] | None = Field(
        default=None, description="Rules that fired and each model feature's contribution (log-odds)."
    )


class StageTransitionRead(BaseModel):
    """One move of a lead between lifecycle stages, and why."""

    id: uuid.UUID
    lead_id: uuid.UUID
    from_stage: str
    to_stage: str
    transitioned_at: dt.datetime
    cause: str = Field(description="`policy`, `reevaluation` (a change request), `ops`, `crm` or `merge`.")
    actor: str = Field(description="`policy:<id>`, or who moved it.")
    reason: str | None
    policy_id: int | None = Field(description="The threshold policy version that decided it.")
    segment: str | None = Field(description="The policy segment whose criteria applied.")
    score_record_id: uuid.UUID | None = Field(description="The score that triggered it.")
    change_request_id: int | None
    outcome_id: int | None
    downstream: bool = Field(description="Whether this move may trigger routing and CRM handoff.")


class StageMove(BaseModel):
    """An ops move of a lead's lifecycle stage."""

    model_config = ConfigDict(extra="forbid")

    stage: Literal["subscriber", "lead", "mql", "sql", "opportunity", "customer", "disqualified", "recycled"]
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)] = Field(
        description="Why; kept on the transition."
    )
    trigger_downstream: bool = Field(
        default=True, description="Whether entering mql/sql this way may trigger routing and CRM handoff."
    )


class LeadRead(BaseModel):
    """A lead with its identities, current score, score history and most recent events."""

    id: uuid.UUID
    created_at: dt.datetime
    updated_at: dt.datetime
    first_event_at: dt.datetime | None
    last_event_at: dt.datetime | None
    traits: dict[str, Any]
    identities: list[IdentityRead]
    merged_ids: list[uuid.UUID] = Field(description="Leads that were found to be this person and merged in.")
    events: list[EventRead]
    events_total: int
    score: ScoreRead | None = Field(description="The latest score by the active pipeline version(s).")
    shadow_score: ScoreRead | None = Field(description="The latest score by a shadow version, if any.")
    score_history: list[ScoreRead] = Field(description="Most recent first, without explanations.")
    stage: str = Field(
        description="Lifecycle stage: subscriber, lead, mql, sql, opportunity, customer, disqualified or recycled."
    )
    stage_changed_at: dt.datetime | None
    transitions: list[StageTransitionRead] = Field(description="Stage transitions, most recent first.")
    assignment: AssignmentRead | None = Field(
        default=None, description="The current assignment (owner, pool or queue), if the lead was routed."
    )


class ActivityIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: ShortStr
    occurred_at: AwareDatetime
    properties: dict[str, Any] = Field(default_factory=dict)


class ScorePreviewRequest(BaseModel):
    """A lead to score without storing anything ("test a record")."""

    model_config = ConfigDict(extra="forbid")

    traits: dict[str, Scalar] = Field(default_factory=dict)
    activities: list[ActivityIn] = Field(default_factory=list, max_length=10_000)
    pipeline_version: int | None = Field(default=None, description="Default: the active version.")
    as_of: AwareDatetime | None = Field(default=None, description="The scoring time; default now.")


class ScorePreview(ScoreValues):
    """A score computed for a preview; nothing was stored."""

    as_of: dt.datetime
    explanation: dict[str, Any]


class PipelineSummary(BaseModel):
    version: int
    name: str
    active: bool
    shadow: bool
    sklearn_version: str
    training_data_sha256: str | None
    created_by: str
    created_at: dt.datetime
    metrics: dict[str, Any] = Field(description="Headline training figures (cross-validation and hold-out).")


class PipelineRead(PipelineSummary):
    spec: dict[str, Any]
    metrics_detail: dict[str, Any] = Field(description="Every training metric, tables included.")


class PipelineComparison(BaseModel):
    """How a version's scores differ from the active version's, on leads scored by both."""

    version: int
    baseline_version: int
    leads_compared: int
    mean_score_difference: float | None
    mean_absolute_score_difference: float | None
    grade_agreement: float | None = Field(description="Share of leads with the same grade.")
    grade_changes: dict[str, dict[str, int]] = Field(description="Baseline grade -> this version's grade -> leads.")
    largest_moves: list[dict[str, Any]] = Field(description="Leads whose score moved most, either way.")
