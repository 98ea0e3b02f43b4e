"""Measuring a scoring model against outcomes: the figures training reports on its hold-out and the
reports compute on live outcomes, from the same functions, plus the score bands and checks of the
score-band report.

Everything here is pure: labels (0/1), probabilities (0-1) and scores (points, 0-100) in, plain
values out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "GRADES",
    "DriftWarning",
    "band_edges",
    "band_label",
    "band_of",
    "calibration_table",
    "classification_metrics",
    "drift_warnings",
    "inversions",
]

# Fit letter (A best) then engagement digit (1 best): see `scoring.spec.Grades`.
GRADES: tuple[str, ...] = tuple(f"{letter}{digit}" for letter in "ABCD" for digit in "1234")
SCORE_MIN = 0.0
SCORE_MAX = 100.0
MAX_BANDS = 100


def classification_metrics(
    labels: Sequence[int] | npt.NDArray[Any], probabilities: Sequence[float] | npt.NDArray[Any]
) -> dict[str, float]:
    """ROC-AUC, PR-AUC (average precision), Brier score and log loss of `probabilities` (of the
    positive class, 0-1) against 0/1 `labels`.

    Both classes must be present (ROC-AUC is undefined otherwise: sklearn raises ValueError).
    Log loss clips probabilities of exactly 0 or 1 (sklearn's float epsilon), so it stays finite.
    """
    from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    return {
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "brier": float(brier_score_loss(y, p)),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
    }


def calibration_table(
    labels: Sequence[int] | npt.NDArray[Any], probabilities: Sequence[float] | npt.NDArray[Any], *, bins: int = 10
) -> list[dict[str, Any]]:
    """`bins` equal-width probability bins (`[k/bins, (k+1)/bins)`, the last one closed at 1): per
    bin, how many leads, their mean predicted probability and their observed positive rate (`None`
    for an empty bin)."""
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    which = np.minimum((p * bins).astype(np.intp), bins - 1)
    table = []
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        table.append(
            {
                "bin": b,
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "count": count,
                "mean_predicted": float(p[mask].mean()) if count else None,
                "observed_rate": float(y[mask].mean()) if count else None,
            }
        )
    return table


def band_edges(edges: Sequence[float] | None = None, *, width: float | None = None) -> tuple[float, ...]:
    """The edges of score bands: `edges` as given, or bands of `width` points from 0 (the last one
    ends at 100 and may be narrower), or 0, 20, ..., 100 when neither is given.

    Edges must be finite, strictly increasing, start at 0 and end at 100 (so every score falls in
    exactly one band) and make at most 100 bands. Raises `ValueError` saying what is wrong; giving
    both `edges` and `width` is an error.
    """
    if edges is not None and width is not None:
        raise ValueError("give bands or band_width, not both")
    if width is not None:
        if not math.isfinite(width) or width <= 0 or width > SCORE_MAX:
            raise ValueError(f"band_width must be more than 0 and at most 100 points, got {width:g}")
        count = math.ceil(SCORE_MAX / width - 1e-9)
        if count > MAX_BANDS:
            raise ValueError(f"band_width {width:g} makes more than {MAX_BANDS} bands")
        return (*(round(k * width, 9) for k in range(count)), SCORE_MAX)
    if edges is None:
        return (0.0, 20.0, 40.0, 60.0, 80.0, 100.0)
    values = tuple(float(e) for e in edges)
    if len(values) < 2:
        raise ValueError("bands need at least two edges, e.g. 0,50,100")
    if len(values) - 1 > MAX_BANDS:
        raise ValueError(f"at most {MAX_BANDS} bands")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("band edges must be finite numbers")
    if values[0] != SCORE_MIN or values[-1] != SCORE_MAX:
        raise ValueError("band edges must start at 0 and end at 100")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise ValueError("band edges must be strictly increasing")
    return values


def band_of(score: float, edges: Sequence[float]) -> int:
    """The index of the band holding `score`: band `i` is `[edges[i], edges[i+1])`, and the last band
    also holds its upper edge (100). Scores outside the edges go to the first or last band."""
    for i, upper in enumerate(edges[1:-1]):
        if score < upper:
            return i
    return len(edges) - 2


def band_label(lower: float, upper: float) -> str:
    """`"20-40"`; edges print without trailing zeros (`"12.5-25"`)."""
    return f"{lower:g}-{upper:g}"


def inversions(rates: Sequence[float | None]) -> list[tuple[int, int]]:
    """Where a conversion rate falls as the band rises: pairs `(i, j)` of consecutive bands that have
    a rate (`None` bands are skipped), `i` below `j`, with `rates[j] < rates[i]`. An empty list means
    the rates never fall (ties are fine)."""
    known = [(i, r) for i, r in enumerate(rates) if r is not None]
    return [(i, j) for (i, a), (j, b) in zip(known, known[1:], strict=False) if b < a]


@dataclass(frozen=True)
class DriftWarning:
    """A live figure worse than training by more than its tolerance (both in the metric's units)."""

    metric: str
    observed: float
    training: float
    tolerance: float

    @property
    def detail(self) -> str:
        worse = "below" if self.metric == "roc_auc" else "above"
        gap = abs(self.observed - self.training)
        return (
            f"{self.metric} on outcomes is {self.observed:.4f}, {gap:.4f} {worse} training ({self.training:.4f}); "
            f"tolerance {self.tolerance:g}"
        )


def drift_warnings(
    observed: Mapping[str, float],
    training: Mapping[str, Any],
    *,
    roc_auc_tolerance: float,
    brier_tolerance: float,
) -> list[DriftWarning]:
    """Warnings when ROC-AUC falls more than `roc_auc_tolerance` below training, or the Brier score
    rises more than `brier_tolerance` above it (absolute differences). A figure training did not
    record is not compared."""
    out: list[DriftWarning] = []
    auc, brier = training.get("roc_auc"), training.get("brier")
    if isinstance(auc, int | float) and observed["roc_auc"] < auc - roc_auc_tolerance:
        out.append(DriftWarning("roc_auc", observed["roc_auc"], float(auc), roc_auc_tolerance))
    if isinstance(brier, int | float) and observed["brier"] > brier + brier_tolerance:
        out.append(DriftWarning("brier", observed["brier"], float(brier), brier_tolerance))
    return out
