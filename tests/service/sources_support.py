"""Helpers for the vendor source tests: make a source, run another app instance, read stored events."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from service.app import create_app
from service.db import create_engine
from service.settings import Settings
from service.sources import add_source, source_config
from tests.conftest import Db

EMPTY = {"lead": 0, "lead_identity": 0, "inbound_request": 0, "inbound_event": 0, "lead_merge": 0}


async def create_source(
    settings: Settings,
    name: str,
    scheme: str,
    *,
    secret: str | None = None,
    mapping: dict[str, Any] | None = None,
    signature_versions: list[str] | None = None,
) -> str:
    """A source of `scheme`; returns its secret (the one given, else the one made)."""
    engine = create_engine(settings.database_url)
    try:
        created = await add_source(
            engine,
            name=name,
            scheme=scheme,
            now=dt.datetime.now(dt.UTC),
            secret=secret,
            config=source_config(mapping=mapping, signature_versions=signature_versions),
        )
    finally:
        await engine.dispose()
    return created.secret


@asynccontextmanager
async def client_for(settings: Settings, base_url: str = "http://test") -> AsyncIterator[httpx.AsyncClient]:
    """An app instance with these settings, over httpx's ASGI transport."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url) as c,
    ):
        yield c


def u(value: object) -> str:
    """A UUID read by raw SQL (hex text on SQLite, uuid on PostgreSQL) as canonical text."""
    return str(uuid.UUID(str(value)))


async def stored_events(db: Db) -> list[dict[str, Any]]:
    """Every stored event as `{key, type, name, occurred_at, lead_id, payload}`, in key order."""
    rows = await db.rows(
        "SELECT external_id, type, name, occurred_at, lead_id, payload FROM inbound_event ORDER BY external_id"
    )
    out = []
    for row in rows:
        payload = row.payload if isinstance(row.payload, dict) else json.loads(row.payload)
        occurred = row.occurred_at
        if isinstance(occurred, str):
            occurred = dt.datetime.fromisoformat(occurred)
        if occurred.tzinfo is None:
            occurred = occurred.replace(tzinfo=dt.UTC)
        out.append(
            {
                "key": row.external_id,
                "type": row.type,
                "name": row.name,
                "occurred_at": occurred,
                "lead_id": u(row.lead_id),
                "payload": payload,
            }
        )
    return out


async def identities(db: Db) -> set[tuple[str, str]]:
    return {(r.namespace, r.value) for r in await db.rows("SELECT namespace, value FROM lead_identity")}


async def lead_traits(db: Db, lead_id: str) -> dict[str, Any]:
    for row in await db.rows("SELECT id, traits FROM lead"):
        if u(row.id) == lead_id:
            return row.traits if isinstance(row.traits, dict) else json.loads(row.traits)
    raise AssertionError(f"no lead {lead_id}")
