"""Routes for report readers (viewer): funnel, score bands, routing balance, model health.

Every report answers JSON, or CSV (its `rows` table) with `Accept: text/csv` or `?format=csv`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query
from pydantic import AwareDatetime, BaseModel
from starlette.responses import Response

from service.api.deps import ServicesDep, Viewer, utcnow
from service.events import ErrorBody
from service.reports.common import csv_text, resolve_period
from service.reports.funnel import FunnelReport, FunnelRow, funnel_report
from service.reports.routing import RoutingReport, RoutingTable, routing_report
from service.reports.scores import (
    CalibrationRow,
    ModelReport,
    ScoreBandRow,
    ScoreBandsReport,
    model_report,
    score_bands_report,
)

router = APIRouter(tags=["reports"])

CSV_TYPE = "text/csv"
ERRORS: dict[int | str, dict[str, Any]] = {
    200: {"content": {CSV_TYPE: {"schema": {"type": "string"}}}},
    **{code: {"model": ErrorBody} for code in (401, 403, 422)},
}

Since = Annotated[
    AwareDatetime | None,
    Query(description="Start of the period, inclusive, with a UTC offset (default: 30 days before `until`)."),
]
Until = Annotated[
    AwareDatetime | None, Query(description="End of the period, exclusive, with a UTC offset (default: now).")
]
Format = Annotated[
    Literal["json", "csv"] | None,
    Query(description="`csv` answers the report's rows as CSV, as `Accept: text/csv` does."),
]
Accept = Annotated[str | None, Header()]


def wants_csv(format: Literal["json", "csv"] | None, accept: str | None) -> bool:
    """`?format=` wins; otherwise CSV when the client accepts text/csv and not JSON first."""
    if format is not None:
        return format == "csv"
    if not accept:
        return False
    types = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    return CSV_TYPE in types and (
        "application/json" not in types or types.index(CSV_TYPE) < types.index("application/json")
    )


def csv_response(name: str, rows: Sequence[BaseModel], row_model: type[BaseModel]) -> Response:
    """The report's rows as a CSV download named after the report."""
    body = csv_text(rows, list(row_model.model_fields))
    return Response(
        body,
        media_type=f"{CSV_TYPE}; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="leadscore-{name}.csv"'},
    )


# --- score bands and model health (service.reports.scores) ------------------------------------------------

PipelineParam = Annotated[int | None, Query(description="A pipeline version number (default: the active one).")]
_SCORE_ERRORS: dict[int | str, dict[str, Any]] = {**ERRORS, **{code: {"model": ErrorBody} for code in (404, 409)}}


@router.get("/v1/reports/score-bands", response_model=ScoreBandsReport, responses=_SCORE_ERRORS)
async def get_score_bands_report(
    services: ServicesDep,
    _: Viewer,
    since: Since = None,
    until: Until = None,
    pipeline: PipelineParam = None,
    bands: Annotated[
        str | None, Query(description="Band edges from 0 to 100, comma-separated (default `0,20,40,60,80,100`).")
    ] = None,
    band_width: Annotated[
        float | None,
        Query(description="Bands of this many points from 0 instead of `bands` (the last may be narrower)."),
    ] = None,
    format: Format = None,
    accept: Accept = None,
) -> Any:
    """Conversion rate per score band and per grade of a pipeline version's scores, with a monotonicity check."""
    report = await score_bands_report(
        services.engine,
        period=resolve_period(since, until, now=utcnow()),
        pipeline=pipeline,
        bands=bands,
        band_width=band_width,
    )
    return csv_response("score-bands", report.rows, ScoreBandRow) if wants_csv(format, accept) else report


@router.get("/v1/reports/model", response_model=ModelReport, responses=_SCORE_ERRORS)
async def get_model_report(
    services: ServicesDep,
    _: Viewer,
    since: Since = None,
    until: Until = None,
    pipeline: PipelineParam = None,
    format: Format = None,
    accept: Accept = None,
) -> Any:
    """ROC-AUC, Brier, log loss and calibration on outcomes since activation, beside training; drift warnings."""
    now = utcnow()
    settings = services.settings
    report = await model_report(
        services.engine,
        period=resolve_period(since, until, now=now) if since or until else None,
        pipeline=pipeline,
        min_outcomes=settings.report_model_min_outcomes,
        roc_auc_tolerance=settings.report_drift_roc_auc_tolerance,
        brier_tolerance=settings.report_drift_brier_tolerance,
        now=now,
    )
    return csv_response("model", report.rows, CalibrationRow) if wants_csv(format, accept) else report


# --- funnel and routing balance (service.reports.funnel, service.reports.routing) -------------------------

By = Annotated[
    Literal["source", "policy"] | None,
    Query(description="Break the funnel down by the lead's first source, or by the policy version that qualified it."),
]


@router.get("/v1/reports/funnel", response_model=FunnelReport, responses=ERRORS)
async def get_funnel_report(
    services: ServicesDep,
    _: Viewer,
    since: Since = None,
    until: Until = None,
    by: By = None,
    source: Annotated[str | None, Query(description="Only leads whose first event came from this source.")] = None,
    format: Format = None,
    accept: Accept = None,
) -> FunnelReport | Response:
    """Leads per lifecycle stage: how far the period's new leads got, conversion between stages, and stage entries."""
    now = utcnow()
    report = await funnel_report(
        services.engine, period=resolve_period(since, until, now=now), by=by, source=source, now=now
    )
    return csv_response("funnel", report.rows, FunnelRow) if wants_csv(format, accept) else report


@router.get("/v1/reports/routing", response_model=RoutingReport, responses=ERRORS)
async def get_routing_report(
    services: ServicesDep,
    _: Viewer,
    since: Since = None,
    until: Until = None,
    pool: Annotated[str | None, Query(description="Only this pool's assignments and its leads' handoffs.")] = None,
    table: Annotated[RoutingTable, Query(description="The table a CSV export carries.")] = "assignments",
    format: Format = None,
    accept: Accept = None,
) -> RoutingReport | Response:
    """Assignments per owner, pool and queue against the pools' configured shares, and time to CRM delivery."""
    now = utcnow()
    report = await routing_report(services.engine, period=resolve_period(since, until, now=now), pool=pool, now=now)
    return csv_response(f"routing-{table}", *report.table(table)) if wants_csv(format, accept) else report
