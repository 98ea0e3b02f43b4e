"""Shared set-up of the qualification and change-control tests: the app with an active pipeline,
ops and viewer keys, and policies built from score lines."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI

from service.app import create_app
from service.auth import create_key
from service.db import create_engine, write_transaction
from service.repositories import qualification as repo
from service.settings import Settings
from tests.service.test_scoring_service import register


def score_line(field: str, op: str, value: float) -> dict[str, Any]:
    return {"field": field, "op": op, "value": value}


def policy(mql: dict[str, Any], sql: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    criteria: dict[str, Any] = {"mql": mql}
    if sql is not None:
        criteria["sql"] = sql
    return {"name": "test", "default": criteria, **extra}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def scores_of(trained: Any, *traits: dict[str, str]) -> list[float]:
    """What the demo pipeline scores leads with these traits (and no activities)."""
    return [trained.compiled.score(trained.profile(t), now=now()).value for t in traits]


@dataclass
class Env:
    """The app with an active pipeline, a client, ops and viewer keys, and the test's database."""

    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings
    ops: dict[str, str]
    ops2: dict[str, str]
    viewer: dict[str, str]
    pipeline_version: int

    async def activate_policy(self, spec: dict[str, Any]) -> int:
        """Make `spec` the active policy directly (what an applied change request does)."""
        engine = create_engine(self.settings.database_url)
        try:
            async with write_transaction(engine) as conn:
                policy_id = await repo.insert_policy(
                    conn, name=spec["name"], spec=spec, change_request_id=None, created_by="test", now=now()
                )
                await repo.set_active_policy(conn, policy_id=policy_id, actor="test", now=now())
        finally:
            await engine.dispose()
        await self.app.state.services.policies.refresh()
        return policy_id


async def _key(settings: Settings, role: str, name: str) -> dict[str, str]:
    engine = create_engine(settings.database_url)
    try:
        created = await create_key(engine, name=name, role="ops" if role == "ops" else "viewer", now=now())
    finally:
        await engine.dispose()
    return {"authorization": f"Bearer {created.key}"}


@asynccontextmanager
async def open_env(settings: Settings, trained: Any) -> AsyncIterator[Env]:
    """The app (lifespan running) over a database with the demo pipeline active, and keys: ops `ana`,
    ops `bo`, viewer `vi`."""
    version = await register(settings, trained)
    keys = [await _key(settings, role, name) for role, name in (("ops", "ana"), ("ops", "bo"), ("viewer", "vi"))]
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield Env(app, client, settings, keys[0], keys[1], keys[2], version)
