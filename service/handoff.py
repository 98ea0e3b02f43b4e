"""From qualification to the CRM: leads that newly entered mql or sql are routed to an owner and a
CRM handoff per configured destination is put in the outbox, in the transaction of the stage change.

Called by `service.qualification.record_transitions` (the one place transitions are written) with
the transitions it flagged `downstream`, so ingest, re-evaluation after a policy change and ops
moves all hand off the same way, and only when the change allowed it.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from service.crm import Handoff, load_destinations
from service.delivery import DeliveryItem, enqueue_deliveries, handoff_item
from service.repositories import handoff as repo
from service.routing import Assignment, RoutingLead, assign_leads
from service.settings import Settings


@dataclass(frozen=True)
class HandoffTargets:
    """Where handoffs go: the names of the configured CRM destinations (none: assign only)."""

    destinations: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> HandoffTargets:
        """The configured destinations (raises `InvalidDestinations` on a bad configuration)."""
        return cls(
            destinations=tuple(
                sorted(load_destinations(settings.delivery_destinations, settings.delivery_destinations_file))
            )
        )


NO_TARGETS = HandoffTargets()


async def hand_off(
    conn: AsyncConnection,
    transitions: Sequence[Mapping[str, Any]],
    *,
    targets: HandoffTargets,
    now: dt.datetime,
) -> list[Assignment]:
    """Route the leads of `transitions` (rows entering mql/sql, flagged downstream) and enqueue one
    handoff per lead and destination, keyed by the transition, so a repeat enqueues nothing.

    Nothing happens without an active routing rules version (no assignment, no handoff): a lead
    with no owner is not handed to a CRM. Returns the assignments made.
    """
    latest: dict[uuid.UUID, Mapping[str, Any]] = {}
    for row in transitions:
        latest[row["lead_id"]] = row  # one routing decision per lead: its last move in this batch
    if not latest:
        return []
    lead_ids = list(latest)
    traits, identities = await repo.lead_facts(conn, lead_ids)
    records = await repo.score_records(conn, [r["score_record_id"] for r in latest.values() if r["score_record_id"]])
    record_of = {lead_id: records.get(row["score_record_id"]) for lead_id, row in latest.items()}
    leads = []
    for lead_id, row in latest.items():
        record = record_of[lead_id]
        leads.append(
            RoutingLead(
                lead_id=lead_id,
                traits=traits.get(lead_id, {}),
                score=None if record is None else record["score"],
                fit=None if record is None else record["fit"],
                engagement=None if record is None else record["engagement"],
                grade=None if record is None else record["grade"],
                stage=row["to_stage"],
                segment=row["segment"],
                emails=tuple(v for ns, v in identities.get(lead_id, []) if ns == "email"),
            )
        )
    assignments = await assign_leads(conn, leads, now=now)
    if not targets.destinations or not assignments:
        return assignments
    items: list[DeliveryItem] = []
    for assignment in assignments:
        row = latest[assignment.lead_id]
        record = record_of[assignment.lead_id]
        ids = identities.get(assignment.lead_id, [])
        handoff = Handoff(
            lead_id=assignment.lead_id,
            email=next((v for ns, v in ids if ns == "email"), None),
            external_ids={ns: v for ns, v in ids if ns != "email"},
            owner_id=assignment.owner_id,
            stage=row["to_stage"],
            score=None if record is None else record["score"],
            grade=None if record is None else record["grade"],
            probability=None if record is None else record["probability"],
            pipeline_version=None if record is None else record["pipeline_version_id"],
            traits=traits.get(assignment.lead_id, {}),
            assignment={
                "routing_version": assignment.routing_version,
                "rule_id": assignment.rule_id,
                "matched_by": assignment.matched_by,
                "queue": assignment.queue,
                "reason": assignment.reason,
            },
            occurred_at=row["transitioned_at"],
        )
        items.extend(
            handoff_item(handoff, destination, handoff_key=str(row["id"])) for destination in targets.destinations
        )
    await enqueue_deliveries(conn, items, now=now)
    return assignments
