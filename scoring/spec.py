"""The pipeline spec: features, rules, model settings and how they combine, as validated data.

A spec is plain data (YAML or JSON parsed by the shell into a dict) validated here with pydantic::

    spec = PipelineSpec.model_validate(data)      # raises pydantic.ValidationError
    spec = load_spec(data)                        # same, but raises SpecInvalid with a list of errors

Every error names the bad field: pydantic's own errors carry their location
(``rules.fit.rules.0.when.op``); the cross-field checks done here (unknown feature, operator not
allowed for the feature's type, value of the wrong type, duplicate rule id...) are reported as
``"<dotted path>: <message>"`` lines.

Semantics (see also ``scoring.rules`` and ``scoring.pipeline``):

* A **feature** resolves one value per lead from a trait or from an aggregate over activities.
  ``None`` and ``""`` are always missing; ``missing`` (or the spec-wide ``missing_markers``) adds
  markers such as X Education's ``Select``. Numbers may be clipped to ``[min, max]``.
* A **condition** is a leaf ``{field, op, value}`` or ``{all: [...]}`` / ``{any: [...]}``. For
  feature conditions ``field`` names a feature; for activity ``where`` conditions it names an activity
  property. A missing value matches no operator except ``ne`` / ``not_in`` (which are exactly the
  negations of ``eq`` / ``in``) and ``exists: false``.
* **Points** add up per group (``fit``, ``engagement``); each group is clamped to its ``cap``;
  ``total_cap`` clamps the weighted rule part of the score (see ``CombineSpec``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from scoring.errors import SpecInvalid

__all__ = [
    "ActivityCountSource",
    "ActivityRule",
    "ActivitySumSource",
    "AllOf",
    "AnyOf",
    "Cap",
    "CombineSpec",
    "Condition",
    "ConditionRule",
    "DaysSinceLastActivitySource",
    "Decay",
    "EngagementRules",
    "FeatureSpec",
    "FitRules",
    "Grades",
    "HistGradientBoostingModel",
    "HistGradientBoostingParams",
    "Leaf",
    "LogisticRegressionModel",
    "LogisticRegressionParams",
    "ModelSpec",
    "Op",
    "PipelineSpec",
    "RulesSpec",
    "TraitSource",
    "check_condition",
    "load_spec",
]

Op = Literal["eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "exists", "contains"]
FeatureType = Literal["number", "category", "boolean"]

# Which operators make sense for which feature type; anything else is a spec error, caught when
# the spec is validated instead of silently never matching in production.
OPS_BY_TYPE: dict[str, frozenset[str]] = {
    "number": frozenset({"eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "exists"}),
    "category": frozenset({"eq", "ne", "in", "not_in", "contains", "exists"}),
    "boolean": frozenset({"eq", "ne", "exists"}),
}
_NUMERIC_OPS = frozenset({"gt", "gte", "lt", "lte"})
_LIST_OPS = frozenset({"in", "not_in"})

RuleId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")]


class _Strict(BaseModel):
    # extra="forbid" turns a typo ("piont") into an error naming the field instead of a silent default;
    # allow_inf_nan=False because one NaN weight would poison every score.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _is_number(value: Any) -> bool:
    # bool is an int subclass in Python; `gt: true` is a spec mistake, not 1.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, str | bool) or _is_number(value)


# --------------------------------------------------------------------------------------- conditions


class Leaf(_Strict):
    """``{field, op, value}``: compare one feature (or activity property) with a literal.

    ``value`` shape by operator: ``in``/``not_in`` a non-empty list of scalars; ``gt``/``gte``/
    ``lt``/``lte`` a number; ``contains`` a string; ``exists`` a boolean (default true);
    ``eq``/``ne`` a scalar.
    """

    field: str = Field(min_length=1)
    op: Op
    value: Any = None

    @model_validator(mode="after")
    def _check_value_shape(self) -> Leaf:
        op, value = self.op, self.value
        if op in _LIST_OPS:
            if not isinstance(value, list) or not value or not all(_is_scalar(v) for v in value):
                raise ValueError(f"value: op {op!r} needs a non-empty list of strings/numbers/booleans")
        elif op in _NUMERIC_OPS:
            if not _is_number(value):
                raise ValueError(f"value: op {op!r} needs a finite number, got {value!r}")
        elif op == "contains":
            if not isinstance(value, str):
                raise ValueError(f"value: op 'contains' needs a string, got {value!r}")
        elif op == "exists":
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"value: op 'exists' needs true or false, got {value!r}")
        elif not _is_scalar(value):
            raise ValueError(f"value: op {op!r} needs a string, number or boolean, got {value!r}")
        return self


class AllOf(_Strict):
    """``{all: [...]}``: true when every child condition is true."""

    all: list[Condition] = Field(min_length=1)


class AnyOf(_Strict):
    """``{any: [...]}``: true when at least one child condition is true."""

    any: list[Condition] = Field(min_length=1)


def _condition_tag(value: Any) -> str:
    if isinstance(value, dict):
        if "all" in value:
            return "all"
        if "any" in value:
            return "any"
        return "leaf"
    if isinstance(value, AllOf):
        return "all"
    if isinstance(value, AnyOf):
        return "any"
    return "leaf"


Condition = Annotated[
    Annotated[Leaf, Tag("leaf")] | Annotated[AllOf, Tag("all")] | Annotated[AnyOf, Tag("any")],
    Discriminator(_condition_tag),
]
AllOf.model_rebuild()
AnyOf.model_rebuild()


# ----------------------------------------------------------------------------------------- features


class TraitSource(_Strict):
    """The value of one lead trait, e.g. ``{kind: trait, trait: "Lead Origin"}``."""

    kind: Literal["trait"] = "trait"
    trait: str = Field(min_length=1)


class ActivityCountSource(_Strict):
    """How many ``activity`` occurrences happened in the last ``days`` days (all time if omitted)."""

    kind: Literal["activity_count"]
    activity: str = Field(min_length=1)
    days: float | None = Field(default=None, gt=0)


class ActivitySumSource(_Strict):
    """Sum of the numeric ``property`` over ``activity`` occurrences in the last ``days`` days.

    Non-numeric or missing property values are skipped; no occurrence gives 0.
    """

    kind: Literal["activity_sum"]
    activity: str = Field(min_length=1)
    property: str = Field(min_length=1)
    days: float | None = Field(default=None, gt=0)


class DaysSinceLastActivitySource(_Strict):
    """Days (fractional) from the last occurrence of ``activity`` (any activity if omitted) to ``now``.

    Missing when there is no such activity; activities dated after ``now`` count as 0 days.
    """

    kind: Literal["days_since_last_activity"]
    activity: str | None = None


Source = Annotated[
    TraitSource | ActivityCountSource | ActivitySumSource | DaysSinceLastActivitySource,
    Field(discriminator="kind"),
]


class Clip(_Strict):
    """Clamp a number to ``[min, max]`` (either bound optional) before rules and model see it."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _check_order(self) -> Clip:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class FeatureSpec(_Strict):
    """One named input. ``source`` may be a string (a trait name) or omitted (the trait ``name``)."""

    name: str = Field(min_length=1, max_length=100)
    source: Source
    type: FeatureType
    missing: list[str] | None = None
    clip: Clip | None = None
    description: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_source(cls, data: Any) -> Any:
        if isinstance(data, dict):
            source = data.get("source")
            if source is None and isinstance(data.get("name"), str):
                data = {**data, "source": {"kind": "trait", "trait": data["name"]}}
            elif isinstance(source, str):
                data = {**data, "source": {"kind": "trait", "trait": source}}
            elif isinstance(source, dict) and "kind" not in source and "trait" in source:
                data = {**data, "source": {"kind": "trait", **source}}
        return data

    @model_validator(mode="after")
    def _check_type(self) -> FeatureSpec:
        if not isinstance(self.source, TraitSource) and self.type != "number":
            raise ValueError(f"type: a {self.source.kind} feature is a number, not {self.type!r}")
        if self.clip is not None and self.type != "number":
            raise ValueError("clip: only number features can be clipped")
        return self


