"""The score-band and model reports: does a pipeline version still tell converting leads from the rest?

What the figures count (the README's "Reports" section says the same):

- **Outcomes** are the CRM's reports on a lead (`service.outcomes`), taken by the time they happened
  (`occurred_at`). A lead *converted* when it has a `converted` or `won` outcome; it was *lost* when
  it has a `lost` one and no `converted` or `won`; either is a *final* outcome. `accepted` (or any
  later step) means sales took the lead up, and is counted in its own column; a lead with only
  `accepted`, or no outcome, is *open*.
- **The reported score** of a lead is its latest non-shadow score by the version at (or before) the
  time of its first outcome, i.e. the score sales saw when they took it up; for a lead with no
  outcome yet, its latest before the period's end. Shadow scores and merged leads never count.
- **Score bands** count the live leads whose reported score was made in the period, by outcomes up
  to the period's end. `conversion_rate` is converted / leads with a final outcome (open leads are
  not known yet); `conversion_rate_of_leads` is converted / all leads (every open lead counted as
  not converted: a lower bound). Both counts are in the row.
- **The model report** takes the live leads with a final outcome in its window (by default: since the
  version was last made active) and their reported scores' probabilities, and measures them as
  training measured its hold-out (`scoring.evaluation`): ROC-AUC, PR-AUC, Brier score, log loss and
  a 10-bin calibration table, beside the training hold-out's figures.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scoring.evaluation import (
    GRADES,
    band_edges,
    band_label,
    calibration_table,
    classification_metrics,
    drift_warnings,
    inversions,
)
from service.errors import LeadscoreError
from service.pipelines import NoActivePipeline, PipelineNotFound
from service.reports.common import ReportPeriod
from service.repositories import pipelines as pipelines_repo
from service.repositories import score_reports as repo
from service.repositories.score_reports import BandGradeCount

CALIBRATION_BINS = 10


class InvalidReportBands(LeadscoreError):
    """`bands` or `band_width` do not make score bands (422)."""

    status = 422


# --- score bands --------------------------------------------------------------------------------------


class ScoreBandRow(BaseModel):
    """One score band or grade (or all leads): how many leads, and what became of them."""

    dimension: Literal["band", "grade", "all"] = Field(description="What `group` is.")
    group: str = Field(description="The band (`20-40`: 20 <= score < 40, the last band includes 100) or grade.")
    lower: float | None = Field(description="A band's lowest score (inclusive).")
    upper: float | None = Field(description="A band's upper edge (exclusive, but 100 for the last band).")
    leads: int = Field(description="Live leads whose reported score is in this group.")
    accepted: int = Field(description="Of them, leads with an accepted, converted or won outcome.")
    with_outcome: int = Field(description="Of them, leads with a final outcome (converted, won or lost).")
    converted: int = Field(description="Of them, leads with a converted or won outcome.")
    lost: int = Field(description="Of them, leads with a lost outcome and no converted or won one.")
    open: int = Field(description="Leads without a final outcome yet (`leads - with_outcome`).")
    conversion_rate: float | None = Field(description="converted / with_outcome; null without outcomes.")
    conversion_rate_of_leads: float | None = Field(description="converted / leads (open leads as not converted).")
    mean_probability: float | None = Field(description="Mean predicted conversion probability (0-1).")
    mean_score: float | None = Field(description="Mean score (points, 0-100).")


class BandInversion(BaseModel):
    """Two neighbouring bands (among those with outcomes) where the higher one converts less."""

    lower_band: str
    upper_band: str
    lower_rate: float
    upper_rate: float


class Monotonicity(BaseModel):
    monotonic: bool | None = Field(
        description="Whether the conversion rate never falls as the band rises, over the bands with a final "
        "outcome; null when fewer than two bands have one."
    )
    bands_compared: int = Field(description="Bands with at least one final outcome.")
    inversions: list[BandInversion]


class ScoreBandsReport(BaseModel):
    """Conversion per score band and per grade of one pipeline version's scores."""

    period: ReportPeriod
    pipeline_version: int
    active: bool = Field(description="Whether the version is the active one now.")
    bands: list[float] = Field(description="The band edges, 0 to 100.")
    totals: ScoreBandRow
    monotonicity: Monotonicity
    rows: list[ScoreBandRow] = Field(description="The bands, lowest first, then the grades A1 to D4.")


def parse_bands(bands: str | None, band_width: float | None) -> tuple[float, ...]:
    """Band edges from `?bands=0,25,50,75,100` or `?band_width=25` (default 0, 20, ..., 100);
    `InvalidReportBands` saying what is wrong."""
    try:
        edges = None if bands is None else [float(part) for part in bands.split(",")]
        return band_edges(edges, width=band_width)
    except ValueError as exc:
        message = str(exc)
        if message.startswith("could not convert"):
            message = f"bands must be comma-separated numbers, got {bands!r}"
        raise InvalidReportBands(message) from None


