"""Threshold policies: when a scored lead is an MQL or an SQL.

A policy is data, validated here and compiled once (no text is evaluated)::

    name: default-2026-11
    default:                       # used when no segment matches
      mql: {all: [{field: fit, op: gte, value: 30}, {field: engagement, op: gte, value: 50}]}
      sql: {field: score, op: gte, value: 75}
    segments:                      # conditions on lead traits; the first that matches wins
      - name: enterprise
        when: {field: company_size, op: gte, value: 1000}
        mql: {field: score, op: gte, value: 60}
    hysteresis: {score: 5, fit: 5, engagement: 5, probability: 0.05}
    allow_demotion: false

Stage conditions use the pipeline spec's condition language (``{field, op, value}`` leaves with
``all``/``any``) over the fields of a score: ``score`` (0-100), ``fit`` and ``engagement`` (rule
points), ``probability`` (0-1) and ``grade`` (e.g. ``"A1"``). Segment conditions use the same
language over the lead's raw traits, each leaf coercing the trait to its literal's type as activity
``where`` conditions do (so ``{field: company_size, op: gte, value: 1000}`` matches ``"1500"``).

Semantics of :meth:`CompiledPolicy.decide` (stages as in ``scoring.lifecycle``):

* the policy only moves leads in ``subscriber``, ``lead``, ``mql``, ``sql`` or ``recycled``;
  ``opportunity``, ``customer`` and ``disqualified`` belong to the CRM and to ops;
* **forward**: the lead goes to the highest stage whose condition holds (``sql`` before ``mql``)
  when that is above its current stage; a recycled lead re-enters at ``mql`` or ``sql``;
* **back**: only with ``allow_demotion``. A lead in ``mql``/``sql`` stays in the highest stage
  (up to its own) whose condition, *loosened by the hysteresis margins*, still holds, else
  ``lead``. Loosening moves each ``gt``/``gte`` bound down and each ``lt``/``lte`` bound up by the
  margin of the leaf's field, so a lead must fall clearly below the line to leave a stage it
  entered by crossing it, and does not flap while hovering at the line.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scoring.errors import SpecInvalid
from scoring.lifecycle import POLICY_STAGES, rank
from scoring.rules import compile_condition, compile_property_condition
from scoring.spec import AllOf, AnyOf, Condition, Leaf, check_condition

__all__ = [
    "SCORE_FIELDS",
    "CompiledPolicy",
    "Criteria",
    "Decision",
    "Hysteresis",
    "Segment",
    "ThresholdPolicySpec",
    "compile_policy",
    "load_policy",
]

#: The fields a stage condition may compare, and their types.
SCORE_FIELDS: Mapping[str, str] = {
    "score": "number",
    "fit": "number",
    "engagement": "number",
    "probability": "number",
    "grade": "category",
}
DEFAULT_SEGMENT = "default"

Predicate = Callable[[Mapping[str, Any]], bool]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Hysteresis(_Strict):
    """How far below a stage's line a lead must fall to leave it (used only with ``allow_demotion``).

    Units are the field's own: score points (0-100), rule points, probability (0-1).
    """

    score: float = Field(default=0.0, ge=0, le=100)
    fit: float = Field(default=0.0, ge=0)
    engagement: float = Field(default=0.0, ge=0)
    probability: float = Field(default=0.0, ge=0, le=1)


class Criteria(_Strict):
    """The stage conditions of one segment: ``mql`` is required, ``sql`` optional."""

    mql: Condition
    sql: Condition | None = None


class Segment(Criteria):
    """Leads whose traits satisfy ``when`` use this segment's stage conditions."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
    when: Condition


class ThresholdPolicySpec(_Strict):
    """A whole threshold policy. Stored as data; a stored (applied) version never changes."""

    spec_version: Literal[1] = 1
    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    default: Criteria
    segments: list[Segment] = Field(default_factory=list, max_length=100)
    hysteresis: Hysteresis = Hysteresis()
    allow_demotion: bool = False

    @model_validator(mode="after")
    def _check_fields(self) -> ThresholdPolicySpec:
        errors: list[str] = []
        named: list[tuple[str, Criteria]] = [("default", self.default)]
        named += [(f"segments[{i}]", segment) for i, segment in enumerate(self.segments)]
        for loc, criteria in named:
            check_condition(criteria.mql, f"{loc}.mql", SCORE_FIELDS, errors, noun="score field")
            if criteria.sql is not None:
                check_condition(criteria.sql, f"{loc}.sql", SCORE_FIELDS, errors, noun="score field")
        seen: dict[str, int] = {}
        for i, segment in enumerate(self.segments):
            if segment.name == DEFAULT_SEGMENT:
                errors.append(f"segments[{i}].name: {DEFAULT_SEGMENT!r} names the policy's default criteria")
            elif segment.name in seen:
                errors.append(
                    f"segments[{i}].name: duplicate segment name {segment.name!r} (first at {seen[segment.name]})"
                )
            seen.setdefault(segment.name, i)
        if errors:
            raise ValueError("\n".join(errors))
        return self


