"""Routing in the service: rules versions (create; activate, inside a change request's apply;
list), assignment of qualified leads inside the caller's transaction, previews, impact of other
rules, and account owners.

`assign_leads` is what the ingest transaction calls when leads newly enter a stage that routes
(MQL/SQL); it writes the assignments, the pools' counters and the accounts claimed in that same
transaction, so the caller's outbox row commits (or not) together with them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson
import structlog
import yaml
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scoring.errors import SpecInvalid
from scoring.free_mail import FREE_MAIL_DOMAINS
from scoring.routing import (
    Decision,
    PoolState,
    Router,
    RoutingLead,
    RoutingSpec,
    email_domain,
    is_free_mail,
    load_routing_spec,
)
from service.change_schemas import RoutingImpact, RoutingMove, RoutingTargets
from service.errors import LeadscoreError, NotFound
from service.ids import uuid7
from service.repositories import pipelines as pipelines_repo
from service.repositories import routing as repo
from service.routing_schemas import (
    AccountRead,
    RoutingActivationRead,
    RoutingPreview,
    RoutingPreviewRequest,
    RoutingRulesList,
    RoutingRulesVersionRead,
)

__all__ = [
    "Assignment",
    "InvalidRoutingSpec",
    "NoActiveRouting",
    "RoutingLead",
    "RoutingVersionNotFound",
    "activate_spec_in",
    "activate_version_in",
    "assign_leads",
    "create_version",
    "create_version_in",
    "list_versions",
    "parse_routing_spec",
    "preview_routing",
    "routing_impact",
]

log = structlog.get_logger(__name__)


class InvalidRoutingSpec(LeadscoreError):
    """The routing spec is not valid; `detail` lists `{loc, msg}` per problem (422)."""

    status = 422


class RoutingVersionNotFound(NotFound):
    """No routing rules version has this number (404)."""


class NoActiveRouting(LeadscoreError):
    """No routing rules version is active (409)."""

    status = 409


@dataclass(frozen=True)
class Assignment:
    """A stored assignment: what the CRM handoff needs (owner or queue) and why it was chosen."""

    id: uuid.UUID
    lead_id: uuid.UUID
    kind: str
    owner_id: str | None
    pool_id: str | None
    queue: str | None
    routing_version: int
    rule_id: str | None
    matched_by: str
    reason: str
    stage: str | None
    assigned_at: dt.datetime


# --- versions ------------------------------------------------------------------------------------------


def parse_routing_spec(text: str) -> RoutingSpec:
    """A spec from YAML (or JSON) text; `InvalidRoutingSpec` naming each bad field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidRoutingSpec([{"loc": "", "msg": f"not valid YAML: {exc}"}]) from None
    return validate_spec(data)


def validate_spec(data: Any) -> RoutingSpec:
    try:
        return load_routing_spec(data)
    except SpecInvalid as exc:
        raise InvalidRoutingSpec(exc.errors) from None


def spec_digest(spec: RoutingSpec) -> str:
    """sha256 of the spec's canonical JSON: equal digests, equal routing."""
    return hashlib.sha256(orjson.dumps(spec.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)).hexdigest()


async def create_version(engine: AsyncEngine, spec: RoutingSpec, *, actor: str, now: dt.datetime) -> int:
    """Store a spec as a new immutable version. Making a version active is a change request's
    (`service.change_requests`), which calls `activate_version_in` or `activate_spec_in`."""
    async with engine.begin() as conn:
        version_id = await create_version_in(conn, spec, actor=actor, now=now)
    log.info("routing rules version created", version=version_id, actor=actor)
    return version_id


async def create_version_in(conn: AsyncConnection, spec: RoutingSpec, *, actor: str, now: dt.datetime) -> int:
    """`create_version` in the caller's transaction (for change requests that apply it)."""
    return await repo.insert_version(
        conn,
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        spec_sha256=spec_digest(spec),
        created_by=actor,
        now=now,
    )


