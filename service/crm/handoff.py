"""The payload of a handoff: what Leadscore tells a CRM about a lead. Stored as `delivery.payload`;
each adapter maps it onto its CRM's fields (see `service.crm.config` for the mapping)."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class Handoff(BaseModel):
    """A qualified, assigned lead, ready for the CRM. Extra keys are kept and can be mapped too."""

    model_config = ConfigDict(extra="allow")

    lead_id: uuid.UUID
    email: str | None = Field(default=None, description="Normalised email; HubSpot upserts by it.")
    external_ids: dict[str, str] = Field(default_factory=dict, description="Ids in other systems, by system.")
    owner_id: str | None = Field(default=None, description="The assigned owner's id in the CRM.")
    stage: str = Field(description="Leadscore lifecycle stage: `mql`, `sql`, ...")
    score: float | None = Field(default=None, description="0-100.")
    grade: str | None = None
    probability: float | None = None
    pipeline_version: int | None = None
    traits: dict[str, Any] = Field(default_factory=dict)
    assignment: dict[str, Any] | None = Field(
        default=None, description="How the owner was chosen: rules version, rule, reason."
    )
    occurred_at: AwareDatetime | None = Field(default=None, description="When the stage changed.")

    def to_payload(self) -> dict[str, Any]:
        """The JSON document stored in the outbox."""
        return self.model_dump(mode="json", exclude_none=True)
