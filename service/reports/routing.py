"""Routing balance over a period: who got the qualified leads, whether pools shared them out as
configured, and how long the CRM handoffs took.

Definitions:

* **Assignments** are counted, not leads: a lead routed at `mql` and again at `sql` counts twice,
  since each is a handoff someone has to work. Assignments of leads since merged into another lead
  are left out (the survivor is the person; counting both would count them twice).
* Rows (`table=assignments`, the default CSV): one per pool member (`kind` `pool`), per owner
  assigned directly by a rule or as an account's owner (`owner`), and per queue (`queue`).
  Every member of the active routing rules' pools has a row, with zero if it got nothing.
* **Expected share** of a pool member comes from the *active* routing rules version: its weight over
  the sum of the weights of the pool's members that are not paused (round robin: equal shares);
  paused members and owners no longer in the pool expect 0. Capacity limits are not modelled: a
  member at capacity falls behind its expected share, and that shows as deviation. When the
  period's assignments were made by other versions, a warning says so.
* **Fairness per pool** (`table=pools`), among members expecting a share: each member's *load*
  is assignments / expected assignments (1 = exactly on plan).
  `max_min_ratio` is the most over the least loaded member (1 = even; 2 = someone got twice their
  due relative to someone else; null when one got none); `coefficient_of_variation` is the spread
  of the loads (standard deviation / mean; 0 = even, and comparable across pools of any size);
  `excess_assignments` is how many assignments would have to move to other members to match the
  plan exactly (half the sum of |actual - expected| over every member). A chi-square test is
  deliberately not reported: round robin is deterministic, not a random draw, so its p-value would
  answer a question nobody asked; these figures say "who is ahead, by how much" in leads.
* **Time to first delivery** (`table=deliveries`), per CRM destination, over the handoffs enqueued
  in the period (the outbox row is written in the transaction of the qualifying transition and the
  assignment, so they share its time): from then to the end of the first delivered attempt
  (its start plus its duration), median (the middle value, or the mean of the middle two), p90
  (nearest rank) and max, in seconds. `pending` counts rows waiting or in flight and `dead` dead
  letters, as they are now (`generated_at`), not at the end of the period.
* `?pool=` keeps the assignments from that pool and the handoffs of leads it assigned.
"""

from __future__ import annotations

import datetime as dt
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Literal

from pydantic import AwareDatetime, BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine

from scoring.errors import SpecInvalid
from scoring.routing import RoutingSpec, load_routing_spec
from service.reports.common import ReportPeriod
from service.repositories import routing_reports as repo
from service.repositories.funnel_reports import read_snapshot
from service.repositories.routing_reports import Handoff

RoutingTable = Literal["assignments", "pools", "owners", "deliveries"]
MemberStatus = Literal["active", "paused", "not_in_rules"]


class RoutingRow(BaseModel):
    """Assignments to one target in the period."""

    kind: Literal["pool", "owner", "queue"]
    pool_id: str | None
    owner_id: str | None
    queue: str | None
    assignments: int
    share_of_all: float | None = Field(description="Of every assignment in the report (0-1).")
    share_of_pool: float | None = Field(description="Of the pool's assignments (0-1); pool rows only.")
    member_status: MemberStatus | None = Field(
        description="The member in the active routing rules: active, paused or not in the pool; pool rows only."
    )
    weight: int | None = Field(description="The member's weight in the active routing rules.")
    expected_share: float | None = Field(description="The member's share by the active rules (0-1).")
    expected_assignments: float | None = Field(description="expected_share x the pool's assignments.")
    deviation: float | None = Field(description="assignments - expected_assignments (leads; + is ahead of plan).")
    load: float | None = Field(description="assignments / expected_assignments (1 = on plan).")


class PoolRow(BaseModel):
    """How evenly one pool shared out its assignments."""

    pool_id: str
    strategy: str | None = Field(description="In the active routing rules; null when the pool is not in them.")
    active_members: int = Field(description="Members not paused in the active rules.")
    assignments: int
    max_min_ratio: float | None = Field(description="Most over least loaded active member; null if one got none.")
    coefficient_of_variation: float | None = Field(description="Std. deviation / mean of the active members' loads.")
    excess_assignments: float | None = Field(description="Assignments that would have to move to match the plan.")
    routing_versions: list[int] = Field(description="Routing rules versions that made the period's assignments.")


class OwnerRow(BaseModel):
    """One owner's assignments, from pools and direct."""

    owner_id: str
    assignments: int
    from_pools: int
    direct: int = Field(description="By a rule naming the owner, or as an account's owner.")
    share_of_all: float | None