# -------------------------------------------------------------------------------------------- rules


class ConditionRule(_Strict):
    """``points`` (may be negative) when ``when`` holds for the lead's features."""

    id: RuleId
    when: Condition
    points: float
    description: str | None = None


class Decay(_Strict):
    """How an activity's points fade with its age ``now - occurred_at`` (days).

    ``half_life_days``: points x 0.5 ** (age / half_life). ``window_days``: occurrences older than
    the window give nothing. Both may be set. Activities dated after ``now`` have age 0.
    """

    half_life_days: float | None = Field(default=None, gt=0)
    window_days: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_needed(self) -> Decay:
        if self.half_life_days is None and self.window_days is None:
            raise ValueError("decay needs half_life_days or window_days (omit decay for none)")
        return self


class ActivityRule(_Strict):
    """``points`` per occurrence of ``activity`` whose properties satisfy ``where``.

    ``daily_cap`` bounds the undecayed points counted per UTC calendar day (the most recent
    occurrences of the day count first); decay then applies per occurrence.
    """

    id: RuleId
    activity: str = Field(min_length=1)
    where: Condition | None = None
    points: float
    daily_cap: float | None = Field(default=None, gt=0)
    decay: Decay | None = None
    description: str | None = None


class Cap(_Strict):
    """Bounds on a points total; either side optional.

    ``min <= 0 <= max``: a cap limits how far rules move a total, it never moves a lead that no
    rule fired for (and this keeps the attribution of a cut to the rules well defined).
    """

    min: float | None = Field(default=None, le=0)
    max: float | None = Field(default=None, ge=0)


