"""A pipeline version compiled for serving: spec (features, rules, combine) + scorecard artifact.

::

    pipeline = compile_pipeline(spec, artifact)          # once per pipeline version
    score = pipeline.score(profile, now=now)             # one lead, ~tens of microseconds
    batch = pipeline.score_batch(rows, now=now)          # many traits-only rows, numpy

Scoring is a pure function of (spec, artifact, profile, now): no clock, no I/O, no randomness, and
the order of a profile's activities does not matter.

How a score is made (see ``scoring.spec.CombineSpec``)::

    fit, engagement = group-capped rule points (unweighted)
    rule_part       = clamp(fit_weight * fit + engagement_weight * engagement, rules.total_cap)
    value           = clamp(model_weight * 100 * probability + rule_part + offset, 0, 100), 2 decimals
    grade           = fit letter (A-D, by fit points) + engagement digit (1-4, by engagement points)

Explanation: every fired rule (points before/after its group cap), every model feature with its
signed contribution in log-odds, and -- kept separate because the units differ (points vs
log-odds) -- the top three rules up/down (by awarded points) and the top three features up/down
(by contribution).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
from sklearn import __version__ as SKLEARN_VERSION

from scoring.errors import ArtifactIncompatible, ModelNotCompilable
from scoring.features import ActivityGroups, FeatureResolver, FeatureValue, feature_definitions, index_activities
from scoring.profile import LeadProfile, require_aware
from scoring.rules import RuleHit, RuleSet, clamp_columns
from scoring.scorecard import ARTIFACT_FORMAT, Scorecard
from scoring.spec import Cap, CombineSpec, PipelineSpec

__all__ = [
    "BatchScores",
    "CompiledPipeline",
    "Explanation",
    "FeatureContribution",
    "Score",
    "check_artifact",
    "combine_columns",
    "compile_pipeline",
    "grade_columns",
    "inputs_digest",
]

FloatArray = npt.NDArray[np.float64]
_FIT_LETTERS = "ABCD"
_ENGAGEMENT_DIGITS = "1234"
_GRADE_TABLE = np.array([f + e for f in _FIT_LETTERS for e in _ENGAGEMENT_DIGITS], dtype=object)


class FeatureContribution(NamedTuple):
    """A model feature's resolved ``value`` and its signed ``contribution`` in log-odds, relative to
    an average training lead (see ``Explanation.contribution_scale``).

    A NamedTuple rather than a frozen dataclass: a score builds one per model feature, and frozen
    dataclass construction was a fifth of the per-lead time."""

    name: str
    value: FeatureValue
    contribution: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {"name": self.name, "value": self.value, "contribution": self.contribution}


@dataclass(frozen=True)
class Explanation:
    """Why a lead got its score.

    ``rules``: every rule that fired, in spec order. ``features``: every model feature, in model
    order. ``baseline_log_odds + sum(contributions) == log_odds``. ``contribution_scale`` is
    ``"calibrated"`` (sigmoid or no calibration: ``probability == 1 / (1 + exp(-log_odds))``) or
    ``"uncalibrated"`` (isotonic: the model's log-odds before the non-linear calibration map).
    ``total_cap_cut``: weighted points removed by ``rules.total_cap`` (positive when the cap lowered
    the score, negative when it raised it). The ``top_*`` tuples hold up to three entries each.
    """

    rules: tuple[RuleHit, ...]
    features: tuple[FeatureContribution, ...]
    baseline_log_odds: float
    log_odds: float
    contribution_scale: str
    total_cap_cut: float
    top_rules_up: tuple[RuleHit, ...]
    top_rules_down: tuple[RuleHit, ...]
    top_features_up: tuple[FeatureContribution, ...]
    top_features_down: tuple[FeatureContribution, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "rules": [hit.to_dict() for hit in self.rules],
            "features": [f.to_dict() for f in self.features],
            "baseline_log_odds": self.baseline_log_odds,
            "log_odds": self.log_odds,
            "contribution_scale": self.contribution_scale,
            "total_cap_cut": self.total_cap_cut,
            "top_rules_up": [hit.rule_id for hit in self.top_rules_up],
            "top_rules_down": [hit.rule_id for hit in self.top_rules_down],
            "top_features_up": [f.name for f in self.top_features_up],
            "top_features_down": [f.name for f in self.top_features_down],
        }


@dataclass(frozen=True)
class Score:
    """The result of scoring one lead.

    ``value``: 0-100, rounded to 2 decimals. ``fit`` / ``engagement``: group-capped rule points.
    ``probability``: calibrated probability of conversion in [0, 1]. ``grade``: e.g. ``"B2"``
    (``"A1"`` best). ``inputs_digest``: sha256 hex of the canonical JSON of the resolved features
    and the now-relative activity-rule totals -- equal digests mean equal inputs to the pipeline.
    """

    value: float
    fit: float
    engagement: float
    probability: float
    grade: str
    inputs_digest: str
    explanation: Explanation

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (plain floats, strings, lists, dicts)."""
        return {
            "value": self.value,
            "fit": self.fit,
            "engagement": self.engagement,
            "probability": self.probability,
            "grade": self.grade,
            "inputs_digest": self.inputs_digest,
            "explanation": self.explanation.to_dict(),
        }


@dataclass(frozen=True)
class BatchScores:
    """Scores of many traits-only rows, one array entry per row.

    ``top_up`` / ``top_down``: ``(n, 3)`` indices into ``feature_names`` of the features with the
    largest positive / negative contributions, ``-1`` where fewer exist. ``rule_hits``:
    ``(n, len(rule_ids))`` booleans of the condition rules that fired.
    """

    probability: FloatArray
    value: FloatArray
    fit: FloatArray
    engagement: FloatArray
    grade: npt.NDArray[np.object_]
    top_up: npt.NDArray[np.intp]
    top_down: npt.NDArray[np.intp]
    feature_names: tuple[str, ...]
    rule_ids: tuple[str, ...]
    rule_hits: npt.NDArray[np.bool_]

    def __len__(self) -> int:
        return int(self.value.shape[0])

    def reasons(self, row: int) -> dict[str, list[str]]:
        """Names of the top features up/down and the rules that fired for ``row``."""
        return {
            "features_up": [self.feature_names[j] for j in self.top_up[row] if j >= 0],
            "features_down": [self.feature_names[j] for j in self.top_down[row] if j >= 0],
            "rules": [rule_id for rule_id, hit in zip(self.rule_ids, self.rule_hits[row], strict=True) if hit],
        }


def check_artifact(spec: PipelineSpec, artifact: Mapping[str, Any]) -> None:
    """Raise unless ``artifact`` was made by this sklearn version for this spec's model inputs.

    :class:`ArtifactIncompatible`: other sklearn version or artifact format, or model feature
    definitions (source, type, missing markers, clip) that differ from the spec's.
    :class:`ModelNotCompilable`: the artifact is not a scorecard (e.g. gradient boosting).
    """
    if not isinstance(artifact, Mapping):
        raise ArtifactIncompatible(f"artifact must be a mapping, got {type(artifact).__name__}")
    version = artifact.get("sklearn_version")
    if version != SKLEARN_VERSION:
        raise ArtifactIncompatible(
            f"artifact was trained with scikit-learn {version!r}, this is {SKLEARN_VERSION!r}; retrain it"
        )
    if artifact.get("format_version") != ARTIFACT_FORMAT:
        raise ArtifactIncompatible(f"artifact format {artifact.get('format_version')!r} is not {ARTIFACT_FORMAT}")
    if artifact.get("kind") != "scorecard":
        raise ModelNotCompilable(
            f"artifact kind {artifact.get('kind')!r} cannot be served; only "
            "logistic-regression scorecards compile (score other models in batch "
            "with TrainingResult.fitted)"
        )
    expected = feature_definitions(spec, spec.model.features)
    actual = artifact.get("inputs")
    if actual != expected:
        if not isinstance(actual, list) or len(actual) != len(expected):
            raise ArtifactIncompatible("artifact model features do not match the spec's model.features")
        for want, have in zip(expected, actual, strict=True):
            if want != have:
                raise ArtifactIncompatible(
                    f"model feature {want['name']!r} differs between spec and artifact: spec {want}, artifact {have}"
                )


def compile_pipeline(spec: PipelineSpec, artifact: Mapping[str, Any]) -> CompiledPipeline:
    """Compile ``spec`` + ``artifact`` into a :class:`CompiledPipeline`.

    Rules, combine and grades come from ``spec`` (they may change without retraining); the model
    comes from ``artifact``. Raises :class:`ArtifactIncompatible` / :class:`ModelNotCompilable`
    (see :func:`check_artifact`).
    """
    return CompiledPipeline(spec, artifact)


class CompiledPipeline:
    """A pipeline ready to score. Immutable after construction; safe to share between threads.

    Construct it with :func:`compile_pipeline` (the constructor runs the same artifact checks).
    """

    def __init__(self, spec: PipelineSpec, artifact: Mapping[str, Any]) -> None:
        check_artifact(spec, artifact)
        self.spec = spec
        self.artifact = artifact
        self.scorecard = Scorecard(artifact)
        if list(self.scorecard.feature_names) != list(spec.model.features):
            raise ArtifactIncompatible("scorecard features are not the spec's model.features")
        self.rules = RuleSet(spec)
        self.resolver = FeatureResolver(spec)
        self._combine: CombineSpec = spec.combine
        self._total_cap: Cap = spec.rules.total_cap
        self._contribution_scale = "calibrated" if self.scorecard.calibrated_contributions else "uncalibrated"
        self._activity_names = self.resolver.activity_names | self.rules.activity_names
        self._digest = _DigestWriter(self.resolver.types, self.rules.activity_rule_ids)

    # ------------------------------------------------------------------------------- per lead

    def score(self, profile: LeadProfile, *, now: datetime) -> Score:
        """Score one lead at ``now`` (timezone-aware; decay and windows are relative to it).

        Returns a :class:`Score` with its explanation. Raises :class:`InvalidInput` for a naive
        ``now``. Unknown traits are ignored; missing or unparseable ones count as missing.
        """
        require_aware(now, "now")
        card = self.scorecard
        groups: ActivityGroups | None = None
        last_age: float | None = None
        if profile.activities:
            groups, last_age = index_activities(profile.activities, now.timestamp(), self._activity_names)
        values = self.resolver.resolve_profile(profile.traits, groups, last_age)
        fit, engagement, hits, activity_totals = self.rules.evaluate_indexed(values, groups)

        decision, contributions, log_odds = card.explain(values)
        probability = card.probability(decision)
        names = card.feature_names
        # tuple.__new__ straight from C: the NamedTuple's generated __new__ is Python code, and a
        # score builds one contribution per model feature.
        features: tuple[FeatureContribution, ...] = tuple(
            map(
                tuple.__new__,
                itertools.repeat(FeatureContribution),
                zip(names, map(values.__getitem__, names), contributions, strict=True),
            )
        )

        combine = self._combine
        rule_part = combine.fit_weight * fit + combine.engagement_weight * engagement
        capped_part = _clamp(rule_part, self._total_cap)
        raw_value = combine.model_weight * 100.0 * probability + capped_part + combine.offset
        value = _round2(min(100.0, max(0.0, raw_value)))

        digest = self._digest.digest(values, activity_totals)

        # Built without the frozen dataclasses' __init__ (one object.__setattr__ per field): same
        # objects, equal and immutable as ever, for half the cost.
        explanation = _build(
            Explanation,
            rules=hits,
            features=features,
            baseline_log_odds=card.baseline,
            log_odds=log_odds,
            contribution_scale=self._contribution_scale,
            total_cap_cut=rule_part - capped_part,
            top_rules_up=_top(hits, up=True),
            top_rules_down=_top(hits, up=False),
            top_features_up=_top_features(features, up=True),
            top_features_down=_top_features(features, up=False),
        )
        return _build(
            Score,
            value=value,
            fit=fit,
            engagement=engagement,
            probability=probability,
            grade=self._grade(fit, engagement),
            inputs_digest=digest,
            explanation=explanation,
        )

    def _grade(self, fit: float, engagement: float) -> str:
        a, b, c = self._combine.grades.fit
        one, two, three = self._combine.grades.engagement
        letter = "A" if fit >= a else "B" if fit >= b else "C" if fit >= c else "D"
        digit = "1" if engagement >= one else "2" if engagement >= two else "3" if engagement >= three else "4"
        return letter + digit

    # ------------------------------------------------------------------------------ per column

    def score_batch(self, rows: Sequence[Mapping[str, Any]], *, now: datetime) -> BatchScores:
        """Score many traits-only rows (no activities) with numpy.

        Same numbers as :meth:`score` on ``LeadProfile(traits=row)`` (probabilities within a few
        ulps; rule points bit-identical). ``rows`` are mappings of trait name to raw value, e.g.
        ``csv.DictReader`` rows (all strings, empty = missing). Without activities, activity
        counts/sums are 0 and "days since" is missing, so ``now`` is only checked to be
        timezone-aware here.
        """
        require_aware(now, "now")
        columns = self.resolver.resolve_columns(rows)
        fit, engagement, hits = self.rules.evaluate_columns(columns)
        card = self.scorecard
        terms = card.column_contributions(columns)
        probability = card.probabilities(card.decisions(terms))
        value = combine_columns(self.spec, probability, fit, engagement)
        grade = grade_columns(self.spec, fit, engagement)
        top_up, top_down = _top_columns(terms * card.slope)
        return BatchScores(
            probability, value, fit, engagement, grade, top_up, top_down, card.feature_names, self.rules.rule_ids, hits
        )


def combine_columns(spec: PipelineSpec, probability: FloatArray, fit: FloatArray, engagement: FloatArray) -> FloatArray:
    """Column version of the combine step: the 0-100 score, rounded to 2 decimals."""
    combine = spec.combine
    rule_part = combine.fit_weight * fit + combine.engagement_weight * engagement
    capped = clamp_columns(rule_part, spec.rules.total_cap)
    raw = combine.model_weight * 100.0 * probability + capped + combine.offset
    # np.rint rounds half to even, like Python's round() used per lead.
    result: FloatArray = np.rint(np.clip(raw, 0.0, 100.0) * 100.0) / 100.0
    return result


def grade_columns(spec: PipelineSpec, fit: FloatArray, engagement: FloatArray) -> npt.NDArray[np.object_]:
    """Column version of the grade: ``"A1"`` .. ``"D4"``."""
    a, b, c = spec.combine.grades.fit
    one, two, three = spec.combine.grades.engagement
    letter = (fit < a).astype(np.intp) + (fit < b) + (fit < c)
    digit = (engagement < one).astype(np.intp) + (engagement < two) + (engagement < three)
    result: npt.NDArray[np.object_] = _GRADE_TABLE[letter * 4 + digit]
    return result


# Canonical JSON: sorted keys, no spaces, UTF-8, no NaN. One encoder, built once (constructing one
# per call cost a microsecond). `values` already has sorted keys (see FeatureResolver), so only the
# small outer dicts are sorted here, and the output equals json.dumps(..., sort_keys=True).
_CANONICAL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def inputs_digest(values: Mapping[str, FeatureValue], activity_totals: Mapping[str, tuple[int, float]]) -> str:
    """sha256 hex of the canonical JSON ``{"activity_rules": {...}, "features": {...}}``.

    ``values``: resolved features with keys in sorted order. ``activity_totals``: per activity rule,
    ``(occurrences, points)`` -- the now-relative part of the inputs.
    """
    totals = dict(sorted(activity_totals.items())) if len(activity_totals) > 1 else activity_totals
    text = _CANONICAL.encode({"activity_rules": totals, "features": values})
    return hashlib.sha256(text.encode()).hexdigest()


class _DigestWriter:
    """:func:`inputs_digest` for the values this pipeline's resolver makes: the same bytes, faster.

    The json encoder spends most of its time in per-call set-up and float repr. Here each
    feature's ``"name":value`` fragment is memoised for the values that repeat across leads
    (categories, booleans, missing, and numbers such as visit counts), so a feature costs a dict
    lookup; other numbers go through ``float.__repr__``, as in the json encoder. Relies on what the
    resolver guarantees: keys in sorted order, and per feature one value class (float, bool or str)
    or None -- so 1.0 and True, equal as dict keys, never meet in one memo.
    """

    def __init__(self, types: Mapping[str, str], activity_rule_ids: Sequence[str]) -> None:
        self._prefix = {name: _CANONICAL.encode(name) + ":" for name in types}
        self._memo: dict[str, dict[FeatureValue, str]] = {name: {} for name in types}
        self._class: dict[str, type] = {
            name: float if kind == "number" else bool if kind == "boolean" else str for name, kind in types.items()
        }
        self._rule_prefix = {rule_id: _CANONICAL.encode(rule_id) + ":[" for rule_id in activity_rule_ids}

    def digest(self, values: Mapping[str, FeatureValue], activity_totals: Mapping[str, tuple[int, float]]) -> str:
        """``inputs_digest(values, activity_totals)``."""
        memo = self._memo
        try:
            totals = [self._total(rule_id, activity_totals[rule_id]) for rule_id in sorted(activity_totals)]
            features = [memo[name].get(value) or self._fragment(name, value) for name, value in values.items()]
        except _Unexpected:
            return inputs_digest(values, activity_totals)
        text = '{"activity_rules":{' + ",".join(totals) + '},"features":{' + ",".join(features) + "}}"
        return hashlib.sha256(text.encode()).hexdigest()

    def _total(self, rule_id: str, total: tuple[int, float]) -> str:
        count, points = total
        prefix = self._rule_prefix.get(rule_id)
        if prefix is None or count.__class__ is not int or points.__class__ is not float or not math.isfinite(points):
            raise _Unexpected
        return prefix + int.__repr__(count) + "," + float.__repr__(points) + "]"

    def _fragment(self, name: str, value: FeatureValue) -> str:
        if name not in self._prefix or (value is not None and value.__class__ is not self._class[name]):
            raise _Unexpected
        memo = self._memo[name]
        if isinstance(value, float):
            if not math.isfinite(value):
                raise _Unexpected  # the json encoder raises for it
            text = self._prefix[name] + float.__repr__(value)
            # 0.0 and -0.0 are one dict key but two JSON texts: zeros are never memoised.
            if value and len(memo) < _DIGEST_MEMO_LIMIT:
                memo[value] = text
            return text
        text = self._prefix[name] + _CANONICAL.encode(value)
        if len(memo) < _DIGEST_MEMO_LIMIT:
            memo[value] = text
        return text


class _Unexpected(Exception):
    """A value :class:`_DigestWriter` does not handle: use the generic :func:`inputs_digest`."""


_DIGEST_MEMO_LIMIT = 2048


def _clamp(value: float, cap: Cap) -> float:
    if cap.max is not None and value > cap.max:
        return cap.max
    if cap.min is not None and value < cap.min:
        return cap.min
    return value


def _round2(value: float) -> float:
    # round(x * 100) / 100 (half to even) is what np.rint does in the batch path; round(x, 2) is a
    # decimal rounding that can differ from it in the last place.
    return round(value * 100.0) / 100.0


_T = TypeVar("_T", Score, Explanation)


def _build(cls: type[_T], **fields: Any) -> _T:
    # Every field by keyword, so a field added to the class and forgotten here fails the tests
    # (equality and to_dict) instead of going unnoticed.
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


# Sort keys in C. Sorting by x with reverse=True keeps ties in their original order, exactly like
# sorting by -x: Python's sort stays stable when reversed.
_AWARDED = operator.itemgetter(4)
_CONTRIBUTION = operator.itemgetter(2)


def _top(hits: Sequence[RuleHit], *, up: bool) -> tuple[RuleHit, ...]:
    if up:
        chosen = [h for h in hits if h[4] > 0.0]
        chosen.sort(key=_AWARDED, reverse=True)
    else:
        chosen = [h for h in hits if h[4] < 0.0]
        chosen.sort(key=_AWARDED)
    return tuple(chosen[:3])


def _top_features(features: Sequence[FeatureContribution], *, up: bool) -> tuple[FeatureContribution, ...]:
    if up:
        ranked = [f for f in features if f[2] > 0.0]
        ranked.sort(key=_CONTRIBUTION, reverse=True)
    else:
        ranked = [f for f in features if f[2] < 0.0]
        ranked.sort(key=_CONTRIBUTION)
    return tuple(ranked[:3])


def _top_columns(contributions: FloatArray) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    n, k = contributions.shape
    rows = np.arange(n)
    top_up = np.full((n, 3), -1, dtype=np.intp)
    top_down = np.full((n, 3), -1, dtype=np.intp)
    # Three rounds of argmax/argmin (first index wins a tie, like the per-lead stable sort) instead
    # of a full argsort of every row: the batch only needs three of each.
    for sign, out in ((1.0, top_up), (-1.0, top_down)):
        work = contributions * sign
        for r in range(min(3, k)):
            best = np.argmax(work, axis=1)
            value = work[rows, best]
            out[:, r] = np.where(value > 0.0, best, -1)
            work[rows, best] = -np.inf
    return top_up, top_down
