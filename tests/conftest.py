"""Shared fixtures: real databases built by the migrations, and signed-request helpers.

Every database test runs on SQLite, and also on PostgreSQL when LEADSCORE_TEST_DATABASE_URL is set
(a URL such as postgresql+asyncpg://postgres@127.0.0.1/test; a fresh database is created next to
it for the session and dropped after). SQLite tests each get a copy of a migrated template file;
PostgreSQL tests share the session's database and it is truncated before each test.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url
from standardwebhooks import Webhook

from service import migrate
from service.app import create_app
from service.settings import Settings
from service.sources import add_source

PG_ENV = "LEADSCORE_TEST_DATABASE_URL"
BACKENDS = ["sqlite"] + (["postgresql"] if os.environ.get(PG_ENV) else [])
REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def _pg_admin_dsn(url: str, database: str) -> str:
    u = make_url(url).set(drivername="postgresql", database=database)
    return u.render_as_string(hide_password=False)


@pytest.fixture(scope="session", params=BACKENDS)
def migrated_database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A database at the migrations' head, for the whole session, per backend."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "template.db"
        migrate.upgrade(f"sqlite+aiosqlite:///{path}")
        yield f"sqlite+aiosqlite:///{path}"
        return
    base = os.environ[PG_ENV]
    name = f"leadscore_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(_pg_admin_dsn(base, make_url(base).database or "postgres"))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    url = make_url(base).set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def db_url(migrated_database: str, tmp_path: Path) -> str:
    """A clean migrated database for one test."""
    if migrated_database.startswith("sqlite"):
        template = Path(migrated_database.split("///", 1)[1])
        path = tmp_path / "test.db"
        shutil.copyfile(template, path)
        return f"sqlite+aiosqlite:///{path}"

    async def truncate() -> None:
        conn = await asyncpg.connect(_pg_admin_dsn(migrated_database, make_url(migrated_database).database or ""))
        try:
            tables = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
            )
            if tables:
                names = ", ".join(f'"{t["tablename"]}"' for t in tables)
                # Append-only tables refuse TRUNCATE through a trigger; replica mode skips triggers.
                await conn.execute("SET session_replication_role = replica")
                await conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
            # A test may have moved the recorded revision (readiness checks do).
            await conn.execute("UPDATE alembic_version SET version_num = $1", migrate.head())
        finally:
            await conn.close()

    asyncio.run(truncate())
    return migrated_database


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        source_cache_seconds=0,
        var_dir=tmp_path / "var",
        _env_file=None,  # type: ignore[call-arg]
    )


@dataclass
class Sender:
    """A webhook sender: signs bodies with the vendor's own Standard Webhooks library."""

    source: str
    secret: str

    def headers(
        self,
        body: bytes,
        *,
        msg_id: str | None = None,
        at: dt.datetime | None = None,
        secret: str | None = None,
    ) -> dict[str, str]:
        msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
        at = at or dt.datetime.now(dt.UTC)
        signature = Webhook(secret or self.secret).sign(msg_id, at, body.decode())
        return {
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(at.timestamp())),
            "webhook-signature": signature,
        }

    async def post(
        self, client: httpx.AsyncClient, payload: Any, *, msg_id: str | None = None, **kw: Any
    ) -> httpx.Response:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return await client.post(
            f"/v1/webhooks/{self.source}", content=body, headers=self.headers(body, msg_id=msg_id, **kw)
        )


