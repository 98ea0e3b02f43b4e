"""Lifecycle moves by ops and the CRM: forward freely, back only with a reason."""

from __future__ import annotations

import pytest

from scoring.lifecycle import InvalidTransition, check_move, rank


@pytest.mark.parametrize(
    ("current", "target", "backward"),
    [
        ("lead", "mql", False),
        ("subscriber", "customer", False),
        ("mql", "sql", False),
        ("sql", "opportunity", False),
        ("recycled", "mql", False),  # re-engaged
        ("recycled", "lead", False),
        ("sql", "mql", True),
        ("customer", "lead", True),
        ("mql", "disqualified", True),
        ("opportunity", "recycled", True),
        ("disqualified", "lead", True),
        ("disqualified", "recycled", True),
    ],
)
def test_direction(current: str, target: str, backward: bool) -> None:
    assert check_move(current, target, reason="r") is backward
    if backward:
        for reason in (None, "", "  "):
            with pytest.raises(InvalidTransition, match="needs a reason"):
                check_move(current, target, reason=reason)
    else:
        assert check_move(current, target, reason=None) is False


@pytest.mark.parametrize(
    ("current", "target", "message"),
    [("mql", "mql", "already in stage"), ("lead", "hot", "unknown stage"), ("cold", "lead", "unknown stage")],
)
def test_refused(current: str, target: str, message: str) -> None:
    with pytest.raises(InvalidTransition, match=message):
        check_move(current, target, reason="because")


def test_rank() -> None:
    assert [rank(s) for s in ("subscriber", "lead", "mql", "sql", "opportunity", "customer")] == list(range(6))
    assert rank("recycled") is None
    assert rank("disqualified") is None
