"""Training: protocol, metrics, determinism, input errors, gradient boosting."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest

from scoring.errors import ModelNotCompilable, TrainingDataInvalid
from scoring.features import model_matrix
from scoring.pipeline import compile_pipeline
from scoring.spec import PipelineSpec
from scoring.training import TrainingResult, train_pipeline


def test_x_education_quality(trained: TrainingResult) -> None:
    metrics = trained.metrics
    assert metrics["cv"]["roc_auc"]["mean"] >= 0.85
    assert metrics["cv"]["brier"]["mean"] <= 0.15
    assert metrics["holdout"]["roc_auc"] >= 0.85
    assert metrics["holdout"]["brier"] <= 0.15
    assert len(metrics["cv"]["roc_auc"]["folds"]) == 5
    assert metrics["rows"] == 7396
    assert metrics["holdout_rows"] == pytest.approx(7396 * 0.2, abs=1)


def test_metrics_and_artifact_are_json(trained: TrainingResult) -> None:
    assert json.loads(json.dumps(trained.metrics, allow_nan=False)) == trained.metrics
    assert json.loads(json.dumps(trained.artifact, allow_nan=False)) == trained.artifact


def test_calibration_table_and_deciles(trained: TrainingResult) -> None:
    table = trained.metrics["calibration_table"]
    assert [b["bin"] for b in table] == list(range(10))
    assert sum(b["count"] for b in table) == trained.metrics["holdout_rows"]
    deciles = trained.metrics["score_deciles"]
    assert len(deciles) == 10
    rates = [d["conversion_rate"] for d in deciles]
    assert rates[0] > 0.8 > 0.15 > rates[-1]  # the score ranks leads
    assert all(a["score_min"] >= b["score_max"] for a, b in zip(deciles, deciles[1:], strict=False))


def test_training_is_deterministic(spec_data: dict[str, Any], rows: list[dict[str, str]], labels: list[int]) -> None:
    data = copy.deepcopy(spec_data)
    data["model"]["cv_folds"] = 2
    spec = PipelineSpec.model_validate(data)
    first = train_pipeline(spec, rows[:2000], labels[:2000])
    second = train_pipeline(spec, rows[:2000], labels[:2000])
    assert first.artifact == second.artifact
    assert first.metrics == second.metrics


def test_progress_is_reported_in_order(
    spec_data: dict[str, Any], rows: list[dict[str, str]], labels: list[int]
) -> None:
    data = copy.deepcopy(spec_data)
    data["model"]["cv_folds"] = 2
    seen: list[tuple[str, float]] = []
    train_pipeline(
        PipelineSpec.model_validate(data),
        rows[:1000],
        labels[:1000],
        progress=lambda stage, fraction: seen.append((stage, fraction)),
    )
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions)
    assert seen[0] == ("prepare", 0.0)
    assert seen[-1] == ("done", 1.0)
    assert {s for s, _ in seen} >= {"cross_validate", "fit"}


@pytest.mark.parametrize(
    ("n_rows", "labels", "match"),
    [
        (3, [0, 1], "3 rows but 2 labels"),
        (3, [0, 1, 2], "0 or 1"),
        (3, [0, 1, "x"], "0 or 1"),
        (40, [0] * 35 + [1] * 5, "smaller class has 5 rows"),
        (40, [0] * 40, "smaller class has 0 rows"),
    ],
)
def test_bad_training_data_is_refused(spec: PipelineSpec, n_rows: int, labels: list[Any], match: str) -> None:
    with pytest.raises(TrainingDataInvalid, match=match):
        train_pipeline(spec, [{}] * n_rows, labels)


def test_gradient_boosting_trains_but_is_not_servable(
    spec_data: dict[str, Any], rows: list[dict[str, str]], labels: list[int]
) -> None:
    data = copy.deepcopy(spec_data)
    data["model"] = {**data["model"], "estimator": "hist_gradient_boosting", "cv_folds": 2, "params": {"max_iter": 30}}
    spec = PipelineSpec.model_validate(data)
    result = train_pipeline(spec, rows[:3000], labels[:3000])
    assert result.metrics["holdout"]["roc_auc"] > 0.8
    assert result.artifact["kind"] == "sklearn_in_memory"
    assert json.loads(json.dumps(result.artifact)) == result.artifact
    probabilities = result.fitted.predict_proba(model_matrix(spec, rows[3000:3100]))[:, 1]
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    with pytest.raises(ModelNotCompilable, match="cannot be served"):
        compile_pipeline(spec, result.artifact)