async def score_bands_report(
    engine: AsyncEngine, *, period: ReportPeriod, pipeline: int | None, bands: str | None, band_width: float | None
) -> ScoreBandsReport:
    """The score-band report of `pipeline` (default: the active version) over `period`."""
    edges = parse_bands(bands, band_width)
    async with engine.connect() as conn:
        version, active = await _version(conn, pipeline)
        counts = await repo.band_grade_counts(
            conn, version_id=version["id"], since=period.since, until=period.until, edges=edges
        )
    band_rows = [
        _row("band", band_label(lower, upper), [c for c in counts if c.band == i], lower=lower, upper=upper)
        for i, (lower, upper) in enumerate(zip(edges, edges[1:], strict=False))
    ]
    seen = {c.grade for c in counts}
    grades = [*GRADES, *sorted(seen - set(GRADES))]
    grade_rows = [_row("grade", grade, [c for c in counts if c.grade == grade]) for grade in grades]
    return ScoreBandsReport(
        period=period,
        pipeline_version=version["id"],
        active=active,
        bands=list(edges),
        totals=_row("all", "all", counts),
        monotonicity=_monotonicity(band_rows),
        rows=[*band_rows, *grade_rows],
    )


def _row(
    dimension: Literal["band", "grade", "all"],
    group: str,
    counts: Sequence[BandGradeCount],
    *,
    lower: float | None = None,
    upper: float | None = None,
) -> ScoreBandRow:
    leads = sum(c.leads for c in counts)
    converted = sum(c.converted for c in counts)
    lost = sum(c.lost for c in counts)
    decided = converted + lost
    return ScoreBandRow(
        dimension=dimension,
        group=group,
        lower=lower,
        upper=upper,
        leads=leads,
        accepted=sum(c.accepted for c in counts),
        with_outcome=decided,
        converted=converted,
        lost=lost,
        open=leads - decided,
        conversion_rate=converted / decided if decided else None,
        conversion_rate_of_leads=converted / leads if leads else None,
        mean_probability=sum(c.probability_sum for c in counts) / leads if leads else None,
        mean_score=sum(c.score_sum for c in counts) / leads if leads else None,
    )


def _monotonicity(rows: Sequence[ScoreBandRow]) -> Monotonicity:
    rates = [row.conversion_rate for row in rows]
    compared = sum(1 for rate in rates if rate is not None)
    found = inversions(rates)
    return Monotonicity(
        monotonic=None if compared < 2 else not found,
        bands_compared=compared,
        inversions=[
            BandInversion(
                lower_band=rows[i].group,
                upper_band=rows[j].group,
                lower_rate=rates[i] or 0.0,
                upper_rate=rates[j] or 0.0,
            )
            for i, j in found
        ],
    )


# --- model ----------------------------------------------------------------------------------------------


class ModelFigures(BaseModel):
    roc_auc: float | None
    pr_auc: float | None = Field(description="Average precision.")
    brier: float | None = Field(description="Mean squared difference of probability and outcome (0 best).")
    log_loss: float | None


class DriftWarningRead(BaseModel):
    metric: str = Field(description="`roc_auc` (fell) or `brier` (rose).")
    observed: float
    training: float
    tolerance: float
    detail: str


class CalibrationRow(BaseModel):
    """One probability bin: the leads whose reported probability falls in it, and the training
    hold-out's leads in the same bin."""

    bin: int
    lower: float = Field(description="Lowest probability (inclusive).")
    upper: float = Field(description="Upper edge (exclusive; 1 is in the last bin).")
    count: int
    mean_predicted: float | None
    observed_rate: float | None = Field(description="Share of these leads that converted.")
    training_count: int | None
    training_mean_predicted: float | None
    training_observed_rate: float | None


class ModelReport(BaseModel):
    """How well a pipeline version's probabilities match the outcomes reported since it was made active
    (or in a given period), beside its training figures."""

    pipeline_version: int
    active: bool = Field(description="Whether the version is the active one now.")
    activated_at: AwareDatetime | None = Field(description="When it was last made active (null: never).")
    period: ReportPeriod = Field(
        description="The outcomes' window: the one asked for, else from `activated_at` (or the version's "
        "creation, if never active) to now."
    )
    status: Literal["ok", "drift", "insufficient_data"]
    outcomes: int = Field(description="Leads with a final outcome in the period and a reported score.")
    positives: int = Field(description="Of them, converted (converted or won).")
    negatives: int = Field(description="Of them, lost.")
    unscored: int = Field(
        description="Leads with a final outcome in the period but no score by this version before their first outcome."
    )
    min_outcomes: int = Field(description="`LEADSCORE_REPORT_MODEL_MIN_OUTCOMES`.")
    figures: ModelFigures | None = Field(description="On the outcomes; null with insufficient data.")
    training: ModelFigures | None = Field(description="On the training hold-out; null if training recorded none.")
    drift: list[DriftWarningRead]
    warnings: list[str]
    rows: list[CalibrationRow] = Field(description="The calibration table (empty with insufficient data).")


