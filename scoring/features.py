"""Feature layer: turn raw traits and activities into typed feature values.

Two paths compute the same values:

* per lead (:meth:`FeatureResolver.resolve_traits` / ``resolve_aggregates``), plain Python, used by
  ``CompiledPipeline.score``;
* per column (:meth:`FeatureResolver.resolve_columns`), numpy arrays for bulk scoring of
  traits-only rows (e.g. CSV rows read with the stdlib ``csv`` module, where every value is a string).

Coercion rules (both paths):

* ``None``, ``""`` (after stripping) and the feature's missing markers (e.g. ``Select``) are missing.
* number: ints/floats as is, booleans as 1/0, strings parsed with ``float``; unparseable or
  non-finite values are missing. Then clipped to the spec's ``clip`` bounds.
* category: strings stripped; booleans become ``"true"``/``"false"``; other values ``str(value)``.
* boolean: ``yes/true/y/t/1`` and ``no/false/n/f/0`` (any case), booleans, and numbers 1/0;
  anything else is missing.

Activity aggregates are computed relative to the ``now`` passed in (never the clock).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from scoring.profile import Activity
from scoring.spec import (
    ActivityCountSource,
    ActivitySumSource,
    DaysSinceLastActivitySource,
    FeatureSpec,
    PipelineSpec,
    TraitSource,
)

__all__ = [
    "MISSING_TOKEN",
    "Columns",
    "FeatureResolver",
    "FeatureValue",
    "Occurrence",
    "coerce_boolean",
    "coerce_category",
    "coerce_number",
    "feature_definitions",
    "model_matrix",
    "model_token",
    "TimedActivity",
    "index_activities",
    "index_timed",
    "timed_activities",
]

FeatureValue = float | str | bool | None
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

# The model sees missing categories/booleans as this category of their own, so "not given" can carry
# weight (on X Education it does: leads who skip the occupation question convert less).
MISSING_TOKEN = "__missing__"

_TRUE = frozenset({"yes", "true", "y", "t", "1"})
_FALSE = frozenset({"no", "false", "n", "f", "0"})
_SECONDS_PER_DAY = 86_400.0
_NO_MISSING: frozenset[str] = frozenset({""})

# One matching activity as the per-lead evaluation reads it: (sort key, age in days at ``now``
# clamped at 0, UTC day number, properties). Groups of them are kept most recent first.
Occurrence = tuple[float, float, int, Mapping[str, Any]]
ActivityGroups = dict[str, list[Occurrence]]
_SORT_KEY = operator.itemgetter(0)


def coerce_number(raw: Any, missing: frozenset[str]) -> float | None:
    """Coerce a raw trait to a finite float, or None when missing/unparseable (see module doc)."""
    if raw is None:
        return None
    if isinstance(raw, str):
        text = raw.strip()
        if text in missing:
            return None
        try:
            value = float(text)
        except ValueError:
            return None
    elif isinstance(raw, bool):
        value = 1.0 if raw else 0.0
    elif isinstance(raw, int | float):
        value = float(raw)
    else:
        return None
    return value if math.isfinite(value) else None


def coerce_category(raw: Any, missing: frozenset[str]) -> str | None:
    """Coerce a raw trait to a stripped string category, or None when missing (see module doc)."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        text = "true" if raw else "false"
    elif isinstance(raw, str):
        text = raw.strip()
    else:
        text = str(raw)
    return None if text in missing else text


def coerce_boolean(raw: Any, missing: frozenset[str]) -> bool | None:
    """Coerce a raw trait to True/False, or None when missing/unrecognised (see module doc)."""
    if raw is None:
        return None
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        text = raw.strip()
        if text in missing:
            return None
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        return None
    if isinstance(raw, int | float):
        if raw == 1:
            return True
        if raw == 0:
            return False
    return None


def model_token(value: FeatureValue) -> str:
    """The category string the model sees for a resolved category/boolean value."""
    if value is None:
        return MISSING_TOKEN
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@dataclass(frozen=True)
class _TraitPlan:
    name: str
    trait: str
    type: str
    missing: frozenset[str]
    lo: float | None
    hi: float | None


@dataclass(frozen=True)
class _AggregatePlan:
    name: str
    source: ActivityCountSource | ActivitySumSource | DaysSinceLastActivitySource
    lo: float | None
    hi: float | None


