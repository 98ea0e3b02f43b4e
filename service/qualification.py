"""Qualification in the service: the active threshold policy of each process, applying it after
each score, stage transitions (written in one place), ops stage moves, and re-evaluation.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scoring.errors import ScoringError
from scoring.lifecycle import QUALIFIED, InvalidTransition, check_move
from scoring.thresholds import CompiledPolicy, ThresholdPolicySpec, compile_policy
from service.audit import append_audit
from service.auth import Principal
from service.change_schemas import ThresholdPolicyRead
from service.db import write_transaction
from service.errors import LeadNotFound, LeadscoreError
from service.events import StageMove, StageTransitionRead
from service.handoff import HandoffTargets, hand_off
from service.ids import uuid7
from service.metrics import STAGE_TRANSITIONS
from service.repositories import leads as leads_repo
from service.repositories import pipelines as pipelines_repo
from service.repositories import qualification as repo

log = structlog.get_logger(__name__)


class InvalidStageMove(LeadscoreError):
    """The stage move is not allowed: unknown stage, no change, or backward without a reason (422)."""

    status = 422


class InvalidPolicy(LeadscoreError):
    """A threshold policy that does not validate; `detail` lists each bad field (422)."""

    status = 422


@dataclass(frozen=True)
class LoadedPolicy:
    """A threshold policy version compiled for use."""

    policy_id: int
    name: str
    compiled: CompiledPolicy

    @property
    def actor(self) -> str:
        return f"policy:{self.policy_id}"


def parse_policy(data: Any) -> ThresholdPolicySpec:
    """A policy from its JSON form; `InvalidPolicy` naming each bad field."""
    try:
        return ThresholdPolicySpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidPolicy(
            [
                {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
        ) from None


def load_policy_row(row: Mapping[str, Any]) -> LoadedPolicy:
    return LoadedPolicy(policy_id=row["id"], name=row["name"], compiled=compile_policy(parse_policy(row["spec"])))


class PolicyRegistry:
    """Each process's compiled active threshold policy, refreshed from `threshold_policy_slot`.

    A process picks up a newly applied policy within `refresh_seconds`; every transition names the
    policy version that decided it, so a switch is never misattributed.
    """

    def __init__(self, engine: AsyncEngine, *, refresh_seconds: float) -> None:
        self._engine = engine
        self._refresh_seconds = refresh_seconds
        self._compiled: dict[int, LoadedPolicy] = {}
        self.current: LoadedPolicy | None = None
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> LoadedPolicy | None:
        async with self._engine.connect() as conn:
            policy_id = await repo.active_policy_id(conn)
            if policy_id is not None and policy_id not in self._compiled:
                row = await repo.get_policy(conn, policy_id)
                try:
                    if row is not None:
                        self._compiled[policy_id] = load_policy_row(row)
                except (InvalidPolicy, ScoringError) as exc:
                    # Stored policies were validated when proposed; this build may still refuse one.
                    log.error(
                        "threshold policy cannot be used; keeping the previous one", policy=policy_id, error=str(exc)
                    )
        if policy_id is None:
            self.current = None
        elif policy_id in self._compiled and (self.current is None or self.current.policy_id != policy_id):
            self.current = self._compiled[policy_id]
            log.info("threshold policy loaded", policy=policy_id, name=self.current.name)
        return self.current

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="policy-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.refresh()
            except Exception as exc:  # keep the policy we have; the next round retries
                log.warning("threshold policy refresh failed", error=str(exc))


async def list_policies(engine: AsyncEngine) -> list[ThresholdPolicyRead]:
    """Every applied threshold policy version, oldest first, and which one is active."""
    async with engine.connect() as conn:
        active = await repo.active_policy_id(conn)
        rows = await repo.list_policies(conn)
    return [
        ThresholdPolicyRead(
            version=row["id"],
            name=row["name"],
            active=row["id"] == active,
            spec=row["spec"],
            change_request_id=row["change_request_id"],
            created_by=row["created_by"],
            created_at=row["created_at"],
        )
        for row in rows
    ]


# --- transitions ------------------------------------------------------------------------------------


def transition_row(
    *,
    lead_id: uuid.UUID,
    from_stage: str,
    to_stage: str,
    now: dt.datetime,
    cause: str,
    actor: str,
    downstream: bool,
    reason: str | None = None,
    policy_id: int | None = None,
    segment: str | None = None,
    score_record_id: uuid.UUID | None = None,
    change_request_id: int | None = None,
    outcome_id: int | None = None,
) -> dict[str, Any]:
    """A `stage_transition` row. `downstream` is the caller's permission; the row's flag is set only
    when the lead enters a qualified stage (mql, sql), the moves routing reacts to."""
    return {
        "id": uuid7(),
        "lead_id": lead_id,
        "from_stage": from_stage,
        "to_stage": to_stage,
        "transitioned_at": now,
        "cause": cause,
        "actor": actor,
        "reason": reason,
        "policy_id": policy_id,
        "segment": segment,
        "score_record_id": score_record_id,
        "change_request_id": change_request_id,
        "outcome_id": outcome_id,
        "downstream": downstream and to_stage in QUALIFIED,
    }


async def record_transitions(
    conn: AsyncConnection,
    rows: Sequence[dict[str, Any]],
    *,
    now: dt.datetime,
    handoff: HandoffTargets,
    lead_rows_written: bool = False,
) -> list[dict[str, Any]]:
    """Write stage transitions, in the caller's transaction: the only place that does.

    Sets the leads' stage (unless the caller's own lead update already carries it, as the ingest
    batch's does: `lead_rows_written`), appends the transitions (one statement), counts them, and
    returns those flagged `downstream`: the leads that newly entered mql/sql and may be routed.
    Those are routed and their CRM handoffs enqueued (`service.handoff.hand_off`) here, in this same
    transaction, so a stage change, its assignment and its outbox rows commit together or not at all.
    """
    if not rows:
        return []
    if not lead_rows_written:
        await repo.set_stages(conn, {row["lead_id"]: row["to_stage"] for row in rows}, now)
    await repo.insert_transitions(conn, rows)
    for row in rows:
        STAGE_TRANSITIONS.labels(row["from_stage"], row["to_stage"]).inc()
    downstream = [row for row in rows if row["downstream"]]
    if downstream:
        await hand_off(conn, downstream, targets=handoff, now=now)
    return downstream


def decide_after_scores(
    policy: LoadedPolicy,
    leads: Mapping[uuid.UUID, tuple[str, Mapping[str, Any]]],
    records: Mapping[uuid.UUID, Mapping[str, Any]],
    *,
    now: dt.datetime,
    cause: str = "policy",
    actor: str | None = None,
    downstream: bool = True,
    change_request_id: int | None = None,
) -> list[dict[str, Any]]:
    """The transitions `policy` makes for leads given their `(stage, traits)` and active score
    records (a record has `id`, `score`, `fit`, `engagement`, `probability`, `grade`)."""
    rows: list[dict[str, Any]] = []
    decide = policy.compiled.decide
    for lead_id, record in records.items():
        stage, traits = leads[lead_id]
        decision = decide(stage, record, traits)
        if decision is None:
            continue
        rows.append(
            transition_row(
                lead_id=lead_id,
                from_stage=stage,
                to_stage=decision.stage,
                now=now,
                cause=cause,
                actor=actor or policy.actor,
                downstream=downstream,
                policy_id=policy.policy_id,
                segment=decision.segment,
                score_record_id=record["id"],
                change_request_id=change_request_id,
            )
        )
    return rows


# --- ops ------------------------------------------------------------------------------------------


async def move_stage(
    conn: AsyncConnection,
    *,
    lead_id: uuid.UUID,
    stage: str,
    reason: str,
    actor: str,
    cause: str,
    downstream: bool,
    now: dt.datetime,
    handoff: HandoffTargets,
    outcome_id: int | None = None,
) -> dict[str, Any]:
    """Move a live lead to `stage` by hand (ops) or on a CRM outcome, in the caller's transaction.
    Backward moves need a reason (see `scoring.lifecycle`). Returns the transition row."""
    live = await leads_repo.get_live_lead(conn, lead_id)
    row = None if live is None else await repo.lock_live_lead(conn, live["id"])
    if row is None:
        raise LeadNotFound(f"no lead {lead_id}")
    if row["merged_into_id"] is not None:
        raise LeadNotFound(f"lead {lead_id} was just merged into {row['merged_into_id']}; move that lead")
    lead_id = row["id"]
    try:
        check_move(row["stage"], stage, reason=reason)
    except InvalidTransition as exc:
        raise InvalidStageMove(str(exc)) from None
    transition = transition_row(
        lead_id=lead_id,
        from_stage=row["stage"],
        to_stage=stage,
        now=now,
        cause=cause,
        actor=actor,
        reason=reason,
        downstream=downstream,
        outcome_id=outcome_id,
    )
    await record_transitions(conn, [transition], now=now, handoff=handoff)
    return transition


async def move_lead_stage(
    engine: AsyncEngine,
    lead_id: uuid.UUID,
    move: StageMove,
    *,
    principal: Principal,
    handoff: HandoffTargets,
    now: dt.datetime,
) -> StageTransitionRead:
    """The ops action: move a lead's stage by hand, with a reason."""
    async with write_transaction(engine) as conn:
        transition = await move_stage(
            conn,
            lead_id=lead_id,
            stage=move.stage,
            reason=move.reason,
            actor=principal.subject,
            cause="ops",
            downstream=move.trigger_downstream,
            now=now,
            handoff=handoff,
        )
        await append_audit(
            conn,
            actor=principal.subject,
            role=principal.role,
            action="lead.stage_moved",
            entity="lead",
            entity_id=str(transition["lead_id"]),
            before={"stage": transition["from_stage"]},
            after={"stage": transition["to_stage"], "trigger_downstream": move.trigger_downstream},
            reason=move.reason,
            now=now,
        )
    return transition_read(transition)