class FitRules(_Strict):
    """Who the lead is. Condition rules only."""

    cap: Cap = Cap()
    rules: list[ConditionRule] = Field(default_factory=list)


class EngagementRules(_Strict):
    """What the lead did: condition rules on features plus per-occurrence activity rules."""

    cap: Cap = Cap()
    rules: list[ConditionRule] = Field(default_factory=list)
    activities: list[ActivityRule] = Field(default_factory=list)


class RulesSpec(_Strict):
    """Both rule groups and the total cap on the weighted rule part of the score."""

    fit: FitRules = FitRules()
    engagement: EngagementRules = EngagementRules()
    total_cap: Cap = Cap()


# -------------------------------------------------------------------------------------------- model


class LogisticRegressionParams(_Strict):
    """Parameters passed to ``sklearn.linear_model.LogisticRegression`` (L2, lbfgs)."""

    C: float = Field(default=1.0, gt=0)
    class_weight: Literal["balanced"] | None = None
    max_iter: int = Field(default=2000, ge=10, le=100_000)
    tol: float = Field(default=1e-4, gt=0)


class HistGradientBoostingParams(_Strict):
    """Parameters passed to ``sklearn.ensemble.HistGradientBoostingClassifier``."""

    learning_rate: float = Field(default=0.1, gt=0)
    max_iter: int = Field(default=200, ge=1, le=10_000)
    max_leaf_nodes: int = Field(default=31, ge=2)
    max_depth: int | None = Field(default=None, ge=1)
    min_samples_leaf: int = Field(default=20, ge=1)
    l2_regularization: float = Field(default=0.0, ge=0)
    class_weight: Literal["balanced"] | None = None


class _ModelBase(_Strict):
    features: list[str] = Field(min_length=1)
    calibration: Literal["sigmoid", "isotonic", "none"] = "sigmoid"
    random_seed: int = Field(default=0, ge=0, le=2**32 - 1)
    cv_folds: int = Field(default=5, ge=2, le=20)
    holdout_fraction: float = Field(default=0.2, gt=0, lt=0.9)


class LogisticRegressionModel(_ModelBase):
    """A linear model: compiled into an additive scorecard for serving."""

    estimator: Literal["logistic_regression"] = "logistic_regression"
    params: LogisticRegressionParams = LogisticRegressionParams()


class HistGradientBoostingModel(_ModelBase):
    """Gradient boosting: training, metrics and batch scoring with sklearn only (not compilable)."""

    estimator: Literal["hist_gradient_boosting"]
    params: HistGradientBoostingParams = HistGradientBoostingParams()


