"""Dev mode: a `demo` webhook source and an ops key, so a fresh checkout can be tried at once."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from service.auth import Principal, create_key
from service.change_requests import bootstrap_pipeline
from service.pipelines import read_training_csv, train_and_register
from service.repositories.pipelines import get_slots
from service.settings import Settings
from service.sources import SourceRegistry, add_source, rotate_source

log = structlog.get_logger(__name__)

DEMO_SOURCE = "demo"
DEV_MODE = Principal(subject="system:dev-mode", role="ops", name="dev mode")


async def bootstrap(engine: AsyncEngine, *, settings: Settings, base_url: str) -> Path:
    """Create what is missing and write `<var_dir>/dev-credentials.json` (mode 0600); train and
    activate the demo pipeline when no version is active."""
    var_dir = settings.var_dir
    await _demo_pipeline(engine, settings)
    path = var_dir / "dev-credentials.json"
    now = dt.datetime.now(dt.UTC)
    known: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    source = await SourceRegistry(engine, ttl=0, retry_after=1).get(DEMO_SOURCE)
    secret = known.get("webhook_secret")
    if source is None:
        secret = (await add_source(engine, name=DEMO_SOURCE, scheme="standard", now=now, actor=DEV_MODE)).secret
    elif secret not in source.secrets:
        secret = (await rotate_source(engine, name=DEMO_SOURCE, now=now, actor=DEV_MODE)).secret
    ops_key = known.get("ops_api_key")
    if not ops_key:
        ops_key = (await create_key(engine, name="dev-ops", role="ops", now=now, actor=DEV_MODE)).key
    credentials = {
        "webhook_url": f"{base_url}/v1/webhooks/{DEMO_SOURCE}",
        "webhook_source": DEMO_SOURCE,
        "webhook_scheme": "standard",
        "webhook_secret": secret,
        "ops_api_key": ops_key,
    }
    if credentials != known:
        var_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(credentials, f, indent=2)
            f.write("\n")
    log.info(
        "dev mode: demo webhook source and ops key ready",
        credentials_file=str(path),
        webhook_url=credentials["webhook_url"],
    )
    return path


async def _demo_pipeline(engine: AsyncEngine, settings: Settings) -> None:
    async with engine.connect() as conn:
        active = (await get_slots(conn)).get("active")
    if active is not None:
        log.info("dev mode: pipeline version active", version=active)
        return
    spec, data = settings.demo_pipeline_spec, settings.demo_training_data
    if not spec.is_file() or not data.is_file():
        log.warning(
            "dev mode: no pipeline is active and the demo spec or data is missing; events will be stored unscored",
            spec=str(spec),
            data=str(data),
        )
        return
    rows, labels, digest = read_training_csv(data, "Converted")
    registered = await train_and_register(
        engine, spec_text=spec.read_text(), rows=rows, labels=labels, data_sha256=digest, actor="dev-mode"
    )
    await bootstrap_pipeline(
        engine,
        registered.version_id,
        principal=DEV_MODE,
        reason="dev mode: the demo pipeline",
        now=dt.datetime.now(dt.UTC),
    )
    log.info(
        "dev mode: trained the demo pipeline and made it active (research data, not a product default)",
        version=registered.version_id,
        spec=str(spec),
        data=str(data),
        rows=len(rows),
    )
