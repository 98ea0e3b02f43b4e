"""Routes for threshold policies and their recommendation (viewer)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from service.api.deps import ServicesDep, Viewer, utcnow
from service.change_schemas import Recommendation, ThresholdPolicyRead
from service.events import ErrorBody
from service.outcomes import recommend_threshold
from service.qualification import list_policies

router = APIRouter(tags=["qualification"])
_errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 403, 422)}


@router.get("/v1/thresholds/recommendation", response_model=Recommendation, responses=_errors)
async def get_threshold_recommendation(
    services: ServicesDep,
    _: Viewer,
    target_precision: Annotated[
        float | None, Query(gt=0, le=1, description="Share of MQLs that should convert (0-1).")
    ] = None,
    weekly_volume: Annotated[float | None, Query(gt=0, description="New MQLs per week sales can absorb.")] = None,
    window_days: Annotated[
        int | None, Query(ge=7, le=3650, description="Default: LEADSCORE_CHANGE_WINDOW_DAYS.")
    ] = None,
) -> Recommendation:
    """The MQL score cutoff reaching a target precision or weekly volume, from stored outcomes and scores."""
    return await recommend_threshold(
        services.engine,
        target_precision=target_precision,
        weekly_volume=weekly_volume,
        window_days=window_days or services.settings.change_window_days,
        now=utcnow(),
    )


@router.get("/v1/thresholds/policies", response_model=list[ThresholdPolicyRead], responses=_errors)
async def get_threshold_policies(services: ServicesDep, _: Viewer) -> list[ThresholdPolicyRead]:
    """Every applied threshold policy version, oldest first, and which one is active."""
    return await list_policies(services.engine)
