"""The lead funnel over a period: how far the leads created in it got, and how many leads entered
each stage during it, overall, by source or by the threshold policy version that qualified them.

Definitions (what a row counts):

* **Cohort**: live leads (merged leads are left out: they live on in the lead they merged into)
  created in `[since, until)`.
* **Reached** a stage: the lead was, by `until`, in that stage *or a later one* of the funnel
  (`subscriber < lead < mql < sql < opportunity < customer`), at creation or after any transition
  before `until`. So a lead moved from `lead` straight to `sql` counts as having reached `mql`, a
  lead later disqualified or recycled keeps the furthest stage it reached, and a demotion does not
  take a stage back. `share` is reached / cohort; `conversion_from_previous` is reached / reached
  of the stage before.
* **Entered in period** (the flow view, any lead whatever its creation date): the lead crossed
  into that stage or a later one during the period, by a transition from an earlier stage (or
  from `recycled`/`disqualified`, which rank below every funnel stage), or by being created in
  the period already in it. A lead counts once per stage however often it crossed; a recycled lead
  that qualifies again counts again in the period it does.
* **median_hours_from_previous**: among cohort leads that reached the stage and had reached the
  previous one strictly before it (so leads that skipped the previous stage, or started past it,
  do not pull the median to zero), the median time from first reaching the previous stage to first
  reaching this one.
* **by=source**: a lead's source is the source of its first event by event time (first-touch
  attribution; a late backfilled event with an earlier time re-attributes the lead). `unknown`
  when it has no event (an event-less lead cannot be created today).
* **by=policy**: the threshold policy version on the lead's first crossing into `mql` or beyond
  before `until`, as `policy:<id>`; `manual` when that crossing had no policy (ops or a CRM
  outcome qualified it); `unqualified` when it has not reached `mql` by `until`.
"""

from __future__ import annotations

import datetime as dt
import statistics
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import AwareDatetime, BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine

from scoring.lifecycle import FUNNEL, rank
from service.errors import LeadscoreError
from service.reports.common import ReportPeriod
from service.repositories import funnel_reports as repo
from service.repositories.funnel_reports import FunnelLead, FunnelMove

FunnelBy = Literal["source", "policy"]
ALL = "all"
MANUAL = "manual"
UNQUALIFIED = "unqualified"
UNKNOWN_SOURCE = "unknown"
_MQL = FUNNEL.index("mql")
_HOUR = dt.timedelta(hours=1)


class UnknownReportSource(LeadscoreError):
    """The report's `source` filter names no webhook source (422)."""

    status = 422


class FunnelRow(BaseModel):
    """One stage of one group: the cohort view and the flow view."""

    group: str = Field(description="`all`, a source name, or `policy:<id>`/`manual`/`unqualified` (see `by`).")
    stage: str
    cohort: int = Field(description="Leads of the group created in the period.")
    reached: int = Field(description="Cohort leads in this stage or a later one by the end of the period.")
    share: float | None = Field(description="reached / cohort (0-1); null for an empty cohort.")
    conversion_from_previous: float | None = Field(
        description="reached / reached of the previous stage (0-1); null for the first stage or when none reached it."
    )
    entered_in_period: int = Field(description="Leads (any cohort) that entered this stage or passed it in the period.")
    median_hours_from_previous: float | None = Field(
        description="Median hours from the previous stage to this one, among cohort leads that went through both."
    )


class FunnelGroup(BaseModel):
    group: str
    name: str | None = Field(description="The policy version's name, for `policy:<id>` groups.")
    cohort: int
    entered_in_period: int = Field(description="Leads of the group that entered any stage in the period.")


class FunnelReport(BaseModel):
    """The funnel: `rows` (one per group and stage, in funnel order) is the CSV table."""

    period: ReportPeriod
    by: FunnelBy | None
    source: str | None = Field(description="The source filter, if any.")
    generated_at: AwareDatetime
    stages: list[str]
    cohort: int = Field(description="Leads created in the period (all groups).")
    groups: list[FunnelGroup]
    rows: list[FunnelRow]


@dataclass
class _Path:
    """A lead's way through the funnel up to the end of the period."""

    lead: FunnelLead
    # When the lead was first in funnel stage i or a later one (index = funnel rank).
    first_reached: list[dt.datetime | None]
    # Funnel ranks it crossed into (or was created in or past) during the period.
    entered: set[int] = field(default_factory=set)
    qualified_by: str = UNQUALIFIED


