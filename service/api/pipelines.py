"""Routes for API readers: pipeline versions, comparisons and score previews."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query

from service.api.deps import ServicesDep, Viewer, utcnow
from service.events import (
    ErrorBody,
    PipelineComparison,
    PipelineRead,
    PipelineSummary,
    ScorePreview,
    ScorePreviewRequest,
)
from service.pipelines import compare_pipeline, list_pipelines, preview_score, read_pipeline

router = APIRouter(tags=["scoring"])
_auth: dict[int | str, dict[str, Any]] = {401: {"model": ErrorBody}, 403: {"model": ErrorBody}}


@router.get("/v1/pipelines", response_model=list[PipelineSummary], responses=_auth)
async def get_pipelines(services: ServicesDep, _: Viewer) -> list[PipelineSummary]:
    """Every pipeline version, oldest first, with which is active and which is shadow."""
    return await list_pipelines(services.engine)


@router.get("/v1/pipelines/{version}", response_model=PipelineRead, responses={**_auth, 404: {"model": ErrorBody}})
async def get_pipeline(version: int, services: ServicesDep, _: Viewer) -> PipelineRead:
    """A pipeline version: its spec and its training metrics."""
    return await read_pipeline(services.engine, version)


@router.get(
    "/v1/pipelines/{version}/comparison",
    response_model=PipelineComparison,
    responses={**_auth, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
)
async def compare_pipeline_version(
    version: int,
    services: ServicesDep,
    _: Viewer,
    baseline: Annotated[int | None, Query(description="Default: the active version.")] = None,
) -> PipelineComparison:
    """How this version's scores (e.g. a shadow's) differ from the active version's."""
    return await compare_pipeline(services.engine, version, baseline_id=baseline)


@router.post(
    "/v1/score",
    response_model=ScorePreview,
    responses={**_auth, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}, 422: {"model": ErrorBody}},
)
async def score_preview(
    request: Annotated[ScorePreviewRequest, Body()], services: ServicesDep, _: Viewer
) -> ScorePreview:
    """Score a lead body with its explanation; persists nothing."""
    return await preview_score(services.engine, services.pipelines, request, now=utcnow())
