"""Train a pipeline's model with scikit-learn and produce a JSON artifact plus honest metrics.

Protocol (all splits stratified and seeded by ``model.random_seed``):

1. hold out ``model.holdout_fraction`` (20 %) of the rows;
2. ``model.cv_folds``-fold cross-validation (5) on the remaining rows: each fold fits a fresh copy of
   the whole estimator (preprocessing and calibration included), so no fold sees its own
   validation rows; CV metrics are reported as mean, std and per fold;
3. the final model is fitted on the training part only, and the hold-out rows are scored once.
   The artifact is therefore exactly the model the hold-out figures describe; refitting on all
   rows would gain 20 % data but ship a model nobody measured. (Retrain with holdout_fraction
   small if data is scarce.)

The estimator is one sklearn ``Pipeline`` (ColumnTransformer: OneHotEncoder for categories and
booleans, median imputation + missing indicator + StandardScaler for numbers; then the estimator),
wrapped in ``CalibratedClassifierCV(ensemble=False)`` unless calibration is ``none``. For logistic
regression the artifact is a compiled scorecard (``scoring.scorecard``); gradient boosting is
trained and measured, and ``TrainingResult.fitted`` can score batches, but it is refused for serving
(no code-free serialisation is installed: skops is not a dependency).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from scoring.errors import TrainingDataInvalid
from scoring.evaluation import calibration_table, classification_metrics
from scoring.features import FeatureResolver, feature_definitions, model_matrix
from scoring.rules import RuleSet
from scoring.scorecard import ARTIFACT_FORMAT, compile_scorecard
from scoring.spec import HistGradientBoostingModel, PipelineSpec

__all__ = ["TrainingResult", "build_estimator", "train_pipeline"]

Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class TrainingResult:
    """What training produced.

    ``artifact``: JSON-serialisable dict (store it with the spec as a pipeline version).
    ``metrics``: JSON-serialisable dict of CV and hold-out figures. ``fitted``: the fitted sklearn
    estimator (input: ``scoring.features.model_matrix(spec, rows)``), for the equality test and
    batch scoring -- keep it in memory, never pickle it.
    """

    artifact: dict[str, Any]
    metrics: dict[str, Any]
    fitted: Any


def build_estimator(spec: PipelineSpec) -> Any:
    """The unfitted sklearn estimator for ``spec.model`` (see module doc for its shape)."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    model = spec.model
    types = [spec.feature(name).type for name in model.features]
    categorical = [i for i, t in enumerate(types) if t != "number"]
    numeric = [i for i, t in enumerate(types) if t == "number"]
    transformers: list[tuple[str, Any, list[int]]] = []
    # Sparse one-hot for the linear model: lbfgs on the dense matrix was ~7x slower here. Gradient
    # boosting needs dense input.
    boosting = isinstance(model, HistGradientBoostingModel)
    if categorical:
        transformers.append(
            ("category", OneHotEncoder(handle_unknown="ignore", sparse_output=not boosting), categorical)
        )
    if numeric:
        # keep_empty_features keeps column positions fixed even if a column is all missing in a fold.
        transformers.append(
            (
                "number",
                Pipeline(
                    [
                        ("impute", SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True)),
                        ("scale", StandardScaler()),
                    ]
                ),
                numeric,
            )
        )
    preprocess = ColumnTransformer(transformers, remainder="drop", sparse_threshold=0.0 if boosting else 1.0)
    estimator: Any
    if isinstance(model, HistGradientBoostingModel):
        p = model.params
        estimator = HistGradientBoostingClassifier(
            learning_rate=p.learning_rate,
            max_iter=p.max_iter,
            max_leaf_nodes=p.max_leaf_nodes,
            max_depth=p.max_depth,
            min_samples_leaf=p.min_samples_leaf,
            l2_regularization=p.l2_regularization,
            class_weight=p.class_weight,
            early_stopping=False,
            random_state=model.random_seed,
        )
    else:
        q = model.params
        estimator = LogisticRegression(
            C=q.C, class_weight=q.class_weight, max_iter=q.max_iter, tol=q.tol, random_state=model.random_seed
        )
    pipeline = Pipeline([("preprocess", preprocess), ("model", estimator)])
    if model.calibration == "none":
        return pipeline
    # ensemble=False: one model refitted on all rows plus one calibrator fitted on cross-validated
    # predictions, so the result is a single logistic composition that compiles exactly.
    return CalibratedClassifierCV(
        pipeline,
        method=model.calibration,
        ensemble=False,
        cv=StratifiedKFold(model.cv_folds, shuffle=True, random_state=model.random_seed),
    )


