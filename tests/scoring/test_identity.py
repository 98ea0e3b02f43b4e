"""Scores stay bit-identical across rewrites of the per-lead fast path.

``GOLDEN`` is the sha256 of the exact ``Score.to_dict()`` JSON (floats as repr) of a fixed-seed
corpus of profiles, computed with the straightforward implementation that preceded the fast path
(per-rule scans over sorted activities, datetime-based timing, the generic json digest). The
artifacts are hand-made, so the corpus does not depend on what scikit-learn trains. A change that
moves any score, explanation or digest by one ulp changes the hash: if a change of results is
intended, say so and regenerate it with ``corpus_sha256()``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from scoring.pipeline import CompiledPipeline, Explanation, Score, compile_pipeline, inputs_digest
from scoring.profile import Activity, LeadProfile
from scoring.spec import PipelineSpec
from tests.scoring.conftest import NOW, constant_artifact, make_spec

GOLDEN = "df680f110df6d55215791becefb4286a449fd3dc5e6351986cb96daa14ae3e48"

ZONES = [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8)), timezone(timedelta(hours=13))]
NAMES = ["Page Viewed", "Form Submitted", "Email Opened", "Unsubscribed", "Webinar", "Purchase"]
URLS: list[Any] = ["/pricing", "/pricing/team", "/blog", " /pricing ", "", None, 3, ["/pricing"], "PRICING", "  "]
TRAIT_VALUES: list[Any] = [
    "",
    "Select",
    " 12 ",
    "nan",
    "inf",
    "-0",
    "0",
    "3",
    "1200",
    "Yes",
    "no",
    None,
    5,
    2.5,
    True,
    "Working Professional",
    "Unemployed",
    "Businessman",
    "Lead Add Form",
    "API",
    "Reference",
    "Google",
]
X_EDUCATION_TRAITS = [
    "Lead Origin",
    "Lead Source",
    "Do Not Email",
    "TotalVisits",
    "Total Time Spent on Website",
    "Page Views Per Visit",
    "What is your current occupation",
    "Through Recommendations",
    "City",
]
AGGREGATES: list[dict[str, Any]] = [
    {"name": "visits", "type": "number"},
    {"name": "job", "type": "category", "missing": ["Select"]},
    {"name": "pv7", "type": "number", "source": {"kind": "activity_count", "activity": "Page Viewed", "days": 7}},
    {
        "name": "pv",
        "type": "number",
        "source": {"kind": "activity_count", "activity": "Page Viewed"},
        "clip": {"max": 6},
    },
    {
        "name": "spend",
        "type": "number",
        "source": {"kind": "activity_sum", "activity": "Purchase", "property": "amount", "days": 30},
    },
    {
        "name": "spend_all",
        "type": "number",
        "source": {"kind": "activity_sum", "activity": "Purchase", "property": "amount"},
        "clip": {"min": 0, "max": 100},
    },
    {"name": "since", "type": "number", "source": {"kind": "days_since_last_activity"}},
    {
        "name": "since_form",
        "type": "number",
        "source": {"kind": "days_since_last_activity", "activity": "Form Submitted"},
        "clip": {"max": 30},
    },
]
WHERE: list[dict[str, Any]] = [
    {"field": "url", "op": "contains", "value": "pricing"},
    {"any": [{"field": "url", "op": "eq", "value": "/blog"}, {"field": "amount", "op": "gt", "value": 2}]},
    {"all": [{"field": "url", "op": "exists"}, {"field": "amount", "op": "lte", "value": 3}]},
    {"field": "url", "op": "in", "value": ["/pricing", "/blog"]},
]


def weighted_artifact(spec: PipelineSpec, rng: random.Random) -> dict[str, Any]:
    """A hand-made scorecard with non-zero weights and sigmoid calibration."""
    artifact = constant_artifact(spec, 0.3)
    for feature in artifact["features"]:
        if feature["type"] == "number":
            feature.update(
                center=rng.uniform(0, 500),
                scale=rng.uniform(1, 300),
                weight=rng.uniform(-1, 1),
                offset=rng.uniform(-0.1, 0.1),
                missing=rng.uniform(-0.5, 0.5),
            )
        else:
            weights = {v: rng.uniform(-1, 1) for v in ("true", "false", "__missing__", *TRAIT_VALUES[:22:3])}
            feature.update(weights={str(k): w for k, w in weights.items()}, unknown_weight=rng.uniform(-0.2, 0.2))
    artifact["calibration"] = {"method": "sigmoid", "a": -1.3, "b": 0.2}
    return artifact


def random_activities(rng: random.Random, now: datetime) -> list[Activity]:
    count = rng.choice([0, 1, 2, 3, 5, 10, 10, 20, 40])
    anchors = [now + timedelta(seconds=rng.randint(-400 * 86_400, 2 * 86_400)) for _ in range(max(1, count // 3))]
    out = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.3:  # ties: the same instant
            at = rng.choice(anchors)
        elif kind < 0.5:  # the same day
            at = rng.choice(anchors) + timedelta(minutes=rng.randint(-600, 600))
        elif kind < 0.6:  # around UTC midnight
            midnight = (now - timedelta(days=rng.randint(0, 20))).replace(hour=0, minute=0, second=0, microsecond=0)
            at = midnight + timedelta(microseconds=rng.randint(-3, 3))
        else:  # anywhere, including after now
            at = now + timedelta(seconds=rng.uniform(-100 * 86_400, 86_400))
        props: dict[str, Any] = {}
        if rng.random() < 0.8:
            props["url"] = rng.choice(URLS)
        if rng.random() < 0.4:
            props["amount"] = rng.choice([1, 2.5, "3", "x", None, -4, "1e3", True])
        out.append(Activity(rng.choice(NAMES), at.astimezone(rng.choice(ZONES)), props))
    return out


def aggregate_spec(rng: random.Random) -> PipelineSpec:
    cap = rng.choice([{}, {"max": 10}, {"min": -5, "max": 8}, {"min": -3}])
    activities = []
    for k in range(rng.randint(1, 5)):
        rule: dict[str, Any] = {
            "id": f"a{k}",
            "activity": rng.choice(NAMES[:5]),
            "points": rng.choice([1, 3, -2, 0.7, 10, -15]),
        }
        if rng.random() < 0.6:
            rule["daily_cap"] = rng.choice([1, 2.5, 5, 7])
        decay = {}
        if rng.random() < 0.6:
            decay["half_life_days"] = rng.choice([1, 3.5, 7, 30])
        if rng.random() < 0.5:
            decay["window_days"] = rng.choice([1, 7, 60])
        if decay:
            rule["decay"] = decay
        if rng.random() < 0.4:
            rule["where"] = rng.choice(WHERE)
        activities.append(rule)
    return make_spec(
        features=AGGREGATES,
        fit={
            "cap": cap,
            "rules": [
                {"id": "f1", "when": {"field": "visits", "op": "gte", "value": 3}, "points": 12},
                {"id": "f2", "when": {"field": "job", "op": "exists", "value": False}, "points": -6},
                {
                    "id": "f3",
                    "when": {
                        "any": [{"field": "pv7", "op": "gte", "value": 3}, {"field": "since", "op": "lt", "value": 1}]
                    },
                    "points": 4,
                },
            ],
        },
        engagement={
            "cap": cap,
            "rules": [
                {"id": "e1", "when": {"field": "spend", "op": "gt", "value": 2}, "points": 5},
                {
                    "id": "e2",
                    "when": {
                        "all": [
                            {"field": "since_form", "op": "lte", "value": 10},
                            {"field": "pv", "op": "gte", "value": 2},
                        ]
                    },
                    "points": -3,
                },
            ],
            "activities": activities,
        },
        total_cap=rng.choice([{}, {"min": -4, "max": 9}]),
        model_features=("visits", "job"),
    )


def corpus(x_education: PipelineSpec) -> list[tuple[CompiledPipeline, LeadProfile, datetime]]:
    rng = random.Random(20261122)
    cases = []
    pipeline = compile_pipeline(x_education, weighted_artifact(x_education, rng))
    for _ in range(600):
        now = NOW + timedelta(seconds=rng.randint(-30 * 86_400, 30 * 86_400))
        traits = {name: rng.choice(TRAIT_VALUES) for name in rng.sample(X_EDUCATION_TRAITS, rng.randint(0, 9))}
        cases.append((pipeline, LeadProfile(traits, random_activities(rng, now)), now))
    for _ in range(12):
        spec = aggregate_spec(rng)
        pipeline = compile_pipeline(spec, weighted_artifact(spec, rng))
        for _ in range(60):
            now = NOW + timedelta(seconds=rng.randint(-30 * 86_400, 30 * 86_400))
            traits = {"visits": rng.choice(TRAIT_VALUES), "job": rng.choice(TRAIT_VALUES)}
            cases.append((pipeline, LeadProfile(traits, random_activities(rng, now)), now))
    return cases


def corpus_sha256(x_education: PipelineSpec) -> str:
    digest = hashlib.sha256()
    for pipeline, profile, now in corpus(x_education):
        digest.update(json.dumps(pipeline.score(profile, now=now).to_dict(), sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def test_scores_are_bit_identical_to_the_reference_implementation(spec: PipelineSpec) -> None:
    assert corpus_sha256(spec) == GOLDEN


def test_fast_digest_equals_the_generic_digest(spec: PipelineSpec) -> None:
    from scoring.features import timed_activities

    for pipeline, profile, now in corpus(spec)[::7]:
        timed = timed_activities(profile.activities, now)
        values = pipeline.resolver.resolve_traits(profile.traits)
        pipeline.resolver.resolve_aggregates(timed, values)
        totals = pipeline.rules.evaluate(values, timed).activity_totals
        assert pipeline.score(profile, now=now).inputs_digest == inputs_digest(values, totals)


def test_scores_carry_every_dataclass_field(pipeline: CompiledPipeline, rows: list[dict[str, str]]) -> None:
    score = pipeline.score(LeadProfile(rows[0], [Activity("Page Viewed", NOW, {"url": "/pricing"})]), now=NOW)
    assert set(vars(score)) == {f.name for f in dataclasses.fields(Score)}
    assert set(vars(score.explanation)) == {f.name for f in dataclasses.fields(Explanation)}
    assert score == dataclasses.replace(score)