@dataclass(frozen=True)
class Columns:
    """Resolved features of many rows, column-wise.

    ``numbers``: float64 arrays with NaN for missing (number features, and booleans as 1.0/0.0).
    ``categories``: ``(codes, vocabulary)`` per category feature; ``vocabulary[code]`` is the value,
    code 0 is always ``None`` (missing).
    """

    n_rows: int
    numbers: dict[str, FloatArray]
    categories: dict[str, tuple[IntArray, list[str | None]]]


class _Interner(dict[Any, int]):
    """Maps raw values to ids in ``distinct``; ``map(interner.__getitem__, cells)`` runs at C speed
    for the (very common) repeated values.

    Only strings and None are remembered: 1, 1.0 and True are equal dict keys but may resolve
    differently (category "1" vs "true"), so each other value gets an id of its own.
    """

    def __init__(self, distinct: list[Any]) -> None:
        super().__init__()
        self._distinct = distinct

    def __missing__(self, key: Any) -> int:
        raw_id = len(self._distinct)
        self._distinct.append(key)
        if key is None or key.__class__ is str:
            self[key] = raw_id
        return raw_id


_UNSET: Any = object()
_MEMO_LIMIT = 4096


def _resolver_for(plan: _TraitPlan) -> Callable[[Any], FeatureValue]:
    missing, lo, hi = plan.missing, plan.lo, plan.hi
    if plan.type == "category":
        return lambda raw: coerce_category(raw, missing)
    if plan.type == "boolean":
        return lambda raw: coerce_boolean(raw, missing)
    if lo is None and hi is None:
        return lambda raw: coerce_number(raw, missing)

    def clipped(raw: Any) -> float | None:
        number = coerce_number(raw, missing)
        return None if number is None else _clip(number, lo, hi)

    return clipped


def _clip(value: float, lo: float | None, hi: float | None) -> float:
    if lo is not None and value < lo:
        value = lo
    if hi is not None and value > hi:
        value = hi
    return value


_COUNT, _SUM, _DAYS_SINCE = 0, 1, 2


def _aggregate_step(
    plan: _AggregatePlan,
) -> tuple[str, int, str | None, float | None, str | None, float | None, float | None]:
    source = plan.source
    if isinstance(source, ActivityCountSource):
        return plan.name, _COUNT, source.activity, source.days, None, plan.lo, plan.hi
    if isinstance(source, ActivitySumSource):
        return plan.name, _SUM, source.activity, source.days, source.property, plan.lo, plan.hi
    return plan.name, _DAYS_SINCE, source.activity, None, None, plan.lo, plan.hi


