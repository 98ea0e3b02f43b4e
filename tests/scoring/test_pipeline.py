"""The compiled pipeline: combine, grades, caps, explanation, digest, batch, artifact checks."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pytest

from scoring.errors import ArtifactIncompatible, InvalidInput, ModelNotCompilable, ScoringError
from scoring.pipeline import CompiledPipeline, Score, compile_pipeline, grade_columns
from scoring.profile import Activity, LeadProfile
from scoring.spec import PipelineSpec
from scoring.training import TrainingResult
from tests.scoring.conftest import NOW, compiled, constant_artifact, make_spec, number

ALWAYS = {"field": "visits", "op": "exists", "value": False}


def points_spec(
    fit: float = 0.0,
    engagement: float = 0.0,
    *,
    combine: dict[str, Any] | None = None,
    total_cap: dict[str, float] | None = None,
) -> PipelineSpec:
    return make_spec(
        fit={"rules": [{"id": "f", "when": ALWAYS, "points": fit}]},
        engagement={"rules": [{"id": "e", "when": ALWAYS, "points": engagement}]},
        combine=combine,
        total_cap=total_cap,
    )


GRADES = {"fit": [20, 10, 0], "engagement": [25, 12, 4]}


@pytest.mark.parametrize(
    ("fit", "engagement", "grade"),
    [
        (20, 25, "A1"),
        (35, 100, "A1"),
        (19.99, 25, "B1"),
        (10, 24.9, "B2"),
        (9.5, 12, "C2"),
        (0, 11, "C3"),
        (0, 4, "C3"),
        (-0.01, 3.99, "D4"),
        (-50, -50, "D4"),
        (20, 0, "A4"),
        (-1, 30, "D1"),
    ],
)
def test_grades(fit: float, engagement: float, grade: str) -> None:
    spec = points_spec(fit, engagement, combine={"grades": GRADES})
    score = compiled(spec).score(LeadProfile({}), now=NOW)
    assert score.grade == grade
    assert grade_columns(spec, np.array([fit]), np.array([engagement]))[0] == grade


@pytest.mark.parametrize(
    ("probability", "fit", "engagement", "combine", "total_cap", "value", "cut"),
    [
        (0.5, 0, 0, {}, None, 50.0, 0.0),  # model_weight 1: 100 x p
        (0.9, 30, 0, {"fit_weight": 1}, None, 100.0, 0.0),  # clamped at 100
        (0.1, -30, 0, {"fit_weight": 1}, None, 0.0, 0.0),  # clamped at 0
        (0.5, 10, 20, {"model_weight": 0.5, "fit_weight": 0.5, "engagement_weight": 1}, None, 50.0, 0.0),
        (0.5, 0, 0, {"offset": 7.5}, None, 57.5, 0.0),
        (0.123456, 0, 0, {}, None, 12.35, 0.0),  # two decimals
        (0.5, 15, 10, {"model_weight": 0, "fit_weight": 1, "engagement_weight": 1}, {"max": 10}, 10.0, 15.0),
        (0.5, -30, 0, {"model_weight": 0, "fit_weight": 1, "offset": 50}, {"min": -20}, 30.0, -10.0),
        (
            0.5,
            -30,
            5,
            {"model_weight": 0, "fit_weight": 1, "engagement_weight": 2, "offset": 50},
            {"min": -15, "max": 5},
            35.0,
            -5.0,
        ),
    ],
)
def test_combine_and_total_cap(
    probability: float,
    fit: float,
    engagement: float,
    combine: dict[str, Any],
    total_cap: dict[str, float] | None,
    value: float,
    cut: float,
) -> None:
    spec = points_spec(fit, engagement, combine=combine, total_cap=total_cap)
    pipeline = compiled(spec, probability)
    score = pipeline.score(LeadProfile({}), now=NOW)
    assert score.probability == pytest.approx(probability, abs=1e-15)
    assert score.value == value
    assert score.explanation.total_cap_cut == pytest.approx(cut)
    assert (score.fit, score.engagement) == (fit, engagement)
    batch = pipeline.score_batch([{}], now=NOW)
    assert batch.value[0] == value


def test_naive_now_and_naive_activity_are_refused() -> None:
    pipeline = compiled(points_spec())
    with pytest.raises(InvalidInput, match="timezone-aware"):
        pipeline.score(LeadProfile({}), now=datetime(2026, 1, 1))
    with pytest.raises(InvalidInput, match="timezone-aware"):
        pipeline.score_batch([], now=datetime(2026, 1, 1))
    with pytest.raises(InvalidInput):
        Activity("Page Viewed", datetime(2026, 1, 1), {})
    assert issubclass(InvalidInput, ScoringError)


# -------------------------------------------------------------------------------- artifact checks


def test_artifact_from_another_sklearn_version_is_refused(spec: PipelineSpec, trained: TrainingResult) -> None:
    artifact = dict(trained.artifact, sklearn_version="0.24.2")
    with pytest.raises(ArtifactIncompatible, match="0.24.2"):
        compile_pipeline(spec, artifact)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"format_version": 99}, ArtifactIncompatible, "format"),
        ({"kind": "sklearn_in_memory"}, ModelNotCompilable, "cannot be served"),
        ({"features": "nope"}, ArtifactIncompatible, "malformed"),
        ({"calibration": {"method": "beta"}}, ArtifactIncompatible, "malformed"),
    ],
)
def test_malformed_artifacts_are_refused(
    spec: PipelineSpec, trained: TrainingResult, change: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        compile_pipeline(spec, dict(trained.artifact, **change))


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["features"][4].update(clip={"min": 0, "max": 99}),  # total_visits clipped differently
        lambda d: d["features"][10].update(source="Lead Profile"),  # occupation from another trait
        lambda d: d.update(missing_markers=[]),  # "Select" no longer missing
        lambda d: d["model"]["features"].pop(),  # one feature fewer
        lambda d: d["model"]["features"].reverse(),  # other order
    ],
)
def test_artifact_must_match_the_specs_model_features(
    spec_data: dict[str, Any], trained: TrainingResult, change: Any
) -> None:
    data = json.loads(json.dumps(spec_data))
    change(data)
    with pytest.raises(ArtifactIncompatible):
        compile_pipeline(PipelineSpec.model_validate(data), trained.artifact)


def test_rules_and_combine_can_change_without_retraining(spec_data: dict[str, Any], trained: TrainingResult) -> None:
    data = json.loads(json.dumps(spec_data))
    data["rules"]["fit"]["rules"][0]["points"] = 1
    data["combine"]["model_weight"] = 0.5
    compile_pipeline(PipelineSpec.model_validate(data), trained.artifact)


def test_artifact_survives_a_json_round_trip(
    spec: PipelineSpec, trained: TrainingResult, rows: list[dict[str, str]]
) -> None:
    again = compile_pipeline(spec, json.loads(json.dumps(trained.artifact)))
    direct = compile_pipeline(spec, trained.artifact)
    for row in rows[:200]:
        assert again.score(LeadProfile(row), now=NOW) == direct.score(LeadProfile(row), now=NOW)


# ----------------------------------------------------------------------------------- explanation


def test_score_explanation_is_complete_and_json(pipeline: CompiledPipeline, rows: list[dict[str, str]]) -> None:
    row = next(r for r in rows if r["What is your current occupation"] == "Working Professional")
    activities = [Activity("Page Viewed", NOW - timedelta(hours=h), {"url": "/pricing"}) for h in range(3)]
    score = pipeline.score(LeadProfile(row, activities), now=NOW)
    explanation = score.explanation
    fired = {h.rule_id for h in explanation.rules}
    assert {"working-professional", "page-viewed", "pricing-page"} <= fired
    assert [f.name for f in explanation.features] == list(pipeline.spec.model.features)
    total = explanation.baseline_log_odds + sum(f.contribution for f in explanation.features)
    assert total == pytest.approx(explanation.log_odds, abs=1e-12)
    # Sigmoid calibration keeps contributions exact in calibrated log-odds.
    assert explanation.contribution_scale == "calibrated"
    assert 1 / (1 + math.exp(-explanation.log_odds)) == pytest.approx(score.probability, abs=1e-12)
    assert all(f.contribution > 0 for f in explanation.top_features_up)
    assert all(f.contribution < 0 for f in explanation.top_features_down)
    ups = sorted((f.contribution for f in explanation.features if f.contribution > 0), reverse=True)[:3]
    assert [f.contribution for f in explanation.top_features_up] == ups
    assert len(explanation.top_rules_up) <= 3
    assert all(h.awarded > 0 for h in explanation.top_rules_up)
    data = score.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["grade"] == score.grade
    assert {r["rule_id"] for r in data["explanation"]["rules"]} == fired


def test_digest_depends_on_inputs_not_on_noise(pipeline: CompiledPipeline, rows: list[dict[str, str]]) -> None:
    row = rows[0]
    base = pipeline.score(LeadProfile(row), now=NOW)
    assert len(base.inputs_digest) == 64
    # Unused traits and spelling of the same value do not change the inputs.
    same = pipeline.score(LeadProfile({**row, "Tags": "whatever", "TotalVisits": f" {row['TotalVisits']} "}), now=NOW)
    assert same.inputs_digest == base.inputs_digest
    other = pipeline.score(LeadProfile({**row, "TotalVisits": "17"}), now=NOW)
    assert other.inputs_digest != base.inputs_digest
    # An activity changes the now-relative aggregates; the same activity at another now too.
    activity = [Activity("Page Viewed", NOW - timedelta(days=1), {})]
    with_activity = pipeline.score(LeadProfile(row, activity), now=NOW)
    later = pipeline.score(LeadProfile(row, activity), now=NOW + timedelta(days=3))
    assert len({base.inputs_digest, with_activity.inputs_digest, later.inputs_digest}) == 3


def test_replay_with_the_same_now_is_identical(pipeline: CompiledPipeline, rows: list[dict[str, str]]) -> None:
    activities = [Activity("Form Submitted", NOW - timedelta(days=d), {}) for d in (1, 5, 40)]
    first = pipeline.score(LeadProfile(rows[3], activities), now=NOW)
    second = pipeline.score(LeadProfile(dict(rows[3]), list(reversed(activities))), now=NOW)
    assert first == second
    assert first.to_dict() == second.to_dict()


def test_activity_aggregate_features(pipeline: CompiledPipeline) -> None:
    views = [Activity("Page Viewed", NOW - timedelta(hours=h), {}) for h in range(12)]
    old = [Activity("Page Viewed", NOW - timedelta(days=30), {})]
    score = pipeline.score(LeadProfile({}, views + old), now=NOW)
    fired = {h.rule_id for h in score.explanation.rules}
    assert {"browsing-this-week", "active-recently"} <= fired
    quiet = pipeline.score(LeadProfile({}, old), now=NOW)
    assert not {"browsing-this-week", "active-recently"} & {h.rule_id for h in quiet.explanation.rules}


def test_sum_aggregate_feature() -> None:
    spec = make_spec(
        features=[
            number("visits"),
            {
                "name": "spent",
                "type": "number",
                "source": {"kind": "activity_sum", "activity": "Purchase", "property": "amount", "days": 30},
            },
        ],
        fit={"rules": [{"id": "big", "when": {"field": "spent", "op": "gte", "value": 100}, "points": 5}]},
    )
    pipeline = compiled(spec)
    buys = [
        Activity("Purchase", NOW - timedelta(days=d), {"amount": a})
        for d, a in ((1, "60"), (2, 50), (3, "n/a"), (45, 500))
    ]
    assert pipeline.score(LeadProfile({}, buys), now=NOW).fit == 5
    assert pipeline.score(LeadProfile({}, buys[:1] + buys[2:]), now=NOW).fit == 0


# ------------------------------------------------------------------------------------------ batch


def test_batch_matches_per_lead_over_the_whole_file(pipeline: CompiledPipeline, rows: list[dict[str, str]]) -> None:
    batch = pipeline.score_batch(rows, now=NOW)
    assert len(batch) == len(rows)
    singles: list[Score] = [pipeline.score(LeadProfile(row), now=NOW) for row in rows]
    assert np.abs(batch.probability - [s.probability for s in singles]).max() < 1e-12
    assert np.abs(batch.value - [s.value for s in singles]).max() <= 0.01 + 1e-9
    assert list(batch.grade) == [s.grade for s in singles]
    assert list(batch.fit) == [s.fit for s in singles]
    assert list(batch.engagement) == [s.engagement for s in singles]
    for i in range(0, len(rows), 97):
        reasons = batch.reasons(i)
        explanation = singles[i].explanation
        assert reasons["features_up"] == [f.name for f in explanation.top_features_up]
        assert reasons["features_down"] == [f.name for f in explanation.top_features_down]
        assert reasons["rules"] == [h.rule_id for h in explanation.rules]


def test_batch_handles_missing_keys_and_non_string_values(pipeline: CompiledPipeline) -> None:
    rows: list[dict[str, Any]] = [
        {},
        {"TotalVisits": 3, "Do Not Email": True, "Lead Origin": None},
        {"TotalVisits": "3", "Do Not Email": "Yes", "Country": 1},
        {"Country": True},
        {"Country": "1"},
    ]
    batch = pipeline.score_batch(rows, now=NOW)
    for i, row in enumerate(rows):
        single = pipeline.score(LeadProfile(row), now=NOW)
        assert batch.probability[i] == pytest.approx(single.probability, abs=1e-12)
        assert batch.grade[i] == single.grade


def test_empty_batch(pipeline: CompiledPipeline) -> None:
    batch = pipeline.score_batch([], now=NOW)
    assert len(batch) == 0
    assert batch.top_up.shape == (0, 3)


def test_constant_artifact_helper_is_compilable() -> None:
    spec = points_spec()
    artifact = constant_artifact(spec, 0.25)
    assert compile_pipeline(spec, artifact).score(LeadProfile({}), now=NOW).probability == pytest.approx(0.25)


def test_digest_is_sha256_of_canonical_json(pipeline: CompiledPipeline, rows: list[dict[str, str]]) -> None:
    import hashlib

    from scoring.features import timed_activities

    activities = [
        Activity("Email Opened", NOW - timedelta(hours=5), {}),
        Activity("Page Viewed", NOW - timedelta(days=2), {"url": "/pricing"}),
    ]
    timed = timed_activities(activities, NOW)
    values = pipeline.resolver.resolve_traits(rows[7])
    pipeline.resolver.resolve_aggregates(timed, values)
    totals = pipeline.rules.evaluate(values, timed).activity_totals
    assert set(totals) == {"email-opened", "page-viewed", "pricing-page"}
    canonical = json.dumps(
        {"features": values, "activity_rules": totals},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    expected = hashlib.sha256(canonical.encode()).hexdigest()
    assert pipeline.score(LeadProfile(rows[7], activities), now=NOW).inputs_digest == expected
