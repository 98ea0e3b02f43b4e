"""Change control: every change to what qualifies, scores or routes leads is a change request.

Life of a request::

    pending --approve (another ops identity)--> approved --apply (now, or at apply_at)--> applied
       |                                           |                                  \\-> failed
       \\--reject / withdraw (its author)-----------\\--> rejected / withdrawn

With `require_approval` off, a proposal is approved as it is made. An approved request without
`apply_at` (or whose time has passed) is applied at once; one with a later `apply_at` is applied by
the due-change applier (`ChangeApplier`), which any number of replicas may run: a request is
claimed by a conditional update from `approved` in the transaction that applies it, so exactly one
transaction applies it. Every event goes through `_audit`.

Each request carries an impact preview (computed from stored scores, re-scoring the stored leads
in process for a pipeline change), and says whether applying it re-evaluates existing leads
(`reevaluate`, in batches of their own transactions) and whether leads that newly qualify then may
be routed (`trigger_downstream`, recorded on their transitions). The preview and the re-evaluation
run the same code over the same leads, so the preview's counts are what the re-evaluation does.
A routing rules change moves no stage: its preview routes the window's routed leads in process
with the proposed rules instead (no counter moves), and applying it activates the version in the
apply transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scoring.lifecycle import is_backward
from scoring.thresholds import compile_policy
from service.audit import append_audit
from service.auth import Principal
from service.change_schemas import (
    ActivePipelineChange,
    ChangeRequestCreate,
    ChangeRequestRead,
    Decision,
    Impact,
    RollbackChange,
    RoutingRulesChange,
    SegmentImpact,
    ShadowPipelineChange,
    ThresholdPolicyChange,
)
from service.db import write_transaction
from service.errors import Forbidden, LeadscoreError, NotFound
from service.handoff import NO_TARGETS, HandoffTargets
from service.pipelines import InvalidPipeline, LoadedPipeline, Pipelines, compile_version, profile_of, score_leads
from service.qualification import (
    LoadedPolicy,
    decide_after_scores,
    evaluation_batch,
    load_policy_row,
    record_transitions,
)
from service.repositories import change_requests as repo
from service.repositories import pipelines as pipelines_repo
from service.repositories import qualification as qualification_repo
from service.repositories import routing as routing_repo
from service.routing import (
    InvalidRoutingSpec,
    activate_spec_in,
    activate_version_in,
    router_for,
    routing_impact,
    validate_spec,
)
from service.settings import Settings

log = structlog.get_logger(__name__)

SCHEDULER = "scheduler"
NO_APPROVAL = "(approval not required)"


class ChangeRequestNotFound(NotFound):
    """No change request has this id (404)."""


class ChangeRequestConflict(LeadscoreError):
    """The change request is not in a status that allows this (409)."""

    status = 409


class SelfApprovalRefused(Forbidden):
    """The author of a change request can never approve it (403)."""


class NotTheAuthor(Forbidden):
    """Only the author of a change request may withdraw it (403)."""


class InvalidChange(LeadscoreError):
    """The proposed change cannot be made: unknown or unservable version, nothing to roll back to (422)."""

    status = 422


@dataclass(frozen=True)
class ChangeControl:
    """How change requests behave (from settings)."""

    require_approval: bool = True
    window_days: int = 90
    impact_max_leads: int = 10_000
    sample_size: int = 20
    batch_size: int = 500
    lookback: dt.timedelta = dt.timedelta(days=365)
    # Where leads that a re-evaluation newly qualifies are handed off (with `trigger_downstream`).
    handoff: HandoffTargets = NO_TARGETS

    @classmethod
    def from_settings(cls, settings: Settings) -> ChangeControl:
        return cls(
            handoff=HandoffTargets.from_settings(settings),
            require_approval=settings.require_approval,
            window_days=settings.change_window_days,
            impact_max_leads=settings.impact_max_leads,
            batch_size=settings.reevaluation_batch_size,
            lookback=dt.timedelta(days=settings.activity_lookback_days),
        )


# --- audit ------------------------------------------------------------------------------------------


async def _audit(
    conn: AsyncConnection,
    *,
    actor: str,
    role: str,
    action: str,
    request_id: int,
    before: Any,
    after: Any,
    reason: str | None,
    now: dt.datetime,
) -> None:
    """Append one change-request event to the audit log, in the caller's transaction (every event
    of every request goes through here)."""
    await append_audit(
        conn,
        actor=actor,
        role=role,
        action=action,
        entity="change_request",
        entity_id=str(request_id),
        before=before,
        after=after,
        reason=reason,
        now=now,
    )


def _snapshot(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"status": row["status"], "apply_at": row["apply_at"].isoformat() if row["apply_at"] else None}


# --- reading ------------------------------------------------------------------------------------------


def _read(row: Mapping[str, Any]) -> ChangeRequestRead:
    return ChangeRequestRead(
        id=row["id"],
        kind=row["kind"],
        status=row["status"],
        change=row["payload"],
        reason=row["reason"],
        author=row["author"],
        created_at=row["created_at"],
        bootstrap=row["bootstrap"],
        reevaluate=row["reevaluate"],
        trigger_downstream=row["trigger_downstream"],
        window_days=row["window_days"],
        apply_at=row["apply_at"],
        approved_by=row["approved_by"],
        approved_at=row["approved_at"],
        closed_by=row["closed_by"],
        closed_at=row["closed_at"],
        close_reason=row["close_reason"],
        applied_by=row["applied_by"],
        applied_at=row["applied_at"],
        before=row["before"],
        result=row["result"],
        impact=Impact.model_validate(row["impact"]) if row["impact"] else None,
    )


async def _get(conn: AsyncConnection, request_id: int, *, lock: bool = False) -> dict[str, Any]:
    row = await repo.get(conn, request_id, lock=lock)
    if row is None:
        raise ChangeRequestNotFound(f"no change request {request_id}")
    return row


async def get_request(engine: AsyncEngine, request_id: int) -> ChangeRequestRead:
    async with engine.connect() as conn:
        return _read(await _get(conn, request_id))


async def list_requests(
    engine: AsyncEngine, *, statuses: list[str] | None, limit: int, before_id: int | None
) -> list[ChangeRequestRead]:
    async with engine.connect() as conn:
        return [_read(r) for r in await repo.list_requests(conn, statuses=statuses, limit=limit, before_id=before_id)]


# --- what a change leads to ---------------------------------------------------------------------------


def _change(kind: str, payload: Mapping[str, Any]) -> Any:
    models: dict[str, Any] = {
        "threshold_policy": ThresholdPolicyChange,
        "active_pipeline": ActivePipelineChange,
        "shadow_pipeline": ShadowPipelineChange,
        "routing_rules": RoutingRulesChange,
        "rollback": RollbackChange,
    }
    return models[kind].model_validate(dict(payload))


async def _pipeline(conn: AsyncConnection, version: int) -> LoadedPipeline:
    row = await pipelines_repo.get_version(conn, version)
    if row is None:
        raise InvalidChange(f"no pipeline version {version}")
    try:
        return compile_version(row)
    except InvalidPipeline as exc:
        raise InvalidChange(exc.detail) from None


async def _active_policy(conn: AsyncConnection) -> LoadedPolicy | None:
    policy_id = await qualification_repo.active_policy_id(conn)
    row = None if policy_id is None else await qualification_repo.get_policy(conn, policy_id)
    return None if row is None else load_policy_row(row)


def _is_routing(change: Any) -> bool:
    return isinstance(change, RoutingRulesChange) or (
        isinstance(change, RollbackChange) and change.target == "routing_rules"
    )


async def _routing_version(conn: AsyncConnection, version: int) -> None:
    row = await routing_repo.get_version(conn, version)
    if row is None:
        raise InvalidChange(f"no routing rules version {version}")
    try:
        validate_spec(row["spec"])
    except InvalidRoutingSpec as exc:
        raise InvalidChange(exc.detail) from None


async def _validate(conn: AsyncConnection, change: Any) -> None:
    """Refuse a change that could not be applied as it stands (a bad routing spec:
    `InvalidRoutingSpec`, naming each problem)."""
    if isinstance(change, ActivePipelineChange | ShadowPipelineChange) and change.version is not None:
        await _pipeline(conn, change.version)
    elif isinstance(change, RoutingRulesChange):
        if change.spec is not None:
            validate_spec(change.spec)
        elif change.version is not None:
            await _routing_version(conn, change.version)
    elif isinstance(change, RollbackChange):
        if change.target == "routing_rules":
            if change.version not in await routing_repo.ever_activated(conn):
                raise InvalidChange(f"routing rules version {change.version} was never active")
            await _routing_version(conn, change.version)
        elif change.target == "threshold_policy":
            if await qualification_repo.get_policy(conn, change.version) is None:
                raise InvalidChange(f"no threshold policy version {change.version}")
        else:
            earlier = await repo.applied_versions(conn, target="active_pipeline")
            if change.version not in earlier:
                raise InvalidChange(f"pipeline version {change.version} was never made active by a change request")
            await _pipeline(conn, change.version)


async def _outcome_of(
    conn: AsyncConnection, change: Any
) -> tuple[LoadedPolicy | None, LoadedPipeline | None, str | None]:
    """The policy that would qualify leads after the change, the pipeline that would score them
    when it changes (None when scores stay as stored), and a note when no stage can move."""
    if isinstance(change, ThresholdPolicyChange):
        return LoadedPolicy(policy_id=0, name=change.policy.name, compiled=compile_policy(change.policy)), None, None
    if isinstance(change, RollbackChange) and change.target == "threshold_policy":
        row = await qualification_repo.get_policy(conn, change.version)
        if row is None:
            raise InvalidChange(f"no threshold policy version {change.version}")
        return load_policy_row(row), None, None
    if isinstance(change, ShadowPipelineChange):
        return None, None, "a shadow version scores alongside the active one and changes no stage"
    policy = await _active_policy(conn)
    pipeline = await _pipeline(conn, change.version)
    note = None if policy is not None else "no threshold policy is active: stages do not depend on scores"
    return policy, pipeline, note


@dataclass
class _Tally:
    """Counts of stage moves, by direction, move and segment, with a sample of lead ids."""

    sample_size: int
    considered: int = 0
    moves: Counter[str] = field(default_factory=Counter)
    segments: dict[str, Counter[str]] = field(default_factory=dict)
    directions: Counter[str] = field(default_factory=Counter)
    segment_directions: dict[str, Counter[str]] = field(default_factory=dict)
    sample: list[str] = field(default_factory=list)

    def add(self, row: Mapping[str, Any]) -> None:
        move = f"{row['from_stage']}->{row['to_stage']}"
        direction = "down" if is_backward(row["from_stage"], row["to_stage"]) else "up"
        segment = row["segment"] or "default"
        self.moves[move] += 1
        self.directions[direction] += 1
        self.segments.setdefault(segment, Counter())[move] += 1
        self.segment_directions.setdefault(segment, Counter())[direction] += 1
        if len(self.sample) < self.sample_size:
            self.sample.append(str(row["lead_id"]))

    def counts(self) -> dict[str, Any]:
        return {
            "leads_considered": self.considered,
            "changes": sum(self.moves.values()),
            "up": self.directions["up"],
            "down": self.directions["down"],
            "moves": dict(sorted(self.moves.items())),
            "by_segment": {
                name: {
                    "up": self.segment_directions[name]["up"],
                    "down": self.segment_directions[name]["down"],
                    "moves": dict(sorted(moves.items())),
                }
                for name, moves in sorted(self.segments.items())
            },
        }


async def _rescore(
    conn: AsyncConnection,
    pipeline: LoadedPipeline,
    leads: Mapping[uuid.UUID, tuple[str, Mapping[str, Any]]],
    *,
    now: dt.datetime,
    lookback: dt.timedelta,
) -> dict[uuid.UUID, dict[str, Any]]:
    """Scores of the leads by `pipeline`, computed in process; nothing is stored."""
    activities: dict[uuid.UUID, list[Any]] = {lead_id: [] for lead_id in leads}
    for row in await pipelines_repo.lead_activities(conn, list(leads), since=now - lookback):
        activities[row.lead_id].append(row)
    records: dict[uuid.UUID, dict[str, Any]] = {}
    for lead_id, (_, traits) in leads.items():
        score = pipeline.compiled.score(profile_of(traits, activities[lead_id]), now=now)
        records[lead_id] = {
            "id": None,
            "score": score.value,
            "fit": score.fit,
            "engagement": score.engagement,
            "probability": score.probability,
            "grade": score.grade,
        }
    return records


async def compute_impact(
    engine: AsyncEngine, change: Any, *, window_days: int, control: ChangeControl, now: dt.datetime
) -> Impact:
    """What applying `change` with re-evaluation would do to the stages of the leads scored in the
    last `window_days` days (at most `control.impact_max_leads` of them); for routing rules, where
    the leads routed in the window would go instead. Changes nothing."""
    if _is_routing(change):
        return await _routing_impact(engine, change, window_days=window_days, control=control, now=now)
    tally = _Tally(control.sample_size)
    truncated = False
    since = now - dt.timedelta(days=window_days)
    async with engine.connect() as conn:
        policy, pipeline, note = await _outcome_of(conn, change)
        after: uuid.UUID | None = None
        while True:
            room = control.impact_max_leads - tally.considered
            leads, records, last = await evaluation_batch(
                conn, after=after, limit=max(1, min(control.batch_size, room)), since=since, lock=False
            )
            if last is None:
                break
            if room <= 0:
                truncated = True
                break
            if policy is not None:
                if pipeline is not None:
                    records = await _rescore(conn, pipeline, leads, now=now, lookback=control.lookback)
                for row in decide_after_scores(policy, leads, records, now=now):
                    tally.add(row)
            tally.considered += len(leads)
            after = last
    counts = tally.counts()
    return Impact(
        computed_at=now,
        window_days=window_days,
        truncated=truncated,
        sample=tally.sample,
        note=note,
        leads_considered=counts["leads_considered"],
        changes=counts["changes"],
        up=counts["up"],
        down=counts["down"],
        moves=counts["moves"],
        by_segment={name: SegmentImpact(**value) for name, value in counts["by_segment"].items()},
    )


async def _routing_impact(
    engine: AsyncEngine, change: Any, *, window_days: int, control: ChangeControl, now: dt.datetime
) -> Impact:
    """A routing change moves no stage: its impact is where the window's routed leads would go."""
    async with engine.connect() as conn:
        if isinstance(change, RoutingRulesChange) and change.spec is not None:
            router = await router_for(conn, spec=validate_spec(change.spec))
        else:
            router = await router_for(conn, version=change.version)
        policy = await _active_policy(conn)

        def segment_for(traits: Mapping[str, Any]) -> str | None:
            return policy.compiled.segment_for(traits) if policy is not None else None

        routing, truncated = await routing_impact(
            conn,
            router,
            since=now - dt.timedelta(days=window_days),
            max_leads=control.impact_max_leads,
            batch_size=control.batch_size,
            sample_size=control.sample_size,
            segment_for=segment_for,
            now=now,
        )
    return Impact(
        computed_at=now,
        window_days=window_days,
        truncated=truncated,
        sample=[move.lead_id for move in routing.sample],
        note="routing rules move no stage; `routing` shows where the window's routed leads would go",
        leads_considered=routing.leads_considered,
        changes=0,
        up=0,
        down=0,
        moves={},
        by_segment={},
        routing=routing,
    )


