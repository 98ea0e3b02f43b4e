"""Lead routing: which owner, pool member or queue a qualified lead goes to, and why.

Pure: values in, values out. The shell passes in the pools' counters (:class:`PoolState`), the
accounts that already have an owner and ``now``; it gets back one :class:`Decision` per lead, the
pools' new counters and the accounts the decisions claim, and stores them.

A **routing spec** (YAML, validated here, stored as an immutable version)::

    spec_version: 1
    name: default routing
    account_match: {precedence: account, company_id_trait: Company Id}
    pools:
      - id: ae-emea
        strategy: weighted_round_robin        # round_robin | weighted_round_robin | least_loaded
        capacity: 25                          # new leads per member per window (optional)
        window_hours: 24                      # UTC-aligned windows: 24 = UTC calendar days
        members:
          - {owner: "005A1", weight: 2}
          - {owner: "005A2", paused: true}
    rules:
      - id: enterprise-emea
        when: {all: [{field: score, op: gte, value: 80}, {field: traits.Region, op: eq, value: EMEA}]}
        target: {pool: ae-emea}
        fallback: {queue: emea-overflow}
    fallback: {queue: unassigned}             # required: an owner or a queue

Semantics:

* **Conditions** are the scoring spec's (``scoring.spec.Leaf``/``AllOf``/``AnyOf``, compiled by
  ``scoring.rules.compile_property_condition``). Fields: ``score``, ``fit``, ``engagement``
  (numbers), ``grade``, ``stage``, ``segment``, ``email_domain`` (strings), and ``traits.<name>``
  (any trait, coerced to the literal's type). A missing value matches nothing but ``ne``,
  ``not_in`` and ``exists: false``. A rule without ``when`` matches every lead.
* **First match wins.** No rule matching sends the lead to the spec's ``fallback``.
* **Pools.** Paused members and members at capacity (``window_count >= capacity`` in the current
  window) are skipped. Among the rest, ``round_robin`` takes the member whose turn it is (the least
  recently assigned; never-assigned members first, in list order); ``weighted_round_robin`` is the
  smooth weighted round robin (each pick adds every available member's weight to its current
  weight, takes the largest, ties in list order, and subtracts the total from the winner), exact
  and deterministic: 2:1:1 gives 2/1/1 of every 4 leads; ``least_loaded`` takes the member with the
  fewest assignments in the window per unit of weight, ties by turn order. A pool with nobody
  available sends the lead to the rule's ``fallback``, else the spec's, and the reason says who was
  skipped and why.
* **Account match.** A lead's company id (the ``company_id_trait``) and email domains, free-mail
  domains excluded (:data:`scoring.free_mail.FREE_MAIL_DOMAINS` plus the spec's list), are looked up
  in the accounts that have an owner, company id first. With ``precedence: account`` (default) an
  account's owner takes the lead whatever rule matched; with ``precedence: rules`` the matched
  rule wins and the account owner only replaces the spec's fallback. A rule's ``account_owner:
  prefer|ignore`` overrides the precedence for leads it matches. With ``claim`` (default), a lead a
  rule sends to an owner (fixed or from a pool) makes that owner the owner of its accounts that have
  none, so the next lead of the company follows it (also later in the same batch).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scoring.errors import SpecInvalid
from scoring.features import coerce_category
from scoring.free_mail import FREE_MAIL_DOMAINS
from scoring.profile import require_aware
from scoring.rules import Predicate, compile_property_condition
from scoring.spec import OPS_BY_TYPE, AllOf, AnyOf, Condition, Leaf

__all__ = [
    "LEAD_FIELDS",
    "AccountKey",
    "AccountMatch",
    "Decision",
    "Member",
    "MemberState",
    "Pool",
    "PoolState",
    "Router",
    "RoutingLead",
    "RoutingOutcome",
    "RoutingRule",
    "RoutingSpec",
    "Target",
    "email_domain",
    "is_free_mail",
    "load_routing_spec",
    "window_start",
]

#: Lead fields a condition may name (besides ``traits.<name>``) and their types.
LEAD_FIELDS: dict[str, str] = {
    "score": "number",
    "fit": "number",
    "engagement": "number",
    "grade": "category",
    "stage": "category",
    "segment": "category",
    "email_domain": "category",
}
TRAIT_PREFIX = "traits."

Strategy = Literal["round_robin", "weighted_round_robin", "least_loaded"]
TargetKind = Literal["owner", "pool", "queue"]
MatchedBy = Literal["rule", "rule_fallback", "account", "fallback"]
#: ``("company", id)`` or ``("domain", "acme.io")``.
AccountKey = tuple[str, str]

Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,99}$")]
OwnerId = Annotated[str, Field(min_length=1, max_length=200)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# ------------------------------------------------------------------------------------------- spec


class Target(_Strict):
    """Exactly one of: a fixed ``owner`` (a CRM owner id), a ``pool`` id, a ``queue`` name."""

    owner: OwnerId | None = None
    pool: Id | None = None
    queue: Id | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        if sum(value is not None for value in (self.owner, self.pool, self.queue)) != 1:
            raise ValueError("a target is exactly one of {owner: ...}, {pool: ...}, {queue: ...}")
        return self

    @property
    def kind(self) -> TargetKind:
        return "owner" if self.owner is not None else "pool" if self.pool is not None else "queue"

    def describe(self) -> str:
        return f"{self.kind} {self.owner or self.pool or self.queue!r}"


class Member(_Strict):
    """A pool member: a CRM owner id, a weight, paused or not, an optional own capacity."""

    owner: OwnerId
    weight: int = Field(default=1, ge=1, le=1000)
    paused: bool = False
    capacity: int | None = Field(default=None, ge=0, description="Overrides the pool's capacity for this member.")


class Pool(_Strict):
    """Owners who take turns. ``capacity``: new leads per member per window (none: unlimited)."""

    id: Id
    strategy: Strategy = "round_robin"
    members: list[Member] = Field(min_length=1)
    capacity: int | None = Field(default=None, ge=0)
    window_hours: int = Field(default=24, ge=1, le=24 * 31)
    description: str | None = None

    @model_validator(mode="after")
    def _check_members(self) -> Pool:
        seen: set[str] = set()
        errors: list[str] = []
        for i, member in enumerate(self.members):
            if member.owner in seen:
                errors.append(f"members[{i}].owner: {member.owner!r} is listed twice")
            seen.add(member.owner)
            if self.strategy == "round_robin" and member.weight != 1:
                errors.append(
                    f"members[{i}].weight: round_robin ignores weights; use weighted_round_robin or least_loaded"
                )
        if errors:
            raise ValueError("\n".join(errors))
        return self


class RoutingRule(_Strict):
    """``target`` for leads matching ``when`` (every lead when omitted); ``fallback`` when the
    target pool has nobody available."""

    id: Id
    when: Condition | None = None
    target: Target
    fallback: Target | None = None
    account_owner: Literal["prefer", "ignore"] | None = Field(
        default=None, description="Whether an account's owner takes this rule's leads; default: the precedence."
    )
    description: str | None = None


class AccountMatch(_Strict):
    """How leads of accounts that already have an owner are routed (see the module doc)."""

    enabled: bool = True
    precedence: Literal["account", "rules"] = "account"
    company_id_trait: str | None = Field(default=None, min_length=1)
    claim: bool = True
    free_mail_domains: list[str] = Field(default_factory=list, description="Added to the shipped list.")


class RoutingSpec(_Strict):
    """A whole routing configuration, validated; compile it with :class:`Router`."""

    spec_version: Literal[1] = 1
    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    account_match: AccountMatch = AccountMatch()
    pools: list[Pool] = Field(default_factory=list)
    rules: list[RoutingRule] = Field(default_factory=list)
    fallback: Target

    @model_validator(mode="after")
    def _cross_check(self) -> RoutingSpec:
        errors: list[str] = []
        pools: set[str] = set()
        for i, pool in enumerate(self.pools):
            if pool.id in pools:
                errors.append(f"pools[{i}].id: duplicate pool id {pool.id!r}")
            pools.add(pool.id)
        if self.fallback.kind == "pool":
            errors.append("fallback: the spec's fallback must always be available: an owner or a queue, not a pool")
        rule_ids: set[str] = set()
        for i, rule in enumerate(self.rules):
            loc = f"rules[{i}]"
            if rule.id in rule_ids:
                errors.append(f"{loc}.id: duplicate rule id {rule.id!r}")
            rule_ids.add(rule.id)
            for name, target in (("target", rule.target), ("fallback", rule.fallback)):
                if target is not None and target.pool is not None and target.pool not in pools:
                    errors.append(f"{loc}.{name}.pool: unknown pool {target.pool!r}")
            if rule.when is not None:
                _check_condition(rule.when, f"{loc}.when", errors)
        if errors:
            raise ValueError("\n".join(errors))
        return self

    def pool(self, pool_id: str) -> Pool:
        """The pool called ``pool_id``; ``KeyError`` if there is none."""
        for pool in self.pools:
            if pool.id == pool_id:
                return pool
        raise KeyError(pool_id)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_condition(condition: Leaf | AllOf | AnyOf, loc: str, errors: list[str]) -> None:
    if isinstance(condition, AllOf | AnyOf):
        children = condition.all if isinstance(condition, AllOf) else condition.any
        word = "all" if isinstance(condition, AllOf) else "any"
        for i, child in enumerate(children):
            _check_condition(child, f"{loc}.{word}[{i}]", errors)
        return
    name = condition.field
    if name.startswith(TRAIT_PREFIX):
        if len(name) == len(TRAIT_PREFIX):
            errors.append(f"{loc}.field: name the trait after 'traits.'")
        return  # traits are untyped: each leaf coerces the trait to its literal's type
    kind = LEAD_FIELDS.get(name)
    if kind is None:
        known = ", ".join(sorted(LEAD_FIELDS))
        errors.append(f"{loc}.field: unknown field {name!r} (known: {known}, or traits.<name>)")
        return
    if condition.op not in OPS_BY_TYPE[kind]:
        errors.append(f"{loc}.op: {condition.op!r} is not allowed on {kind} field {name!r}")
        return
    if condition.op == "exists":
        return
    values = condition.value if isinstance(condition.value, list) else [condition.value]
    for value in values:
        if (kind == "number" and not _is_number(value)) or (kind == "category" and not isinstance(value, str)):
            errors.append(f"{loc}.value: {value!r} is not a {kind} (field {name!r})")


def load_routing_spec(data: Any) -> RoutingSpec:
    """Validate ``data`` (a dict parsed from YAML/JSON) into a :class:`RoutingSpec`.

    Raises :class:`SpecInvalid` whose ``errors`` hold one ``{"loc", "msg"}`` per problem, ``loc``
    being the dotted path of the bad field (``rules[2].target.pool``).
    """
    try:
        return RoutingSpec.model_validate(data)
    except ValidationError as exc:
        entries: list[dict[str, str]] = []
        for error in exc.errors(include_url=False):
            loc = _format_loc(error["loc"])
            for line in str(error["msg"]).removeprefix("Value error, ").split("\n"):
                head, sep, tail = line.partition(": ")
                if sep and " " not in head:
                    entries.append({"loc": f"{loc}.{head}" if loc else head, "msg": tail})
                else:
                    entries.append({"loc": loc, "msg": line})
        summary = "; ".join(f"{e['loc']}: {e['msg']}" if e["loc"] else e["msg"] for e in entries)
        raise SpecInvalid(f"invalid routing spec: {summary}", entries) from exc


def _format_loc(parts: tuple[int | str, ...]) -> str:
    out = ""
    previous: int | str | None = None
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "leaf" or (part in ("all", "any") and previous == part):
            pass  # tags pydantic inserts for the condition union
        else:
            out += f".{part}" if out else part
        previous = part
    return out


# ------------------------------------------------------------------------------------------ state


@dataclass(frozen=True)
class MemberState:
    """One pool member's counters, as stored.

    ``last_turn``: the pool's turn number of this member's latest assignment (0: never).
    ``current_weight``: smooth weighted round robin. ``window_start``/``window_count``: leads taken
    in the window that starts then. ``assigned_total``: every lead taken from this pool.
    """

    last_turn: int = 0
    current_weight: int = 0
    window_start: dt.datetime | None = None
    window_count: int = 0
    assigned_total: int = 0


FRESH = MemberState()


@dataclass(frozen=True)
class PoolState:
    """A pool's counters by owner id; members without an entry are fresh. May hold owners no longer
    in the pool (their turn numbers still count for the pool's turn)."""

    members: Mapping[str, MemberState] = field(default_factory=dict)

    @property
    def turn(self) -> int:
        """The latest turn number given out in this pool."""
        return max((m.last_turn for m in self.members.values()), default=0)


@dataclass(frozen=True)
class RoutingLead:
    """What routing knows of a lead. ``emails`` give the domains for account matching and
    ``email_domain`` (the first business domain, else the first domain)."""

    lead_id: uuid.UUID
    traits: Mapping[str, Any] = field(default_factory=dict)
    score: float | None = None
    fit: float | None = None
    engagement: float | None = None
    grade: str | None = None
    stage: str | None = None
    segment: str | None = None
    emails: Sequence[str] = ()


@dataclass(frozen=True)
class Decision:
    """Where one lead goes and why.

    ``kind``: the target that placed it (``owner``: a fixed or account owner, ``pool``: a pool
    member, ``queue``: no owner). ``matched_by``: ``rule`` (the matched rule's target),
    ``rule_fallback`` (its target pool had nobody available), ``account`` (an account's owner),
    ``fallback`` (the spec's fallback). ``rule_id``: the rule that matched, if any.
    ``account``: the account whose owner took it. ``claims``: accounts this decision makes the
    owner's.
    """

    lead_id: uuid.UUID
    kind: TargetKind
    owner_id: str | None
    pool_id: str | None
    queue: str | None
    rule_id: str | None
    matched_by: MatchedBy
    reason: str
    account: AccountKey | None = None
    claims: tuple[AccountKey, ...] = ()


@dataclass(frozen=True)
class RoutingOutcome:
    """Decisions in lead order, the new state of each pool that changed, and the accounts claimed
    (account -> owner)."""

    decisions: tuple[Decision, ...]
    pools: dict[str, PoolState]
    claims: dict[AccountKey, str]


# --------------------------------------------------------------------------------------- helpers


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def window_start(now: dt.datetime, hours: int) -> dt.datetime:
    """Start of the UTC-aligned window of ``hours`` containing ``now`` (24: the UTC day)."""
    require_aware(now, "now")
    size = dt.timedelta(hours=hours)
    return _EPOCH + size * ((now - _EPOCH) // size)


def email_domain(email: str) -> str | None:
    """The lower-cased domain of an address, or None when it has none."""
    _, sep, domain = email.strip().rpartition("@")
    domain = domain.strip().rstrip(".").lower()
    return domain if sep and "." in domain else None


def is_free_mail(domain: str, free: frozenset[str]) -> bool:
    """Whether ``domain`` (lower-cased) or a parent domain of it is in ``free``."""
    # Sub-domains too: mail.yahoo.com is yahoo.com.
    parts = domain.split(".")
    return any(".".join(parts[i:]) in free for i in range(len(parts) - 1))


def _walk_fields(condition: Leaf | AllOf | AnyOf, out: set[str]) -> None:
    if isinstance(condition, AllOf | AnyOf):
        for child in condition.all if isinstance(condition, AllOf) else condition.any:
            _walk_fields(child, out)
    else:
        out.add(condition.field)


_LABEL = {"round_robin": "round robin", "weighted_round_robin": "weighted round robin", "least_loaded": "least loaded"}


@dataclass(frozen=True)
class _Pick:
    owner: str | None
    detail: str
    skipped: tuple[str, ...]
    state: PoolState


def _pick(pool: Pool, state: PoolState, now: dt.datetime) -> _Pick:
    start = window_start(now, pool.window_hours)
    skipped: list[str] = []
    # (list position, member, state, leads in this window)
    available: list[tuple[int, Member, MemberState, int]] = []
    for index, member in enumerate(pool.members):
        current = state.members.get(member.owner, FRESH)
        count = current.window_count if current.window_start == start else 0
        capacity = member.capacity if member.capacity is not None else pool.capacity
        if member.paused:
            skipped.append(f"{member.owner} paused")
        elif capacity is not None and count >= capacity:
            skipped.append(f"{member.owner} at capacity ({count}/{capacity} this window)")
        else:
            available.append((index, member, current, count))
    if not available:
        return _Pick(None, "", tuple(skipped), state)

    members = dict(state.members)
    if pool.strategy == "weighted_round_robin":
        total = sum(member.weight for _, member, _, _ in available)
        raised = [
            (index, member, replace(s, current_weight=s.current_weight + member.weight), count)
            for index, member, s, count in available
        ]
        # max() keeps the first of equals: ties go to list order.
        chosen = max(raised, key=lambda entry: entry[2].current_weight)
        for index, member, s, _ in raised:
            members[member.owner] = s if index != chosen[0] else replace(s, current_weight=s.current_weight - total)
        detail = f"weight {chosen[1].weight} of {total}"
    elif pool.strategy == "least_loaded":
        chosen = min(available, key=lambda e: (Fraction(e[3], e[1].weight), e[2].last_turn, e[0]))
        detail = f"{chosen[3]} leads this window, the fewest" + (
            f" per unit of weight ({chosen[1].weight})" if chosen[1].weight != 1 else ""
        )
    else:
        chosen = min(available, key=lambda e: (e[2].last_turn, e[0]))
        detail = "next in turn"
    _, member, _, count = chosen
    before = members.get(member.owner, FRESH)
    members[member.owner] = replace(
        before,
        last_turn=state.turn + 1,
        window_start=start,
        window_count=count + 1,
        assigned_total=before.assigned_total + 1,
    )
    return _Pick(member.owner, detail, tuple(skipped), PoolState(members))


# ---------------------------------------------------------------------------------------- router


class Router:
    """A routing spec compiled for use. Build once per version; routing is pure."""

    def __init__(self, spec: RoutingSpec, *, free_mail_domains: Iterable[str] = FREE_MAIL_DOMAINS) -> None:
        self.spec = spec
        self._pools = {pool.id: pool for pool in spec.pools}
        extra = spec.account_match.free_mail_domains
        self._free_mail = frozenset(d.strip().lower() for d in (*free_mail_domains, *extra))
        fields: set[str] = set()
        self._rules: list[tuple[RoutingRule, Predicate | None]] = []
        for rule in spec.rules:
            if rule.when is not None:
                _walk_fields(rule.when, fields)
            self._rules.append((rule, compile_property_condition(rule.when) if rule.when is not None else None))
        self._traits = tuple(sorted(f.removeprefix(TRAIT_PREFIX) for f in fields if f.startswith(TRAIT_PREFIX)))
        #: Whether routing reads the leads' emails (account match or an ``email_domain`` condition).
        self.reads_emails = spec.account_match.enabled or "email_domain" in fields
        default = "prefer" if spec.account_match.precedence == "account" else "ignore"
        self._account_owner = {rule.id: rule.account_owner or default for rule in spec.rules}

    # ------------------------------------------------------------------------------------ parts

    def domains(self, lead: RoutingLead) -> tuple[list[str], list[str]]:
        """The lead's email domains: ``(business, free_mail)``, each in ``emails`` order."""
        business: list[str] = []
        free: list[str] = []
        for email in lead.emails:
            domain = email_domain(email)
            if domain is None:
                continue
            bucket = free if is_free_mail(domain, self._free_mail) else business
            if domain not in bucket:
                bucket.append(domain)
        return business, free

    def account_keys(self, lead: RoutingLead) -> list[AccountKey]:
        """The accounts a lead may belong to, most specific first: company id, then business
        email domains. Empty when account matching is off."""
        match = self.spec.account_match
        if not match.enabled:
            return []
        keys: list[AccountKey] = []
        if match.company_id_trait is not None:
            company = coerce_category(lead.traits.get(match.company_id_trait), frozenset({""}))
            if company is not None:
                keys.append(("company", company))
        keys.extend(("domain", domain) for domain in self.domains(lead)[0])
        return keys

    def fields(self, lead: RoutingLead) -> dict[str, Any]:
        """What conditions read: the lead fields and the traits the rules name."""
        business, free = self.domains(lead)
        values: dict[str, Any] = {
            "score": lead.score,
            "fit": lead.fit,
            "engagement": lead.engagement,
            "grade": lead.grade,
            "stage": lead.stage,
            "segment": lead.segment,
            "email_domain": next(iter(business or free), None),
        }
        for name in self._traits:
            values[TRAIT_PREFIX + name] = lead.traits.get(name)
        return values

    def match(self, lead: RoutingLead) -> RoutingRule | None:
        """The first rule whose condition holds for the lead, or None."""
        values = self.fields(lead)
        for rule, predicate in self._rules:
            if predicate is None or predicate(values):
                return rule
        return None

    def pools_for(self, leads: Iterable[RoutingLead]) -> list[str]:
        """Ids of the pools routing these leads may draw from (sorted): the shell locks their
        counters, in this order, before :meth:`route`."""
        needed: set[str] = set()
        for lead in leads:
            rule = self.match(lead)
            if rule is not None:
                needed.update(t.pool for t in (rule.target, rule.fallback) if t is not None and t.pool is not None)
        return sorted(needed)

    # ----------------------------------------------------------------------------------- route

    def route(
        self,
        leads: Sequence[RoutingLead],
        *,
        pools: Mapping[str, PoolState],
        accounts: Mapping[AccountKey, str],
        now: dt.datetime,
    ) -> RoutingOutcome:
        """Route ``leads`` in order, each seeing the counters and account owners the previous ones
        left. ``pools``: the current state of (at least) the pools of :meth:`pools_for`, absent
        meaning fresh. ``accounts``: account -> owner id, for (at least) the leads' account keys.
        ``now``: timezone-aware; it picks the capacity window.
        """
        require_aware(now, "now")
        states: dict[str, PoolState] = dict(pools)
        owners: dict[AccountKey, str] = dict(accounts)
        changed: set[str] = set()
        claims: dict[AccountKey, str] = {}
        decisions: list[Decision] = []
        for lead in leads:
            decision = self._route_one(lead, states, owners, changed, now)
            if decision.owner_id is not None:
                for key in decision.claims:
                    owners[key] = claims[key] = decision.owner_id
            decisions.append(decision)
        return RoutingOutcome(tuple(decisions), {pool_id: states[pool_id] for pool_id in sorted(changed)}, claims)

    def _route_one(
        self,
        lead: RoutingLead,
        states: dict[str, PoolState],
        owners: Mapping[AccountKey, str],
        changed: set[str],
        now: dt.datetime,
    ) -> Decision:
        rule = self.match(lead)
        keys = self.account_keys(lead)
        account = next((key for key in keys if key in owners), None)
        notes: list[str] = []
        if self.spec.account_match.enabled and not keys:
            free = self.domains(lead)[1]
            if free:
                notes.append(f"{', '.join(free)} is free mail, never an account")

        if account is not None and (rule is None or self._account_owner[rule.id] == "prefer"):
            account_owner = owners[account]
            why = f"account {account[0]} {account[1]!r} belongs to {account_owner!r}"
            if rule is not None:
                why += f"; rule {rule.id!r} matched, and account owners take its leads"
            rule_id = rule.id if rule else None
            return Decision(lead.lead_id, "owner", account_owner, None, None, rule_id, "account", why, account)
        if account is not None and rule is not None:
            notes.append(f"account {account[0]} {account[1]!r} belongs to {owners[account]!r}, but the rule wins")

        if rule is None:
            return self._final(lead, "no rule matched", notes)
        head = f"rule {rule.id!r} matched"
        placed = self._place(rule.target, states, changed, now, notes)
        if placed is not None:
            kind, owner, pool_id, queue, detail = placed
            unclaimed = tuple(k for k in keys if k not in owners) if owner and self.spec.account_match.claim else ()
            reason = "; ".join([f"{head}: {detail}", *notes])
            return Decision(lead.lead_id, kind, owner, pool_id, queue, rule.id, "rule", reason, None, unclaimed)
        if rule.fallback is not None:
            placed = self._place(rule.fallback, states, changed, now, notes)
            if placed is not None:
                kind, owner, pool_id, queue, detail = placed
                reason = "; ".join([f"{head}, rule fallback: {detail}", *notes])
                return Decision(lead.lead_id, kind, owner, pool_id, queue, rule.id, "rule_fallback", reason)
        return self._final(lead, head, notes, rule_id=rule.id)

    def _final(self, lead: RoutingLead, head: str, notes: list[str], *, rule_id: str | None = None) -> Decision:
        target = self.spec.fallback
        reason = "; ".join([f"{head}, fallback: {target.describe()}", *notes])
        return Decision(lead.lead_id, target.kind, target.owner, None, target.queue, rule_id, "fallback", reason)

    def _place(
        self, target: Target, states: dict[str, PoolState], changed: set[str], now: dt.datetime, notes: list[str]
    ) -> tuple[TargetKind, str | None, str | None, str | None, str] | None:
        """Where ``target`` puts a lead, or None (with a note saying why) for a pool with nobody
        available."""
        if target.pool is None:
            return target.kind, target.owner, None, target.queue, target.describe()
        pool = self._pools[target.pool]
        pick = _pick(pool, states.get(pool.id, PoolState()), now)
        if pick.owner is None:
            notes.append(f"nobody available in pool {pool.id!r} ({', '.join(pick.skipped)})")
            return None
        states[pool.id] = pick.state
        changed.add(pool.id)
        detail = f"pool {pool.id!r} ({_LABEL[pool.strategy]}) chose {pick.owner!r}, {pick.detail}"
        if pick.skipped:
            detail += f" (skipped {', '.join(pick.skipped)})"
        return "pool", pick.owner, pool.id, None, detail
