"""HTTP schemas of change control, impact previews and threshold recommendations."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, model_validator

from scoring.thresholds import ThresholdPolicySpec

Reason = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
Status = Literal["pending", "approved", "applied", "rejected", "withdrawn", "failed"]
STATUSES: tuple[str, ...] = ("pending", "approved", "applied", "rejected", "withdrawn", "failed")


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ThresholdPolicyChange(_In):
    """Make a new threshold policy version active."""

    kind: Literal["threshold_policy"]
    policy: ThresholdPolicySpec


class ActivePipelineChange(_In):
    """Make a pipeline version the active one (it scores, qualifies and routes)."""

    kind: Literal["active_pipeline"]
    version: int


class ShadowPipelineChange(_In):
    """Make a pipeline version the shadow one (scores alongside, changes nothing), or clear it."""

    kind: Literal["shadow_pipeline"]
    version: int | None


class RoutingRulesChange(_In):
    """Make routing rules active: a full routing spec (stored as a new immutable version when no
    version has exactly this spec), or a stored version by number. Exactly one of the two."""

    kind: Literal["routing_rules"]
    spec: dict[str, Any] | None = Field(default=None, description="A routing spec, as `routing load` reads it.")
    version: int | None = Field(default=None, description="A stored routing rules version.")

    @model_validator(mode="after")
    def _one_of(self) -> RoutingRulesChange:
        if (self.spec is None) == (self.version is None):
            raise ValueError("give exactly one of spec and version")
        return self


class RollbackChange(_In):
    """Restore a threshold policy version, or a pipeline or routing rules version that was active before."""

    kind: Literal["rollback"]
    target: Literal["threshold_policy", "active_pipeline", "routing_rules"]
    version: int


ProposedChange = Annotated[
    ThresholdPolicyChange | ActivePipelineChange | ShadowPipelineChange | RoutingRulesChange | RollbackChange,
    Field(discriminator="kind"),
]


class ChangeRequestCreate(_In):
    """A proposed change, why, and what applying it should do."""

    change: ProposedChange
    reason: Reason
    apply_at: AwareDatetime | None = Field(
        default=None, description="Apply at this time once approved; default: as soon as it is approved."
    )
    reevaluate: bool = Field(
        default=False,
        description="On apply, re-evaluate the stages of the leads scored in the last `window_days` days "
        "(re-scoring them first for a pipeline change). Otherwise leads move on their next event.",
    )
    trigger_downstream: bool = Field(
        default=False,
        description="Let leads that newly qualify by the re-evaluation be routed to sales. Needs `reevaluate`.",
    )
    window_days: int | None = Field(
        default=None, ge=1, le=3650, description="Leads scored this many days back are previewed and re-evaluated."
    )

    @model_validator(mode="after")
    def _downstream_needs_reevaluation(self) -> ChangeRequestCreate:
        if self.trigger_downstream and not self.reevaluate:
            raise ValueError("trigger_downstream needs reevaluate")
        return self


class Decision(_In):
    """Why a change request is rejected or withdrawn."""

    reason: Reason


class SegmentImpact(BaseModel):
    up: int
    down: int
    moves: dict[str, int] = Field(description="`from->to`: leads.")


class RoutingTargets(BaseModel):
    """Leads per destination: CRM owners (fixed, account or pool member), pools and queues."""

    owners: dict[str, int]
    pools: dict[str, int]
    queues: dict[str, int]


class RoutingMove(BaseModel):
    lead_id: str
    before: str = Field(description="`owner:<id>` or `queue:<name>` of its latest assignment.")
    after: str = Field(description="Where the proposed rules would send it.")
    rule_id: str | None
    matched_by: str


class RoutingImpact(BaseModel):
    """Where the window's routed leads (their latest assignment) went and where the proposed rules
    would send them, routed in process from the current pool counters and account owners (as
    `POST /v1/routing/preview` does, in lead id order); no counter moves and nothing is stored."""

    leads_considered: int = Field(description="Live leads whose latest assignment falls in the window.")
    moved: int = Field(description="Leads that would reach another owner or queue.")
    retargeted: int = Field(
        description="Leads the rules would send to another pool, fixed owner or queue (not only another pool turn)."
    )
    before: RoutingTargets
    after: RoutingTargets
    sample: list[RoutingMove] = Field(description="Some of the leads that would move.")


class Impact(BaseModel):
    """What a change would do to lead stages (and, for routing rules, to where routed leads go),
    computed from stored data; nothing is changed."""

    computed_at: dt.datetime
    window_days: int
    leads_considered: int = Field(description="Live leads with an active score in the window.")
    truncated: bool = Field(description="More leads were in the window than a preview considers.")
    changes: int = Field(description="Leads whose stage would change.")
    up: int
    down: int
    moves: dict[str, int] = Field(description="`from->to`: leads.")
    by_segment: dict[str, SegmentImpact]
    sample: list[str] = Field(description="Some of the affected lead ids.")
    note: str | None = None
    routing: RoutingImpact | None = Field(default=None, description="For a routing rules change.")


class ChangeRequestRead(BaseModel):
    id: int
    kind: str
    status: Status
    change: dict[str, Any]
    reason: str
    author: str
    created_at: dt.datetime
    bootstrap: bool = Field(description="A first activation when nothing was active, applied at once.")
    reevaluate: bool
    trigger_downstream: bool
    window_days: int
    apply_at: dt.datetime | None
    approved_by: str | None
    approved_at: dt.datetime | None
    closed_by: str | None = Field(description="Who rejected or withdrew it.")
    closed_at: dt.datetime | None
    close_reason: str | None
    applied_by: str | None
    applied_at: dt.datetime | None
    before: dict[str, Any] | None = Field(description="What was in place before it was applied.")
    result: dict[str, Any] | None = Field(description="What applying it did (and the re-evaluation's counts).")
    impact: Impact | None = Field(description="The impact preview computed when it was proposed.")


class Recommendation(BaseModel):
    """A score cutoff for MQL and what it would have given on the window's data."""

    target: dict[str, float]
    window_days: int
    leads: int = Field(description="Leads created in the window with an active score (the volume base).")
    labelled: int = Field(description="Leads with a known outcome and a score before it.")
    cutoff: float | None = Field(description="Qualify at score >= cutoff; null when no cutoff reaches the target.")
    precision: float | None
    recall: float | None
    weekly_volume: float | None
    policy_example: dict[str, Any] | None = Field(description="The cutoff as a stage condition.")


class ThresholdPolicyRead(BaseModel):
    """An applied threshold policy version."""

    version: int
    name: str
    active: bool
    spec: dict[str, Any]
    change_request_id: int | None = Field(description="The change request that applied it.")
    created_by: str = Field(description="Who proposed it.")
    created_at: dt.datetime
