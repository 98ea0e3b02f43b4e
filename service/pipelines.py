"""Pipeline versions in the service: registering trained versions, choosing the active and shadow
ones, keeping each process's compiled copies current, and scoring leads with them."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import hashlib
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sklearn
import structlog
import yaml
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scoring.errors import ScoringError
from scoring.pipeline import CompiledPipeline, Explanation, Score, compile_pipeline
from scoring.profile import Activity, LeadProfile
from scoring.spec import PipelineSpec
from scoring.training import train_pipeline
from service.errors import LeadscoreError, NotFound
from service.events import PipelineComparison, PipelineRead, PipelineSummary, ScorePreview, ScorePreviewRequest
from service.ids import uuid7
from service.repositories import pipelines as repo

log = structlog.get_logger(__name__)


class PipelineNotFound(NotFound):
    """No pipeline version has this number (404)."""


class InvalidPipeline(LeadscoreError):
    """The spec or artifact cannot be used (422)."""

    status = 422


class NoActivePipeline(LeadscoreError):
    """Nothing can be scored: no version is active (409)."""

    status = 409


@dataclass(frozen=True)
class LoadedPipeline:
    """A pipeline version compiled for serving."""

    version_id: int
    name: str
    compiled: CompiledPipeline


@dataclass(frozen=True)
class Pipelines:
    """What scores right now in this process: the active version and the optional shadow one."""

    active: LoadedPipeline | None = None
    shadow: LoadedPipeline | None = None


def parse_spec(text: str) -> PipelineSpec:
    """A spec from YAML (or JSON, which is YAML) text; `InvalidPipeline` naming the bad fields."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidPipeline(f"the spec is not valid YAML: {exc}") from None
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as exc:
        raise InvalidPipeline(
            [
                {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False, include_input=False)
            ]
        ) from None


def compile_version(row: Mapping[str, Any]) -> LoadedPipeline:
    """Compile a stored version; raises `InvalidPipeline` if this build cannot serve it."""
    try:
        spec = PipelineSpec.model_validate(row["spec"])
        compiled = compile_pipeline(spec, row["artifact"])
    except (ValidationError, ScoringError) as exc:
        raise InvalidPipeline(f"pipeline version {row['id']} cannot be served here: {exc}") from None
    return LoadedPipeline(version_id=row["id"], name=row["name"], compiled=compiled)


class PipelineRegistry:
    """Each process's compiled active/shadow pipelines, refreshed from `pipeline_slot`.

    Processes notice a slot change within `refresh_seconds`; each score record names the version
    that actually made it, so a switch is never misattributed.
    """

    def __init__(self, engine: AsyncEngine, *, refresh_seconds: float) -> None:
        self._engine = engine
        self._refresh_seconds = refresh_seconds
        self._compiled: dict[int, LoadedPipeline] = {}
        self._failed: dict[int, str] = {}
        self.current = Pipelines()
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> Pipelines:
        async with self._engine.connect() as conn:
            slots = await repo.get_slots(conn)
            loaded: dict[str, LoadedPipeline | None] = {}
            for slot in repo.SLOTS:
                version_id = slots.get(slot)
                loaded[slot] = None if version_id is None else await self._load(conn, version_id)
        self.current = Pipelines(active=loaded["active"], shadow=loaded["shadow"])
        return self.current

    async def _load(self, conn: AsyncConnection, version_id: int) -> LoadedPipeline | None:
        if version_id in self._compiled:
            return self._compiled[version_id]
        if version_id in self._failed:
            return None
        row = await repo.get_version(conn, version_id)
        if row is None:
            return None
        try:
            loaded = compile_version(row)
        except InvalidPipeline as exc:
            self._failed[version_id] = str(exc.detail)
            log.error(
                "pipeline version cannot be served; events are stored unscored",
                version=version_id,
                error=str(exc.detail),
            )
            return None
        self._compiled[version_id] = loaded
        log.info("pipeline version loaded", version=version_id, name=loaded.name)
        return loaded

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="pipeline-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_seconds)
            try:
                await self.refresh()
            except Exception as exc:  # keep serving with what we have; the next round retries
                log.warning("pipeline refresh failed", error=str(exc))


def profile_of(traits: Mapping[str, Any], activities: Iterable[Any]) -> LeadProfile:
    """A scoring profile from a lead's traits and its activity event rows."""
    return LeadProfile(
        traits=traits,
        activities=tuple(
            Activity(name=a.name or "", occurred_at=a.occurred_at, properties=(a.payload or {}).get("properties") or {})
            for a in activities
        ),
    )


