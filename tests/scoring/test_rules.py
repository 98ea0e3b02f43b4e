"""Rule semantics, table-driven: every operator, nesting, caps, decay, daily caps, property conditions.

Condition tests run both compiled forms (per-lead closures and numpy column masks) and require
them to agree with the expected answer.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from scoring.features import FeatureResolver, timed_activities
from scoring.profile import Activity
from scoring.rules import RuleEvaluation, RuleSet
from scoring.spec import PipelineSpec
from tests.scoring.conftest import NOW, boolean, category, make_spec, number

FEATURES = [
    number("visits"),
    category("job", missing=["Select"]),
    boolean("optin"),
    number("capped", source="capped", clip={"min": 0, "max": 10}),
]

MISSING = object()  # the trait is absent from the row


def fires(leaf: dict[str, Any], raw: Any, trait: str) -> tuple[bool, bool]:
    spec = make_spec(features=FEATURES, fit={"rules": [{"id": "r", "when": leaf, "points": 1}]})
    traits = {} if raw is MISSING else {trait: raw}
    resolver, rules = FeatureResolver(spec), RuleSet(spec)
    per_lead = rules.evaluate(resolver.resolve_traits(traits)).fit == 1.0
    fit, _, hits = rules.evaluate_columns(resolver.resolve_columns([traits]))
    assert bool(hits[0, 0]) == (fit[0] == 1.0)
    return per_lead, bool(fit[0] == 1.0)


OPERATOR_CASES: list[tuple[str, str, Any, Any, bool]] = [
    # feature, op, value, raw trait, expected
    ("visits", "eq", 5, "5", True),
    ("visits", "eq", 5, " 5.0 ", True),
    ("visits", "eq", 5, 5, True),
    ("visits", "eq", 5, "6", False),
    ("visits", "eq", 5, "", False),
    ("visits", "eq", 5, MISSING, False),
    ("visits", "ne", 5, "6", True),
    ("visits", "ne", 5, "5", False),
    ("visits", "ne", 5, "", True),  # ne is exactly "not eq": missing is not equal
    ("visits", "in", [1, 2], "2", True),
    ("visits", "in", [1, 2], "3", False),
    ("visits", "in", [1, 2], None, False),
    ("visits", "not_in", [1, 2], "3", True),
    ("visits", "not_in", [1, 2], "1", False),
    ("visits", "not_in", [1, 2], MISSING, True),
    ("visits", "gt", 5, "6", True),
    ("visits", "gt", 5, "5", False),
    ("visits", "gt", 5, "", False),
    ("visits", "gt", 5, "lots", False),  # unparseable -> missing
    ("visits", "gt", 5, "inf", False),  # non-finite -> missing
    ("visits", "gte", 5, "5", True),
    ("visits", "gte", 5, "4.99", False),
    ("visits", "lt", 5, "4", True),
    ("visits", "lt", 5, "5", False),
    ("visits", "lt", 5, MISSING, False),
    ("visits", "lte", 5, "5", True),
    ("visits", "lte", 5, "5.01", False),
    ("visits", "lte", 5, True, True),  # booleans read as 1/0
    ("visits", "exists", True, "0", True),
    ("visits", "exists", True, "", False),
    ("visits", "exists", None, "3", True),  # exists defaults to true
    ("visits", "exists", False, MISSING, True),
    ("visits", "exists", False, "3", False),
    ("capped", "eq", 10, "50", True),  # clipped before rules see it
    ("capped", "gt", 9, "50", True),
    ("capped", "eq", 0, "-3", True),
    ("job", "eq", "Pro", "Pro", True),
    ("job", "eq", "Pro", "  Pro ", True),
    ("job", "eq", "Pro", "pro", False),  # case-sensitive
    ("job", "eq", "Pro", "Select", False),  # missing marker
    ("job", "eq", "5", 5, True),  # non-strings become strings
    ("job", "eq", "true", True, True),
    ("job", "ne", "Pro", "Amateur", True),
    ("job", "ne", "Pro", "Pro", False),
    ("job", "ne", "Pro", "Select", True),
    ("job", "in", ["A", "B"], "B", True),
    ("job", "in", ["A", "B"], "C", False),
    ("job", "in", ["A", "B"], MISSING, False),
    ("job", "not_in", ["A", "B"], "C", True),
    ("job", "not_in", ["A", "B"], "A", False),
    ("job", "not_in", ["A", "B"], "Select", True),
    ("job", "contains", "ro", "Pro", True),
    ("job", "contains", "ro", "Amateur", False),
    ("job", "contains", "ro", MISSING, False),
    ("job", "exists", True, "Select", False),
    ("job", "exists", True, "X", True),
    ("job", "exists", False, "Select", True),
    ("job", "exists", False, "", True),
    ("optin", "eq", True, "Yes", True),
    ("optin", "eq", True, "yes", True),
    ("optin", "eq", True, "1", True),
    ("optin", "eq", True, 1, True),
    ("optin", "eq", True, True, True),
    ("optin", "eq", True, "No", False),
    ("optin", "eq", True, "", False),
    ("optin", "eq", True, "maybe", False),  # unrecognised -> missing
    ("optin", "eq", False, "No", True),
    ("optin", "eq", False, MISSING, False),
    ("optin", "ne", True, "No", True),
    ("optin", "ne", True, "", True),
    ("optin", "ne", True, "Yes", False),
    ("optin", "exists", True, "No", True),
    ("optin", "exists", True, "", False),
]


@pytest.mark.parametrize(("feature", "op", "value", "raw", "expected"), OPERATOR_CASES)
def test_operator(feature: str, op: str, value: Any, raw: Any, expected: bool) -> None:
    leaf: dict[str, Any] = {"field": feature, "op": op}
    if value is not None:
        leaf["value"] = value
    trait = feature
    assert fires(leaf, raw, trait) == (expected, expected)


def test_every_operator_is_covered() -> None:
    from typing import get_args

    from scoring.spec import Op

    assert {case[1] for case in OPERATOR_CASES} == set(get_args(Op))


A = {"field": "visits", "op": "gte", "value": 3}
B = {"field": "job", "op": "eq", "value": "Pro"}
C = {"field": "optin", "op": "eq", "value": True}


@pytest.mark.parametrize(
    ("condition", "traits", "expected"),
    [
        ({"all": [A, B]}, {"visits": "3", "job": "Pro"}, True),
        ({"all": [A, B]}, {"visits": "3", "job": "Amateur"}, False),
        ({"all": [A]}, {"visits": "1"}, False),
        ({"any": [A, B]}, {"visits": "1", "job": "Pro"}, True),
        ({"any": [A, B]}, {"visits": "1", "job": "Amateur"}, False),
        ({"any": [A, B]}, {}, False),
        ({"all": [A, {"any": [B, C]}]}, {"visits": "4", "optin": "Yes"}, True),
        ({"all": [A, {"any": [B, C]}]}, {"visits": "4", "optin": "No"}, False),
        (
            {"any": [{"all": [A, B]}, {"all": [C, {"field": "job", "op": "exists", "value": False}]}]},
            {"optin": "Yes", "job": "Select"},
            True,
        ),
        (
            {"any": [{"all": [A, B]}, {"all": [C, {"field": "job", "op": "exists", "value": False}]}]},
            {"optin": "Yes", "job": "Pro"},
            False,
        ),
        ({"all": [{"any": [{"all": [A, {"any": [B]}]}]}]}, {"visits": "9", "job": "Pro"}, True),
    ],
)
def test_nesting(condition: dict[str, Any], traits: dict[str, Any], expected: bool) -> None:
    spec = make_spec(features=FEATURES, fit={"rules": [{"id": "r", "when": condition, "points": 1}]})
    resolver, rules = FeatureResolver(spec), RuleSet(spec)
    assert (rules.evaluate(resolver.resolve_traits(traits)).fit == 1.0) is expected
    fit, _, _ = rules.evaluate_columns(resolver.resolve_columns([traits]))
    assert bool(fit[0] == 1.0) is expected


ALWAYS = {"field": "visits", "op": "exists", "value": False}  # fires on an empty profile


def evaluate_points(points: list[float], cap: dict[str, float] | None) -> RuleEvaluation:
    group: dict[str, Any] = {"rules": [{"id": f"r{i}", "when": ALWAYS, "points": p} for i, p in enumerate(points)]}
    if cap is not None:
        group["cap"] = cap
    spec = make_spec(features=FEATURES, fit=group)
    return RuleSet(spec).evaluate(FeatureResolver(spec).resolve_traits({}))


@pytest.mark.parametrize(
    ("points", "cap", "total", "awarded", "capped"),
    [
        ([10, 15, -5], None, 20, [10, 15, -5], [False, False, False]),
        ([10, 15, -5], {"max": 30}, 20, [10, 15, -5], [False, False, False]),
        ([10, 15, -5], {"max": 20}, 20, [10, 15, -5], [False, False, False]),  # exactly at the cap
        # max binds: the positive rules share the cut in proportion, negatives untouched
        ([10, 15, -5], {"max": 12}, 12, [6.8, 10.2, -5], [True, True, False]),
        ([10, 15, -5], {"max": 0}, 0, [2, 3, -5], [True, True, False]),
        # min binds: the negative rules share the cut
        ([-10, -6, 4], {"min": -8}, -8, [-7.5, -4.5, 4], [True, True, False]),
        ([-10, -6, 4], {"min": -8, "max": 1}, -8, [-7.5, -4.5, 4], [True, True, False]),
        ([-10], {"min": 0}, 0, [0], [True]),
        ([], {"min": -5, "max": 5}, 0, [], []),
    ],
)
def test_group_caps(
    points: list[float], cap: dict[str, float] | None, total: float, awarded: list[float], capped: list[bool]
) -> None:
    result = evaluate_points(points, cap)
    assert result.fit == total
    assert [h.awarded for h in result.hits] == pytest.approx(awarded, abs=1e-12)
    assert [h.capped for h in result.hits] == capped
    assert [h.points for h in result.hits] == points
    assert sum(h.awarded for h in result.hits) == pytest.approx(total, abs=1e-12)


def test_group_caps_column_path_matches() -> None:
    for points, cap in [([10, 15, -5], {"max": 12.0}), ([-10, -6, 4], {"min": -8.0})]:
        group: dict[str, Any] = {
            "cap": cap,
            "rules": [{"id": f"r{i}", "when": ALWAYS, "points": p} for i, p in enumerate(points)],
        }
        spec = make_spec(
            features=FEATURES,
            fit=group,
            engagement=group | {"rules": [{"id": f"e{i}", "when": ALWAYS, "points": p} for i, p in enumerate(points)]},
        )
        resolver, rules = FeatureResolver(spec), RuleSet(spec)
        per_lead = rules.evaluate(resolver.resolve_traits({}))
        fit, engagement, hits = rules.evaluate_columns(resolver.resolve_columns([{}]))
        assert (fit[0], engagement[0]) == (per_lead.fit, per_lead.engagement)
        assert hits.all()


# ----------------------------------------------------------------------------- activity rules


def activity_spec(**rule: Any) -> PipelineSpec:
    body = {"id": "act", "activity": "Page Viewed", "points": 8} | rule
    return make_spec(features=FEATURES, engagement={"activities": [body]})


def activity_points(spec: PipelineSpec, activities: list[Activity], now: datetime = NOW) -> RuleEvaluation:
    resolver = FeatureResolver(spec)
    return RuleSet(spec).evaluate(resolver.resolve_traits({}), timed_activities(activities, now))


def viewed(at: datetime, **props: Any) -> Activity:
    return Activity("Page Viewed", at, props)


@pytest.mark.parametrize(
    ("decay", "age", "expected"),
    [
        (None, timedelta(days=400), 8.0),
        ({"half_life_days": 7}, timedelta(0), 8.0),
        ({"half_life_days": 7}, timedelta(days=7), 4.0),
        ({"half_life_days": 7}, timedelta(days=14), 2.0),
        ({"half_life_days": 7}, timedelta(days=3.5), 8.0 * 0.5**0.5),
        ({"half_life_days": 7}, -timedelta(days=2), 8.0),  # dated after now: age 0
        ({"window_days": 30}, timedelta(days=29, hours=23), 8.0),
        ({"window_days": 30}, timedelta(days=30), 8.0),
        ({"window_days": 30}, timedelta(days=30, seconds=1), None),  # outside: no hit at all
        ({"half_life_days": 10, "window_days": 20}, timedelta(days=10), 4.0),
        ({"half_life_days": 10, "window_days": 20}, timedelta(days=25), None),
    ],
)
def test_decay(decay: dict[str, float] | None, age: timedelta, expected: float | None) -> None:
    spec = activity_spec(**({"decay": decay} if decay else {}))
    result = activity_points(spec, [viewed(NOW - age)])
    if expected is None:
        assert result.hits == ()
        assert result.engagement == 0.0
    else:
        assert result.engagement == pytest.approx(expected, rel=1e-12)
        assert result.hits[0].kind == "activity"
        assert result.hits[0].occurrences == 1


H = timedelta(hours=1)
DAY = timedelta(days=1)


@pytest.mark.parametrize(
    ("points", "daily_cap", "offsets", "expected", "daily_capped"),
    [
        (2, 5, [H, 2 * H], 4, False),
        (2, 5, [H, 2 * H, 3 * H], 5, True),  # 2 + 2 + 1
        (2, 5, [H, 2 * H, 3 * H, 4 * H, 5 * H], 5, True),
        (2, 5, [H, 2 * H, 3 * H, DAY, DAY + H, DAY + 2 * H], 10, True),  # two UTC days, cap each
        (2, 4, [H, DAY + H, 2 * DAY + H], 6, False),
        (-15, 10, [H, 2 * H], -10, True),  # negative points: the cap bounds their size
        (3, None, [H] * 7, 21, False),
    ],
)
def test_daily_cap(
    points: float, daily_cap: float | None, offsets: list[timedelta], expected: float, daily_capped: bool
) -> None:
    spec = activity_spec(points=points, **({"daily_cap": daily_cap} if daily_cap else {}))
    result = activity_points(spec, [viewed(NOW - o) for o in offsets])  # NOW is 09:00 UTC
    assert result.engagement == pytest.approx(expected)
    assert result.hits[0].daily_capped is daily_capped
    assert result.hits[0].occurrences == len(offsets)


def test_daily_cap_keeps_the_most_recent_occurrences_with_decay() -> None:
    spec = activity_spec(points=2, daily_cap=5, decay={"half_life_days": 1})
    result = activity_points(spec, [viewed(NOW - 3 * H), viewed(NOW - H), viewed(NOW - 2 * H)])
    expected = 2 * 0.5 ** (1 / 24) + 2 * 0.5 ** (2 / 24) + 1 * 0.5 ** (3 / 24)
    assert result.engagement == pytest.approx(expected, rel=1e-12)


def test_daily_cap_days_are_utc_days() -> None:
    spec = activity_spec(points=4, daily_cap=5)
    plus_two = timezone(timedelta(hours=2))
    # 00:30 at +02:00 on the 23rd is 22:30 UTC on the 22nd: same UTC day as 23:00 UTC on the 22nd.
    late_utc = viewed(datetime(2026, 11, 22, 23, 0, tzinfo=UTC))
    same_day = [viewed(datetime(2026, 11, 23, 0, 30, tzinfo=plus_two)), late_utc]
    assert activity_points(spec, same_day).engagement == 5
    other_day = [viewed(datetime(2026, 11, 23, 2, 30, tzinfo=plus_two)), late_utc]
    assert activity_points(spec, other_day).engagement == 8


@pytest.mark.parametrize(
    ("where", "props", "expected"),
    [
        ({"field": "url", "op": "contains", "value": "/pricing"}, {"url": "/pricing/team"}, True),
        ({"field": "url", "op": "contains", "value": "/pricing"}, {"url": "/about"}, False),
        ({"field": "url", "op": "contains", "value": "/pricing"}, {}, False),
        ({"field": "tags", "op": "contains", "value": "vip"}, {"tags": ["new", "vip"]}, True),
        ({"field": "amount", "op": "gt", "value": 100}, {"amount": "150"}, True),
        ({"field": "amount", "op": "gt", "value": 100}, {"amount": 150}, True),
        ({"field": "amount", "op": "gt", "value": 100}, {"amount": "abc"}, False),
        ({"field": "amount", "op": "lte", "value": 100}, {"amount": 100}, True),
        ({"field": "paid", "op": "eq", "value": True}, {"paid": "yes"}, True),
        ({"field": "paid", "op": "eq", "value": True}, {"paid": "no"}, False),
        ({"field": "step", "op": "eq", "value": 3}, {"step": "3.0"}, True),
        ({"field": "plan", "op": "eq", "value": "pro"}, {"plan": "pro"}, True),
        ({"field": "plan", "op": "ne", "value": "pro"}, {"plan": "free"}, True),
        ({"field": "plan", "op": "ne", "value": "pro"}, {}, True),
        ({"field": "plan", "op": "in", "value": ["pro", "team"]}, {"plan": "team"}, True),
        ({"field": "plan", "op": "not_in", "value": ["pro", "team"]}, {"plan": "team"}, False),
        ({"field": "plan", "op": "exists"}, {"plan": ""}, False),
        ({"field": "plan", "op": "exists", "value": False}, {}, True),
        (
            {"all": [{"field": "plan", "op": "eq", "value": "pro"}, {"field": "seats", "op": "gte", "value": 5}]},
            {"plan": "pro", "seats": 7},
            True,
        ),
        (
            {"any": [{"field": "plan", "op": "eq", "value": "pro"}, {"field": "seats", "op": "gte", "value": 5}]},
            {"plan": "free", "seats": 2},
            False,
        ),
    ],
)
def test_activity_property_conditions(where: dict[str, Any], props: dict[str, Any], expected: bool) -> None:
    spec = activity_spec(where=where)
    result = activity_points(spec, [viewed(NOW - H, **props)])
    assert (result.engagement == 8.0) is expected


def test_activity_rules_only_match_their_activity() -> None:
    spec = activity_spec()
    result = activity_points(spec, [Activity("Email Opened", NOW - H, {})])
    assert result.hits == ()


def test_activity_points_are_capped_with_the_engagement_group() -> None:
    spec = make_spec(
        features=FEATURES,
        engagement={
            "cap": {"max": 10},
            "rules": [{"id": "cond", "when": ALWAYS, "points": 6}],
            "activities": [{"id": "act", "activity": "Page Viewed", "points": 3}],
        },
    )
    result = activity_points(spec, [viewed(NOW - H), viewed(NOW - 2 * H)])
    assert result.engagement == 10
    assert [(h.rule_id, h.points, h.capped) for h in result.hits] == [("cond", 6, True), ("act", 6, True)]
    assert sum(h.awarded for h in result.hits) == pytest.approx(10)
    assert result.activity_totals == {"act": (2, 6.0)}
