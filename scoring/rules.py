"""Rules compiled once into plain Python closures (per lead) and numpy masks (per column).

Nothing here evaluates text: each condition leaf becomes a small closure over its field name and a
pre-coerced literal. Semantics are in ``scoring.spec``; the points arithmetic is:

* a group's raw total is the sum of its fired rules' points, in declared order (condition rules,
  then activity rules), then clamped to the group cap;
* when a cap binds, the rules on the side that was cut (positive rules for ``max``, negative rules
  for ``min``) are scaled by one common factor, so the awarded points of the explanation add up
  to the capped total; those rules are flagged ``capped``;
* an activity rule sums ``points x decay(age)`` over matching occurrences; with ``daily_cap``, at
  most ``daily_cap`` undecayed points count per UTC day, most recent occurrences first.

Sums use a fixed order (rules) or ``math.fsum`` (occurrences), so the order of a profile's
activities never changes a result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from scoring.features import (
    ActivityGroups,
    Columns,
    FeatureValue,
    Occurrence,
    TimedActivity,
    coerce_boolean,
    coerce_category,
    coerce_number,
    index_timed,
)
from scoring.spec import (
    AllOf,
    AnyOf,
    Cap,
    ConditionRule,
    Leaf,
    PipelineSpec,
)

__all__ = [
    "RuleEvaluation",
    "RuleHit",
    "RuleSet",
    "clamp_columns",
    "compile_column_condition",
    "compile_condition",
    "compile_property_condition",
]

Predicate = Callable[[Mapping[str, Any]], bool]
ColumnPredicate = Callable[[Columns], npt.NDArray[np.bool_]]
_NO_MISSING: frozenset[str] = frozenset({""})


class RuleHit(NamedTuple):
    """One rule that fired for a lead.

    ``points``: what the rule contributed before the group cap (for an activity rule: after decay
    and daily cap). ``awarded``: after the group cap (unweighted points). ``capped``: the group cap
    cut it. ``daily_capped``: the daily cap cut at least one occurrence. ``occurrences``: matching
    activities counted (1 for a condition rule).
    """

    rule_id: str
    group: str
    kind: str
    points: float
    awarded: float
    capped: bool = False
    daily_capped: bool = False
    occurrences: int = 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "rule_id": self.rule_id,
            "group": self.group,
            "kind": self.kind,
            "points": self.points,
            "awarded": self.awarded,
            "capped": self.capped,
            "daily_capped": self.daily_capped,
            "occurrences": self.occurrences,
        }


@dataclass(frozen=True)
class RuleEvaluation:
    """Group totals (capped, unweighted points), the hits, and the activity-rule totals that
    depend on ``now`` (they go into the inputs digest)."""

    fit: float
    engagement: float
    hits: tuple[RuleHit, ...]
    activity_totals: dict[str, tuple[int, float]]


# --------------------------------------------------------------------------- condition compilers


def compile_condition(condition: Leaf | AllOf | AnyOf, types: Mapping[str, str]) -> Predicate:
    """Compile a feature condition into ``predicate(feature_values) -> bool``.

    ``types`` maps feature names to ``number``/``category``/``boolean``; the spec has already
    checked that each leaf's operator and value suit its feature's type.
    """
    if isinstance(condition, AllOf):
        return _all_of(tuple(compile_condition(c, types) for c in condition.all))
    if isinstance(condition, AnyOf):
        return _any_of(tuple(compile_condition(c, types) for c in condition.any))
    return _compile_leaf(condition, types[condition.field])


# all()/any() over a generator cost a generator frame per call; these loops short-circuit the same.
def _all_of(children: tuple[Predicate, ...]) -> Predicate:
    def all_of(values: Mapping[str, Any]) -> bool:
        for child in children:  # noqa: SIM110
            if not child(values):
                return False
        return True

    return all_of


def _any_of(children: tuple[Predicate, ...]) -> Predicate:
    def any_of(values: Mapping[str, Any]) -> bool:
        for child in children:  # noqa: SIM110
            if child(values):
                return True
        return False

    return any_of


def _literal(value: Any, kind: str) -> Any:
    # Numbers are compared as floats, as the feature layer produces them.
    return float(value) if kind == "number" and not isinstance(value, bool) else value


def _compile_leaf(leaf: Leaf, kind: str) -> Predicate:
    name, op = leaf.field, leaf.op
    if op == "exists":
        wanted = leaf.value is not False
        return lambda values: (values.get(name) is not None) is wanted
    if op in ("in", "not_in"):
        members = frozenset(_literal(v, kind) for v in leaf.value)
        if op == "in":
            return lambda values: values.get(name) in members
        return lambda values: values.get(name) not in members
    literal = _literal(leaf.value, kind)
    if op == "eq":
        return lambda values: values.get(name) == literal
    if op == "ne":
        # Exactly "not eq": a missing value is "not equal" too.
        return lambda values: values.get(name) != literal
    if op == "contains":

        def contains(values: Mapping[str, Any]) -> bool:
            value = values.get(name)
            return value is not None and literal in value

        return contains
    # One closure per operator rather than a shared one calling a comparator: a call less per rule.
    if op == "gt":
        return lambda values: (value := values.get(name)) is not None and value > literal
    if op == "gte":
        return lambda values: (value := values.get(name)) is not None and value >= literal
    if op == "lt":
        return lambda values: (value := values.get(name)) is not None and value < literal
    if op == "lte":
        return lambda values: (value := values.get(name)) is not None and value <= literal
    raise ValueError(f"unknown operator {op!r}")


_COMPARATORS: dict[str, Callable[[float, float], bool]] = {
    "gt": lambda a, b: a > b,
    "gte": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "lte": lambda a, b: a <= b,
}


def compile_property_condition(condition: Leaf | AllOf | AnyOf) -> Predicate:
    """Compile an activity ``where`` condition into ``predicate(properties) -> bool``.

    Property values are untyped, so each leaf coerces the property to its literal's type
    (number, boolean or string, with the feature layer's rules); ``contains`` also matches a list
    property holding the literal. A property that cannot be coerced matches like a missing one.
    """
    if isinstance(condition, AllOf):
        return _all_of(tuple(compile_property_condition(c) for c in condition.all))
    if isinstance(condition, AnyOf):
        return _any_of(tuple(compile_property_condition(c) for c in condition.any))
    name, op, value = condition.field, condition.op, condition.value
    if op == "exists":
        wanted = value is not False
        return lambda props: (coerce_category(props.get(name), _NO_MISSING) is not None) is wanted
    if op in ("eq", "ne", "in", "not_in"):
        literals = value if isinstance(value, list) else [value]
        tests = tuple(_property_equals(name, literal) for literal in literals)
        if op in ("eq", "in"):
            return lambda props: any(test(props) for test in tests)
        return lambda props: not any(test(props) for test in tests)
    if op == "contains":

        def contains(props: Mapping[str, Any]) -> bool:
            raw = props.get(name)
            if raw.__class__ is str:
                # The usual case (a URL, a title), inlined: coerce_category strips, "" is missing.
                stripped: str = raw.strip()
                return stripped != "" and value in stripped
            if isinstance(raw, list | tuple | set | frozenset):
                return value in raw
            text = coerce_category(raw, _NO_MISSING)
            return text is not None and value in text

        return contains
    compare, bound = _COMPARATORS[op], float(value)

    def ordered(props: Mapping[str, Any]) -> bool:
        number = coerce_number(props.get(name), _NO_MISSING)
        return number is not None and compare(number, bound)

    return ordered


def _property_equals(name: str, literal: Any) -> Predicate:
    if isinstance(literal, bool):
        return lambda props: coerce_boolean(props.get(name), _NO_MISSING) is literal
    if isinstance(literal, int | float):
        number = float(literal)
        return lambda props: coerce_number(props.get(name), _NO_MISSING) == number
    return lambda props: coerce_category(props.get(name), _NO_MISSING) == literal


def compile_column_condition(condition: Leaf | AllOf | AnyOf, types: Mapping[str, str]) -> ColumnPredicate:
    """Compile a feature condition into ``predicate(columns) -> bool array`` (same semantics as
    :func:`compile_condition`: NaN / code 0 is missing)."""
    if isinstance(condition, AllOf | AnyOf):
        parts = condition.all if isinstance(condition, AllOf) else condition.any
        children = tuple(compile_column_condition(c, types) for c in parts)
        combine = np.logical_and if isinstance(condition, AllOf) else np.logical_or

        def nested(columns: Columns) -> npt.NDArray[np.bool_]:
            result = children[0](columns)
            for child in children[1:]:
                result = combine(result, child(columns))
            return result

        return nested
    leaf, kind = condition, types[condition.field]
    if kind == "category":
        return _category_column_leaf(leaf)
    return _number_column_leaf(leaf, kind)


def _number_column_leaf(leaf: Leaf, kind: str) -> ColumnPredicate:
    name, op = leaf.field, leaf.op

    def literal(value: Any) -> float:
        # Booleans live in the columns as 1.0 / 0.0.
        return float(value)

    def predicate(columns: Columns) -> npt.NDArray[np.bool_]:
        x = columns.numbers[name]
        result: npt.NDArray[np.bool_]
        if op == "exists":
            present = ~np.isnan(x)
            return present if leaf.value is not False else ~present
        if op in ("in", "not_in"):
            result = np.isin(x, [literal(v) for v in leaf.value])
            return result if op == "in" else ~result
        bound = literal(leaf.value)
        if op == "eq":
            result = x == bound
        elif op == "ne":
            result = ~(x == bound)
        else:
            # NaN compares False, like the per-lead "missing never matches".
            result = _UFUNCS[op](x, bound)
        return result

    del kind
    return predicate


def _category_column_leaf(leaf: Leaf) -> ColumnPredicate:
    name, op, value = leaf.field, leaf.op, leaf.value
    matches: Callable[[str | None], bool]
    if op == "exists":
        wanted = value is not False
        matches = lambda v: (v is not None) is wanted  # noqa: E731
    elif op in ("in", "not_in"):
        members = frozenset(value)
        matches = (lambda v: v in members) if op == "in" else (lambda v: v not in members)
    elif op == "eq":
        matches = lambda v: v == value  # noqa: E731
    elif op == "ne":
        matches = lambda v: v != value  # noqa: E731
    else:  # contains
        matches = lambda v: v is not None and value in v  # noqa: E731

    def predicate(columns: Columns) -> npt.NDArray[np.bool_]:
        codes, vocab = columns.categories[name]
        # Evaluate once per distinct value, then index by code: O(vocabulary) Python work.
        table = np.fromiter((matches(v) for v in vocab), dtype=np.bool_, count=len(vocab))
        return table[codes]

    return predicate


# ------------------------------------------------------------------------------------- rule set


@dataclass(frozen=True)
class _CompiledRule:
    rule_id: str
    group: str
    points: float
    predicate: Predicate
    column_predicate: ColumnPredicate


class _CompiledActivityRule(NamedTuple):
    # A NamedTuple: the per-lead loop unpacks it in one step.
    rule_id: str
    activity: str
    points: float
    where: Predicate | None
    daily_cap: float | None
    half_life_days: float | None
    window_days: float | None


def _clamp(value: float, cap: Cap) -> float:
    if cap.max is not None and value > cap.max:
        return cap.max
    if cap.min is not None and value < cap.min:
        return cap.min
    return value


def clamp_columns(values: npt.NDArray[np.float64], cap: Cap) -> npt.NDArray[np.float64]:
    """Column version of the cap clamp."""
    if cap.min is None and cap.max is None:
        return values
    return np.clip(values, cap.min, cap.max)


class RuleSet:
    """All rules of a spec, compiled. Build once per pipeline version; evaluation is pure."""

    def __init__(self, spec: PipelineSpec) -> None:
        types = {feature.name: feature.type for feature in spec.features}
        self.caps: dict[str, Cap] = {"fit": spec.rules.fit.cap, "engagement": spec.rules.engagement.cap}
        self.condition_rules: dict[str, tuple[_CompiledRule, ...]] = {}
        for group, rules in (("fit", spec.rules.fit.rules), ("engagement", spec.rules.engagement.rules)):
            self.condition_rules[group] = tuple(self._compile_rule(rule, group, types) for rule in rules)
        self.activity_rules = tuple(
            _CompiledActivityRule(
                rule.id,
                rule.activity,
                rule.points,
                compile_property_condition(rule.where) if rule.where is not None else None,
                rule.daily_cap,
                rule.decay.half_life_days if rule.decay else None,
                rule.decay.window_days if rule.decay else None,
            )
            for rule in spec.rules.engagement.activities
        )
        by_activity: dict[str, list[_CompiledActivityRule]] = {}
        for activity_rule in self.activity_rules:
            by_activity.setdefault(activity_rule.activity, []).append(activity_rule)
        self._by_activity = {name: tuple(rules) for name, rules in by_activity.items()}
        self.activity_rule_ids: tuple[str, ...] = tuple(rule.rule_id for rule in self.activity_rules)
        #: Activity names the activity rules read.
        self.activity_names: frozenset[str] = frozenset(self._by_activity)
        # Per group: (predicate, the hit it makes while the group cap does not bind). RuleHit is an
        # immutable tuple, so one prebuilt hit per rule serves every lead.
        self._condition_hits: dict[str, tuple[tuple[Predicate, RuleHit], ...]] = {
            group: tuple(
                (rule.predicate, RuleHit(rule.rule_id, group, "condition", rule.points, rule.points)) for rule in rules
            )
            for group, rules in self.condition_rules.items()
        }
        self.rule_ids: tuple[str, ...] = tuple(
            rule.rule_id for group in ("fit", "engagement") for rule in self.condition_rules[group]
        )
        self.referenced_features: frozenset[str] = frozenset(_fields(spec))

    @staticmethod
    def _compile_rule(rule: ConditionRule, group: str, types: Mapping[str, str]) -> _CompiledRule:
        return _CompiledRule(
            rule.id, group, rule.points, compile_condition(rule.when, types), compile_column_condition(rule.when, types)
        )

    # ------------------------------------------------------------------------------- per lead

    def evaluate(self, values: Mapping[str, FeatureValue], timed: Sequence[TimedActivity] = ()) -> RuleEvaluation:
        """Evaluate every rule for one lead.

        ``values``: resolved features. ``timed``: from ``scoring.features.timed_activities``.
        Returns capped group totals and the hits.
        """
        groups = index_timed(timed, self.activity_names)[0] if timed else None
        return RuleEvaluation(*self.evaluate_indexed(values, groups))

    def evaluate_indexed(
        self, values: Mapping[str, FeatureValue], groups: ActivityGroups | None
    ) -> tuple[float, float, tuple[RuleHit, ...], dict[str, tuple[int, float]]]:
        """:meth:`evaluate` over activities grouped by ``scoring.features.index_activities``
        (``None`` without activities), as a plain ``(fit, engagement, hits, activity_totals)``."""
        hits: list[RuleHit] = []
        activity_totals: dict[str, tuple[int, float]] = {}
        fit = self._cap_group("fit", [hit for predicate, hit in self._condition_hits["fit"] if predicate(values)], hits)
        group_hits = [hit for predicate, hit in self._condition_hits["engagement"] if predicate(values)]
        if groups:
            for rule in self.activity_rules:
                occurrences = groups.get(rule.activity)
                if not occurrences:
                    continue
                count, points, daily_capped = _activity_total(rule, occurrences)
                if count:
                    activity_totals[rule.rule_id] = (count, points)
                    group_hits.append(
                        tuple.__new__(
                            RuleHit,
                            (rule.rule_id, "engagement", "activity", points, points, False, daily_capped, count),
                        )
                    )
        engagement = self._cap_group("engagement", group_hits, hits)
        return fit, engagement, tuple(hits), activity_totals

    def _cap_group(self, group: str, group_hits: list[RuleHit], hits: list[RuleHit]) -> float:
        # group_hits hold points == awarded, uncapped; they are kept as they are unless the cap binds.
        all_points = [hit[3] for hit in group_hits]
        raw = 0.0
        for points in all_points:
            raw += points
        capped_total = _clamp(raw, self.caps[group])
        if capped_total == raw:
            hits.extend(group_hits)
            return capped_total
        positive = math.fsum([p for p in all_points if p > 0])
        negative = math.fsum([p for p in all_points if p < 0])
        # max bound: scale the positive rules down; min bound: the negative ones.
        upper = raw > capped_total
        factor = (capped_total - negative) / positive if upper else (capped_total - positive) / negative
        new = tuple.__new__
        for hit, points in zip(group_hits, all_points, strict=True):
            if points > 0 if upper else points < 0:
                hit = new(RuleHit, (hit[0], group, hit[2], points, points * factor, True, hit[6], hit[7]))
            hits.append(hit)
        return capped_total

    # ------------------------------------------------------------------------------ per column

    def evaluate_columns(
        self, columns: Columns
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
        """Vectorised evaluation for traits-only rows (no activities, so activity rules give 0).

        Returns ``(fit, engagement, hits)``: capped group totals, and a boolean matrix
        ``(n_rows, len(rule_ids))`` of which condition rules fired. Sums run in the same order as
        :meth:`evaluate`, so totals are bit-identical to the per-lead path.
        """
        n = columns.n_rows
        hits = np.zeros((n, len(self.rule_ids)), dtype=np.bool_)
        totals: dict[str, npt.NDArray[np.float64]] = {}
        column = 0
        for group in ("fit", "engagement"):
            raw = np.zeros(n)
            for rule in self.condition_rules[group]:
                mask = rule.column_predicate(columns)
                hits[:, column] = mask
                column += 1
                raw = raw + np.where(mask, rule.points, 0.0)
            totals[group] = clamp_columns(raw, self.caps[group])
        return totals["fit"], totals["engagement"], hits


_UFUNCS = {"gt": np.greater, "gte": np.greater_equal, "lt": np.less, "lte": np.less_equal}


def _activity_total(rule: _CompiledActivityRule, occurrences: list[Occurrence]) -> tuple[int, float, bool]:
    """``(matching occurrences, points, daily cap cut)`` of one activity rule; ``occurrences``
    most recent first (so ages only grow and each UTC day's occurrences are consecutive)."""
    _, _, points, where, daily_cap, half_life, window = rule
    count = 0
    parts: list[float] = []
    if daily_cap is None:
        for _, age, _, props in occurrences:
            if window is not None and age > window:
                break
            if where is not None and not where(props):
                continue
            count += 1
            parts.append(points if half_life is None else points * 0.5 ** (age / half_life))
        return count, math.fsum(parts), False
    size, cap = abs(points), daily_cap
    daily_capped = False
    day_now, left = None, cap
    for _, age, day, props in occurrences:
        if window is not None and age > window:
            break
        if where is not None and not where(props):
            continue
        count += 1
        # A fresh budget per UTC day, spent most recent first: within a day they decay least, so
        # the cap keeps the freshest.
        if day != day_now:
            day_now, left = day, cap
        take = size if size <= left else left
        if take < size:
            daily_capped = True
        left = left - take
        if take > 0.0:
            signed = math.copysign(take, points)
            parts.append(signed if half_life is None else signed * 0.5 ** (age / half_life))
    return count, math.fsum(parts), daily_capped


def _fields(spec: PipelineSpec) -> set[str]:
    out: set[str] = set()

    def walk(condition: Leaf | AllOf | AnyOf) -> None:
        if isinstance(condition, AllOf):
            for child in condition.all:
                walk(child)
        elif isinstance(condition, AnyOf):
            for child in condition.any:
                walk(child)
        else:
            out.add(condition.field)

    for rule in (*spec.rules.fit.rules, *spec.rules.engagement.rules):
        walk(rule.when)
    return out