def load_policy(data: Any) -> ThresholdPolicySpec:
    """Validate ``data`` (a dict from YAML/JSON) into a policy; :class:`SpecInvalid` lists every
    problem as ``{"loc", "msg"}``."""
    try:
        return ThresholdPolicySpec.model_validate(data)
    except ValidationError as exc:
        entries: list[dict[str, str]] = []
        for error in exc.errors(include_url=False):
            loc = ".".join(str(p) for p in error["loc"] if p not in ("leaf",))
            for line in str(error["msg"]).removeprefix("Value error, ").split("\n"):
                head, sep, tail = line.partition(": ")
                if sep and " " not in head:
                    entries.append({"loc": f"{loc}.{head}" if loc else head, "msg": tail})
                else:
                    entries.append({"loc": loc, "msg": line})
        summary = "; ".join(f"{e['loc']}: {e['msg']}" if e["loc"] else e["msg"] for e in entries)
        raise SpecInvalid(f"invalid threshold policy: {summary}", entries) from exc


def _loosen(condition: Leaf | AllOf | AnyOf, margins: Hysteresis) -> Leaf | AllOf | AnyOf:
    """``condition`` with every ordered bound moved by its field's margin, so it is easier to hold."""
    if isinstance(condition, AllOf):
        return AllOf(all=[_loosen(child, margins) for child in condition.all])
    if isinstance(condition, AnyOf):
        return AnyOf(any=[_loosen(child, margins) for child in condition.any])
    margin = float(getattr(margins, condition.field, 0.0))
    if margin == 0.0 or condition.op not in ("gt", "gte", "lt", "lte"):
        return condition
    shift = -margin if condition.op in ("gt", "gte") else margin
    return condition.model_copy(update={"value": float(condition.value) + shift})


@dataclass(frozen=True)
class Decision:
    """A stage the policy moves a lead to, and the segment whose criteria decided it."""

    stage: str
    segment: str


@dataclass(frozen=True)
class _Compiled:
    name: str
    # (stage, predicate), highest stage first.
    enter: tuple[tuple[str, Predicate], ...]
    stay: tuple[tuple[str, Predicate], ...]


class CompiledPolicy:
    """A policy compiled into closures. Build once per policy version; :meth:`decide` is pure."""

    def __init__(self, spec: ThresholdPolicySpec) -> None:
        self.spec = spec
        self._segments: tuple[tuple[Predicate, _Compiled], ...] = tuple(
            (compile_property_condition(segment.when), self._criteria(segment.name, segment, spec))
            for segment in spec.segments
        )
        self._default = self._criteria(DEFAULT_SEGMENT, spec.default, spec)
        self.allow_demotion = spec.allow_demotion

    @staticmethod
    def _criteria(name: str, criteria: Criteria, spec: ThresholdPolicySpec) -> _Compiled:
        stages = [
            (stage, condition) for stage, condition in (("sql", criteria.sql), ("mql", criteria.mql)) if condition
        ]
        return _Compiled(
            name=name,
            enter=tuple((stage, compile_condition(condition, SCORE_FIELDS)) for stage, condition in stages),
            stay=tuple(
                (stage, compile_condition(_loosen(condition, spec.hysteresis), SCORE_FIELDS))
                for stage, condition in stages
            ),
        )

    def segment_for(self, traits: Mapping[str, Any]) -> str:
        """The name of the segment whose criteria apply to a lead with these traits."""
        return self._select(traits).name

    def _select(self, traits: Mapping[str, Any]) -> _Compiled:
        for matches, compiled in self._segments:
            if matches(traits):
                return compiled
        return self._default

    def decide(self, stage: str, values: Mapping[str, Any], traits: Mapping[str, Any]) -> Decision | None:
        """The stage this policy moves a lead to, or ``None`` to leave it where it is.

        ``stage``: the lead's current stage. ``values``: its score as ``{score, fit, engagement,
        probability, grade}`` (numbers as floats). ``traits``: its raw traits (for the segment).
        """
        if stage not in POLICY_STAGES:
            return None
        criteria = self._select(traits)
        entered = next((target for target, holds in criteria.enter if holds(values)), None)
        if stage == "recycled":
            return Decision(entered, criteria.name) if entered is not None else None
        current = rank(stage)
        assert current is not None
        if entered is not None and (rank(entered) or 0) > current:
            return Decision(entered, criteria.name)
        if self.allow_demotion and stage in ("mql", "sql"):
            kept = next(
                (target for target, holds in criteria.stay if (rank(target) or 0) <= current and holds(values)),
                "lead",
            )
            if (rank(kept) or 0) < current:
                return Decision(kept, criteria.name)
        return None


def compile_policy(spec: ThresholdPolicySpec) -> CompiledPolicy:
    """Compile a validated policy (see :class:`CompiledPolicy`)."""
    return CompiledPolicy(spec)