@pytest.fixture
async def sender(settings: Settings) -> Sender:
    from service.db import create_engine

    engine = create_engine(settings.database_url)
    try:
        created = await add_source(engine, name="demo", scheme="standard", now=dt.datetime.now(dt.UTC))
    finally:
        await engine.dispose()
    return Sender(source=created.name, secret=created.secret)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    """The app in process, its lifespan running."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app over httpx's ASGI transport."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


def lead_event(email: str | None = "ana@acme.io", **fields: Any) -> dict[str, Any]:
    """A valid canonical event, with fields overridden."""
    subject: dict[str, Any] = {}
    if email is not None:
        subject["email"] = email
    subject.update(fields.pop("subject", {}))
    event: dict[str, Any] = {
        "type": "lead.identified",
        "occurred_at": "2026-11-20T10:00:00Z",
        "subject": subject,
        "traits": {"country": "PT"},
    }
    event.update(fields)
    return event


@dataclass
class Db:
    """Direct SQL on the test database, to check what was (or was not) stored."""

    engine: Any

    async def scalar(self, sql: str, **params: Any) -> Any:
        from sqlalchemy import text

        async with self.engine.connect() as conn:
            return (await conn.execute(text(sql), params)).scalar()

    async def rows(self, sql: str, **params: Any) -> list[Any]:
        from sqlalchemy import text

        async with self.engine.connect() as conn:
            return list(await conn.execute(text(sql), params))

    async def counts(self) -> dict[str, int]:
        tables = ["lead", "lead_identity", "inbound_request", "inbound_event", "lead_merge"]
        return {t: int(await self.scalar(f"SELECT count(*) FROM {t}")) for t in tables}

    async def orphans(self) -> dict[str, int]:
        """Rows of the ingest tables (which carry no foreign keys) that point at nothing."""
        checks = {
            "event->lead": "SELECT count(*) FROM inbound_event e LEFT JOIN lead l ON l.id = e.lead_id "
            "WHERE l.id IS NULL",
            "event->request": "SELECT count(*) FROM inbound_event e LEFT JOIN inbound_request r "
            "ON r.id = e.request_id WHERE r.id IS NULL",
            "event->merged lead": "SELECT count(*) FROM inbound_event e JOIN lead l ON l.id = e.lead_id "
            "WHERE l.merged_into_id IS NOT NULL",
            "identity->lead": "SELECT count(*) FROM lead_identity i LEFT JOIN lead l ON l.id = i.lead_id "
            "WHERE l.id IS NULL OR l.merged_into_id IS NOT NULL",
            "score->lead": "SELECT count(*) FROM score_record s LEFT JOIN lead l ON l.id = s.lead_id "
            "WHERE l.id IS NULL",
        }
        return {name: int(await self.scalar(sql)) for name, sql in checks.items()}


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[Db]:
    from service.db import create_engine

    engine = create_engine(settings.database_url)
    try:
        yield Db(engine)
    finally:
        await engine.dispose()


@dataclass
class Trained:
    """The X Education demo pipeline, trained once per session."""

    spec_dict: dict[str, Any]
    result: Any
    compiled: Any

    def profile(self, traits: dict[str, Any]) -> Any:
        from scoring.profile import LeadProfile

        return LeadProfile(traits=traits)


def train_demo() -> Trained:
    """Train the X Education demo pipeline on its data (a few seconds); the `trained` fixture and the
    end-to-end benchmark (`bench/bench_e2e.py`) use it."""
    from scoring.pipeline import compile_pipeline
    from scoring.training import train_pipeline
    from service.pipelines import parse_spec, read_training_csv

    spec = parse_spec((REPO_ROOT / "pipelines" / "x-education.yaml").read_text())
    rows, labels, _ = read_training_csv(SHARED / "data" / "x-education" / "leads_train.csv", "Converted")
    result = train_pipeline(spec, rows, labels)
    return Trained(
        spec_dict=spec.model_dump(mode="json"), result=result, compiled=compile_pipeline(spec, result.artifact)
    )


@pytest.fixture(scope="session")
def trained() -> Trained:
    return train_demo()


@pytest.fixture(scope="session")
def crm_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The CRM peer (`tests/peers/crm_peer.py`) as a real process, shared by the session; tests
    reset its behaviour and tell their requests apart by idempotency key."""
    from tests.peers.process import CrmPeer

    peer = CrmPeer(tmp_path_factory.mktemp("crm-peer"))
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()