async def activate_version_in(conn: AsyncConnection, version_id: int, *, actor: str, now: dt.datetime) -> None:
    """Make a stored version the active one, in the caller's transaction (the change request's
    apply); every process routes with it from its next batch."""
    row = await repo.get_version(conn, version_id)
    if row is None:
        raise RoutingVersionNotFound(f"no routing rules version {version_id}")
    await _activate(conn, version_id, validate_spec(row["spec"]), actor=actor, now=now)


async def activate_spec_in(
    conn: AsyncConnection, spec: RoutingSpec, *, created_by: str, actor: str, now: dt.datetime
) -> int:
    """Make `spec` active in the caller's transaction: the newest stored version with exactly this
    spec, else a new version (by `created_by`). Returns the version made active."""
    version_id = await repo.version_with_digest(conn, spec_digest(spec))
    if version_id is None:
        version_id = await create_version_in(conn, spec, actor=created_by, now=now)
    await _activate(conn, version_id, spec, actor=actor, now=now)
    return version_id


async def _activate(conn: AsyncConnection, version_id: int, spec: RoutingSpec, *, actor: str, now: dt.datetime) -> None:
    # The pools' counter rows exist before any lead is routed with the version, so routing only
    # ever locks existing rows (assign_leads still creates any that are missing).
    await repo.ensure_pool_members(conn, [(p.id, m.owner) for p in spec.pools for m in p.members], now)
    await repo.insert_activation(conn, version_id=version_id, actor=actor, now=now)


async def list_versions(engine: AsyncEngine) -> RoutingRulesList:
    async with engine.connect() as conn:
        versions = await repo.list_versions(conn)
        activations = await repo.list_activations(conn)
    active = activations[-1]["version_id"] if activations else None
    return RoutingRulesList(
        active_version=active,
        versions=[
            RoutingRulesVersionRead(
                version=v["id"],
                name=v["name"],
                active=v["id"] == active,
                spec_sha256=v["spec_sha256"],
                created_by=v["created_by"],
                created_at=v["created_at"],
                spec=v["spec"],
            )
            for v in versions
        ],
        activations=[
            RoutingActivationRead(
                version=a["version_id"], activated_at=a["activated_at"], activated_by=a["activated_by"]
            )
            for a in activations
        ],
    )


# Compiled routers by (version id, spec sha256): versions are immutable, so an entry never goes
# stale; the digest keeps apart equal ids of different databases (tests, restored copies).
_ROUTERS: dict[tuple[int, str], Router] = {}
_ROUTERS_KEPT = 32


async def _router(conn: AsyncConnection, version_id: int, digest: str | None = None) -> Router:
    if digest is None:
        digest = await repo.version_digest(conn, version_id)
        if digest is None:
            raise RoutingVersionNotFound(f"no routing rules version {version_id}")
    router = _ROUTERS.get((version_id, digest))
    if router is None:
        row = await repo.get_version(conn, version_id)
        if row is None:
            raise RoutingVersionNotFound(f"no routing rules version {version_id}")
        router = Router(validate_spec(row["spec"]))
        if len(_ROUTERS) >= _ROUTERS_KEPT:
            _ROUTERS.pop(next(iter(_ROUTERS)))
        _ROUTERS[(version_id, digest)] = router
    return router


# --- assignment ----------------------------------------------------------------------------------------


