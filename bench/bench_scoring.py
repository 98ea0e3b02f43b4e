"""Speed of the scoring core on the X Education data (plain script, not a test).

    .venv/bin/python bench/bench_scoring.py [--runs 7] [--json bench/results/scoring.json]

Trains pipelines/x-education.yaml once, then measures, each over ``--runs`` repetitions (median and
min-max reported):

1. ``CompiledPipeline.score``: one lead in process -- features, rules, scorecard, explanation and
   inputs digest -- cycling through distinct CSV rows (traits only, and with 10 activities);
2. ``CompiledPipeline.score_batch`` over the whole file (7,396 rows already parsed by ``csv``);
3. for scale: sklearn's fitted estimator ``predict_proba`` on a one-row numpy input (no DataFrame).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import sklearn  # noqa: E402
import yaml  # noqa: E402

from scoring.features import model_matrix  # noqa: E402
from scoring.pipeline import compile_pipeline  # noqa: E402
from scoring.profile import Activity, LeadProfile  # noqa: E402
from scoring.spec import load_spec  # noqa: E402
from scoring.training import train_pipeline  # noqa: E402

DATA_FILE = REPO_ROOT.parent / "shared" / "data" / "x-education" / "leads_train.csv"
SPEC_FILE = REPO_ROOT / "pipelines" / "x-education.yaml"
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def repeat(runs: int, once: Callable[[], float]) -> dict[str, float]:
    """Run ``once`` (returns one figure) ``runs`` times after a warm-up; median and spread."""
    once()
    values = [once() for _ in range(runs)]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": runs}


def per_item_us(function: Callable[[Any], object], items: list[Any]) -> Callable[[], float]:
    def once() -> float:
        start = time.perf_counter()
        for item in items:
            function(item)
        return (time.perf_counter() - start) / len(items) * 1e6

    return once


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7, help="repetitions per measurement (default 7)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()

    with SPEC_FILE.open(encoding="utf-8") as handle:
        spec = load_spec(yaml.safe_load(handle))
    with DATA_FILE.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    labels = [int(row["Converted"]) for row in rows]

    start = time.perf_counter()
    result = train_pipeline(spec, rows, labels)
    training_s = time.perf_counter() - start
    pipeline = compile_pipeline(spec, json.loads(json.dumps(result.artifact)))

    leads = [LeadProfile(row) for row in rows[:2000]]
    activities = [
        Activity("Page Viewed", NOW - timedelta(hours=7 * h), {"url": "/pricing" if h % 3 else "/blog"})
        for h in range(8)
    ]
    activities += [
        Activity("Form Submitted", NOW - timedelta(days=2), {}),
        Activity("Email Opened", NOW - timedelta(days=1), {}),
    ]
    busy_leads = [LeadProfile(row, activities) for row in rows[:2000]]

    figures: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "sklearn": sklearn.__version__,
            "numpy": np.__version__,
            "load_average": os.getloadavg(),
        },
        "training_s": training_s,
        "cv_roc_auc": result.metrics["cv"]["roc_auc"]["mean"],
        "cv_brier": result.metrics["cv"]["brier"]["mean"],
        "holdout_roc_auc": result.metrics["holdout"]["roc_auc"],
        "holdout_brier": result.metrics["holdout"]["brier"],
    }
    figures["score_us_traits_only"] = repeat(args.runs, per_item_us(lambda p: pipeline.score(p, now=NOW), leads))
    figures["score_us_10_activities"] = repeat(args.runs, per_item_us(lambda p: pipeline.score(p, now=NOW), busy_leads))

    def batch_once() -> float:
        start = time.perf_counter()
        pipeline.score_batch(rows, now=NOW)
        return len(rows) / (time.perf_counter() - start)

    figures["score_batch_leads_per_s"] = repeat(args.runs, batch_once)

    matrix = model_matrix(spec, rows[:500])
    one_row_inputs = [matrix[i : i + 1] for i in range(len(matrix))]
    figures["sklearn_predict_proba_one_row_us"] = repeat(
        args.runs, per_item_us(result.fitted.predict_proba, one_row_inputs)
    )

    def batch_sklearn_once() -> float:
        start = time.perf_counter()
        result.fitted.predict_proba(model_matrix(spec, rows))
        return len(rows) / (time.perf_counter() - start)

    figures["sklearn_batch_incl_feature_matrix_leads_per_s"] = repeat(args.runs, batch_sklearn_once)

    def line(label: str, key: str, unit: str, fmt: str) -> None:
        f = figures[key]
        print(
            f"{label:<58} {format(f['median'], fmt):>10} {unit:<8} "
            f"(min {format(f['min'], fmt)}, max {format(f['max'], fmt)}, {f['runs']} runs)"
        )

    print(
        f"X Education, {len(rows)} rows; training {training_s:.1f} s; CV ROC-AUC {figures['cv_roc_auc']:.4f}, "
        f"CV Brier {figures['cv_brier']:.4f}; hold-out ROC-AUC {figures['holdout_roc_auc']:.4f}, "
        f"Brier {figures['holdout_brier']:.4f}"
    )
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    line("score(): one lead, traits only", "score_us_traits_only", "us/lead", ".1f")
    line("score(): one lead, 10 activities", "score_us_10_activities", "us/lead", ".1f")
    line("score_batch(): whole file", "score_batch_leads_per_s", "leads/s", ",.0f")
    line("sklearn predict_proba, one-row numpy input", "sklearn_predict_proba_one_row_us", "us/lead", ".0f")
    line(
        "sklearn predict_proba, whole file (incl. model_matrix)",
        "sklearn_batch_incl_feature_matrix_leads_per_s",
        "leads/s",
        ",.0f",
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
