"""Model evaluation maths: metrics and calibration against hand-computed figures, score bands, the
monotonicity check and drift warnings."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from scoring.evaluation import (
    GRADES,
    band_edges,
    band_label,
    band_of,
    calibration_table,
    classification_metrics,
    drift_warnings,
    inversions,
)

LABELS = [1, 0, 1, 1, 0, 0, 1, 0]
PROBS = [0.9, 0.8, 0.7, 0.35, 0.35, 0.1, 0.05, 1.0]


def pairwise_auc(labels: Sequence[int], probs: Sequence[float]) -> float:
    """Share of (positive, negative) pairs ranked right, ties counting half (Mann-Whitney)."""
    pos = [p for p, y in zip(probs, labels, strict=True) if y]
    neg = [p for p, y in zip(probs, labels, strict=True) if not y]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg)
    return wins / (len(pos) * len(neg))


def test_metrics_match_their_definitions() -> None:
    figures = classification_metrics(LABELS, PROBS)
    # Pairs: 0.9 beats 0.8, 0.35, 0.1 (3); 0.7 beats 0.35, 0.1 (2); 0.35 ties 0.35, beats 0.1 (1.5); 0.05 none.
    assert figures["roc_auc"] == pytest.approx(6.5 / 16) == pytest.approx(pairwise_auc(LABELS, PROBS))
    assert figures["brier"] == pytest.approx(sum((p - y) ** 2 for p, y in zip(PROBS, LABELS, strict=True)) / 8)
    eps = 2.220446049250313e-16  # p = 1.0 for a negative is clipped, not infinite
    expected_log_loss = (
        -sum(
            math.log(min(max(p, eps), 1 - eps)) if y else math.log(1 - min(max(p, eps), 1 - eps))
            for p, y in zip(PROBS, LABELS, strict=True)
        )
        / 8
    )
    assert figures["log_loss"] == pytest.approx(expected_log_loss, rel=1e-6)
    assert 0 < figures["pr_auc"] <= 1


def test_calibration_bins_are_half_open_and_one_is_in_the_last() -> None:
    table = calibration_table(LABELS, PROBS)
    assert [row["bin"] for row in table] == list(range(10))
    counts = {row["bin"]: row["count"] for row in table}
    assert counts == {0: 1, 1: 1, 2: 0, 3: 2, 4: 0, 5: 0, 6: 0, 7: 1, 8: 1, 9: 2}
    last = table[9]
    assert (last["lower"], last["upper"]) == (0.9, 1.0)
    assert last["mean_predicted"] == pytest.approx(0.95)
    assert last["observed_rate"] == 0.5
    assert table[2]["mean_predicted"] is None
    assert table[2]["observed_rate"] is None
    assert table[3]["observed_rate"] == 0.5


@pytest.mark.parametrize(
    ("edges", "width", "expected"),
    [
        (None, None, (0, 20, 40, 60, 80, 100)),
        ([0, 25, 50, 75, 100], None, (0, 25, 50, 75, 100)),
        ([0, 12.5, 100], None, (0, 12.5, 100)),
        (None, 25, (0, 25, 50, 75, 100)),
        (None, 30, (0, 30, 60, 90, 100)),
        (None, 100, (0, 100)),
        (None, 1, tuple(range(101))),
    ],
)
def test_band_edges(edges: list[float] | None, width: float | None, expected: tuple[float, ...]) -> None:
    assert band_edges(edges, width=width) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("edges", "width", "message"),
    [
        ([0, 50, 100], 10, "not both"),
        ([0], None, "at least two"),
        ([10, 50, 100], None, "start at 0"),
        ([0, 50, 90], None, "end at 100"),
        ([0, 50, 50, 100], None, "strictly increasing"),
        ([0, 60, 40, 100], None, "strictly increasing"),
        ([0, math.nan, 100], None, "finite"),
        (list(range(0, 101)) + [100.5], None, "at most 100"),
        (None, 0, "more than 0"),
        (None, -5, "more than 0"),
        (None, 101, "at most 100 points"),
        (None, math.inf, "more than 0"),
        (None, 0.5, "more than 100 bands"),
    ],
)
def test_bad_band_edges_are_refused(edges: list[float] | None, width: float | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        band_edges(edges, width=width)


@pytest.mark.parametrize(("score", "band"), [(0, 0), (19.99, 0), (20, 1), (79.99, 3), (80, 4), (99.5, 4), (100, 4)])
def test_bands_are_half_open_and_the_last_holds_100(score: float, band: int) -> None:
    assert band_of(score, band_edges()) == band


def test_band_labels_and_grades() -> None:
    assert [band_label(a, b) for a, b in [(0, 20), (12.5, 25.0)]] == ["0-20", "12.5-25"]
    assert GRADES[:5] == ("A1", "A2", "A3", "A4", "B1")
    assert GRADES[-1] == "D4"
    assert len(GRADES) == 16


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ([0.1, 0.2, 0.2, 0.5], []),
        ([0.1, None, 0.3, None, 0.9], []),
        ([0.1, 0.4, 0.3, 0.5], [(1, 2)]),
        ([0.5, None, 0.2, 0.1], [(0, 2), (2, 3)]),
        ([None, None], []),
    ],
)
def test_inversions_skip_bands_without_outcomes(rates: list[float | None], expected: list[tuple[int, int]]) -> None:
    assert inversions(rates) == expected


TRAINING = {"roc_auc": 0.90, "brier": 0.12}


@pytest.mark.parametrize(
    ("observed", "warned"),
    [
        ({"roc_auc": 0.86, "brier": 0.16}, []),
        ({"roc_auc": 0.849, "brier": 0.12}, ["roc_auc"]),
        ({"roc_auc": 0.95, "brier": 0.171}, ["brier"]),
        ({"roc_auc": 0.40, "brier": 0.40}, ["roc_auc", "brier"]),
    ],
)
def test_drift_beyond_the_tolerances(observed: dict[str, float], warned: list[str]) -> None:
    warnings = drift_warnings(observed, TRAINING, roc_auc_tolerance=0.05, brier_tolerance=0.05)
    assert [w.metric for w in warnings] == warned
    for w in warnings:
        assert (w.observed, w.training, w.tolerance) == (observed[w.metric], TRAINING[w.metric], 0.05)
        assert w.metric in w.detail


def test_no_drift_without_training_figures() -> None:
    assert drift_warnings({"roc_auc": 0.1, "brier": 0.9}, {}, roc_auc_tolerance=0.05, brier_tolerance=0.05) == []