class FeatureResolver:
    """Resolves the features named in ``names`` (all of the spec's features by default)."""

    def __init__(self, spec: PipelineSpec, names: Iterable[str] | None = None) -> None:
        wanted = set(names) if names is not None else {f.name for f in spec.features}
        self.spec = spec
        self.traits: list[_TraitPlan] = []
        self.aggregates: list[_AggregatePlan] = []
        self.types: dict[str, str] = {}
        for feature in spec.features:
            if feature.name not in wanted:
                continue
            self.types[feature.name] = feature.type
            lo = feature.clip.min if feature.clip is not None else None
            hi = feature.clip.max if feature.clip is not None else None
            if isinstance(feature.source, TraitSource):
                self.traits.append(
                    _TraitPlan(feature.name, feature.source.trait, feature.type, spec.missing_for(feature), lo, hi)
                )
            else:
                self.aggregates.append(_AggregatePlan(feature.name, feature.source, lo, hi))
        self.has_aggregates = bool(self.aggregates)
        self._template: dict[str, FeatureValue] = dict.fromkeys(sorted(self.types))
        self._steps: list[tuple[str, str, Callable[[Any], FeatureValue], dict[str, Any]]] = [
            (plan.name, plan.trait, _resolver_for(plan), {}) for plan in self.traits
        ]
        self._aggregate_steps = tuple(_aggregate_step(plan) for plan in self.aggregates)
        #: Activity names the aggregates read (a ``days_since_last_activity`` without an activity
        #: reads every activity through ``last_age`` instead).
        self.activity_names: frozenset[str] = frozenset(
            plan.source.activity for plan in self.aggregates if plan.source.activity is not None
        )
        # The aggregates of a lead without activities are constants: start traits-only leads from
        # them instead of aggregating nothing per lead.
        self._idle_template = self._template.copy()
        self.aggregate({}, None, self._idle_template)

    # ------------------------------------------------------------------------------- per lead

    def resolve_traits(self, traits: Mapping[str, Any]) -> dict[str, FeatureValue]:
        """Resolve the trait-sourced features of one lead: ``{feature name: value or None}``.

        Keys are in sorted order; aggregate features are present as None until
        :meth:`resolve_aggregates` fills them.
        """
        return self._resolve(traits, self._template)

    def resolve_profile(
        self, traits: Mapping[str, Any], groups: ActivityGroups | None, last_age: float | None
    ) -> dict[str, FeatureValue]:
        """Resolve every feature of one lead: traits, and aggregates over ``groups`` / ``last_age``
        (from :func:`index_activities`; ``groups=None`` for a lead without activities).

        Same values as :meth:`resolve_traits` then :meth:`resolve_aggregates`, keys in sorted order.
        """
        if groups is None:
            return self._resolve(traits, self._idle_template)
        out = self._resolve(traits, self._template)
        if self._aggregate_steps:
            self.aggregate(groups, last_age, out)
        return out

    def _resolve(self, traits: Mapping[str, Any], template: dict[str, FeatureValue]) -> dict[str, FeatureValue]:
        # Start from every feature name in sorted order: filling existing keys keeps that order, so
        # the dict serialises canonically (sorted keys) without a sort per lead.
        out: dict[str, FeatureValue] = template.copy()
        get = traits.get
        for name, trait, resolve, memo in self._steps:
            raw = get(trait)
            if raw.__class__ is str:
                # Form fields repeat a handful of strings; a bounded memo of raw string -> value turns
                # strip/parse/coerce into one dict lookup. Same values as without it.
                value = memo.get(raw, _UNSET)
                if value is _UNSET:
                    value = resolve(raw)
                    if len(memo) < _MEMO_LIMIT:
                        memo[raw] = value
            else:
                value = resolve(raw)
            out[name] = value
        return out

    def resolve_aggregates(self, timed: Sequence[TimedActivity], out: dict[str, FeatureValue]) -> None:
        """Add activity aggregates to ``out``.

        ``timed``: from :func:`timed_activities` (sorted, ages clamped at 0). Sums use ``math.fsum``
        so the result never depends on order.
        """
        groups, last_age = index_timed(timed, self.activity_names)
        self.aggregate(groups, last_age, out)

    def aggregate(self, groups: ActivityGroups, last_age: float | None, out: dict[str, FeatureValue]) -> None:
        """Add activity aggregates to ``out`` from :func:`index_activities` output (see
        :meth:`resolve_aggregates`)."""
        for name, kind, activity, days, prop, lo, hi in self._aggregate_steps:
            group = groups.get(activity) if activity is not None else None
            value: float | None
            if kind == _COUNT:
                if not group:
                    count = 0
                elif days is None:
                    count = len(group)
                else:
                    count = 0
                    # Most recent first, so ages only grow: stop at the first one outside the window.
                    for _, age, _, _ in group:
                        if age > days:
                            break
                        count += 1
                value = float(count)
            elif kind == _SUM:
                assert prop is not None  # set for every sum
                parts = []
                for _, age, _, props in group or ():
                    if days is not None and age > days:
                        break
                    part = coerce_number(props.get(prop), _NO_MISSING)
                    if part is not None:
                        parts.append(part)
                value = math.fsum(parts)
            elif activity is None:
                value = last_age
            else:
                value = group[0][1] if group else None
            if value is not None and (lo is not None or hi is not None):
                value = _clip(value, lo, hi)
            out[name] = value

    # ------------------------------------------------------------------------------ per column

    def resolve_columns(self, rows: Sequence[Mapping[str, Any]]) -> Columns:
        """Resolve traits-only ``rows`` column-wise (activity aggregates see no activities).

        Category codes are assigned in order of first appearance (0 is missing); consumers build
        their lookup tables from the vocabulary, which is small, then index them with the codes.
        """
        n = len(rows)
        numbers: dict[str, FloatArray] = {}
        categories: dict[str, tuple[IntArray, list[str | None]]] = {}
        # Each distinct raw value is coerced once per feature, however many rows hold it: all cells
        # are first interned row by row into ids of distinct raw values, then each feature resolves
        # only the ids its column contains and indexes the result with numpy.
        raw_ids, distinct = _intern_cells(rows, [plan.trait for plan in self.traits])
        size = len(distinct)
        for j, plan in enumerate(self.traits):
            ids = raw_ids[:, j]
            present = np.zeros(size, dtype=np.bool_)
            present[ids] = True
            used = np.flatnonzero(present).tolist()
            if plan.type == "category":
                vocab: list[str | None] = [None]
                index: dict[str | None, int] = {None: 0}
                remap = np.zeros(size, dtype=np.intp)
                for raw_id in used:
                    value = coerce_category(distinct[raw_id], plan.missing)
                    code = index.get(value)
                    if code is None:
                        code = index[value] = len(vocab)
                        vocab.append(value)
                    remap[raw_id] = code
                categories[plan.name] = (remap[ids], vocab)
                continue
            table = np.full(size, math.nan)
            for raw_id in used:
                if plan.type == "number":
                    number = coerce_number(distinct[raw_id], plan.missing)
                    if number is not None:
                        table[raw_id] = number
                else:
                    flag = coerce_boolean(distinct[raw_id], plan.missing)
                    if flag is not None:
                        table[raw_id] = 1.0 if flag else 0.0
            array = table[ids]
            if plan.lo is not None or plan.hi is not None:
                # np.clip keeps NaN (missing) as NaN, matching the per-lead path.
                array = np.clip(array, plan.lo, plan.hi)
            numbers[plan.name] = array
        for agg in self.aggregates:
            # Traits-only rows have no activities: counts and sums are 0, "days since" is missing.
            if isinstance(agg.source, DaysSinceLastActivitySource):
                array = np.full(n, math.nan)
            else:
                zero = _clip(0.0, agg.lo, agg.hi)
                array = np.full(n, zero)
            numbers[agg.name] = array
        return Columns(n, numbers, categories)