async def preview(engine: AsyncEngine, request_id: int, *, control: ChangeControl, now: dt.datetime) -> Impact:
    """The impact of a change request computed afresh from the current data; stores nothing."""
    async with engine.connect() as conn:
        row = await _get(conn, request_id)
    return await compute_impact(
        engine, _change(row["kind"], row["payload"]), window_days=row["window_days"], control=control, now=now
    )


# --- proposing and deciding ---------------------------------------------------------------------------


async def propose(
    engine: AsyncEngine, body: ChangeRequestCreate, *, principal: Principal, control: ChangeControl, now: dt.datetime
) -> ChangeRequestRead:
    """Record a proposed change with its impact preview; approved at once when approval is not
    required, and then applied at once unless it is scheduled later."""
    if _is_routing(body.change) and body.reevaluate:
        raise InvalidChange("a routing rules change moves no stage: there is nothing to re-evaluate")
    async with engine.connect() as conn:
        await _validate(conn, body.change)
    window_days = body.window_days or control.window_days
    impact = await compute_impact(engine, body.change, window_days=window_days, control=control, now=now)
    approved = not control.require_approval
    async with write_transaction(engine) as conn:
        request_id = await repo.insert(
            conn,
            {
                "kind": body.change.kind,
                "status": "approved" if approved else "pending",
                "payload": body.change.model_dump(mode="json"),
                "reason": body.reason,
                "author": principal.subject,
                "created_at": now,
                "bootstrap": False,
                "reevaluate": body.reevaluate,
                "trigger_downstream": body.trigger_downstream,
                "window_days": window_days,
                "apply_at": body.apply_at,
                "approved_by": NO_APPROVAL if approved else None,
                "approved_at": now if approved else None,
                "impact": impact.model_dump(mode="json"),
            },
        )
        row = await _get(conn, request_id)
        await _audit(
            conn,
            actor=principal.subject,
            role=principal.role,
            action="change_request.proposed",
            request_id=request_id,
            before=None,
            after=_read(row).model_dump(mode="json", exclude={"impact"}),
            reason=body.reason,
            now=now,
        )
    if approved and (body.apply_at is None or body.apply_at <= now):
        return await apply_request(
            engine, request_id, actor=principal.subject, role=principal.role, control=control, now=now
        )
    return await get_request(engine, request_id)