def transition_read(row: Mapping[str, Any]) -> StageTransitionRead:
    return StageTransitionRead(
        id=row["id"],
        lead_id=row["lead_id"],
        from_stage=row["from_stage"],
        to_stage=row["to_stage"],
        transitioned_at=row["transitioned_at"],
        cause=row["cause"],
        actor=row["actor"],
        reason=row["reason"],
        policy_id=row["policy_id"],
        segment=row["segment"],
        score_record_id=row["score_record_id"],
        change_request_id=row["change_request_id"],
        outcome_id=row["outcome_id"],
        downstream=row["downstream"],
    )


# --- re-evaluation ----------------------------------------------------------------------------------


async def evaluation_batch(
    conn: AsyncConnection, *, after: uuid.UUID | None, limit: int, since: dt.datetime, lock: bool
) -> tuple[dict[uuid.UUID, tuple[str, dict[str, Any]]], dict[uuid.UUID, dict[str, Any]], uuid.UUID | None]:
    """One page of leads scored since `since`: `(stage, traits)` and latest active score record per
    lead, and the last id of the page (None when the page is empty)."""
    page = await repo.evaluation_page(conn, after=after, limit=limit, since=since, lock=lock)
    if not page:
        return {}, {}, None
    leads = {row["id"]: (str(row["stage"]), dict(row["traits"])) for row in page}
    records = await pipelines_repo.latest_scores(conn, list(leads))
    return leads, records, page[-1]["id"]
