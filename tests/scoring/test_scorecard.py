"""The compiled scorecard gives sklearn's predict_proba to 1e-9 over the whole X Education file."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest

from scoring.features import model_matrix
from scoring.pipeline import compile_pipeline
from scoring.profile import LeadProfile
from scoring.spec import PipelineSpec
from scoring.training import TrainingResult, train_pipeline
from tests.scoring.conftest import NOW


def scorecard_probabilities(spec: PipelineSpec, artifact: dict[str, Any], rows: list[dict[str, str]]) -> np.ndarray:
    pipeline = compile_pipeline(spec, artifact)
    return np.array([pipeline.score(LeadProfile(row), now=NOW).probability for row in rows])


def test_scorecard_equals_predict_proba_on_the_whole_file(
    spec: PipelineSpec, trained: TrainingResult, rows: list[dict[str, str]]
) -> None:
    expected = trained.fitted.predict_proba(model_matrix(spec, rows))[:, 1]
    actual = scorecard_probabilities(spec, trained.artifact, rows)
    assert len(actual) == 7396
    assert np.abs(actual - expected).max() < 1e-9


@pytest.mark.parametrize(
    ("calibration", "params"), [("isotonic", {}), ("none", {"C": 0.3, "class_weight": "balanced"})]
)
def test_other_calibrations_compile_exactly(
    spec_data: dict[str, Any],
    rows: list[dict[str, str]],
    labels: list[int],
    calibration: str,
    params: dict[str, Any],
) -> None:
    data = copy.deepcopy(spec_data)
    data["model"].update(calibration=calibration, cv_folds=3, params=params)
    spec = PipelineSpec.model_validate(data)
    result = train_pipeline(spec, rows, labels)
    assert result.artifact["calibration"]["method"] == calibration
    expected = result.fitted.predict_proba(model_matrix(spec, rows))[:, 1]
    actual = scorecard_probabilities(spec, result.artifact, rows)
    assert np.abs(actual - expected).max() < 1e-9
    pipeline = compile_pipeline(spec, result.artifact)
    batch = pipeline.score_batch(rows, now=NOW)
    assert np.abs(batch.probability - expected).max() < 1e-9
    explanation = pipeline.score(LeadProfile(rows[0]), now=NOW).explanation
    assert explanation.contribution_scale == ("uncalibrated" if calibration == "isotonic" else "calibrated")


def test_artifact_content(spec: PipelineSpec, trained: TrainingResult) -> None:
    import sklearn

    artifact = trained.artifact
    assert artifact["kind"] == "scorecard"
    assert artifact["sklearn_version"] == sklearn.__version__
    assert artifact["feature_names"] == list(spec.model.features)
    by_name = {f["name"]: f for f in artifact["features"]}
    occupation = by_name["occupation"]["weights"]
    assert occupation["Working Professional"] > occupation["Unemployed"]
    assert "__missing__" in occupation  # "Select" / empty became their own category
    visits = by_name["total_visits"]
    assert {"center", "scale", "weight", "offset", "missing"} <= set(visits)
    assert artifact["calibration"]["method"] == "sigmoid"
    assert {"a", "b"} <= set(artifact["calibration"])
    # Features nobody varied in training carry exactly zero weight after centring.
    assert set(by_name["ad_magazine"]["weights"].values()) == {0.0}


def test_unknown_category_uses_the_unknown_weight(
    spec: PipelineSpec, trained: TrainingResult, rows: list[dict[str, str]]
) -> None:
    row = dict(rows[0], Country="Atlantis")
    expected = trained.fitted.predict_proba(model_matrix(spec, [row]))[0, 1]
    assert compile_pipeline(spec, trained.artifact).score(LeadProfile(row), now=NOW).probability == pytest.approx(
        expected, abs=1e-12
    )
