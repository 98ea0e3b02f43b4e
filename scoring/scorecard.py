"""Compile a fitted linear sklearn pipeline into an additive scorecard, and evaluate it.

The fitted estimator (see ``scoring.training.build_estimator``) is::

    [CalibratedClassifierCV(ensemble=False, method=sigmoid|isotonic) of]
    Pipeline(preprocess=ColumnTransformer(
                 category=OneHotEncoder(handle_unknown="ignore"),
                 number=Pipeline(SimpleImputer(median, add_indicator=True), StandardScaler())),
             model=LogisticRegression)

Its decision function is a sum of one term per input column, so it regroups exactly into one term
per feature:

* category / boolean feature: a weight per value (the one-hot coefficient); values never seen in
  training get ``unknown_weight`` (the all-zero one-hot row);
* number feature: ``((x - center) / scale) * weight + offset`` when present, ``missing`` when
  missing (median imputation and the missing-indicator column folded in).

Terms are then centred on the training data (each feature's mean term moved into the intercept),
so a contribution reads "log-odds above or below an average training lead", and the calibration
map turns the log-odds into the same probability as ``predict_proba`` (to ~1e-15). For sigmoid
calibration ``p = 1 / (1 + exp(a * d + b))`` the contributions are reported times ``-a``, exact in
calibrated log-odds; for isotonic (not linear) they stay in the model's uncalibrated log-odds.

The artifact is plain JSON data (no code, no pickle).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from scoring.errors import ArtifactIncompatible, ModelNotCompilable
from scoring.features import MISSING_TOKEN, Columns, FeatureValue

__all__ = ["ARTIFACT_FORMAT", "Scorecard", "compile_scorecard"]

ARTIFACT_FORMAT = 1
FloatArray = npt.NDArray[np.float64]


def compile_scorecard(
    fitted: Any, feature_names: Sequence[str], feature_types: Sequence[str], x_train: npt.NDArray[Any]
) -> dict[str, Any]:
    """Extract the scorecard part of an artifact from a fitted estimator.

    ``fitted``: the estimator built by ``scoring.training.build_estimator`` for a logistic
    regression, fitted. ``feature_names`` / ``feature_types``: the model features in input-column
    order. ``x_train``: the model matrix it was fitted on (used to centre the contributions).
    Returns a JSON-serialisable dict (``kind: "scorecard"``); the caller adds versions and metadata.
    Raises :class:`ModelNotCompilable` for anything that is not a single linear model.
    """
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression

    calibration: dict[str, Any]
    if isinstance(fitted, CalibratedClassifierCV):
        if len(fitted.calibrated_classifiers_) != 1:
            raise ModelNotCompilable(
                "calibration with ensemble=True averages several models; only ensemble=False compiles to one scorecard"
            )
        calibrated = fitted.calibrated_classifiers_[0]
        pipeline, calibrator = calibrated.estimator, calibrated.calibrators[0]
        if fitted.method == "sigmoid":
            calibration = {"method": "sigmoid", "a": float(calibrator.a_), "b": float(calibrator.b_)}
        elif fitted.method == "isotonic":
            calibration = {
                "method": "isotonic",
                "x": [float(v) for v in calibrator.X_thresholds_],
                "y": [float(v) for v in calibrator.y_thresholds_],
            }
        else:
            raise ModelNotCompilable(f"calibration method {fitted.method!r} cannot be compiled")
    else:
        pipeline, calibration = fitted, {"method": "none"}
    model = pipeline.named_steps["model"]
    if not isinstance(model, LogisticRegression):
        raise ModelNotCompilable(
            f"{type(model).__name__} is not linear; only logistic regression compiles to a scorecard "
            "(use the fitted estimator for batch scoring instead)"
        )
    if [int(c) for c in model.classes_] != [0, 1]:
        raise ModelNotCompilable(f"expected classes [0, 1], got {list(model.classes_)}")
    coef = np.asarray(model.coef_, dtype=np.float64).reshape(-1)
    preprocess = pipeline.named_steps["preprocess"]

    entries: list[dict[str, Any]] = [{} for _ in feature_names]
    cat_positions = [i for i, t in enumerate(feature_types) if t != "number"]
    num_positions = [i for i, t in enumerate(feature_types) if t == "number"]
    if cat_positions:
        encoder = preprocess.named_transformers_["category"]
        start = preprocess.output_indices_["category"].start
        for position, categories in zip(cat_positions, encoder.categories_, strict=True):
            weights = {str(c): float(coef[start + k]) for k, c in enumerate(categories)}
            start += len(categories)
            entries[position] = {"weights": weights, "unknown_weight": 0.0}
    if num_positions:
        numeric = preprocess.named_transformers_["number"]
        imputer, scaler = numeric.named_steps["impute"], numeric.named_steps["scale"]
        start = preprocess.output_indices_["number"].start
        mean, scale = scaler.mean_, scaler.scale_
        k = len(num_positions)
        indicator_of: dict[int, int] = {}
        if imputer.indicator_ is not None:
            for j, column in enumerate(imputer.indicator_.features_):
                indicator_of[int(column)] = k + j
        for j, position in enumerate(num_positions):
            center, sd, weight = float(mean[j]), float(scale[j]), float(coef[start + j])
            imputed = float(imputer.statistics_[j])
            present_term = missing_term = 0.0
            if j in indicator_of:
                i = indicator_of[j]
                present_term = ((0.0 - float(mean[i])) / float(scale[i])) * float(coef[start + i])
                missing_term = ((1.0 - float(mean[i])) / float(scale[i])) * float(coef[start + i])
            entries[position] = {
                "center": center,
                "scale": sd,
                "weight": weight,
                "offset": present_term,
                "missing": ((imputed - center) / sd) * weight + missing_term,
            }
    features = [
        {"name": name, "type": kind, **entry}
        for name, kind, entry in zip(feature_names, feature_types, entries, strict=True)
    ]
    intercept = float(np.asarray(model.intercept_).reshape(-1)[0])

    # Centre: move each feature's mean training term into the intercept. Exact in real arithmetic;
    # in floats it moves the sum by ~1e-15, far inside the 1e-9 equality budget.
    raw = Scorecard({"features": features, "intercept": intercept, "calibration": calibration})
    terms = raw.matrix_contributions(x_train)
    for j, feature in enumerate(features):
        column = terms[:, j]
        # A feature constant in training (e.g. an ad flag nobody ticked) gets an exact 0, not the
        # 1e-19 residue of a floating mean, so it never shows up as a "reason".
        shift = (
            float(column[0])
            if len(column) and bool((column == column[0]).all())
            else (math.fsum(column.tolist()) / len(column) if len(column) else 0.0)
        )
        intercept += shift
        if feature["type"] == "number":
            feature["offset"] -= shift
            feature["missing"] -= shift
        else:
            feature["weights"] = {k: w - shift for k, w in feature["weights"].items()}
            feature["unknown_weight"] -= shift
    return {
        "kind": "scorecard",
        "estimator": "logistic_regression",
        "feature_names": list(feature_names),
        "features": features,
        "intercept": intercept,
        "calibration": calibration,
    }


@dataclass(frozen=True)
class _Term:
    name: str
    is_number: bool
    table: Mapping[Any, float]
    unknown: float
    center: float
    scale: float
    weight: float
    offset: float
    missing: float
    token_weights: Mapping[str, float]


class Scorecard:
    """The evaluable form of an artifact's scorecard part (pure Python per lead, numpy per column)."""

    def __init__(self, artifact: Mapping[str, Any]) -> None:
        try:
            self.feature_names: tuple[str, ...] = tuple(f["name"] for f in artifact["features"])
            self.types: tuple[str, ...] = tuple(f["type"] for f in artifact["features"])
            self.intercept = float(artifact["intercept"])
            self.terms = tuple(_term(f) for f in artifact["features"])
            calibration = artifact["calibration"]
            self.method: str = calibration["method"]
            if self.method == "sigmoid":
                self._a, self._b = float(calibration["a"]), float(calibration["b"])
                # d -> -(a d + b) is linear: contributions scale by -a and stay exact.
                self.slope, self.baseline = -self._a, -(self._a * self.intercept + self._b)
            elif self.method in ("isotonic", "none"):
                self.slope, self.baseline = 1.0, self.intercept
                if self.method == "isotonic":
                    self._x = [float(v) for v in calibration["x"]]
                    self._y = [float(v) for v in calibration["y"]]
                    if not self._x or len(self._x) != len(self._y):
                        raise ValueError("isotonic thresholds are empty or of different lengths")
                    self._x_array, self._y_array = np.asarray(self._x), np.asarray(self._y)
            else:
                raise ValueError(f"unknown calibration method {self.method!r}")
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactIncompatible(f"malformed scorecard artifact: {exc!r}") from exc
        self.calibrated_contributions = self.method != "isotonic"
        # The terms as flat tuples, table None for numbers: per lead a tuple unpack is cheaper
        # than the dataclass attribute lookups.
        self._lead_plan = tuple(
            (None if t.is_number else t.table, t.unknown, t.name, t.center, t.scale, t.weight, t.offset, t.missing)
            for t in self.terms
        )

    # ------------------------------------------------------------------------------- per lead

    def contributions(self, values: Mapping[str, FeatureValue]) -> list[float]:
        """Uncalibrated log-odds term of each model feature for one lead's resolved ``values``."""
        out = []
        for term in self.terms:
            value = values.get(term.name)
            if term.is_number:
                out.append(
                    term.missing
                    if value is None
                    else ((value - term.center) / term.scale)  # type: ignore[operator]
                    * term.weight
                    + term.offset
                )
            else:
                out.append(term.table.get(value, term.unknown))
        return out

    def explain(self, values: Mapping[str, FeatureValue]) -> tuple[float, list[float], float]:
        """``(decision, contributions, log_odds)`` for one lead in one pass: :meth:`decision` of
        :meth:`contributions`, each term times :attr:`slope`, and :attr:`baseline` plus those, all
        summed in feature order exactly as the separate steps do."""
        get, slope = values.get, self.slope
        decision, log_odds = self.intercept, self.baseline
        out = []
        for table, unknown, name, center, scale, weight, offset, missing in self._lead_plan:
            value = get(name)
            if table is None:
                term = missing if value is None else ((value - center) / scale) * weight + offset  # type: ignore[operator]
            else:
                term = table.get(value, unknown)
            decision += term
            contribution = term * slope
            log_odds += contribution
            out.append(contribution)
        return decision, out, log_odds

    def decision(self, contributions: Sequence[float]) -> float:
        """Uncalibrated log-odds: intercept plus the terms, summed in feature order."""
        total = self.intercept
        for c in contributions:
            total += c
        return total

    def probability(self, decision: float) -> float:
        """Calibrated probability of conversion for an uncalibrated log-odds ``decision``."""
        if self.method == "sigmoid":
            return _expit(-(self._a * decision + self._b))
        if self.method == "none":
            return _expit(decision)
        x, y = self._x, self._y
        if len(x) == 1:
            return y[0]
        # sklearn's IsotonicRegression(out_of_bounds="clip"): clip, then scipy interp1d (linear).
        t = min(max(decision, x[0]), x[-1])
        hi = min(max(bisect.bisect_left(x, t), 1), len(x) - 1)
        lo = hi - 1
        slope = (y[hi] - y[lo]) / (x[hi] - x[lo])
        p = slope * (t - x[lo]) + y[lo]
        return 1.0 if 1.0 < p <= 1.0 + 1e-5 else p

    # ------------------------------------------------------------------------------ per column

    def column_contributions(self, columns: Columns) -> FloatArray:
        """``(n_rows, n_features)`` uncalibrated log-odds terms; same arithmetic as per lead."""
        out = np.empty((columns.n_rows, len(self.terms)))
        for j, term in enumerate(self.terms):
            if term.is_number:
                x = columns.numbers[term.name]
                out[:, j] = np.where(
                    np.isnan(x), term.missing, ((x - term.center) / term.scale) * term.weight + term.offset
                )
            elif term.name in columns.categories:
                codes, vocab = columns.categories[term.name]
                table = np.fromiter(
                    (term.table.get(v, term.unknown) for v in vocab), dtype=np.float64, count=len(vocab)
                )
                out[:, j] = table[codes]
            else:  # boolean: 1.0 / 0.0 / NaN
                x = columns.numbers[term.name]
                missing = term.table.get(None, term.unknown)
                out[:, j] = np.where(
                    np.isnan(x),
                    missing,
                    np.where(x == 1.0, term.table.get(True, term.unknown), term.table.get(False, term.unknown)),
                )
        return out

    def matrix_contributions(self, matrix: npt.NDArray[Any]) -> FloatArray:
        """Terms for a model matrix (``scoring.features.model_matrix``): tokens and floats/NaN."""
        out = np.empty((matrix.shape[0], len(self.terms)))
        for j, term in enumerate(self.terms):
            column = matrix[:, j]
            if term.is_number:
                x = column.astype(np.float64)
                out[:, j] = np.where(
                    np.isnan(x), term.missing, ((x - term.center) / term.scale) * term.weight + term.offset
                )
            else:
                weights = term.token_weights
                out[:, j] = [weights.get(token, term.unknown) for token in column]
        return out

    def decisions(self, contributions: FloatArray) -> FloatArray:
        """Row sums plus intercept, in feature order (bit-identical to :meth:`decision`)."""
        total = np.full(contributions.shape[0], self.intercept)
        for j in range(contributions.shape[1]):
            total = total + contributions[:, j]
        return total

    def probabilities(self, decisions: FloatArray) -> FloatArray:
        """Column version of :meth:`probability`."""
        if self.method == "sigmoid":
            return _expit_array(-(self._a * decisions + self._b))
        if self.method == "none":
            return _expit_array(decisions)
        if len(self._x) == 1:
            return np.full(decisions.shape, self._y[0])
        x, y = self._x_array, self._y_array
        t = np.clip(decisions, x[0], x[-1])
        hi = np.clip(np.searchsorted(x, t), 1, len(x) - 1)
        lo = hi - 1
        p: FloatArray = (y[hi] - y[lo]) / (x[hi] - x[lo]) * (t - x[lo]) + y[lo]
        p[(p > 1.0) & (p <= 1.0 + 1e-5)] = 1.0
        return p


