"""Property tests: any profile scores in range, and activity order never matters."""

from __future__ import annotations

import json
import math
from datetime import UTC, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scoring.pipeline import CompiledPipeline
from scoring.profile import Activity, LeadProfile
from tests.scoring.conftest import NOW, compiled, make_spec

# No example database: it would write a .hypothesis/ folder into the repository.
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

TRAITS = [
    "Lead Origin",
    "Lead Source",
    "Do Not Email",
    "Do Not Call",
    "TotalVisits",
    "Total Time Spent on Website",
    "Page Views Per Visit",
    "Country",
    "Specialization",
    "What is your current occupation",
    "City",
    "A free copy of Mastering The Interview",
]
KNOWN_VALUES = [
    "API",
    "Landing Page Submission",
    "Lead Add Form",
    "Google",
    "Reference",
    "Yes",
    "No",
    "Working Professional",
    "Unemployed",
    "Student",
    "India",
    "Select",
    "Mumbai",
    "0",
    "5",
    "1200",
    "2.5",
]

raw_values = st.one_of(
    st.sampled_from(KNOWN_VALUES),
    st.text(max_size=12),
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e4, max_value=1e4).map(repr),
)
traits = st.dictionaries(st.sampled_from(TRAITS), raw_values, max_size=len(TRAITS))
zones = st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))])
properties = st.dictionaries(
    st.sampled_from(["url", "amount", "plan"]),
    st.one_of(st.sampled_from(["/pricing", "/pricing/team", "/blog", "3", ""]), st.integers(-5, 500), st.none()),
    max_size=3,
)
activities = st.lists(
    st.builds(
        lambda name, seconds, zone, props: Activity(name, (NOW + timedelta(seconds=seconds)).astimezone(zone), props),
        st.sampled_from(["Page Viewed", "Form Submitted", "Email Opened", "Unsubscribed", "Webinar"]),
        st.integers(min_value=-400 * 86_400, max_value=2 * 86_400),
        zones,
        properties,
    ),
    max_size=25,
)


def check_ranges(score: Any) -> None:
    assert 0.0 <= score.value <= 100.0
    assert 0.0 <= score.probability <= 1.0
    assert math.isfinite(score.fit)
    assert math.isfinite(score.engagement)
    data = score.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data


@PROPERTY_SETTINGS
@given(traits=traits, acts=activities, data=st.data())
def test_x_education_scores_in_range_and_order_free(
    pipeline: CompiledPipeline, traits: dict[str, Any], acts: list[Activity], data: st.DataObject
) -> None:
    score = pipeline.score(LeadProfile(traits, acts), now=NOW)
    check_ranges(score)
    shuffled = data.draw(st.permutations(acts))
    assert pipeline.score(LeadProfile(traits, shuffled), now=NOW) == score


ALWAYS = {"field": "visits", "op": "exists", "value": False}


@PROPERTY_SETTINGS
@given(
    probability=st.floats(min_value=1e-6, max_value=1 - 1e-6),
    fit_points=st.lists(st.floats(-1e3, 1e3), max_size=5),
    activity_points=st.floats(-1e3, 1e3),
    weights=st.tuples(st.floats(0, 5), st.floats(-5, 5), st.floats(-5, 5), st.floats(-500, 500)),
    cap=st.tuples(st.none() | st.floats(-100, 0), st.none() | st.floats(0, 100)),
    acts=activities,
    data=st.data(),
)
def test_any_weights_and_caps_stay_in_range(
    probability: float,
    fit_points: list[float],
    activity_points: float,
    weights: tuple[float, float, float, float],
    cap: tuple[float | None, float | None],
    acts: list[Activity],
    data: st.DataObject,
) -> None:
    bounds = {k: v for k, v in (("min", cap[0]), ("max", cap[1])) if v is not None}
    spec = make_spec(
        fit={"cap": bounds, "rules": [{"id": f"f{i}", "when": ALWAYS, "points": p} for i, p in enumerate(fit_points)]},
        engagement={
            "cap": bounds,
            "activities": [
                {
                    "id": "pv",
                    "activity": "Page Viewed",
                    "points": activity_points,
                    "daily_cap": 7,
                    "decay": {"half_life_days": 3},
                },
                {
                    "id": "fs",
                    "activity": "Form Submitted",
                    "points": activity_points,
                    "where": {"field": "url", "op": "contains", "value": "pricing"},
                    "decay": {"window_days": 30},
                },
            ],
        },
        total_cap=bounds,
        combine={
            "model_weight": weights[0],
            "fit_weight": weights[1],
            "engagement_weight": weights[2],
            "offset": weights[3],
        },
    )
    pipeline = compiled(spec, probability)
    score = pipeline.score(LeadProfile({}, acts), now=NOW)
    check_ranges(score)
    if cap[1] is not None:
        assert max(score.fit, score.engagement) <= cap[1]
    if cap[0] is not None:
        assert min(score.fit, score.engagement) >= cap[0]
    shuffled = data.draw(st.permutations(acts))
    assert pipeline.score(LeadProfile({}, shuffled), now=NOW) == score
