"""Threshold policies, table-driven: validation, segments, forward-only stages, demotion with hysteresis."""

from __future__ import annotations

from typing import Any

import pytest

from scoring.errors import SpecInvalid
from scoring.thresholds import compile_policy, load_policy

POLICY: dict[str, Any] = {
    "name": "p",
    "default": {
        "mql": {"all": [{"field": "fit", "op": "gte", "value": 30}, {"field": "engagement", "op": "gte", "value": 50}]},
        "sql": {"field": "score", "op": "gte", "value": 75},
    },
    "segments": [
        {
            "name": "enterprise",
            "when": {"field": "company_size", "op": "gte", "value": 1000},
            "mql": {"field": "score", "op": "gte", "value": 60},
        },
        {
            "name": "students",
            "when": {"field": "occupation", "op": "eq", "value": "Student"},
            "mql": {"field": "grade", "op": "in", "value": ["A1", "A2"]},
        },
    ],
    "hysteresis": {"score": 5, "fit": 5, "engagement": 5},
}


def values(
    score: float = 0, fit: float = 0, engagement: float = 0, probability: float = 0, grade: str = "D4"
) -> dict[str, Any]:
    return {
        "score": float(score),
        "fit": float(fit),
        "engagement": float(engagement),
        "probability": float(probability),
        "grade": grade,
    }


@pytest.mark.parametrize(
    ("stage", "score_values", "traits", "expected"),
    [
        # default segment: fit and engagement for MQL, score for SQL
        ("lead", values(fit=30, engagement=50), {}, ("mql", "default")),
        ("lead", values(fit=29.9, engagement=90), {}, None),
        ("lead", values(score=80, fit=0, engagement=0), {}, ("sql", "default")),
        ("lead", values(score=80, fit=40, engagement=60), {}, ("sql", "default")),  # highest stage wins
        ("subscriber", values(fit=30, engagement=50), {}, ("mql", "default")),
        ("mql", values(score=75), {}, ("sql", "default")),
        ("mql", values(fit=30, engagement=50), {}, None),  # already there
        # forward only: falling below the line changes nothing without allow_demotion
        ("sql", values(), {}, None),
        ("mql", values(), {}, None),
        # the policy never touches the CRM's and ops' stages
        ("opportunity", values(score=100), {}, None),
        ("customer", values(score=100), {}, None),
        ("disqualified", values(score=100, fit=100, engagement=100), {}, None),
        # recycled leads re-enter when they qualify again
        ("recycled", values(fit=35, engagement=55), {}, ("mql", "default")),
        ("recycled", values(fit=10), {}, None),
        # segments: first match wins; traits are coerced to the literal's type
        ("lead", values(score=60), {"company_size": "1500"}, ("mql", "enterprise")),
        ("lead", values(score=59.99), {"company_size": 1500}, None),
        ("lead", values(score=80), {"company_size": "1500"}, ("mql", "enterprise")),  # no SQL line here
        ("lead", values(score=60), {"company_size": "12"}, None),
        ("lead", values(grade="A2"), {"occupation": "Student"}, ("mql", "students")),
        ("lead", values(score=60, grade="A2"), {"occupation": "Student", "company_size": 5000}, ("mql", "enterprise")),
    ],
)
def test_decide(
    stage: str, score_values: dict[str, Any], traits: dict[str, Any], expected: tuple[str, str] | None
) -> None:
    decision = compile_policy(load_policy(POLICY)).decide(stage, score_values, traits)
    assert (None if decision is None else (decision.stage, decision.segment)) == expected


DEMOTING = {**POLICY, "allow_demotion": True}


@pytest.mark.parametrize(
    ("stage", "score_values", "expected"),
    [
        # MQL entered at fit >= 30 and engagement >= 50; kept down to 25 / 45 (margins of 5)
        ("mql", values(fit=26, engagement=46), None),
        ("mql", values(fit=25, engagement=45), None),
        ("mql", values(fit=24.9, engagement=60), "lead"),
        ("mql", values(fit=40, engagement=44), "lead"),
        # SQL entered at score >= 75, kept down to 70; below that, MQL if its loosened line holds
        ("sql", values(score=71), None),
        ("sql", values(score=69, fit=26, engagement=46), "mql"),
        ("sql", values(score=69), "lead"),
        # never demoted below lead, nor out of stages the policy does not own
        ("lead", values(), None),
        ("subscriber", values(), None),
        ("opportunity", values(), None),
    ],
)
def test_demotion_uses_the_hysteresis_margins(stage: str, score_values: dict[str, Any], expected: str | None) -> None:
    decision = compile_policy(load_policy(DEMOTING)).decide(stage, score_values, {})
    assert (decision.stage if decision else None) == expected


def test_a_lead_hovering_at_the_line_does_not_flap() -> None:
    policy = compile_policy(load_policy(DEMOTING))
    stage, moves = "lead", []
    for score in (74, 75, 74, 73, 76, 72, 75, 71, 74, 69, 73, 74, 75):
        decision = policy.decide(stage, values(score=score), {})
        if decision is not None:
            moves.append((score, stage, decision.stage))
            stage = decision.stage
    # In at 75, out only below 70, in again at 75.
    assert moves == [(75, "lead", "sql"), (69, "sql", "lead"), (75, "lead", "sql")]


def test_without_margins_it_would_flap() -> None:
    policy = compile_policy(load_policy({**DEMOTING, "hysteresis": {}}))
    stage, moves = "lead", 0
    for score in (74, 75, 74, 75, 74):
        decision = policy.decide(stage, values(score=score), {})
        if decision is not None:
            moves += 1
            stage = decision.stage
    assert moves == 4


@pytest.mark.parametrize(
    ("change", "loc", "message"),
    [
        (
            {"default": {"mql": {"field": "visits", "op": "gte", "value": 1}}},
            "default.mql.field",
            "unknown score field 'visits'",
        ),
        (
            {"default": {"mql": {"field": "grade", "op": "gte", "value": 1}}},
            "default.mql.op",
            "not allowed on category",
        ),
        ({"default": {"mql": {"field": "score", "op": "eq", "value": "high"}}}, "default.mql.value", "is not a number"),
        (
            {
                "default": {
                    "mql": {"field": "score", "op": "gte", "value": 1},
                    "sql": {"any": [{"field": "fit", "op": "gt", "value": 1}, {"field": "x", "op": "gt", "value": 1}]},
                }
            },
            "default.sql.any[1].field",
            "unknown score field 'x'",
        ),
        ({"segments": [POLICY["segments"][0], POLICY["segments"][0]]}, "segments[1].name", "duplicate segment name"),
        (
            {"segments": [{**POLICY["segments"][0], "name": "default"}]},
            "segments[0].name",
            "names the policy's default",
        ),
        ({"hysteresis": {"score": -1}}, "hysteresis.score", "greater than or equal to 0"),
        ({"threshold": 5}, "threshold", "Extra inputs are not permitted"),
        ({"default": {}}, "default.mql", "Field required"),
    ],
)
def test_invalid_policies_name_the_field(change: dict[str, Any], loc: str, message: str) -> None:
    with pytest.raises(SpecInvalid) as caught:
        load_policy({**POLICY, **change})
    assert any(e["loc"] == loc and message in e["msg"] for e in caught.value.errors), caught.value.errors


def test_policy_is_immutable_and_round_trips() -> None:
    spec = load_policy(POLICY)
    assert load_policy(spec.model_dump(mode="json")) == spec
    with pytest.raises(Exception, match="frozen"):
        spec.allow_demotion = True  # type: ignore[misc]