class DeliveryRow(BaseModel):
    """CRM handoffs enqueued in the period to one destination."""

    destination: str
    handoffs: int
    delivered: int
    pending: int = Field(description="Waiting for an attempt or in flight, now.")
    dead: int = Field(description="Dead letters, now.")
    median_seconds_to_delivery: float | None
    p90_seconds_to_delivery: float | None
    max_seconds_to_delivery: float | None


class RoutingReport(BaseModel):
    """Routing balance; `?table=` picks which of the four tables a CSV export carries."""

    period: ReportPeriod
    pool: str | None = Field(description="The pool filter, if any.")
    generated_at: AwareDatetime
    active_routing_version: int | None
    assignments: int
    rows: list[RoutingRow]
    pools: list[PoolRow]
    owners: list[OwnerRow]
    deliveries: list[DeliveryRow]
    warnings: list[str]

    def table(self, name: RoutingTable) -> tuple[Sequence[BaseModel], type[BaseModel]]:
        """One of the report's tables and its row model, for a CSV export."""
        tables: dict[str, tuple[Sequence[BaseModel], type[BaseModel]]] = {
            "assignments": (self.rows, RoutingRow),
            "pools": (self.pools, PoolRow),
            "owners": (self.owners, OwnerRow),
            "deliveries": (self.deliveries, DeliveryRow),
        }
        return tables[name]


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _nearest_rank(sorted_values: Sequence[float], fraction: float) -> float:
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)]


def _pool_rows(
    pool_id: str, counts: dict[str, int], spec: RoutingSpec | None, total: int
) -> tuple[list[RoutingRow], PoolRow]:
    config = next((p for p in spec.pools if p.id == pool_id), None) if spec is not None else None
    members = [m.owner for m in config.members] if config is not None else []
    owners = members + sorted(set(counts) - set(members))
    in_pool = sum(counts.values())
    weights = {m.owner: m.weight for m in config.members} if config is not None else {}
    paused = {m.owner for m in config.members if m.paused} if config is not None else set()
    active_weight = sum(w for o, w in weights.items() if o not in paused)
    rows: list[RoutingRow] = []
    loads: list[float] = []
    gaps: list[float] = []
    for owner in owners:
        n = counts.get(owner, 0)
        status: MemberStatus = "not_in_rules" if owner not in weights else "paused" if owner in paused else "active"
        expected_share: float | None = None
        expected: float | None = None
        if config is not None:
            expected_share = weights[owner] / active_weight if status == "active" and active_weight else 0.0
            expected = expected_share * in_pool
            gaps.append(abs(n - expected))
            if status == "active" and expected:
                loads.append(n / expected)
        rows.append(
            RoutingRow(
                kind="pool",
                pool_id=pool_id,
                owner_id=owner,
                queue=None,
                assignments=n,
                share_of_all=_ratio(n, total),
                share_of_pool=_ratio(n, in_pool),
                member_status=status if config is not None else None,
                weight=weights.get(owner),
                expected_share=expected_share,
                expected_assignments=expected,
                deviation=n - expected if expected is not None else None,
                load=_ratio(n, expected) if expected is not None else None,
            )
        )
    mean = statistics.fmean(loads) if loads else 0.0
    summary = PoolRow(
        pool_id=pool_id,
        strategy=config.strategy if config is not None else None,
        active_members=len([o for o in weights if o not in paused]),
        assignments=in_pool,
        max_min_ratio=max(loads) / min(loads) if loads and min(loads) > 0 else None,
        coefficient_of_variation=statistics.pstdev(loads) / mean if mean else None,
        excess_assignments=sum(gaps) / 2 if config is not None else None,
        routing_versions=[],
    )
    return rows, summary


def _deliveries(handoffs: Sequence[Handoff]) -> list[DeliveryRow]:
    by_destination: dict[str, dict[str, Handoff]] = defaultdict(dict)
    seconds: dict[str, dict[str, float]] = defaultdict(dict)
    for h in handoffs:
        by_destination[h.destination][str(h.id)] = h
        if h.delivered_started_at is not None:
            answered = h.delivered_started_at + dt.timedelta(milliseconds=h.delivered_duration_ms or 0.0)
            took = (answered - h.created_at).total_seconds()
            key = str(h.id)
            seconds[h.destination][key] = min(took, seconds[h.destination].get(key, took))
    rows = []
    for destination in sorted(by_destination):
        rows_of = by_destination[destination].values()
        times = sorted(seconds[destination].values())
        rows.append(
            DeliveryRow(
                destination=destination,
                handoffs=len(rows_of),
                delivered=sum(1 for h in rows_of if h.status == "delivered"),
                pending=sum(1 for h in rows_of if h.status in ("pending", "in_flight")),
                dead=sum(1 for h in rows_of if h.status == "dead"),
                median_seconds_to_delivery=statistics.median(times) if times else None,
                p90_seconds_to_delivery=_nearest_rank(times, 0.9) if times else None,
                max_seconds_to_delivery=times[-1] if times else None,
            )
        )
    return rows