def _term(entry: Mapping[str, Any]) -> _Term:
    if entry["type"] == "number":
        return _Term(
            entry["name"],
            True,
            {},
            0.0,
            float(entry["center"]),
            float(entry["scale"]),
            float(entry["weight"]),
            float(entry["offset"]),
            float(entry["missing"]),
            {},
        )
    weights = {str(k): float(v) for k, v in entry["weights"].items()}
    unknown = float(entry["unknown_weight"])
    # Keyed by the resolved value, so per-lead scoring is one dict lookup: strings for categories,
    # True/False for booleans, None for missing (the model's MISSING_TOKEN category).
    table: dict[Any, float]
    if entry["type"] == "boolean":
        table = {True: weights.get("true", unknown), False: weights.get("false", unknown)}
    elif entry["type"] == "category":
        table = dict(weights)
    else:
        raise ValueError(f"unknown feature type {entry['type']!r}")
    table[None] = weights.get(MISSING_TOKEN, unknown)
    return _Term(entry["name"], False, table, unknown, 0.0, 1.0, 0.0, 0.0, 0.0, weights)


def _expit(z: float) -> float:
    # scipy.special.expit's formula, so the result matches sklearn to the last bit or two.
    try:
        return 1.0 / (1.0 + math.exp(-z))
    except OverflowError:
        return 0.0


def _expit_array(z: FloatArray) -> FloatArray:
    with np.errstate(over="ignore"):
        result: FloatArray = 1.0 / (1.0 + np.exp(-z))
    return result
