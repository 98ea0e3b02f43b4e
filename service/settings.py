"""Every setting of the service, read once from `LEADSCORE_*` variables (or a `.env` file)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """The service's configuration. Built once and handed to `create_app`; never read at import time."""

    model_config = SettingsConfigDict(env_prefix="LEADSCORE_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default="sqlite+aiosqlite:///./var/leadscore.db",
        description="SQLAlchemy async URL: sqlite+aiosqlite:///path or postgresql+asyncpg://user@host/db.",
    )
    host: str = Field(default="127.0.0.1", description="Address `leadscore serve` binds.")
    port: int = Field(default=8000, description="Port `leadscore serve` binds.")
    workers: int = Field(default=1, ge=1, description="Server processes for `leadscore serve`.")
    dev_mode: bool = Field(
        default=False,
        description="On start, create the `demo` source and an ops key if missing, and write them to "
        "`<var_dir>/dev-credentials.json`. For local use only.",
    )
    var_dir: Path = Field(default=Path("var"), description="Where dev-mode files are written.")
    max_body_bytes: int = Field(default=1_048_576, ge=1, description="Largest webhook body accepted (413).")
    max_events_per_request: int = Field(default=500, ge=1, description="Largest event list in one body.")
    webhook_tolerance_seconds: int = Field(
        default=300, ge=1, description="How far a signed timestamp may be from now, either way."
    )
    source_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long a process caches a source and its secrets; a rotation or disable "
        "takes effect within this time.",
    )
    retry_after_seconds: int = Field(default=5, ge=1, description="Retry-After sent with a 503.")
    db_pool_size: int = Field(default=10, ge=1, description="Connections per process (PostgreSQL).")
    group_commit_max_events: int = Field(
        default=2000, ge=1, description="Most events written in one group-commit transaction."
    )
    group_commit_writers: int = Field(
        default=1,
        ge=1,
        description="Concurrent group-commit writers per process on PostgreSQL; SQLite always uses one. "
        "More than one made batches smaller and contended in PostgreSQL (measured at 2 workers: "
        "32 % of the framework ceiling with 2 writers, 44 % with 1).",
    )
    pipeline_refresh_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How often a process checks which pipeline version is active or shadow, and which "
        "threshold policy is active.",
    )
    activity_lookback_days: int = Field(
        default=365, ge=1, description="How far back a lead's activities are read when it is scored."
    )
    require_approval: bool = Field(
        default=True,
        description="Change requests need the approval of a second ops identity before they apply. Off: a "
        "proposal is approved as it is made.",
    )
    change_window_days: int = Field(
        default=90,
        ge=1,
        description="Default window of a change request: leads scored this many days back are previewed and, "
        "with `reevaluate`, re-evaluated.",
    )
    impact_max_leads: int = Field(
        default=10_000, ge=1, description="Most leads an impact preview considers (it says when it stopped short)."
    )
    reevaluation_batch_size: int = Field(
        default=500, ge=1, description="Leads re-evaluated (and re-scored) per transaction when a change applies."
    )
    change_applier_seconds: float = Field(
        default=5.0, gt=0, description="How often a process applies approved change requests whose time has come."
    )
    lost_outcome_stage: Literal["recycled", "disqualified"] = Field(
        default="recycled", description="The stage a `lost` outcome from the CRM moves a lead to."
    )
    demo_pipeline_spec: Path = Field(
        default=Path("pipelines/x-education.yaml"),
        description="Dev mode: the spec trained at start-up when no pipeline version is active.",
    )
    demo_training_data: Path = Field(
        default=Path("../shared/data/x-education/leads_train.csv"),
        description="Dev mode: the labelled CSV (label `Converted`) the demo pipeline is trained on.",
    )
    log_level: str = Field(default="INFO", description="Logging level.")
    log_format: Literal["console", "json"] = Field(default="console", description="Log rendering.")