async def approve(
    engine: AsyncEngine, request_id: int, *, principal: Principal, control: ChangeControl, now: dt.datetime
) -> ChangeRequestRead:
    """Approve a pending request (never its author); applied at once unless scheduled later."""
    async with write_transaction(engine) as conn:
        row = await _get(conn, request_id, lock=True)
        if row["author"] == principal.subject:
            raise SelfApprovalRefused("the author of a change request cannot approve it; another ops identity must")
        if not await repo.transition(
            conn,
            request_id,
            expected=("pending",),
            values={"status": "approved", "approved_by": principal.subject, "approved_at": now},
        ):
            raise ChangeRequestConflict(f"change request {request_id} is {row['status']}, not pending")
        await _audit(
            conn,
            actor=principal.subject,
            role=principal.role,
            action="change_request.approved",
            request_id=request_id,
            before=_snapshot(row),
            after={**_snapshot(row), "status": "approved"},
            reason=None,
            now=now,
        )
    if row["apply_at"] is None or row["apply_at"] <= now:
        return await apply_request(
            engine, request_id, actor=principal.subject, role=principal.role, control=control, now=now
        )
    return await get_request(engine, request_id)


async def close(
    engine: AsyncEngine, request_id: int, decision: Decision, *, withdraw: bool, principal: Principal, now: dt.datetime
) -> ChangeRequestRead:
    """Reject (any ops identity) or withdraw (its author only) a request not yet applied."""
    status = "withdrawn" if withdraw else "rejected"
    async with write_transaction(engine) as conn:
        row = await _get(conn, request_id, lock=True)
        if withdraw and row["author"] != principal.subject:
            raise NotTheAuthor("only the author of a change request can withdraw it; others may reject it")
        if not await repo.transition(
            conn,
            request_id,
            expected=("pending", "approved"),
            values={
                "status": status,
                "closed_by": principal.subject,
                "closed_at": now,
                "close_reason": decision.reason,
            },
        ):
            raise ChangeRequestConflict(f"change request {request_id} is {row['status']}; it can no longer be {status}")
        await _audit(
            conn,
            actor=principal.subject,
            role=principal.role,
            action=f"change_request.{status}",
            request_id=request_id,
            before=_snapshot(row),
            after={**_snapshot(row), "status": status},
            reason=decision.reason,
            now=now,
        )
    return await get_request(engine, request_id)


