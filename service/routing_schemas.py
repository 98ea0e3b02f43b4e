"""HTTP schemas of routing: rules versions, previews and assignments."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Scalar = str | int | float | bool | None


class AssignmentRead(BaseModel):
    """Where a lead was routed, by which rules version and rule, and why."""

    id: uuid.UUID
    kind: Literal["owner", "pool", "queue"] = Field(
        description="`owner`: a fixed or account owner; `pool`: a pool member; `queue`: no owner yet."
    )
    owner_id: str | None = Field(description="The CRM owner id (null for a queue).")
    pool_id: str | None
    queue: str | None
    routing_version: int
    rule_id: str | None = Field(description="The rule that matched, if any.")
    matched_by: Literal["rule", "rule_fallback", "account", "fallback"]
    reason: str = Field(description="Why, in words: the rule, the pool's choice, who was skipped.")
    stage: str | None = Field(description="The stage the lead had entered when it was routed.")
    assigned_at: dt.datetime


class RoutingActivationRead(BaseModel):
    version: int
    activated_at: dt.datetime
    activated_by: str


class RoutingRulesVersionRead(BaseModel):
    version: int
    name: str
    active: bool
    spec_sha256: str
    created_by: str
    created_at: dt.datetime
    spec: dict[str, Any]


class RoutingRulesList(BaseModel):
    """Every routing rules version (oldest first), which one is active, and every activation."""

    active_version: int | None
    versions: list[RoutingRulesVersionRead]
    activations: list[RoutingActivationRead] = Field(description="Oldest first; the latest names the active version.")


class RoutingPreviewRequest(BaseModel):
    """A lead to route without storing anything."""

    model_config = ConfigDict(extra="forbid")

    email: Annotated[str, StringConstraints(strip_whitespace=True, to_lower=True, max_length=320)] | None = Field(
        default=None, description="Its domain is matched against account owners (free-mail domains never match)."
    )
    traits: dict[str, Scalar] = Field(default_factory=dict)
    score: float | None = Field(default=None, description="0-100.")
    fit: float | None = None
    engagement: float | None = None
    grade: str | None = Field(default=None, max_length=8)
    stage: str | None = Field(default=None, max_length=32)
    segment: str | None = Field(default=None, max_length=100)
    version: int | None = Field(default=None, description="Rules version to use; default: the active one.")


class AccountRead(BaseModel):
    kind: Literal["company", "domain"]
    key: str


class RoutingPreview(BaseModel):
    """Where the lead would go now and why; nothing was stored and no counter moved."""

    routing_version: int
    kind: Literal["owner", "pool", "queue"]
    owner_id: str | None
    pool_id: str | None
    queue: str | None
    rule_id: str | None
    matched_by: Literal["rule", "rule_fallback", "account", "fallback"]
    reason: str
    account: AccountRead | None = Field(description="The account whose owner takes the lead, if one does.")
