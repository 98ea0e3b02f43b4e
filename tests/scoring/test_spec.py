"""Spec validation: good specs load, and every bad one is refused with the bad field named."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from scoring.errors import SpecInvalid
from scoring.spec import (
    ActivityCountSource,
    AllOf,
    AnyOf,
    HistGradientBoostingModel,
    Leaf,
    LogisticRegressionModel,
    PipelineSpec,
    TraitSource,
    load_spec,
)
from tests.scoring.conftest import make_spec_data

Mutation = Callable[[dict[str, Any]], None]


def base() -> dict[str, Any]:
    return make_spec_data(
        fit={
            "cap": {"max": 20},
            "rules": [
                {
                    "id": "pro",
                    "when": {
                        "all": [
                            {"field": "job", "op": "eq", "value": "Pro"},
                            {"any": [{"field": "visits", "op": "gt", "value": 2}]},
                        ]
                    },
                    "points": 5,
                },
            ],
        },
        engagement={
            "rules": [{"id": "busy", "when": {"field": "visits", "op": "gte", "value": 5}, "points": 3}],
            "activities": [
                {"id": "pv", "activity": "Page Viewed", "points": 1, "daily_cap": 3, "decay": {"half_life_days": 7}}
            ],
        },
    )


def fit_leaf(d: dict[str, Any]) -> dict[str, Any]:
    leaf: dict[str, Any] = d["rules"]["fit"]["rules"][0]["when"]["all"][0]
    return leaf


def test_base_spec_loads_with_defaults() -> None:
    spec = load_spec(base())
    assert isinstance(spec.model, LogisticRegressionModel)
    assert spec.model.calibration == "sigmoid"
    assert (spec.model.cv_folds, spec.model.holdout_fraction) == (5, 0.2)
    condition = spec.rules.fit.rules[0].when
    assert isinstance(condition, AllOf)
    assert isinstance(condition.all[0], Leaf)
    assert isinstance(condition.all[1], AnyOf)
    assert isinstance(spec.feature("visits").source, TraitSource)
    assert spec.feature("visits").source.trait == "visits"  # type: ignore[union-attr]


def test_x_education_spec_loads(spec: PipelineSpec) -> None:
    leaky = {
        "Tags",
        "Lead Quality",
        "Last Activity",
        "Last Notable Activity",
        "Lead Profile",
        "Prospect ID",
        "Lead Number",
        "Converted",
    }
    traits = {f.source.trait for f in spec.features if isinstance(f.source, TraitSource)}
    assert not traits & leaky
    assert not any(t.startswith("Asymmetrique") for t in traits)
    assert spec.missing_for(spec.feature("occupation")) == {"Select", ""}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("Lead Origin", TraitSource(trait="Lead Origin")),
        ({"trait": "Lead Origin"}, TraitSource(trait="Lead Origin")),
        (
            {"kind": "activity_count", "activity": "Page Viewed", "days": 7},
            ActivityCountSource(kind="activity_count", activity="Page Viewed", days=7),
        ),
    ],
)
def test_source_shorthands(source: Any, expected: Any) -> None:
    data = base()
    data["features"].append(
        {
            "name": "extra",
            "source": source,
            "type": "number" if isinstance(expected, ActivityCountSource) else "category",
        }
    )
    assert load_spec(data).feature("extra").source == expected


def test_model_estimator_selects_params_type() -> None:
    data = base()
    data["model"] = {"features": ["visits"], "estimator": "hist_gradient_boosting", "params": {"max_iter": 10}}
    spec = load_spec(data)
    assert isinstance(spec.model, HistGradientBoostingModel)
    assert spec.model.params.max_iter == 10


def _set(path: list[Any], value: Any) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        target: Any = d
        for key in path[:-1]:
            target = target.setdefault(key, {}) if isinstance(key, str) else target[key]
        target[path[-1]] = value

    return mutate


def _dup_rule(d: dict[str, Any]) -> None:
    d["rules"]["engagement"]["rules"].append(copy.deepcopy(d["rules"]["fit"]["rules"][0]))


def _dup_activity_id(d: dict[str, Any]) -> None:
    d["rules"]["engagement"]["activities"][0]["id"] = "busy"


def _dup_feature(d: dict[str, Any]) -> None:
    d["features"].append({"name": "visits", "type": "number"})


@pytest.mark.parametrize(
    ("mutate", "loc", "message"),
    [
        (lambda d: fit_leaf(d).update(op="like"), "rules.fit.rules[0].when.all[0].op", "Input should be"),
        (lambda d: fit_leaf(d).update(field="nope"), "rules.fit.rules[0].when.all[0].field", "unknown feature 'nope'"),
        (lambda d: fit_leaf(d).update(value=5), "rules.fit.rules[0].when.all[0].value", "is not a category"),
        (
            lambda d: fit_leaf(d).update(op="gt", value=3),
            "rules.fit.rules[0].when.all[0].op",
            "not allowed on category",
        ),
        (lambda d: fit_leaf(d).update(op="in", value="Pro"), "rules.fit.rules[0].when.all[0].value", "non-empty list"),
        (lambda d: fit_leaf(d).update(op="in", value=[]), "rules.fit.rules[0].when.all[0].value", "non-empty list"),
        (
            lambda d: fit_leaf(d).update(op="exists", value="yes"),
            "rules.fit.rules[0].when.all[0].value",
            "true or false",
        ),
        (
            lambda d: d["rules"]["fit"]["rules"][0]["when"]["all"][1]["any"][0].update(value="x"),
            "rules.fit.rules[0].when.all[1].any[0].value",
            "finite number",
        ),
        (
            lambda d: d["rules"]["fit"]["rules"][0]["when"]["all"][1]["any"][0].update(value=True),
            "rules.fit.rules[0].when.all[1].any[0].value",
            "finite number",
        ),
        (
            lambda d: d["rules"]["engagement"]["rules"][0]["when"].update(field="optin", op="eq", value="yes"),
            "rules.engagement.rules[0].when.value",
            "is not a boolean",
        ),
        (
            lambda d: d["rules"]["engagement"]["rules"][0]["when"].update(field="optin", op="contains", value="y"),
            "rules.engagement.rules[0].when.op",
            "not allowed on boolean",
        ),
        (_set(["rules", "fit", "rules", 0, "when", "all"], []), "rules.fit.rules[0].when.all", "at least 1 item"),
        (_dup_rule, "rules.engagement.rules[1].id", "duplicate rule id 'pro'"),
        (_dup_activity_id, "rules.engagement.activities[0].id", "duplicate rule id 'busy'"),
        (_dup_feature, "features[4].name", "duplicate feature name"),
        (_set(["rules", "fit", "rules", 0, "id"], "has space"), "rules.fit.rules[0].id", "pattern"),
        (_set(["rules", "fit", "rules", 0, "piont"], 3), "rules.fit.rules[0].piont", "Extra inputs"),
        (_set(["rules", "fit", "rules", 0, "points"], "lots"), "rules.fit.rules[0].points", "valid number"),
        (_set(["rules", "fit", "rules", 0, "points"], float("nan")), "rules.fit.rules[0].points", "finite"),
        (_set(["rules", "fit", "cap"], {"max": -1}), "rules.fit.cap.max", "greater than or equal to 0"),
        (_set(["rules", "fit", "cap"], {"min": 1}), "rules.fit.cap.min", "less than or equal to 0"),
        (_set(["rules", "fit", "activities"], []), "rules.fit.activities", "Extra inputs"),
        (
            _set(["rules", "engagement", "activities", 0, "decay"], {}),
            "rules.engagement.activities[0].decay",
            "half_life_days or window_days",
        ),
        (
            _set(["rules", "engagement", "activities", 0, "decay"], {"half_life_days": 0}),
            "rules.engagement.activities[0].decay.half_life_days",
            "greater than 0",
        ),
        (
            _set(["rules", "engagement", "activities", 0, "daily_cap"], -2),
            "rules.engagement.activities[0].daily_cap",
            "greater than 0",
        ),
        (_set(["model", "features"], ["visits", "zzz"]), "model.features[1]", "unknown feature 'zzz'"),
        (_set(["model", "features"], ["visits", "visits"]), "model.features[1]", "listed twice"),
        (_set(["model", "estimator"], "svm"), "model", "does not match any of the expected tags"),
        (_set(["model", "params"], {"C": -1}), "model.params.C", "greater than 0"),
        (_set(["model", "params"], {"gamma": 1}), "model.params.gamma", "Extra inputs"),
        (_set(["model", "calibration"], "platt"), "model.calibration", "Input should be"),
        (_set(["model", "cv_folds"], 1), "model.cv_folds", "greater than or equal to 2"),
        (_set(["features", 0, "type"], "text"), "features[0].type", "Input should be"),
        (_set(["features", 1, "clip"], {"max": 3}), "features[1].clip", "only number features"),
        (_set(["features", 0, "clip"], {"min": 5, "max": 1}), "features[0].clip", "must not exceed"),
        (
            _set(["features", 1, "source"], {"kind": "activity_count", "activity": "x"}),
            "features[1].type",
            "is a number",
        ),
        (
            lambda d: (
                d["features"].append(
                    {"name": "pv", "type": "number", "source": {"kind": "activity_count", "activity": "x"}}
                ),
                d["model"]["features"].append("pv"),
            ),
            "model.features[1]",
            "must come from traits",
        ),
        (_set(["combine", "grades"], {"fit": [5, 10, 0]}), "combine.grades.fit", "non-increasing"),
        (_set(["combine", "model_weight"], -1), "combine.model_weight", "greater than or equal to 0"),
        (_set(["spec_version"], 2), "spec_version", "Input should be 1"),
    ],
)
def test_invalid_spec_names_the_bad_field(mutate: Mutation, loc: str, message: str) -> None:
    data = base()
    mutate(data)
    with pytest.raises(SpecInvalid) as info:
        load_spec(data)
    entries = info.value.errors
    assert any(e["loc"] == loc and message in e["msg"] for e in entries), entries
    assert loc in str(info.value)
    # The plain pydantic entry point refuses it too.
    with pytest.raises(ValidationError):
        PipelineSpec.model_validate(data)


def test_all_cross_field_errors_are_reported_together() -> None:
    data = base()
    fit_leaf(data).update(field="nope")
    data["model"]["features"] = ["zzz"]
    with pytest.raises(SpecInvalid) as info:
        load_spec(data)
    locs = {e["loc"] for e in info.value.errors}
    assert {"rules.fit.rules[0].when.all[0].field", "model.features[0]"} <= locs


def test_spec_is_immutable() -> None:
    spec = load_spec(base())
    with pytest.raises(ValidationError):
        spec.name = "other"  # type: ignore[misc]