def _intern_cells(rows: Sequence[Mapping[str, Any]], traits: list[str]) -> tuple[IntArray, list[Any]]:
    """``(ids, distinct)``: ``ids[i, j]`` indexes ``distinct``, the raw value of ``traits[j]`` in row i.

    Walks the rows in row order with C-level iterators (itemgetter, chain, a dict with
    ``__missing__``): a row's values sit together in memory, so this reads each cell once and
    cache-friendly; column-by-column passes over CSV rows were twice as slow.
    """
    n, k = len(rows), len(traits)
    distinct: list[Any] = []
    interner = _Interner(distinct)
    if k == 0:
        return np.zeros((n, 0), dtype=np.intp), distinct
    getter = operator.itemgetter(*traits)
    cells: Iterable[Any] = map(getter, rows) if k == 1 else itertools.chain.from_iterable(map(getter, rows))
    try:
        ids = np.fromiter(map(interner.__getitem__, cells), dtype=np.intp, count=n * k)
    except KeyError:
        # Rows without some traits (JSON payloads): slower, but a missing key reads as None.
        cells = itertools.chain.from_iterable(tuple(map(row.get, traits)) for row in rows)
        ids = np.fromiter(map(interner.__getitem__, cells), dtype=np.intp, count=n * k)
    return ids.reshape(n, k), distinct


class TimedActivity(NamedTuple):
    """An activity with its age at ``now`` (days, 0 if dated after ``now``) and its UTC day number
    (days since 1970-01-01 UTC, for daily caps)."""

    activity: Activity
    age_days: float
    utc_day: int


def timed_activities(activities: Sequence[Activity], now: datetime) -> list[TimedActivity]:
    """Activities sorted by ``occurred_at``, with age and UTC day (see :class:`TimedActivity`).

    Sorting here is what makes scores independent of the order activities were given in.
    """
    now_ts = now.timestamp()
    out = []
    for activity in sorted(activities, key=_occurred_at):
        ts = activity.occurred_at.timestamp()
        age = (now_ts - ts) / _SECONDS_PER_DAY
        # tuple.__new__ skips the NamedTuple's Python-level __new__ (a third of this loop's time).
        out.append(
            tuple.__new__(TimedActivity, (activity, age if age > 0.0 else 0.0, math.floor(ts / _SECONDS_PER_DAY)))
        )
    return out