def train_pipeline(
    spec: PipelineSpec,
    rows: Sequence[Mapping[str, Any]],
    labels: Sequence[int],
    *,
    progress: Progress | None = None,
) -> TrainingResult:
    """Train and evaluate ``spec.model`` on traits-only ``rows`` with 0/1 ``labels``.

    ``rows``: mappings of trait name to raw value (e.g. ``csv.DictReader`` rows). ``progress``:
    optional ``callback(stage, fraction)`` with fraction in [0, 1] of the whole job. Deterministic
    for a given spec and data. Raises :class:`TrainingDataInvalid` when rows and labels differ in
    length, labels are not 0/1, or a class is too small for the hold-out and folds.
    """
    from sklearn import __version__ as sklearn_version
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, train_test_split

    report = progress or _no_progress
    model = spec.model
    y = _labels(rows, labels, model.cv_folds, model.holdout_fraction)
    report("prepare", 0.0)
    x = model_matrix(spec, rows)
    n = len(y)
    train_idx, holdout_idx = train_test_split(
        np.arange(n), test_size=model.holdout_fraction, stratify=y, random_state=model.random_seed
    )
    train_idx, holdout_idx = np.sort(train_idx), np.sort(holdout_idx)
    x_train, y_train = x[train_idx], y[train_idx]
    report("prepare", 0.05)

    folds = StratifiedKFold(model.cv_folds, shuffle=True, random_state=model.random_seed)
    fold_metrics: list[dict[str, float]] = []
    for k, (fit_idx, val_idx) in enumerate(folds.split(x_train, y_train)):
        estimator = clone(build_estimator(spec))
        estimator.fit(x_train[fit_idx], y_train[fit_idx])
        fold_metrics.append(classification_metrics(y_train[val_idx], estimator.predict_proba(x_train[val_idx])[:, 1]))
        report("cross_validate", 0.05 + 0.75 * (k + 1) / model.cv_folds)

    fitted = build_estimator(spec)
    fitted.fit(x_train, y_train)
    report("fit", 0.9)

    holdout_p = fitted.predict_proba(x[holdout_idx])[:, 1]
    y_holdout = y[holdout_idx]
    holdout_rows = [rows[int(i)] for i in holdout_idx]
    holdout_scores = _combined_scores(spec, holdout_rows, holdout_p)
    feature_names = list(model.features)
    feature_types = [spec.feature(name).type for name in feature_names]

    metrics: dict[str, Any] = {
        "rows": n,
        "train_rows": len(train_idx),
        "holdout_rows": len(holdout_idx),
        "positive_rate": float(y.mean()),
        "final_fit": "train_part",
        "cv": {
            key: {
                "mean": float(np.mean([m[key] for m in fold_metrics])),
                "std": float(np.std([m[key] for m in fold_metrics])),
                "folds": [m[key] for m in fold_metrics],
            }
            for key in ("roc_auc", "pr_auc", "brier", "log_loss")
        },
        "holdout": classification_metrics(y_holdout, holdout_p),
        "calibration_table": calibration_table(y_holdout, holdout_p),
        "score_deciles": _deciles(y_holdout, holdout_scores, holdout_p),
    }
    common = {
        "format_version": ARTIFACT_FORMAT,
        "sklearn_version": sklearn_version,
        "spec_name": spec.name,
        "estimator": model.estimator,
        "feature_names": feature_names,
        "inputs": feature_definitions(spec, feature_names),
        "metadata": {
            "training_data_sha256": _data_digest(x, y),
            "rows": n,
            "train_rows": len(train_idx),
            "random_seed": model.random_seed,
            "calibration": model.calibration,
            "params": model.params.model_dump(mode="json"),
            "cv_roc_auc": metrics["cv"]["roc_auc"]["mean"],
            "holdout_roc_auc": metrics["holdout"]["roc_auc"],
            "holdout_brier": metrics["holdout"]["brier"],
        },
    }
    if isinstance(model, HistGradientBoostingModel):
        artifact = {"kind": "sklearn_in_memory", "servable": False, **common}
    else:
        artifact = {**compile_scorecard(fitted, feature_names, feature_types, x_train), **common}
    report("done", 1.0)
    return TrainingResult(artifact=artifact, metrics=metrics, fitted=fitted)


def _no_progress(stage: str, fraction: float) -> None:
    del stage, fraction


def _labels(
    rows: Sequence[Mapping[str, Any]], labels: Sequence[int], folds: int, holdout: float
) -> npt.NDArray[np.int64]:
    if len(rows) != len(labels):
        raise TrainingDataInvalid(f"{len(rows)} rows but {len(labels)} labels")
    try:
        y = np.array([int(label) for label in labels], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise TrainingDataInvalid(f"labels must be 0 or 1: {exc}") from exc
    if y.size and not np.isin(y, (0, 1)).all():
        raise TrainingDataInvalid("labels must be 0 or 1")
    # Each class must survive the hold-out split, the CV split and the calibration split inside it.
    needed = math.ceil(folds / ((1.0 - holdout) * (folds - 1) / folds)) + 1
    smallest = int(min((y == 0).sum(), (y == 1).sum())) if y.size else 0
    if smallest < needed:
        raise TrainingDataInvalid(
            f"the smaller class has {smallest} rows; at least {needed} are needed "
            f"for {folds} folds and a {holdout:.0%} hold-out"
        )
    return y


def _deciles(
    y: npt.NDArray[np.int64], scores: npt.NDArray[np.float64], p: npt.NDArray[np.float64]
) -> list[dict[str, Any]]:
    """Hold-out leads ranked by score (best first) in ten equal-count groups."""
    order = np.argsort(-scores, kind="stable")
    out = []
    for d, idx in enumerate(np.array_split(order, 10)):
        if idx.size == 0:
            continue
        out.append(
            {
                "decile": d + 1,
                "count": int(idx.size),
                "score_min": float(scores[idx].min()),
                "score_max": float(scores[idx].max()),
                "mean_probability": float(p[idx].mean()),
                "conversion_rate": float(y[idx].mean()),
            }
        )
    return out


def _combined_scores(
    spec: PipelineSpec, rows: Sequence[Mapping[str, Any]], probability: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    # Imported here: pipeline imports sklearn's version at module load, training is the heavier path.
    from scoring.pipeline import combine_columns

    columns = FeatureResolver(spec).resolve_columns(rows)
    fit, engagement, _ = RuleSet(spec).evaluate_columns(columns)
    return combine_columns(spec, probability, fit, engagement)


def _data_digest(x: npt.NDArray[Any], y: npt.NDArray[np.int64]) -> str:
    digest = hashlib.sha256()
    for row, label in zip(x.tolist(), y.tolist(), strict=True):
        cells = [None if isinstance(v, float) and math.isnan(v) else v for v in row]
        digest.update(json.dumps([cells, label], separators=(",", ":"), ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()