def _estimator_tag(value: Any) -> str:
    if isinstance(value, dict):
        tag = value.get("estimator", "logistic_regression")
        return tag if isinstance(tag, str) else repr(tag)
    return str(getattr(value, "estimator", "logistic_regression"))


ModelSpec = Annotated[
    Annotated[LogisticRegressionModel, Tag("logistic_regression")]
    | Annotated[HistGradientBoostingModel, Tag("hist_gradient_boosting")],
    Discriminator(_estimator_tag),
]


# ------------------------------------------------------------------------------------------ combine


class Grades(_Strict):
    """Grade thresholds (points, inclusive, non-increasing).

    ``fit: [a, b, c]``: fit >= a is ``A``, >= b ``B``, >= c ``C``, else ``D``.
    ``engagement: [x, y, z]``: engagement >= x is ``1``, >= y ``2``, >= z ``3``, else ``4``.
    """

    fit: tuple[float, float, float] = (30.0, 15.0, 5.0)
    engagement: tuple[float, float, float] = (30.0, 15.0, 5.0)

    @field_validator("fit", "engagement")
    @classmethod
    def _non_increasing(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not value[0] >= value[1] >= value[2]:
            raise ValueError(f"thresholds must be non-increasing (best grade first), got {list(value)}")
        return value


class CombineSpec(_Strict):
    """How the parts make the 0-100 score::

        rule_part = clamp(fit_weight * fit + engagement_weight * engagement, rules.total_cap)
        score     = clamp(model_weight * 100 * probability + rule_part + offset, 0, 100)

    ``fit`` and ``engagement`` are the group-capped points; the score is rounded to 2 decimals.
    """

    model_weight: float = Field(default=1.0, ge=0)
    fit_weight: float = 0.0
    engagement_weight: float = 0.0
    offset: float = 0.0
    grades: Grades = Grades()


# ------------------------------------------------------------------------------------------ pipeline


class PipelineSpec(_Strict):
    """A whole pipeline: validated once, then compiled (see ``scoring.pipeline.compile_pipeline``)."""

    spec_version: Literal[1] = 1
    name: str = Field(min_length=1, max_length=200)
    description: str | None = None
    missing_markers: list[str] = Field(default_factory=list)
    features: list[FeatureSpec] = Field(min_length=1)
    rules: RulesSpec = RulesSpec()
    model: ModelSpec
    combine: CombineSpec = CombineSpec()

    @model_validator(mode="after")
    def _cross_check(self) -> PipelineSpec:
        errors: list[str] = []
        by_name: dict[str, FeatureSpec] = {}
        for i, feature in enumerate(self.features):
            if feature.name in by_name:
                errors.append(f"features[{i}].name: duplicate feature name {feature.name!r}")
            by_name[feature.name] = feature

        seen_model: set[str] = set()
        for i, name in enumerate(self.model.features):
            loc = f"model.features[{i}]"
            if name in seen_model:
                errors.append(f"{loc}: feature {name!r} listed twice")
            seen_model.add(name)
            model_feature = by_name.get(name)
            if model_feature is None:
                errors.append(f"{loc}: unknown feature {name!r}")
            elif not isinstance(model_feature.source, TraitSource):
                # Training rows carry traits only; an activity aggregate would be constant in training
                # and meaningful only at serving time, which silently skews the model.
                errors.append(f"{loc}: model features must come from traits, {name!r} is {model_feature.source.kind}")

        seen_ids: dict[str, str] = {}

        def check_id(rule_id: str, loc: str) -> None:
            if rule_id in seen_ids:
                errors.append(f"{loc}.id: duplicate rule id {rule_id!r} (first at {seen_ids[rule_id]})")
            else:
                seen_ids[rule_id] = loc

        types = {name: feature.type for name, feature in by_name.items()}
        groups: list[tuple[str, list[ConditionRule]]] = [
            ("rules.fit.rules", self.rules.fit.rules),
            ("rules.engagement.rules", self.rules.engagement.rules),
        ]
        for prefix, rules in groups:
            for i, rule in enumerate(rules):
                loc = f"{prefix}[{i}]"
                check_id(rule.id, loc)
                check_condition(rule.when, f"{loc}.when", types, errors)
        for i, activity_rule in enumerate(self.rules.engagement.activities):
            check_id(activity_rule.id, f"rules.engagement.activities[{i}]")
        if errors:
            raise ValueError("\n".join(errors))
        return self

    def feature(self, name: str) -> FeatureSpec:
        """Return the feature called ``name``; ``KeyError`` if there is none."""
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(name)

    def missing_for(self, feature: FeatureSpec) -> frozenset[str]:
        """Missing markers for ``feature``: its own list, else the spec-wide one; ``""`` always."""
        markers = feature.missing if feature.missing is not None else self.missing_markers
        # Values are stripped before the comparison, so markers are too.
        return frozenset(marker.strip() for marker in markers) | {""}


def check_condition(
    condition: Leaf | AllOf | AnyOf,
    loc: str,
    types: Mapping[str, str],
    errors: list[str],
    *,
    noun: str = "feature",
) -> None:
    """Append to ``errors`` one ``"<path>: <message>"`` line per leaf of ``condition`` that names an
    unknown field, uses an operator its type does not allow, or compares with a value of the wrong
    type. ``types`` maps each known field to ``number``/``category``/``boolean``; ``noun`` names
    what the fields are in the messages (``feature``, ``score field``...)."""
    if isinstance(condition, AllOf):
        for i, child in enumerate(condition.all):
            check_condition(child, f"{loc}.all[{i}]", types, errors, noun=noun)
        return
    if isinstance(condition, AnyOf):
        for i, child in enumerate(condition.any):
            check_condition(child, f"{loc}.any[{i}]", types, errors, noun=noun)
        return
    name = condition.field
    kind = types.get(name)
    if kind is None:
        errors.append(f"{loc}.field: unknown {noun} {name!r}")
        return
    if condition.op not in OPS_BY_TYPE[kind]:
        allowed = ", ".join(sorted(OPS_BY_TYPE[kind]))
        errors.append(f"{loc}.op: {condition.op!r} is not allowed on {kind} {noun} {name!r} (allowed: {allowed})")
        return
    if condition.op == "exists":
        return
    values = condition.value if isinstance(condition.value, list) else [condition.value]
    for value in values:
        if not _is_of_type(value, kind):
            errors.append(
                f"{loc}.value: {value!r} is not a {kind} ({noun} {name!r}"
                f"{'; quote category values' if kind == 'category' else ''})"
            )


def _is_of_type(value: Any, feature_type: str) -> bool:
    if feature_type == "number":
        return _is_number(value)
    if feature_type == "category":
        return isinstance(value, str)
    return isinstance(value, bool)


def load_spec(data: Any) -> PipelineSpec:
    """Validate ``data`` (a dict parsed from YAML/JSON) into a :class:`PipelineSpec`.

    Raises :class:`SpecInvalid` whose ``errors`` list has one ``{"loc", "msg"}`` entry per problem,
    ``loc`` being the dotted path of the bad field.
    """
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        entries: list[dict[str, str]] = []
        for error in exc.errors(include_url=False):
            loc = _format_loc(error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            for line in message.split("\n"):
                # Cross-field checks report "<path>: <message>"; leaf checks report "value: <message>".
                head, sep, tail = line.partition(": ")
                if sep and " " not in head:
                    entries.append({"loc": f"{loc}.{head}" if loc else head, "msg": tail})
                else:
                    entries.append({"loc": loc, "msg": line})
        summary = "; ".join(f"{e['loc']}: {e['msg']}" if e["loc"] else e["msg"] for e in entries)
        raise SpecInvalid(f"invalid pipeline spec: {summary}", entries) from exc


_UNION_TAGS = frozenset({"leaf", "logistic_regression", "hist_gradient_boosting"})


def _format_loc(parts: tuple[int | str, ...]) -> str:
    """Render a pydantic error location as ``rules.fit.rules[0].when.all[1].op``.

    Pydantic inserts the tag of a tagged union into the location (``when.all.all.0.leaf.op``);
    those parts are dropped so the path reads like the spec the user wrote.
    """
    out = ""
    previous: int | str | None = None
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or (part in ("all", "any") and previous == part):
            pass
        else:
            out += f".{part}" if out else part
        previous = part
    return out