def _occurred_at(activity: Activity) -> datetime:
    return activity.occurred_at


def index_activities(
    activities: Iterable[Activity], now_ts: float, names: frozenset[str]
) -> tuple[ActivityGroups, float | None]:
    """``(groups, last_age)`` for one lead at ``now_ts`` (``now.timestamp()``).

    ``groups``: the activities named in ``names``, by name, as :data:`Occurrence` tuples most
    recent first; ages and UTC days are those of :func:`timed_activities`. ``last_age``: age of the
    most recent activity of any name (None without activities). Each ``occurred_at`` is converted
    to a timestamp once, and only the (small) groups are sorted, by that float: both orders give
    the same results, since everything computed from an occurrence depends on its timestamp alone.
    """
    groups: ActivityGroups = {}
    latest = -math.inf
    for activity in activities:
        ts = activity.occurred_at.timestamp()
        if ts > latest:
            latest = ts
        name = activity.name
        if name in names:
            age = (now_ts - ts) / _SECONDS_PER_DAY
            entry = (ts, age if age > 0.0 else 0.0, math.floor(ts / _SECONDS_PER_DAY), activity.properties)
            group = groups.get(name)
            if group is None:
                groups[name] = [entry]
            else:
                group.append(entry)
    if latest == -math.inf:
        return groups, None
    for group in groups.values():
        if len(group) > 1:
            group.sort(key=_SORT_KEY, reverse=True)
    # Ages fall as timestamps rise (float subtraction and division are monotonic), so the most
    # recent activity has the smallest age: min(ages) without computing every age.
    age = (now_ts - latest) / _SECONDS_PER_DAY
    return groups, age if age > 0.0 else 0.0


def index_timed(timed: Iterable[TimedActivity], names: frozenset[str]) -> tuple[ActivityGroups, float | None]:
    """:func:`index_activities` for activities already timed by :func:`timed_activities`."""
    groups: ActivityGroups = {}
    last_age: float | None = None
    for activity, age, day in timed:
        if last_age is None or age < last_age:
            last_age = age
        if activity.name in names:
            # (age, -day) orders like "most recent first": ages are clamped at 0 for activities
            # dated after now, and the day then tells them apart (daily caps need days in order).
            groups.setdefault(activity.name, []).append((age, age, day, activity.properties))
    for name, group in groups.items():
        groups[name] = sorted(group, key=_age_then_latest_day)
    return groups, last_age


def _age_then_latest_day(entry: Occurrence) -> tuple[float, int]:
    return entry[1], -entry[2]


def model_matrix(spec: PipelineSpec, rows: Sequence[Mapping[str, Any]]) -> npt.NDArray[Any]:
    """The input of the fitted sklearn estimator for traits-only ``rows``.

    An object array of shape ``(len(rows), len(spec.model.features))`` in ``spec.model.features``
    order: category and boolean features as strings (``MISSING_TOKEN`` when missing), numbers as
    floats (NaN when missing). Uses the per-lead coercion, so it is the reference the scorecard is
    checked against.
    """
    names = list(spec.model.features)
    resolver = FeatureResolver(spec, names)
    types = [resolver.types[name] for name in names]
    out = np.empty((len(rows), len(names)), dtype=object)
    for i, row in enumerate(rows):
        values = resolver.resolve_traits(row)
        out[i, :] = [
            (math.nan if values[name] is None else values[name]) if kind == "number" else model_token(values[name])
            for name, kind in zip(names, types, strict=True)
        ]
    return out


def feature_definitions(spec: PipelineSpec, names: Sequence[str]) -> list[dict[str, Any]]:
    """JSON-able definitions of the named features (source, type, effective missing markers, clip).

    Stored in artifacts so a spec whose model inputs changed is refused at compile time.
    """
    out = []
    for name in names:
        feature: FeatureSpec = spec.feature(name)
        out.append(
            {
                "name": feature.name,
                "type": feature.type,
                "source": feature.source.model_dump(mode="json"),
                "missing": sorted(spec.missing_for(feature)),
                "clip": feature.clip.model_dump(mode="json") if feature.clip is not None else None,
            }
        )
    return out
