"""Outcomes reported by sales (the CRM), the lifecycle moves they make, and threshold
recommendations computed from them.

Outcome -> stage (`OUTCOME_STAGES`; a CRM outcome may move a lead back, with the outcome as reason):

| outcome     | stage                                                          |
|-------------|----------------------------------------------------------------|
| `accepted`  | `sql` (sales accepted the lead)                                |
| `converted` | `opportunity` (it became a deal)                               |
| `won`       | `customer`                                                     |
| `lost`      | `recycled` or `disqualified`, as `LEADSCORE_LOST_OUTCOME_STAGE` |

`accepted`, `converted` and `won` only move a lead forward (or out of `recycled`/`disqualified`):
a late `accepted` never takes a customer back to `sql`. `lost` moves any lead but a customer.
For recommendations, a lead converted when it has a `converted` or `won` outcome.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scoring.lifecycle import rank
from scoring.recommend import cutoff_table, for_precision, for_volume
from service.change_schemas import Recommendation
from service.errors import LeadNotFound, LeadscoreError
from service.handoff import NO_TARGETS
from service.qualification import move_stage
from service.repositories import leads as leads_repo
from service.repositories import qualification as repo

Amount = Annotated[decimal.Decimal, Field(ge=0, max_digits=18, decimal_places=2)]
Currency = Annotated[str, StringConstraints(to_upper=True, pattern=r"^[A-Za-z]{3}$")]
OutcomeKind = Literal["accepted", "converted", "won", "lost"]
OUTCOME_STAGES: dict[str, str] = {"accepted": "sql", "converted": "opportunity", "won": "customer"}


class InvalidRecommendationRequest(LeadscoreError):
    """Give exactly one target: `target_precision` or `weekly_volume` (422)."""

    status = 422


class OutcomeReport(BaseModel):
    """One outcome of one lead, as a CRM adapter reports it."""

    model_config = ConfigDict(extra="forbid")

    lead_id: uuid.UUID
    kind: OutcomeKind
    occurred_at: AwareDatetime
    external_id: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = Field(
        default=None, description="The CRM's id of this outcome: a repeat with the same id is ignored."
    )
    reason: Annotated[str, StringConstraints(min_length=1, max_length=500)] | None = Field(
        default=None, description="Why, as the CRM says (a lost reason); also in the stage transition's reason."
    )
    amount: Amount | None = Field(default=None, description="The deal's value (won or converted), in `currency`.")
    currency: Currency | None = Field(default=None, description="ISO 4217 code of `amount`.")


class RecordedOutcome(BaseModel):
    outcome_id: int | None = Field(description="Null for a repeat (nothing stored).")
    lead_id: uuid.UUID
    kind: OutcomeKind
    duplicate: bool
    from_stage: str | None = Field(description="The stage the outcome moved the lead from, if it moved it.")
    to_stage: str | None


def _target(kind: str, current: str, lost_stage: str) -> str | None:
    if kind == "lost":
        return None if current in ("customer", lost_stage) else lost_stage
    target = OUTCOME_STAGES[kind]
    current_rank = rank(current)
    if current_rank is not None and current_rank >= (rank(target) or 0):
        return None
    return target


async def record_outcomes(
    conn: AsyncConnection,
    *,
    source: str,
    outcomes: Sequence[OutcomeReport],
    lost_stage: Literal["recycled", "disqualified"],
    now: dt.datetime,
) -> list[RecordedOutcome]:
    """Store outcomes (ignoring repeats of `(source, external_id)`) and move each lead's stage by
    the mapping above, in the caller's transaction, oldest outcome first. Transitions are caused by
    `crm`, carry the outcome's id, and never trigger downstream work. `LeadNotFound` for an unknown
    lead; a merged lead's outcome is recorded on the lead it was merged into. The results are in the
    order of `outcomes`."""
    results: dict[int, RecordedOutcome] = {}
    # Lock the leads first, in id order (ingest locks leads in id order too): an ingest merging one
    # of them concurrently either commits first (and the lock read follows the merge) or waits and
    # then moves the outcome with the lead's other rows. Unlocked, an outcome inserted while a merge
    # ran would stay on the merged lead, where reports and training labels never look.
    for lead_id in sorted({report.lead_id for report in outcomes}):
        await leads_repo.get_live_lead(conn, lead_id, lock=True)
    for index, report in sorted(enumerate(outcomes), key=lambda pair: pair[1].occurred_at):
        live = await leads_repo.get_live_lead(conn, report.lead_id, lock=True)
        if live is None:
            raise LeadNotFound(f"no lead {report.lead_id}")
        row = {
            "lead_id": live["id"],
            "kind": report.kind,
            "occurred_at": report.occurred_at,
            "source": source,
            "external_id": report.external_id,
            "recorded_at": now,
            "reason": report.reason,
            "amount": report.amount,
            "currency": report.currency,
        }
        inserted = await repo.insert_outcomes(conn, [row])
        if not inserted:
            results[index] = RecordedOutcome(
                outcome_id=None,
                lead_id=live["id"],
                kind=report.kind,
                duplicate=True,
                from_stage=None,
                to_stage=None,
            )
            continue
        current = (await repo.lead_stages(conn, [live["id"]]))[live["id"]]
        target = _target(report.kind, current, lost_stage)
        if target is not None:
            await move_stage(
                conn,
                lead_id=live["id"],
                stage=target,
                reason=f"CRM outcome {report.kind}"
                + (f" ({report.external_id})" if report.external_id else "")
                + (f": {report.reason}" if report.reason else ""),
                actor=f"crm:{source}",
                cause="crm",
                downstream=False,
                now=now,
                handoff=NO_TARGETS,  # an outcome never routes: the CRM already has the lead
                outcome_id=inserted[0]["id"],
            )
        results[index] = RecordedOutcome(
            outcome_id=inserted[0]["id"],
            lead_id=live["id"],
            kind=report.kind,
            duplicate=False,
            from_stage=current if target else None,
            to_stage=target,
        )
    return [results[index] for index in range(len(outcomes))]


async def recommend_threshold(
    engine: AsyncEngine,
    *,
    target_precision: float | None,
    weekly_volume: float | None,
    window_days: int,
    now: dt.datetime,
) -> Recommendation:
    """The MQL score cutoff that reaches `target_precision` (0-1) or the largest flow of new MQLs
    within `weekly_volume`, from the last `window_days` days of scores and outcomes."""
    if (target_precision is None) == (weekly_volume is None):
        raise InvalidRecommendationRequest("give exactly one of target_precision or weekly_volume")
    since = now - dt.timedelta(days=window_days)
    async with engine.connect() as conn:
        scores = await repo.window_scores(conn, since=since)
        labelled = await repo.labelled_scores(conn, since=since)
    table = cutoff_table(scores, labelled, weeks=window_days / 7)
    target: dict[str, float]
    if target_precision is not None:
        chosen = for_precision(table, target_precision)
        target = {"precision": target_precision}
    else:
        assert weekly_volume is not None
        chosen = for_volume(table, weekly_volume)
        target = {"weekly_volume": weekly_volume}
    example: dict[str, Any] | None = None
    if chosen is not None:
        example = {"mql": {"field": "score", "op": "gte", "value": chosen.cutoff}}
    return Recommendation(
        target=target,
        window_days=window_days,
        leads=len(scores),
        labelled=len(labelled),
        cutoff=chosen.cutoff if chosen else None,
        precision=chosen.precision if chosen else None,
        recall=chosen.recall if chosen else None,
        weekly_volume=chosen.weekly_volume if chosen else None,
        policy_example=example,
    )