async def assign_leads(conn: AsyncConnection, leads: Sequence[RoutingLead], *, now: dt.datetime) -> list[Assignment]:
    """Route `leads` with the active rules version and store the assignments, in the caller's open
    transaction (the caller commits). Returns one `Assignment` per lead, in order; an empty list
    when no version is active (nothing is stored then).

    Each lead: its id, traits, score/fit/engagement/grade, the stage it entered and its segment;
    `emails` may be left empty, they are then read from its email identities (one statement).
    Several processes may call this at once: accounts are locked (advisory locks, PostgreSQL) and
    the pools' counter rows are locked `FOR UPDATE` in one order, read, advanced and written back
    in this transaction, so the distribution is exact whatever the concurrency. On SQLite the
    transaction must be a writer's (`BEGIN IMMEDIATE`, see `service.db.writer_connection`).
    Call it at most once per transaction: the lock order holds within one call.
    """
    if not leads:
        return []
    active = await repo.active_version(conn)
    if active is None:
        return []
    version_id, digest = active
    router = await _router(conn, version_id, digest)

    missing = [lead.lead_id for lead in leads if not lead.emails] if router.reads_emails else []
    if missing:
        emails = await repo.lead_emails(conn, missing)
        leads = [lead if lead.emails else replace(lead, emails=tuple(emails.get(lead.lead_id, ()))) for lead in leads]

    keys = sorted({key for lead in leads for key in router.account_keys(lead)})
    await repo.lock_accounts(conn, keys)
    accounts = await repo.account_owners(conn, keys)

    pool_ids = router.pools_for(leads)
    states: dict[str, PoolState] = {}
    if pool_ids:
        members = [(pool_id, m.owner) for pool_id in pool_ids for m in router.spec.pool(pool_id).members]
        await repo.ensure_pool_members(conn, members, now)
        stored = await repo.pool_states(conn, pool_ids, lock=True)
        states = {pool_id: PoolState(stored[pool_id]) for pool_id in pool_ids}

    outcome = router.route(leads, pools=states, accounts=accounts, now=now)

    assignments = [
        _assignment(decision, lead, version_id, now) for decision, lead in zip(outcome.decisions, leads, strict=True)
    ]
    await repo.insert_assignments(conn, [_row(a) for a in assignments])
    # Only the members whose counters moved are written.
    changed = {
        (pool_id, owner_id): member
        for pool_id, state in outcome.pools.items()
        for owner_id, member in state.members.items()
        if states[pool_id].members.get(owner_id) != member
    }
    await repo.update_pool_members(conn, changed, now)
    if outcome.claims:
        claimed_by = {key: a.id for d, a in zip(outcome.decisions, assignments, strict=True) for key in d.claims}
        await repo.claim_accounts(
            conn,
            [
                {
                    "kind": kind,
                    "key": key,
                    "owner_id": owner_id,
                    "source": "assignment",
                    "assignment_id": claimed_by[(kind, key)],
                    "updated_at": now,
                }
                for (kind, key), owner_id in outcome.claims.items()
            ],
        )
    return assignments


def _assignment(decision: Decision, lead: RoutingLead, version_id: int, now: dt.datetime) -> Assignment:
    return Assignment(
        id=uuid7(),
        lead_id=lead.lead_id,
        kind=decision.kind,
        owner_id=decision.owner_id,
        pool_id=decision.pool_id,
        queue=decision.queue,
        routing_version=version_id,
        rule_id=decision.rule_id,
        matched_by=decision.matched_by,
        reason=decision.reason,
        stage=lead.stage,
        assigned_at=now,
    )


def _row(a: Assignment) -> dict[str, Any]:
    return {
        "id": a.id,
        "lead_id": a.lead_id,
        "kind": a.kind,
        "owner_id": a.owner_id,
        "pool_id": a.pool_id,
        "queue": a.queue,
        "routing_version_id": a.routing_version,
        "rule_id": a.rule_id,
        "matched_by": a.matched_by,
        "reason": a.reason,
        "stage": a.stage,
        "assigned_at": a.assigned_at,
    }


# --- preview -------------------------------------------------------------------------------------------