# --- applying ---------------------------------------------------------------------------------------------


async def _perform(
    conn: AsyncConnection, request_id: int, change: Any, *, author: str, actor: str, now: dt.datetime
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Make the change in the caller's transaction; returns `(before, result)`."""
    if _is_routing(change):
        await _validate(conn, change)
        active = await routing_repo.active_version(conn)
        previous = active[0] if active is not None else None
        if isinstance(change, RoutingRulesChange) and change.spec is not None:
            version = await activate_spec_in(conn, validate_spec(change.spec), created_by=author, actor=actor, now=now)
        else:
            version = change.version
            await activate_version_in(conn, version, actor=actor, now=now)
        return {"target": "routing_rules", "version": previous}, {"target": "routing_rules", "version": version}
    if isinstance(change, ThresholdPolicyChange):
        previous = await qualification_repo.active_policy_id(conn)
        policy_id = await qualification_repo.insert_policy(
            conn,
            name=change.policy.name,
            spec=change.policy.model_dump(mode="json"),
            change_request_id=request_id,
            created_by=author,
            now=now,
        )
        await qualification_repo.set_active_policy(conn, policy_id=policy_id, actor=actor, now=now)
        return {"target": "threshold_policy", "version": previous}, {"target": "threshold_policy", "version": policy_id}
    if isinstance(change, RollbackChange) and change.target == "threshold_policy":
        await _validate(conn, change)
        previous = await qualification_repo.active_policy_id(conn)
        await qualification_repo.set_active_policy(conn, policy_id=change.version, actor=actor, now=now)
        return {"target": "threshold_policy", "version": previous}, {
            "target": "threshold_policy",
            "version": change.version,
        }
    slot = "shadow" if isinstance(change, ShadowPipelineChange) else "active"
    target = f"{slot}_pipeline"
    await _validate(conn, change)
    previous = (await pipelines_repo.get_slots(conn)).get(slot)
    await pipelines_repo.set_slot(conn, slot=slot, version_id=change.version, actor=actor, now=now)
    return {"target": target, "version": previous}, {"target": target, "version": change.version}


async def apply_request(
    engine: AsyncEngine, request_id: int, *, actor: str, role: str, control: ChangeControl, now: dt.datetime
) -> ChangeRequestRead:
    """Apply an approved request now (whatever its `apply_at`), then re-evaluate if it says so.

    `ChangeRequestConflict` when it is not approved (or another transaction applied it first);
    `InvalidChange` when it can no longer be made (it is then marked `failed`).
    """
    try:
        async with write_transaction(engine) as conn:
            row = await _get(conn, request_id)
            change = _change(row["kind"], row["payload"])
            if not await repo.transition(
                conn,
                request_id,
                expected=("approved",),
                values={"status": "applied", "applied_by": actor, "applied_at": now},
            ):
                raise ChangeRequestConflict(f"change request {request_id} is {row['status']}, not approved")
            before, result = await _perform(conn, request_id, change, author=row["author"], actor=actor, now=now)
            if row["reevaluate"]:
                result["reevaluation"] = {"status": "running"}
            await repo.update(conn, request_id, {"before": before, "result": result})
            await _audit(
                conn,
                actor=actor,
                role=role,
                action="change_request.applied",
                request_id=request_id,
                before=before,
                after=result,
                reason=row["reason"],
                now=now,
            )
    except InvalidChange as exc:
        await _fail(engine, request_id, error=exc.detail, actor=actor, role=role, now=now)
        raise
    if row["reevaluate"]:
        counts = await reevaluate(engine, row, control=control, now=now)
        result["reevaluation"] = {"status": "done", **counts}
        async with write_transaction(engine) as conn:
            await repo.update(conn, request_id, {"result": result})
            await _audit(
                conn,
                actor=actor,
                role=role,
                action="change_request.reevaluated",
                request_id=request_id,
                before=None,
                after=result["reevaluation"],
                reason=None,
                now=now,
            )
    return await get_request(engine, request_id)


async def _fail(engine: AsyncEngine, request_id: int, *, error: Any, actor: str, role: str, now: dt.datetime) -> None:
    async with write_transaction(engine) as conn:
        if await repo.transition(
            conn, request_id, expected=("approved",), values={"status": "failed", "result": {"error": error}}
        ):
            await _audit(
                conn,
                actor=actor,
                role=role,
                action="change_request.failed",
                request_id=request_id,
                before={"status": "approved"},
                after={"status": "failed", "error": error},
                reason=None,
                now=now,
            )


async def reevaluate(
    engine: AsyncEngine, row: Mapping[str, Any], *, control: ChangeControl, now: dt.datetime
) -> dict[str, Any]:
    """Re-apply the active policy to the leads scored in the request's window, in batches of their
    own transactions (re-scoring them first with the new active version for a pipeline change).
    Transitions name the request and carry its `trigger_downstream`."""
    change = _change(row["kind"], row["payload"])
    tally = _Tally(control.sample_size)
    since = now - dt.timedelta(days=row["window_days"])
    async with engine.connect() as conn:
        policy = await _active_policy(conn)
        pipeline = None
        if isinstance(change, ActivePipelineChange) or (
            isinstance(change, RollbackChange) and change.target == "active_pipeline"
        ):
            pipeline = await _pipeline(conn, change.version)
    if policy is None or isinstance(change, ShadowPipelineChange):
        return tally.counts()
    after: uuid.UUID | None = None
    while True:
        async with write_transaction(engine) as conn:
            leads, records, last = await evaluation_batch(
                conn, after=after, limit=control.batch_size, since=since, lock=True
            )
            if last is None:
                break
            if pipeline is not None:
                records = await score_leads(
                    conn,
                    pipelines=Pipelines(active=pipeline),
                    traits={lead_id: traits for lead_id, (_, traits) in leads.items()},
                    trigger={},
                    now=now,
                    lookback=control.lookback,
                )
            rows = decide_after_scores(
                policy,
                leads,
                records,
                now=now,
                cause="reevaluation",
                actor=f"change_request:{row['id']}",
                downstream=row["trigger_downstream"],
                change_request_id=row["id"],
            )
            await record_transitions(conn, rows, now=now, handoff=control.handoff)
        for transition in rows:
            tally.add(transition)
        tally.considered += len(leads)
        after = last
    return tally.counts()


async def bootstrap_pipeline(
    engine: AsyncEngine, version: int, *, principal: Principal, reason: str, now: dt.datetime
) -> ChangeRequestRead:
    """Make the first-ever active pipeline version active at once, as a change request marked
    `bootstrap` (nothing was active, so nothing changes for any lead). Refused once a version is
    active: then a change request must be approved."""

    async def nothing_active(conn: AsyncConnection) -> None:
        if (await pipelines_repo.get_slots(conn)).get("active") is not None:
            raise ChangeRequestConflict("a pipeline version is already active; propose a change request")

    change = ActivePipelineChange(kind="active_pipeline", version=version)
    return await _bootstrap(engine, change, check=nothing_active, principal=principal, reason=reason, now=now)


async def bootstrap_routing(
    engine: AsyncEngine, change: RoutingRulesChange, *, principal: Principal, reason: str, now: dt.datetime
) -> ChangeRequestRead:
    """Make the first-ever routing rules active at once, as a change request marked `bootstrap`
    (no lead was ever routed, so nothing moves). Refused once any version has been active: then
    a change request must be approved."""

    async def never_active(conn: AsyncConnection) -> None:
        if await routing_repo.ever_activated(conn):
            raise ChangeRequestConflict("routing rules have been active before; propose a change request")

    return await _bootstrap(engine, change, check=never_active, principal=principal, reason=reason, now=now)


async def _bootstrap(
    engine: AsyncEngine,
    change: Any,
    *,
    check: Callable[[AsyncConnection], Awaitable[None]],
    principal: Principal,
    reason: str,
    now: dt.datetime,
) -> ChangeRequestRead:
    # The check runs in the writing transaction, so two bootstraps at once cannot both pass it.
    async with write_transaction(engine) as conn:
        await check(conn)
        await _validate(conn, change)
        request_id = await repo.insert(
            conn,
            {
                "kind": change.kind,
                "status": "applied",
                "payload": change.model_dump(mode="json"),
                "reason": reason,
                "author": principal.subject,
                "created_at": now,
                "bootstrap": True,
                "reevaluate": False,
                "trigger_downstream": False,
                "window_days": 1,
                "approved_by": principal.subject,
                "approved_at": now,
                "applied_by": principal.subject,
                "applied_at": now,
            },
        )
        before, result = await _perform(
            conn, request_id, change, author=principal.subject, actor=principal.subject, now=now
        )
        await repo.update(conn, request_id, {"before": before, "result": result})
        await _audit(
            conn,
            actor=principal.subject,
            role=principal.role,
            action="change_request.bootstrap",
            request_id=request_id,
            before=before,
            after=result,
            reason=reason,
            now=now,
        )
    return await get_request(engine, request_id)


async def activate_pipeline(
    engine: AsyncEngine,
    version: int,
    *,
    principal: Principal,
    reason: str | None,
    control: ChangeControl,
    now: dt.datetime,
    apply_at: dt.datetime | None = None,
    reevaluate: bool = False,
    trigger_downstream: bool = False,
) -> ChangeRequestRead:
    """Make a version active: at once as a bootstrap change request when nothing is active yet,
    else by proposing a change request (which needs `reason`, and approval when required)."""
    async with engine.connect() as conn:
        nothing_active = (await pipelines_repo.get_slots(conn)).get("active") is None
    if nothing_active and apply_at is None:
        return await bootstrap_pipeline(
            engine, version, principal=principal, reason=reason or "first active pipeline version", now=now
        )
    if not reason:
        raise InvalidChange("a change request needs a reason")
    body = ChangeRequestCreate(
        change=ActivePipelineChange(kind="active_pipeline", version=version),
        reason=reason,
        apply_at=apply_at,
        reevaluate=reevaluate,
        trigger_downstream=trigger_downstream,
    )
    return await propose(engine, body, principal=principal, control=control, now=now)


async def activate_routing(
    engine: AsyncEngine,
    change: RoutingRulesChange,
    *,
    principal: Principal,
    reason: str | None,
    control: ChangeControl,
    now: dt.datetime,
    apply_at: dt.datetime | None = None,
    window_days: int | None = None,
) -> ChangeRequestRead:
    """Make routing rules active: at once as a bootstrap change request when no routing version
    was ever active, else by proposing a change request (which needs `reason`, and approval when
    required)."""
    async with engine.connect() as conn:
        never_active = not await routing_repo.ever_activated(conn)
    if never_active and apply_at is None:
        return await bootstrap_routing(
            engine, change, principal=principal, reason=reason or "first routing rules", now=now
        )
    if not reason:
        raise InvalidChange("a change request needs a reason")
    body = ChangeRequestCreate(change=change, reason=reason, apply_at=apply_at, window_days=window_days)
    return await propose(engine, body, principal=principal, control=control, now=now)


# --- the due-change applier -------------------------------------------------------------------------------


class ChangeApplier:
    """Applies approved change requests whose `apply_at` has come. Safe with several replicas: each
    request is claimed by the conditional update in the transaction that applies it."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        control: ChangeControl,
        interval_seconds: float,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._engine = engine
        self._control = control
        self._interval = interval_seconds
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> list[int]:
        """Apply what is due now; returns the ids this call applied."""
        now = self._clock()
        async with self._engine.connect() as conn:
            due = await repo.due(conn, now=now, limit=100)
        applied: list[int] = []
        for request_id in due:
            try:
                await apply_request(
                    self._engine, request_id, actor=SCHEDULER, role="ops", control=self._control, now=now
                )
            except ChangeRequestConflict:
                continue  # another replica (or a person) applied, rejected or withdrew it first
            except InvalidChange as exc:
                log.error("scheduled change request failed", change_request=request_id, error=str(exc.detail))
                continue
            applied.append(request_id)
            log.info("scheduled change request applied", change_request=request_id)
        return applied

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="change-applier")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.run_once()
            except Exception as exc:  # the next round retries
                log.warning("change applier round failed", error=str(exc))
