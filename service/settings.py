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
        default=2.0, gt=0, description="How often a process checks which pipeline version is active or shadow."
    )
    activity_lookback_days: int = Field(
        default=365, ge=1, description="How far back a lead's activities are read when it is scored."
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

    # CRM delivery (the outbox worker and its adapters).
    delivery_destinations: str | None = Field(
        default=None,
        description="CRM destinations as a JSON list (see README, Delivery); takes precedence over the file.",
    )
    delivery_destinations_file: Path | None = Field(
        default=None, description="A JSON or YAML file with the CRM destinations list."
    )
    delivery_in_process: bool | None = Field(
        default=None,
        description="Run one delivery worker inside the HTTP service. Default: on for SQLite (so `make run` "
        "delivers), off for PostgreSQL (run `leadscore worker` processes).",
    )
    delivery_concurrency: int = Field(default=16, ge=1, le=1000, description="Deliveries in flight per worker.")
    delivery_batch_size: int = Field(default=100, ge=1, le=5000, description="Most rows claimed per claim.")
    delivery_poll_seconds: float = Field(
        default=0.2, gt=0, description="How often an idle worker looks for due deliveries."
    )
    delivery_lease_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How long a claim lasts; a killed worker's rows are claimed again after it. Keep it "
        "well above the request timeout.",
    )
    delivery_timeout_seconds: float = Field(default=10.0, gt=0, description="Timeout of one CRM request.")
    delivery_max_attempts: int = Field(default=12, ge=1, description="Attempts before a delivery is a dead letter.")
    delivery_max_age_seconds: float = Field(
        default=86_400.0, gt=0, description="Age after which a failing delivery is a dead letter instead of retried."
    )
    delivery_backoff_base_seconds: float = Field(
        default=1.0, gt=0, description="Retry backoff: the first retry waits up to this long (full jitter)."
    )
    delivery_backoff_max_seconds: float = Field(
        default=300.0, gt=0, description="Retry backoff: the cap of the exponential growth."
    )
    delivery_retry_after_max_seconds: float = Field(
        default=3600.0, gt=0, description="The longest `Retry-After` honoured; longer ones are cut to this."
    )
    delivery_circuit_failures: int = Field(
        default=5, ge=1, description="Consecutive failures to a destination that open its circuit."
    )
    delivery_circuit_open_seconds: float = Field(
        default=30.0, gt=0, description="How long an open circuit waits before one probe delivery."
    )