async def preview_routing(engine: AsyncEngine, request: RoutingPreviewRequest, *, now: dt.datetime) -> RoutingPreview:
    """Where a lead would go now, and why, with the current counters and account owners; stores
    nothing and takes no lock, so a concurrent assignment may take the turn it shows."""
    async with engine.connect() as conn:
        if request.version is not None:
            version_id = request.version
            router = await _router(conn, version_id)
        else:
            active = await repo.active_version(conn)
            if active is None:
                raise NoActiveRouting("no routing rules version is active; name one with `version`")
            version_id = active[0]
            router = await _router(conn, *active)
        lead = RoutingLead(
            lead_id=uuid.UUID(int=0),
            traits=request.traits,
            score=request.score,
            fit=request.fit,
            engagement=request.engagement,
            grade=request.grade,
            stage=request.stage,
            segment=request.segment,
            emails=(request.email,) if request.email else (),
        )
        keys = router.account_keys(lead)
        accounts = await repo.account_owners(conn, keys)
        pool_ids = router.pools_for([lead])
        stored = await repo.pool_states(conn, pool_ids, lock=False)
    decision = router.route(
        [lead], pools={p: PoolState(stored[p]) for p in pool_ids}, accounts=accounts, now=now
    ).decisions[0]
    return RoutingPreview(
        routing_version=version_id,
        kind=decision.kind,
        owner_id=decision.owner_id,
        pool_id=decision.pool_id,
        queue=decision.queue,
        rule_id=decision.rule_id,
        matched_by=decision.matched_by,
        reason=decision.reason,
        account=(
            AccountRead.model_validate({"kind": decision.account[0], "key": decision.account[1]})
            if decision.account
            else None
        ),
    )


# --- impact of other rules ------------------------------------------------------------------------


def _where(kind: str, owner_id: str | None, queue: str | None) -> str:
    return f"owner:{owner_id}" if kind != "queue" else f"queue:{queue}"


@dataclass
class _Targets:
    owners: Counter[str]
    pools: Counter[str]
    queues: Counter[str]

    @classmethod
    def empty(cls) -> _Targets:
        return cls(Counter(), Counter(), Counter())

    def add(self, kind: str, owner_id: str | None, pool_id: str | None, queue: str | None) -> None:
        if kind == "queue":
            self.queues[str(queue)] += 1
        else:
            self.owners[str(owner_id)] += 1
        if pool_id is not None:
            self.pools[pool_id] += 1

    def read(self) -> RoutingTargets:
        return RoutingTargets(
            owners=dict(sorted(self.owners.items())),
            pools=dict(sorted(self.pools.items())),
            queues=dict(sorted(self.queues.items())),
        )


async def router_for(conn: AsyncConnection, *, spec: RoutingSpec | None = None, version: int | None = None) -> Router:
    """The compiled router of a spec, or of a stored version."""
    if spec is not None:
        return Router(spec)
    if version is None:
        raise ValueError("give a spec or a version")
    return await _router(conn, version)