def _spec(active: tuple[int, dict[str, object]] | None, warnings: list[str]) -> RoutingSpec | None:
    if active is None:
        warnings.append("no routing rules version is active: expected shares are unknown")
        return None
    try:
        return load_routing_spec(active[1])
    except SpecInvalid:  # stored versions were validated when created; this build may still refuse one
        warnings.append(f"the active routing rules version {active[0]} cannot be read: expected shares are unknown")
        return None


async def routing_report(
    engine: AsyncEngine, *, period: ReportPeriod, pool: str | None = None, now: dt.datetime
) -> RoutingReport:
    """Routing balance in `period` (see the module docstring), for one pool when `pool` is given."""
    async with read_snapshot(engine) as conn:
        counts = await repo.assignment_counts(conn, since=period.since, until=period.until, pool=pool)
        active = await repo.active_spec(conn)
        handoffs = await repo.handoffs(conn, since=period.since, until=period.until, pool=pool)
    warnings: list[str] = []
    spec = _spec(active, warnings)
    total = sum(c.assignments for c in counts)

    pool_counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    pool_versions: dict[str, set[int]] = defaultdict(set)
    direct: dict[str, int] = defaultdict(int)
    queues: dict[str, int] = defaultdict(int)
    for c in counts:
        if c.kind == "pool" and c.pool_id is not None:
            pool_counts[c.pool_id][c.owner_id or ""] += c.assignments
            pool_versions[c.pool_id].add(c.routing_version_id)
        elif c.kind == "queue":
            queues[c.queue or ""] += c.assignments
        else:
            direct[c.owner_id or ""] += c.assignments
    configured = [p.id for p in spec.pools] if spec is not None else []
    pool_ids = [p for p in configured if pool is None or p == pool]
    pool_ids += sorted(set(pool_counts) - set(pool_ids))
    if pool is not None and not pool_ids:
        warnings.append(f"no pool {pool!r} in the active routing rules and no assignment from it in the period")

    rows: list[RoutingRow] = []
    pools: list[PoolRow] = []
    for pool_id in pool_ids:
        member_rows, summary = _pool_rows(pool_id, pool_counts.get(pool_id, {}), spec, total)
        summary.routing_versions = sorted(pool_versions.get(pool_id, set()))
        rows += member_rows
        pools.append(summary)
        if spec is not None and summary.strategy is None:
            warnings.append(f"pool {pool_id!r} is not in the active routing rules: its expected shares are unknown")
    for owner_id in sorted(direct):
        n = direct[owner_id]
        rows.append(_plain("owner", n, total, owner_id=owner_id))
    for queue in sorted(queues):
        rows.append(_plain("queue", queues[queue], total, queue=queue))

    versions = sorted({c.routing_version_id for c in counts})
    if active is not None and versions and versions != [active[0]]:
        warnings.append(
            f"the period's assignments were made by routing rules versions {', '.join(map(str, versions))}; "
            f"expected shares use the active version {active[0]}"
        )

    from_pools: dict[str, int] = defaultdict(int)
    for member_counts in pool_counts.values():
        for owner_id, n in member_counts.items():
            from_pools[owner_id] += n
    owners = [
        OwnerRow(
            owner_id=owner_id,
            assignments=from_pools[owner_id] + direct[owner_id],
            from_pools=from_pools[owner_id],
            direct=direct[owner_id],
            share_of_all=_ratio(from_pools[owner_id] + direct[owner_id], total),
        )
        for owner_id in sorted(set(from_pools) | set(direct))
    ]
    return RoutingReport(
        period=period,
        pool=pool,
        generated_at=now,
        active_routing_version=active[0] if active is not None else None,
        assignments=total,
        rows=rows,
        pools=pools,
        owners=owners,
        deliveries=_deliveries(handoffs),
        warnings=warnings,
    )


def _plain(
    kind: Literal["owner", "queue"], n: int, total: int, *, owner_id: str | None = None, queue: str | None = None
) -> RoutingRow:
    return RoutingRow(
        kind=kind,
        pool_id=None,
        owner_id=owner_id,
        queue=queue,
        assignments=n,
        share_of_all=_ratio(n, total),
        share_of_pool=None,
        member_status=None,
        weight=None,
        expected_share=None,
        expected_assignments=None,
        deviation=None,
        load=None,
    )