_RULE_FIELDS = ("rule_id", "group", "kind", "points", "awarded", "capped", "daily_capped", "occurrences")
_FEATURE_FIELDS = ("name", "value", "contribution")
_PACKED = 2


def pack_explanation(explanation: Explanation) -> dict[str, Any]:
    """The stored form of an explanation: rules and features as positional rows with their field
    names once. A score record is written for every event, and `to_dict`'s repeated keys were more
    than half of its bytes."""
    return {
        "format": _PACKED,
        "rule_fields": _RULE_FIELDS,
        "rules": [tuple(hit) for hit in explanation.rules],
        "feature_fields": _FEATURE_FIELDS,
        "features": [tuple(feature) for feature in explanation.features],
        "baseline_log_odds": explanation.baseline_log_odds,
        "log_odds": explanation.log_odds,
        "contribution_scale": explanation.contribution_scale,
        "total_cap_cut": explanation.total_cap_cut,
        "top_rules_up": [hit.rule_id for hit in explanation.top_rules_up],
        "top_rules_down": [hit.rule_id for hit in explanation.top_rules_down],
        "top_features_up": [f.name for f in explanation.top_features_up],
        "top_features_down": [f.name for f in explanation.top_features_down],
    }


def unpack_explanation(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The explanation as `Explanation.to_dict` gives it, from its stored form."""
    if stored.get("format") != _PACKED:
        return dict(stored)
    out = {k: v for k, v in stored.items() if k not in ("format", "rule_fields", "feature_fields")}
    out["rules"] = [dict(zip(stored["rule_fields"], row, strict=True)) for row in stored["rules"]]
    out["features"] = [dict(zip(stored["feature_fields"], row, strict=True)) for row in stored["features"]]
    return out


def score_row(
    pipeline: LoadedPipeline,
    score: Score,
    *,
    lead_id: uuid.UUID,
    shadow: bool,
    event_id: uuid.UUID | None,
    now: dt.datetime,
) -> dict[str, Any]:
    """A `score_record` row."""
    return {
        "id": uuid7(),
        "lead_id": lead_id,
        "pipeline_version_id": pipeline.version_id,
        "shadow": shadow,
        "event_id": event_id,
        "scored_at": now,
        "inputs_digest": score.inputs_digest,
        "score": score.value,
        "fit": score.fit,
        "engagement": score.engagement,
        "probability": score.probability,
        "grade": score.grade,
        "explanation": pack_explanation(score.explanation),
    }


async def score_leads(
    conn: AsyncConnection,
    *,
    pipelines: Pipelines,
    traits: Mapping[uuid.UUID, Mapping[str, Any]],
    trigger: Mapping[uuid.UUID, uuid.UUID | None],
    now: dt.datetime,
    lookback: dt.timedelta,
) -> dict[uuid.UUID, dict[str, Any]]:
    """Score each lead with the active (and shadow) pipeline and store the records.

    Returns the active pipeline's record per lead (empty when no pipeline is active).
    """
    if not scores_anything(pipelines) or not traits:
        return {}
    lead_ids = list(traits)
    activities: dict[uuid.UUID, list[Any]] = {lead_id: [] for lead_id in lead_ids}
    for row in await repo.lead_activities(conn, lead_ids, since=now - lookback):
        activities[row.lead_id].append(row)
    rows, active = score_profiles(
        pipelines,
        {lead_id: profile_of(traits[lead_id], activities[lead_id]) for lead_id in lead_ids},
        trigger=trigger,
        now=now,
    )
    await repo.insert_scores(conn, rows)
    return active


def scores_anything(pipelines: Pipelines) -> bool:
    return pipelines.active is not None or pipelines.shadow is not None


def score_profiles(
    pipelines: Pipelines,
    profiles: Mapping[uuid.UUID, LeadProfile],
    *,
    trigger: Mapping[uuid.UUID, uuid.UUID | None],
    now: dt.datetime,
) -> tuple[list[dict[str, Any]], dict[uuid.UUID, dict[str, Any]]]:
    """The `score_record` rows for each lead's profile by the active (and shadow) pipeline, and the
    active pipeline's row per lead; stores nothing (the caller writes the rows)."""
    targets = [p for p in (pipelines.active, pipelines.shadow) if p is not None]
    rows: list[dict[str, Any]] = []
    active: dict[uuid.UUID, dict[str, Any]] = {}
    for lead_id, profile in profiles.items():
        for pipeline in targets:
            shadow = pipeline is not pipelines.active
            record = score_row(
                pipeline,
                pipeline.compiled.score(profile, now=now),
                lead_id=lead_id,
                shadow=shadow,
                event_id=trigger.get(lead_id),
                now=now,
            )
            rows.append(record)
            if not shadow:
                active[lead_id] = record
    return rows, active


# --- ops use cases -------------------------------------------------------------------------------


def read_training_csv(path: Path, label: str) -> tuple[list[dict[str, str]], list[int], str]:
    """Rows, labels and the sha256 of the file. Raises ValueError on a missing or non-0/1 label."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    reader = csv.DictReader(data.decode("utf-8-sig").splitlines())
    if reader.fieldnames is None or label not in reader.fieldnames:
        raise ValueError(f"{path} has no column {label!r}")
    rows: list[dict[str, str]] = []
    labels: list[int] = []
    for number, row in enumerate(reader, start=2):
        value = (row.pop(label) or "").strip()
        if value not in ("0", "1"):
            raise ValueError(f"{path}:{number}: label {label!r} must be 0 or 1, got {value!r}")
        rows.append(row)
        labels.append(int(value))
    return rows, labels, digest


@dataclass(frozen=True)
class Registered:
    version_id: int
    metrics: dict[str, Any]


async def train_and_register(
    engine: AsyncEngine,
    *,
    spec_text: str,
    rows: Sequence[Mapping[str, Any]],
    labels: Sequence[int],
    data_sha256: str | None,
    actor: str,
    progress: Callable[[str, float], None] | None = None,
) -> Registered:
    """Train a spec on labelled rows and store it as a new immutable version. Making it active is a
    change request (`service.change_requests.activate_pipeline`)."""
    spec = parse_spec(spec_text)
    # Training is CPU-bound for seconds: keep it off the event loop.
    result = await asyncio.to_thread(train_pipeline, spec, rows, labels, progress=progress)
    now = dt.datetime.now(dt.UTC)
    async with engine.begin() as conn:
        version_id = await repo.insert_version(
            conn,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            artifact=result.artifact,
            metrics=result.metrics,
            sklearn_version=sklearn.__version__,
            training_data_sha256=data_sha256,
            created_by=actor,
            now=now,
        )
    return Registered(version_id=version_id, metrics=result.metrics)


async def assign_slot(engine: AsyncEngine, *, slot: str, version_id: int | None, actor: str) -> None:
    """Make a version active or shadow (None clears the slot). The version must compile here."""
    if slot not in repo.SLOTS:
        raise ValueError(f"unknown slot {slot!r}")
    async with engine.begin() as conn:
        if version_id is not None:
            row = await repo.get_version(conn, version_id)
            if row is None:
                raise PipelineNotFound(f"no pipeline version {version_id}")
            compile_version(row)
        await repo.set_slot(conn, slot=slot, version_id=version_id, actor=actor, now=dt.datetime.now(dt.UTC))


# --- reading and previewing -----------------------------------------------------------------------


def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The scalar figures of a metrics dict (one level of nesting), without tables."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, int | float | str | bool) or value is None:
            out[key] = value
        elif isinstance(value, dict):
            # Cross-validation figures are {"mean", "std", "folds"}: the headline is the mean.
            scalars = {
                k: v["mean"] if isinstance(v, dict) and "mean" in v else v
                for k, v in value.items()
                if isinstance(v, int | float | str | bool) or (isinstance(v, dict) and "mean" in v)
            }
            if scalars:
                out[key] = scalars
    return out


async def list_pipelines(engine: AsyncEngine) -> list[PipelineSummary]:
    async with engine.connect() as conn:
        slots = await repo.get_slots(conn)
        rows = await repo.list_versions(conn)
    return [_summary(row, slots) for row in rows]


def _summary(row: Mapping[str, Any], slots: Mapping[str, int]) -> PipelineSummary:
    return PipelineSummary(
        version=row["id"],
        name=row["name"],
        active=slots.get("active") == row["id"],
        shadow=slots.get("shadow") == row["id"],
        sklearn_version=row["sklearn_version"],
        training_data_sha256=row["training_data_sha256"],
        created_by=row["created_by"],
        created_at=row["created_at"],
        metrics=headline(row["metrics"]),
    )


async def read_pipeline(engine: AsyncEngine, version_id: int) -> PipelineRead:
    async with engine.connect() as conn:
        slots = await repo.get_slots(conn)
        row = await repo.get_version(conn, version_id)
    if row is None:
        raise PipelineNotFound(f"no pipeline version {version_id}")
    return PipelineRead(**_summary(row, slots).model_dump(), spec=row["spec"], metrics_detail=row["metrics"])


async def preview_score(
    engine: AsyncEngine, registry: PipelineRegistry, request: ScorePreviewRequest, *, now: dt.datetime
) -> ScorePreview:
    """Score a lead body with the active (or a named) version; stores nothing."""
    pipeline = registry.current.active
    if request.pipeline_version is not None and (pipeline is None or pipeline.version_id != request.pipeline_version):
        async with engine.connect() as conn:
            row = await repo.get_version(conn, request.pipeline_version)
        if row is None:
            raise PipelineNotFound(f"no pipeline version {request.pipeline_version}")
        pipeline = compile_version(row)
    if pipeline is None:
        raise NoActivePipeline("no pipeline version is active; name one with `pipeline_version`")
    as_of = request.as_of or now
    profile = LeadProfile(
        traits=request.traits,
        activities=tuple(Activity(a.name, a.occurred_at, a.properties) for a in request.activities),
    )
    try:
        score = pipeline.compiled.score(profile, now=as_of)
    except ScoringError as exc:
        raise InvalidPipeline(str(exc)) from None
    return ScorePreview(
        pipeline_version=pipeline.version_id,
        as_of=as_of,
        score=score.value,
        fit=score.fit,
        engagement=score.engagement,
        probability=score.probability,
        grade=score.grade,
        inputs_digest=score.inputs_digest,
        explanation=score.explanation.to_dict(),
    )


async def compare_pipeline(engine: AsyncEngine, version_id: int, *, baseline_id: int | None) -> PipelineComparison:
    """Compare a version's latest score per lead with the baseline's (default: the active version)."""
    async with engine.connect() as conn:
        if await repo.get_version(conn, version_id) is None:
            raise PipelineNotFound(f"no pipeline version {version_id}")
        if baseline_id is None:
            baseline_id = (await repo.get_slots(conn)).get("active")
            if baseline_id is None:
                raise NoActivePipeline("no pipeline version is active to compare with")
        rows = await repo.compare_versions(conn, version_id=version_id, baseline_id=baseline_id)
    changes: dict[str, dict[str, int]] = {}
    diffs = [row.score - row.baseline_score for row in rows]
    for row in rows:
        by = changes.setdefault(row.baseline_grade, {})
        by[row.grade] = by.get(row.grade, 0) + 1
    moves = sorted(rows, key=lambda r: abs(r.score - r.baseline_score), reverse=True)[:10]
    n = len(rows)
    return PipelineComparison(
        version=version_id,
        baseline_version=baseline_id,
        leads_compared=n,
        mean_score_difference=round(sum(diffs) / n, 4) if n else None,
        mean_absolute_score_difference=round(sum(abs(d) for d in diffs) / n, 4) if n else None,
        grade_agreement=round(sum(1 for r in rows if r.grade == r.baseline_grade) / n, 4) if n else None,
        grade_changes=changes,
        largest_moves=[
            {
                "lead_id": str(r.lead_id),
                "score": r.score,
                "baseline_score": r.baseline_score,
                "grade": r.grade,
                "baseline_grade": r.baseline_grade,
            }
            for r in moves
        ],
    )


# --- bulk -------------------------------------------------------------------------------------------


async def load_version(engine: AsyncEngine, version_id: int | None) -> tuple[LoadedPipeline, bool]:
    """A version compiled for use (default: the active one), and whether it is the active one."""
    async with engine.connect() as conn:
        active_id = (await repo.get_slots(conn)).get("active")
        wanted = version_id if version_id is not None else active_id
        if wanted is None:
            raise NoActivePipeline("no pipeline version is active; name one with --pipeline")
        row = await repo.get_version(conn, wanted)
    if row is None:
        raise PipelineNotFound(f"no pipeline version {wanted}")
    return compile_version(row), wanted == active_id


async def rescore_leads(
    engine: AsyncEngine,
    *,
    version_id: int | None,
    batch_size: int,
    lookback: dt.timedelta,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Re-score every live lead that has no score from the version yet, in batches of its own
    transactions. Resumable: a second run (after an interruption) skips leads already done. A
    version that is not active writes shadow records, so current scores do not change."""
    pipeline, is_active = await load_version(engine, version_id)
    pipelines = Pipelines(active=pipeline) if is_active else Pipelines(shadow=pipeline)
    now = dt.datetime.now(dt.UTC)
    done = 0
    after: uuid.UUID | None = None
    while True:
        async with engine.begin() as conn:
            ids = await repo.live_lead_ids_page(conn, after=after, limit=batch_size, not_scored_by=pipeline.version_id)
            if not ids:
                return done
            traits = await repo.lead_traits(conn, ids)
            await score_leads(conn, pipelines=pipelines, traits=traits, trigger={}, now=now, lookback=lookback)
        after = ids[-1]
        done += len(ids)
        if progress is not None:
            progress(len(ids))