async def routing_impact(
    conn: AsyncConnection,
    router: Router,
    *,
    since: dt.datetime,
    max_leads: int,
    batch_size: int,
    sample_size: int,
    segment_for: Callable[[Mapping[str, Any]], str | None],
    now: dt.datetime,
) -> tuple[RoutingImpact, bool]:
    """Where the live leads assigned since `since` went (their latest assignment) and where
    `router` would send them now: routed in lead id order by the pure router from the current pool
    counters and account owners, read without locks, each lead seeing the turns the previous ones
    took; nothing is written. At most `max_leads` leads; returns `(impact, truncated)`.

    A lead moves when its owner or queue would differ; with unchanged rules, pool members can
    still differ because the turns go on from today's counters, so `retargeted` counts only the
    leads the rules would send to another pool, fixed owner or queue."""
    before, after_targets = _Targets.empty(), _Targets.empty()
    states: dict[str, PoolState] = {}
    accounts: dict[tuple[str, str], str] = {}
    considered = moved = retargeted = 0
    sample: list[RoutingMove] = []
    truncated = False
    cursor: uuid.UUID | None = None
    while True:
        room = max_leads - considered
        page = await repo.routed_leads_page(conn, since=since, after=cursor, limit=max(1, min(batch_size, room)))
        if not page:
            break
        if room <= 0:
            truncated = True
            break
        ids = [row["lead_id"] for row in page]
        scores = await pipelines_repo.latest_scores(conn, ids)
        emails = await repo.lead_emails(conn, ids) if router.reads_emails else {}
        leads = []
        for row in page:
            score = scores.get(row["lead_id"], {})
            traits = dict(row["traits"] or {})
            leads.append(
                RoutingLead(
                    lead_id=row["lead_id"],
                    traits=traits,
                    score=score.get("score"),
                    fit=score.get("fit"),
                    engagement=score.get("engagement"),
                    grade=score.get("grade"),
                    stage=row["stage"],
                    segment=segment_for(traits),
                    emails=tuple(emails.get(row["lead_id"], ())),
                )
            )
        keys = sorted({key for lead in leads for key in router.account_keys(lead)} - accounts.keys())
        accounts.update(await repo.account_owners(conn, keys))
        missing = [pool_id for pool_id in router.pools_for(leads) if pool_id not in states]
        if missing:
            stored = await repo.pool_states(conn, missing, lock=False)
            states.update({pool_id: PoolState(stored[pool_id]) for pool_id in missing})
        outcome = router.route(leads, pools=states, accounts=accounts, now=now)
        states.update(outcome.pools)
        accounts.update(outcome.claims)
        for row, decision in zip(page, outcome.decisions, strict=True):
            before.add(row["kind"], row["owner_id"], row["pool_id"], row["queue"])
            after_targets.add(decision.kind, decision.owner_id, decision.pool_id, decision.queue)
            was = _where(row["kind"], row["owner_id"], row["queue"])
            will = _where(decision.kind, decision.owner_id, decision.queue)
            if was == will:
                continue
            moved += 1
            if (row["pool_id"] or was) != (decision.pool_id or will):
                retargeted += 1
            if len(sample) < sample_size:
                sample.append(
                    RoutingMove(
                        lead_id=str(row["lead_id"]),
                        before=was,
                        after=will,
                        rule_id=decision.rule_id,
                        matched_by=decision.matched_by,
                    )
                )
        considered += len(page)
        cursor = page[-1]["lead_id"]
    impact = RoutingImpact(
        leads_considered=considered,
        moved=moved,
        retargeted=retargeted,
        before=before.read(),
        after=after_targets.read(),
        sample=sample,
    )
    return impact, truncated


# --- account owners ------------------------------------------------------------------------------------


ACCOUNT_KINDS = ("domain", "company")


def account_key(kind: str, key: str) -> tuple[str, str]:
    """A normalised account key: domains lower-cased; company ids as given (trimmed)."""
    if kind not in ACCOUNT_KINDS:
        raise ValueError(f"account kind must be one of {', '.join(ACCOUNT_KINDS)}, not {kind!r}")
    key = key.strip()
    if kind == "domain":
        key = key.lower().rstrip(".").removeprefix("@")
        if email_domain(f"x@{key}") != key:
            raise ValueError(f"{key!r} is not an email domain")
        if is_free_mail(key, FREE_MAIL_DOMAINS):
            raise ValueError(f"{key!r} is a free-mail domain: it never matches an account")
    if not key:
        raise ValueError("an account key cannot be empty")
    return kind, key


async def set_account_owner(engine: AsyncEngine, *, kind: str, key: str, owner_id: str, now: dt.datetime) -> None:
    kind, key = account_key(kind, key)
    async with engine.begin() as conn:
        await repo.set_account_owner(conn, kind=kind, key=key, owner_id=owner_id, now=now)


async def remove_account_owner(engine: AsyncEngine, *, kind: str, key: str) -> bool:
    kind, key = account_key(kind, key)
    async with engine.begin() as conn:
        return await repo.delete_account_owner(conn, kind=kind, key=key)


async def list_account_owners(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return await repo.list_account_owners(conn)


async def list_pool_counters(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return await repo.list_pool_members(conn)
