"""Shared fixtures for the scoring core tests: the X Education data, its spec, one trained model.

Training runs once per session (a few seconds); every test that needs a model reuses it.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sklearn
import yaml

from scoring.features import feature_definitions
from scoring.pipeline import CompiledPipeline, compile_pipeline
from scoring.spec import PipelineSpec
from scoring.training import TrainingResult, train_pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_FILE = REPO_ROOT.parent / "shared" / "data" / "x-education" / "leads_train.csv"
SPEC_FILE = REPO_ROOT / "pipelines" / "x-education.yaml"
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@pytest.fixture(scope="session")
def rows() -> list[dict[str, str]]:
    with DATA_FILE.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="session")
def labels(rows: list[dict[str, str]]) -> list[int]:
    return [int(row["Converted"]) for row in rows]


@pytest.fixture(scope="session")
def spec_data() -> dict[str, Any]:
    with SPEC_FILE.open(encoding="utf-8") as handle:
        data: dict[str, Any] = yaml.safe_load(handle)
    return data


@pytest.fixture(scope="session")
def spec(spec_data: dict[str, Any]) -> PipelineSpec:
    return PipelineSpec.model_validate(spec_data)


@pytest.fixture(scope="session")
def trained(spec: PipelineSpec, rows: list[dict[str, str]], labels: list[int]) -> TrainingResult:
    return train_pipeline(spec, rows, labels)


@pytest.fixture(scope="session")
def pipeline(spec: PipelineSpec, trained: TrainingResult) -> CompiledPipeline:
    return compile_pipeline(spec, trained.artifact)


# ----------------------------------------------------------------------------------- spec helpers


def number(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "number", **extra}


def category(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "category", **extra}


def boolean(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "boolean", **extra}


DEFAULT_FEATURES = [number("visits"), category("job", missing=["Select"]), boolean("optin"), number("score")]


def make_spec_data(
    *,
    features: Sequence[Mapping[str, Any]] = DEFAULT_FEATURES,
    fit: Mapping[str, Any] | None = None,
    engagement: Mapping[str, Any] | None = None,
    total_cap: Mapping[str, Any] | None = None,
    combine: Mapping[str, Any] | None = None,
    model_features: Sequence[str] = ("visits",),
) -> dict[str, Any]:
    rules: dict[str, Any] = {}
    if fit is not None:
        rules["fit"] = dict(fit)
    if engagement is not None:
        rules["engagement"] = dict(engagement)
    if total_cap is not None:
        rules["total_cap"] = dict(total_cap)
    data: dict[str, Any] = {
        "name": "test",
        "features": [dict(f) for f in features],
        "rules": rules,
        "model": {"features": list(model_features)},
    }
    if combine is not None:
        data["combine"] = dict(combine)
    return data


def make_spec(**kwargs: Any) -> PipelineSpec:
    return PipelineSpec.model_validate(make_spec_data(**kwargs))


def constant_artifact(spec: PipelineSpec, probability: float) -> dict[str, Any]:
    """A hand-made scorecard whose probability is always ``probability`` (zero weights, intercept
    logit(p), no calibration): lets rule/combine tests control the model part exactly."""
    features = []
    for name in spec.model.features:
        kind = spec.feature(name).type
        if kind == "number":
            features.append(
                {"name": name, "type": kind, "center": 0.0, "scale": 1.0, "weight": 0.0, "offset": 0.0, "missing": 0.0}
            )
        else:
            features.append({"name": name, "type": kind, "weights": {}, "unknown_weight": 0.0})
    return {
        "kind": "scorecard",
        "format_version": 1,
        "sklearn_version": sklearn.__version__,
        "estimator": "logistic_regression",
        "feature_names": list(spec.model.features),
        "inputs": feature_definitions(spec, spec.model.features),
        "features": features,
        "intercept": math.log(probability / (1.0 - probability)),
        "calibration": {"method": "none"},
    }


def compiled(spec: PipelineSpec, probability: float = 0.5) -> CompiledPipeline:
    return compile_pipeline(spec, constant_artifact(spec, probability))
