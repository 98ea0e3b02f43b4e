"""Every setting of the service, read once from `LEADSCORE_*` variables (or a `.env` file)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Asymmetric algorithms only: the keys come from a public JWKS, and an HMAC "key" made of a public
# key is the classic algorithm-confusion attack.
OIDC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


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
    public_base_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/?#\s]+(/[^?#\s]*)?$",
        description="The scheme, host and any path prefix (a prefix the proxy strips) under which senders "
        "reach this service, e.g. https://leads.example.com: the URL HubSpot signs is rebuilt from it. "
        "Unset: the scheme and Host header of each request.",
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
    report_model_min_outcomes: int = Field(
        default=50,
        ge=2,
        description="Model report: the fewest leads with a final outcome (and both a conversion and a loss among "
        "them) before ROC-AUC, Brier score and calibration are computed; fewer says `insufficient_data`.",
    )
    report_drift_roc_auc_tolerance: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Model report: warn of drift when ROC-AUC on outcomes is more than this (absolute) below "
        "the training hold-out's.",
    )
    report_drift_brier_tolerance: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="Model report: warn of drift when the Brier score on outcomes is more than this (absolute) "
        "above the training hold-out's.",
    )
    demo_pipeline_spec: Path = Field(
        default=Path("pipelines/x-education.yaml"),
        description="Dev mode: the spec trained at start-up when no pipeline version is active.",
    )
    demo_training_data: Path = Field(
        default=Path("../shared/data/x-education/leads_train.csv"),
        description="Dev mode: the labelled CSV (label `Converted`) the demo pipeline is trained on.",
    )
    oidc_issuer: str | None = Field(
        default=None,
        description="OpenID Connect: the identity provider's issuer (`iss`); with the audience and JWKS URL "
        "it turns on bearer tokens (JWT) next to API keys.",
    )
    oidc_audience: str | None = Field(default=None, description="OpenID Connect: the `aud` tokens must carry.")
    oidc_jwks_url: str | None = Field(
        default=None, description="OpenID Connect: the provider's JWKS URL (its signing keys), http(s)."
    )
    oidc_algorithms: list[str] = Field(
        default=["RS256", "ES256"],
        description=f"OpenID Connect: accepted signing algorithms, among {', '.join(OIDC_ALGORITHMS)}.",
    )
    oidc_role_claim: str = Field(
        default="roles",
        description="OpenID Connect: the claim holding the caller's roles or groups (a string or a list of "
        "strings); a dotted path reaches into objects (`realm_access.roles`).",
    )
    oidc_role_map: dict[str, Literal["ops", "viewer"]] = Field(
        default_factory=dict,
        description='OpenID Connect: claim values to roles, as JSON (`{"marketing-ops": "ops", "sales": '
        '"viewer"}`); `ops` wins when several match. Empty: the values `ops` and `viewer` themselves.',
    )
    oidc_leeway_seconds: int = Field(
        default=60, ge=0, le=600, description="OpenID Connect: clock skew allowed on `exp`, `nbf` and `iat`."
    )
    oidc_jwks_cache_seconds: float = Field(
        default=300, gt=0, description="OpenID Connect: how long the provider's keys are cached."
    )
    oidc_jwks_refresh_cooldown_seconds: float = Field(
        default=30,
        ge=0,
        description="OpenID Connect: a token signed by an unknown key id refetches the keys (rotation), at "
        "most once per this many seconds, so forged key ids cannot flood the provider.",
    )
    oidc_jwks_timeout_seconds: float = Field(
        default=5, gt=0, description="OpenID Connect: timeout of one JWKS fetch (503 when the provider is down)."
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

    # HubSpot enrichment (fetching the contacts id-only app webhook events name; sources with a token).
    enrichment_concurrency: int = Field(
        default=4, ge=1, le=100, description="HubSpot contact fetches in flight per worker process."
    )
    enrichment_poll_seconds: float = Field(
        default=1.0, gt=0, description="How often an idle worker looks for due enrichment fetches."
    )
    enrichment_max_attempts: int = Field(
        default=8, ge=1, description="Attempts before a failing enrichment fetch is given up (dead)."
    )

    @property
    def oidc_enabled(self) -> bool:
        return self.oidc_issuer is not None

    @model_validator(mode="after")
    def _oidc_complete(self) -> Settings:
        given = {
            "oidc_issuer": self.oidc_issuer,
            "oidc_audience": self.oidc_audience,
            "oidc_jwks_url": self.oidc_jwks_url,
        }
        if any(given.values()) and not all(given.values()):
            missing = ", ".join(f"LEADSCORE_{k.upper()}" for k, v in given.items() if not v)
            raise ValueError(f"OpenID Connect needs an issuer, an audience and a JWKS URL; missing {missing}")
        unknown = [a for a in self.oidc_algorithms if a not in OIDC_ALGORITHMS]
        if unknown or not self.oidc_algorithms:
            raise ValueError(f"LEADSCORE_OIDC_ALGORITHMS: choose among {', '.join(OIDC_ALGORITHMS)}; got {unknown}")
        if self.oidc_jwks_url is not None and not self.oidc_jwks_url.startswith(("https://", "http://")):
            raise ValueError("LEADSCORE_OIDC_JWKS_URL must be an http(s) URL")
        return self