async def model_report(
    engine: AsyncEngine,
    *,
    period: ReportPeriod | None,
    pipeline: int | None,
    min_outcomes: int,
    roc_auc_tolerance: float,
    brier_tolerance: float,
    now: dt.datetime,
) -> ModelReport:
    """The model report of `pipeline` (default: the active version) on the outcomes in `period`
    (default: since the version was last made active)."""
    async with engine.connect() as conn:
        version, active = await _version(conn, pipeline)
        activated = await repo.activated_at(conn, version["id"])
        if period is None:
            period = ReportPeriod(since=activated or version["created_at"], until=now)
        leads = await repo.labelled_leads(conn, version_id=version["id"], since=period.since, until=period.until)
    scored = [lead for lead in leads if lead.probability is not None]
    labels = [int(lead.converted) for lead in scored]
    probabilities = [float(lead.probability or 0.0) for lead in scored]
    positives = sum(labels)
    negatives = len(labels) - positives
    metrics: Mapping[str, Any] = version["metrics"] or {}
    holdout = metrics.get("holdout")
    training = (
        ModelFigures(**{k: holdout.get(k) for k in ModelFigures.model_fields}) if isinstance(holdout, dict) else None
    )
    report = ModelReport(
        pipeline_version=version["id"],
        active=active,
        activated_at=activated,
        period=period,
        status="insufficient_data",
        outcomes=len(scored),
        positives=positives,
        negatives=negatives,
        unscored=len(leads) - len(scored),
        min_outcomes=min_outcomes,
        figures=None,
        training=training,
        drift=[],
        warnings=[],
        rows=[],
    )
    if len(scored) < min_outcomes or not positives or not negatives:
        report.warnings.append(
            f"insufficient data: {len(scored)} scored leads with a final outcome ({positives} converted, "
            f"{negatives} lost); at least {min_outcomes}, with both kinds, are needed"
        )
        return report
    # sklearn over every labelled lead is CPU for a while: off the event loop that answers webhooks.
    figures, table = await asyncio.to_thread(_evaluate, labels, probabilities)
    report.figures = ModelFigures(**figures)
    report.rows = _calibration_rows(table, metrics)
    if training is None:
        report.warnings.append("the version's training recorded no hold-out figures: drift is not checked")
    report.drift = [
        DriftWarningRead(
            metric=w.metric, observed=w.observed, training=w.training, tolerance=w.tolerance, detail=w.detail
        )
        for w in drift_warnings(
            figures,
            holdout if isinstance(holdout, dict) else {},
            roc_auc_tolerance=roc_auc_tolerance,
            brier_tolerance=brier_tolerance,
        )
    ]
    report.status = "drift" if report.drift else "ok"
    return report


def _evaluate(labels: list[int], probabilities: list[float]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return classification_metrics(labels, probabilities), calibration_table(
        labels, probabilities, bins=CALIBRATION_BINS
    )


def _calibration_rows(table: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]) -> list[CalibrationRow]:
    trained = metrics.get("calibration_table")
    by_bin: dict[int, Mapping[str, Any]] = {}
    if isinstance(trained, list) and len(trained) == len(table):
        by_bin = {int(row["bin"]): row for row in trained if isinstance(row, dict) and "bin" in row}
    return [
        CalibrationRow(
            **row,
            training_count=by_bin.get(row["bin"], {}).get("count"),
            training_mean_predicted=by_bin.get(row["bin"], {}).get("mean_predicted"),
            training_observed_rate=by_bin.get(row["bin"], {}).get("observed_rate"),
        )
        for row in table
    ]


# --- shared ---------------------------------------------------------------------------------------------


async def _version(conn: AsyncConnection, pipeline: int | None) -> tuple[dict[str, Any], bool]:
    """The version asked for (default: the active one) and whether it is active."""
    active = (await pipelines_repo.get_slots(conn)).get("active")
    wanted = pipeline if pipeline is not None else active
    if wanted is None:
        raise NoActivePipeline("no pipeline version is active; name one with `pipeline`")
    row = await repo.version_row(conn, wanted)
    if row is None:
        raise PipelineNotFound(f"no pipeline version {wanted}")
    return row, wanted == active