def _rank_below(stage: str) -> int:
    """Funnel rank; the off-funnel stages rank below every funnel stage."""
    value = rank(stage)
    return -1 if value is None else value


def _path(lead: FunnelLead, moves: Iterable[FunnelMove], period: ReportPeriod) -> _Path:
    first: list[dt.datetime | None] = [None] * len(FUNNEL)
    path = _Path(lead, first)

    def cross(low: int, high: int, at: dt.datetime) -> None:
        for r in range(low + 1, high + 1):
            if first[r] is None:
                first[r] = at
            if period.since <= at < period.until:
                path.entered.add(r)

    cross(-1, _rank_below(lead.initial_stage), lead.created_at)
    qualified = first[_MQL] is not None
    if qualified:
        path.qualified_by = MANUAL
    for move in moves:  # oldest first, all before `until`
        target = rank(move.to_stage)
        if target is None:
            continue
        origin = _rank_below(move.from_stage)
        if origin >= target:
            continue
        if not qualified and origin < _MQL <= target:
            qualified = True
            path.qualified_by = f"policy:{move.policy_id}" if move.policy_id is not None else MANUAL
        cross(origin, target, move.transitioned_at)
    return path


def _group_of(path: _Path, by: FunnelBy | None) -> str:
    if by == "source":
        return path.lead.source or UNKNOWN_SOURCE
    if by == "policy":
        return path.qualified_by
    return ALL


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _rows(group: str, paths: list[_Path], period: ReportPeriod) -> list[FunnelRow]:
    cohort = [p for p in paths if period.since <= p.lead.created_at < period.until]
    rows: list[FunnelRow] = []
    previous: int | None = None
    for index, stage in enumerate(FUNNEL):
        reached = sum(1 for p in cohort if p.first_reached[index] is not None)
        hours: list[float] = []
        if index:
            for p in cohort:
                before, at = p.first_reached[index - 1], p.first_reached[index]
                if before is not None and at is not None and before < at:
                    hours.append((at - before) / _HOUR)
        rows.append(
            FunnelRow(
                group=group,
                stage=stage,
                cohort=len(cohort),
                reached=reached,
                share=_ratio(reached, len(cohort)),
                conversion_from_previous=_ratio(reached, previous) if previous is not None else None,
                entered_in_period=sum(1 for p in paths if index in p.entered),
                median_hours_from_previous=statistics.median(hours) if hours else None,
            )
        )
        previous = reached
    return rows


async def funnel_report(
    engine: AsyncEngine,
    *,
    period: ReportPeriod,
    by: FunnelBy | None = None,
    source: str | None = None,
    now: dt.datetime,
) -> FunnelReport:
    """The funnel of `period` (see the module docstring), for leads of `source` only when given;
    `UnknownReportSource` when no source has that name."""
    async with repo.read_snapshot(engine) as conn:
        source_id: int | None = None
        if source is not None:
            source_id = await repo.source_id(conn, source)
            if source_id is None:
                raise UnknownReportSource(f"no source named {source!r}")
        leads = await repo.funnel_leads(conn, since=period.since, until=period.until, source_id=source_id)
        moves = await repo.funnel_moves(conn, since=period.since, until=period.until, source_id=source_id)
        moves_of: dict[uuid.UUID, list[FunnelMove]] = defaultdict(list)
        for move in moves:
            moves_of[move.lead_id].append(move)
        paths = [_path(lead, moves_of[lead.id], period) for lead in leads]
        groups: dict[str, list[_Path]] = defaultdict(list)
        for path in paths:
            groups[_group_of(path, by)].append(path)
        policies = [int(g.removeprefix("policy:")) for g in groups if g.startswith("policy:")]
        names = await repo.policy_names(conn, policies)
    keys = sorted(groups) or ([ALL] if by is None else [])  # no breakdown: the stages, even with zeros
    rows = [row for key in keys for row in _rows(key, groups.get(key, []), period)]
    return FunnelReport(
        period=period,
        by=by,
        source=source,
        generated_at=now,
        stages=list(FUNNEL),
        cohort=sum(1 for p in paths if period.since <= p.lead.created_at < period.until),
        groups=[
            FunnelGroup(
                group=key,
                name=names.get(int(key.removeprefix("policy:"))) if key.startswith("policy:") else None,
                cohort=sum(1 for p in groups.get(key, []) if period.since <= p.lead.created_at < period.until),
                entered_in_period=sum(1 for p in groups.get(key, []) if p.entered),
            )
            for key in keys
        ],
        rows=rows,
    )
