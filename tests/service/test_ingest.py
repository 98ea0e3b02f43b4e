"""Ingest: deduplication, identity, merges, raw bodies and storage failures, on a real database."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory

from service import migrate
from service.app import create_app
from service.db import create_engine
from service.errors import StorageUnavailable
from service.events import LeadEvent
from service.ingest import IngestJob, IngestWriter
from service.settings import Settings
from tests.conftest import Db, Sender, lead_event

pytestmark = pytest.mark.anyio


def u(value: object) -> str:
    """A UUID read by raw SQL (hex text on SQLite, uuid on PostgreSQL) as canonical text."""
    return str(uuid.UUID(str(value)))


@asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Another app instance on the same database: its own engine, pool and group-commit writer."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c


async def test_accepted_event_is_stored_with_its_raw_body(client: httpx.AsyncClient, sender: Sender, db: Db) -> None:
    body = json.dumps(lead_event(id="evt-1"), indent=1).encode() + b"\n"
    response = await client.post("/v1/webhooks/demo", content=body, headers=sender.headers(body, msg_id="m-1"))
    assert response.status_code == 202
    answer = response.json()
    [request] = await db.rows("SELECT body, webhook_id, source_id, received_at FROM inbound_request")
    assert bytes(request.body) == body
    assert request.webhook_id == "m-1"
    [event] = await db.rows("SELECT id, lead_id, external_id, type FROM inbound_event")
    assert (u(event.id), u(event.lead_id), event.external_id) == (
        answer["event_ids"][0],
        answer["lead_id"],
        "evt-1",
    )


async def test_repeat_is_200_with_the_original_result_and_changes_nothing(
    client: httpx.AsyncClient, sender: Sender, db: Db
) -> None:
    first = await sender.post(client, lead_event(), msg_id="same")
    before = await db.counts()
    updated_at = await db.scalar("SELECT updated_at FROM lead")
    again = await sender.post(client, lead_event(traits={"country": "ES"}), msg_id="same")
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json() | {"duplicate": False, "duplicates": [False]} == first.json()
    assert again.json()["duplicate"] is True
    assert await db.counts() == before
    assert await db.scalar("SELECT updated_at FROM lead") == updated_at


async def test_event_id_in_body_wins_over_webhook_id(client: httpx.AsyncClient, sender: Sender, db: Db) -> None:
    a = await sender.post(client, lead_event(id="evt-9"), msg_id="m-a")
    b = await sender.post(client, lead_event(id="evt-9"), msg_id="m-b")
    assert (a.status_code, b.status_code) == (202, 200)
    assert await db.scalar("SELECT count(*) FROM inbound_event") == 1


async def test_list_body_with_some_duplicates(client: httpx.AsyncClient, sender: Sender, db: Db) -> None:
    await sender.post(client, lead_event(id="e1"))
    events = [lead_event(id="e1"), lead_event(id="e2", email="bo@acme.io"), lead_event(id="e1")]
    response = await sender.post(client, events)
    assert response.status_code == 202
    body = response.json()
    assert body["duplicates"] == [True, False, True]
    assert body["lead_id"] is None
    assert body["event_ids"][0] == body["event_ids"][2]
    assert await db.scalar("SELECT count(*) FROM inbound_event") == 2
    assert await db.scalar("SELECT count(*) FROM inbound_request") == 2


async def test_list_without_ids_uses_webhook_id_and_position(client: httpx.AsyncClient, sender: Sender, db: Db) -> None:
    events = [lead_event(), lead_event(email="bo@acme.io")]
    assert (await sender.post(client, events, msg_id="batch-1")).status_code == 202
    keys = [r.external_id for r in await db.rows("SELECT external_id FROM inbound_event ORDER BY external_id")]
    assert keys == ["batch-1#0", "batch-1#1"]
    assert (await sender.post(client, events, msg_id="batch-1")).status_code == 200


async def test_fifty_concurrent_copies_store_one_event(
    client: httpx.AsyncClient, sender: Sender, settings: Settings, db: Db
) -> None:
    body = json.dumps(lead_event(id="once")).encode()
    async with app_client(settings) as other:
        clients = [client, other]
        responses = await asyncio.gather(
            *[
                clients[i % 2].post("/v1/webhooks/demo", content=body, headers=sender.headers(body, msg_id=f"m{i}"))
                for i in range(50)
            ]
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 49 + [202]
    assert {r.json()["event_ids"][0] for r in responses} == {responses[0].json()["event_ids"][0]}
    assert await db.counts() == {
        "lead": 1,
        "lead_identity": 1,
        "inbound_request": 1,
        "inbound_event": 1,
        "lead_merge": 0,
    }
    assert set((await db.orphans()).values()) == {0}


async def test_interleaved_events_of_one_person_give_one_lead(
    client: httpx.AsyncClient, sender: Sender, settings: Settings, db: Db
) -> None:
    # Each event names the person by a different mix of keys, sent concurrently through two app
    # instances, so their transactions race on the database.
    subjects = [
        {"email": "Ana@Acme.io"},
        {"external_ids": {"hubspot": "h-1"}},
        {"email": " ana@acme.io ", "external_ids": {"segment": "s-1"}},
        {"external_ids": {"hubspot": "h-1", "segment": "s-1"}},
        {"external_ids": {"mautic": "m-1", "hubspot": "h-1"}},
        {"email": "ana@acme.io", "external_ids": {"mautic": "m-1"}},
    ]
    async with app_client(settings) as other:
        clients = [client, other]
        responses = await asyncio.gather(
            *[
                sender.post(clients[i % 2], lead_event(email=None, id=f"e{i}", subject=subjects[i % len(subjects)]))
                for i in range(60)
            ]
        )
    assert all(r.status_code == 202 for r in responses), [r.text for r in responses if r.status_code != 202]
    live = await db.rows("SELECT id FROM lead WHERE merged_into_id IS NULL")
    assert len(live) == 1
    survivor = live[0].id
    assert await db.scalar("SELECT count(DISTINCT lead_id) FROM inbound_event") == 1
    [event_lead] = await db.rows("SELECT DISTINCT lead_id FROM inbound_event")
    assert u(event_lead.lead_id) == u(survivor)
    assert await db.scalar("SELECT count(*) FROM inbound_event") == 60
    identities = await db.rows("SELECT namespace, value FROM lead_identity ORDER BY namespace")
    assert [(i.namespace, i.value) for i in identities] == [
        ("email", "ana@acme.io"),
        ("hubspot", "h-1"),
        ("mautic", "m-1"),
        ("segment", "s-1"),
    ]
    merged = await db.scalar("SELECT count(*) FROM lead WHERE merged_into_id IS NOT NULL")
    assert await db.scalar("SELECT count(*) FROM lead_merge") == merged
    assert set((await db.orphans()).values()) == {0}


async def test_an_event_naming_two_leads_merges_them(
    client: httpx.AsyncClient, sender: Sender, settings: Settings, db: Db
) -> None:
    a = (await sender.post(client, lead_event(id="a", traits={"country": "PT", "title": "CTO"}))).json()["lead_id"]
    b = (
        await sender.post(
            client,
            lead_event(
                email=None,
                id="b",
                occurred_at="2026-11-21T10:00:00Z",
                subject={"external_ids": {"hubspot": "9"}},
                traits={"country": "ES"},
            ),
        )
    ).json()["lead_id"]
    assert a != b
    both = await sender.post(
        client, lead_event(id="c", occurred_at="2026-11-19T10:00:00Z", subject={"external_ids": {"hubspot": "9"}})
    )
    assert both.json()["lead_id"] == a  # the older lead survives
    [merge] = await db.rows("SELECT survivor_id, merged_id, event_id FROM lead_merge")
    assert (u(merge.survivor_id), u(merge.merged_id), u(merge.event_id)) == (a, b, both.json()["event_ids"][0])
    assert await db.scalar("SELECT count(*) FROM inbound_event") == 3
    assert await db.scalar("SELECT count(DISTINCT lead_id) FROM inbound_event") == 1
    assert set((await db.orphans()).values()) == {0}

    key = await _ops_key(settings)
    for lead_id in (a, b):
        lead = (await client.get(f"/v1/leads/{lead_id}", headers={"authorization": f"Bearer {key}"})).json()
        assert lead["id"] == a
        assert lead["merged_ids"] == [b]
        assert lead["events_total"] == 3
        # Latest event time wins per trait, whatever the arrival order.
        assert lead["traits"] == {"country": "ES", "title": "CTO"}
        assert {(i["namespace"], i["value"]) for i in lead["identities"]} == {
            ("email", "ana@acme.io"),
            ("hubspot", "9"),
        }


async def _ops_key(settings: Settings, role: str = "ops") -> str:
    from service.auth import create_key

    engine = create_engine(settings.database_url)
    try:
        return (await create_key(engine, name="t", role=role, now=dt.datetime.now(dt.UTC))).key  # type: ignore[arg-type]
    finally:
        await engine.dispose()


async def test_traits_do_not_depend_on_arrival_order(
    client: httpx.AsyncClient, sender: Sender, settings: Settings
) -> None:
    events = [
        lead_event(id=f"t{i}", occurred_at=f"2026-11-1{i}T10:00:00Z", traits={"stage": f"s{i}", f"k{i}": i})
        for i in range(5)
    ]
    first = (await sender.post(client, events[::-1])).json()["lead_id"]
    # Same events, another person, another order.
    shuffled = [e | {"id": e["id"] + "x", "subject": {"email": "bo@acme.io"}} for e in (events[2:] + events[:2])]
    second = (await sender.post(client, shuffled)).json()["lead_id"]
    key = await _ops_key(settings, "viewer")
    auth = {"authorization": f"Bearer {key}"}
    t1 = (await client.get(f"/v1/leads/{first}", headers=auth)).json()["traits"]
    t2 = (await client.get(f"/v1/leads/{second}", headers=auth)).json()["traits"]
    assert t1 == t2
    assert t1["stage"] == "s4"


async def test_lead_read_needs_a_valid_key(
    client: httpx.AsyncClient, sender: Sender, settings: Settings, db: Db
) -> None:
    lead_id = (await sender.post(client, lead_event())).json()["lead_id"]
    url = f"/v1/leads/{lead_id}"
    assert (await client.get(url)).status_code == 401
    assert (await client.get(url, headers={"authorization": "Bearer lsk_wrong"})).status_code == 401
    assert (await client.get(url, headers={"authorization": "Basic abc"})).status_code == 401
    # A webhook secret is not an API credential.
    assert (await client.get(url, headers={"authorization": f"Bearer {sender.secret}"})).status_code == 401
    key = await _ops_key(settings, "viewer")
    ok = await client.get(url, headers={"authorization": f"Bearer {key}"})
    assert ok.status_code == 200
    assert await db.scalar("SELECT count(*) FROM api_key WHERE last_used_at IS NOT NULL") == 1
    missing = await client.get(f"/v1/leads/{uuid.uuid4()}", headers={"authorization": f"Bearer {key}"})
    assert (missing.status_code, missing.json()["error"]) == (404, "LeadNotFound")

    async with db.engine.begin() as conn:
        from sqlalchemy import text

        await conn.execute(text("UPDATE api_key SET revoked_at = created_at"))
    revoked = await client.get(url, headers={"authorization": f"Bearer {key}"})
    assert (revoked.status_code, revoked.json()["error"]) == (401, "Unauthenticated")


async def test_expired_key_is_401(client: httpx.AsyncClient, settings: Settings) -> None:
    from service.auth import create_key

    engine = create_engine(settings.database_url)
    try:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        key = (await create_key(engine, name="old", role="ops", now=past, expires_at=past)).key
    finally:
        await engine.dispose()
    response = await client.get(f"/v1/leads/{uuid.uuid4()}", headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 401


async def test_unreachable_database_is_503_with_retry_after(settings: Settings, sender: Sender) -> None:
    dead = Settings(
        database_url=(
            "postgresql+asyncpg://postgres@127.0.0.1:9/none"
            if "postgresql" in settings.database_url
            else "sqlite+aiosqlite:////nonexistent-dir/leadscore.db"
        ),
        _env_file=None,  # type: ignore[call-arg]
    )
    async with app_client(dead) as c:
        response = await sender.post(c, lead_event())
        ready = await c.get("/readyz")
    await _let_aiosqlite_threads_finish()
    assert response.status_code == 503
    assert response.json()["error"] == "StorageUnavailable"
    assert response.headers["retry-after"] == str(dead.retry_after_seconds)
    assert ready.status_code == 503


async def test_writer_answers_503_when_the_database_goes_away(settings: Settings) -> None:
    url = (
        "postgresql+asyncpg://postgres@127.0.0.1:9/none"
        if "postgresql" in settings.database_url
        else "sqlite+aiosqlite:////nonexistent-dir/leadscore.db"
    )
    engine = create_engine(url)
    writer = IngestWriter(engine, max_batch_events=100, retry_after=7)
    writer.start()
    event = LeadEvent.model_validate(lead_event())
    job = IngestJob(
        source_id=1,
        webhook_id="w",
        content_type="application/json",
        body=b"{}",
        events=[event],
        event_keys=["w"],
        received_at=dt.datetime.now(dt.UTC),
    )
    try:
        with pytest.raises(StorageUnavailable) as caught:
            await writer.submit(job)
        assert caught.value.retry_after == 7
    finally:
        await writer.stop()
        await engine.dispose()
        await _let_aiosqlite_threads_finish()


def one_event_job(source_id: int, name: str, webhook_id: str | None = None) -> IngestJob:
    """A verified request of one event, named `name` (its id, webhook id and email), for the writer."""
    event = LeadEvent.model_validate(lead_event(id=name, email=f"{name}@acme.io"))
    return IngestJob(
        source_id=source_id,
        webhook_id=webhook_id or name,
        content_type="application/json",
        body=b"{}",
        events=[event],
        event_keys=[name],
        received_at=dt.datetime.now(dt.UTC),
    )


async def test_a_refused_job_fails_alone_and_leaves_no_transaction_open(
    settings: Settings, db: Db, sender: Sender
) -> None:
    """A job the database refuses (a webhook id longer than its column, which the HTTP edge refuses
    first; PostgreSQL checks lengths, SQLite does not) fails on its own, its neighbours in the batch
    are written, and the writer's connection is not left inside the failed transaction (it begins
    and commits on the driver, out of SQLAlchemy's sight): the next batch is written as usual."""
    engine = create_engine(settings.database_url)
    writer = IngestWriter(engine, max_batch_events=100, retry_after=7)
    source_id = await db.scalar("SELECT id FROM source WHERE name = :name", name=sender.source)

    writer.start()
    try:
        good, bad = await asyncio.gather(
            writer.submit(one_event_job(source_id, "good")),
            writer.submit(one_event_job(source_id, "bad", "w" * 300)),
            return_exceptions=True,
        )
        after = await writer.submit(one_event_job(source_id, "after"))
        open_transactions = (
            await db.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state LIKE 'idle in transaction%'"
            )
            if db.engine.dialect.name == "postgresql"
            else 0
        )
    finally:
        await writer.stop()
        await engine.dispose()
    assert not isinstance(good, BaseException)
    assert not isinstance(after, BaseException)
    assert open_transactions == 0
    stored = {row[0] for row in await db.rows("SELECT external_id FROM inbound_event")}
    if db.engine.dialect.name == "postgresql":
        assert isinstance(bad, StorageUnavailable)  # not stored: the sender gets a 503 and may retry
        assert stored == {"good", "after"}
    else:
        assert stored == {"good", "bad", "after"}


async def test_the_writer_survives_its_connection_being_closed_by_the_server(
    settings: Settings, db: Db, sender: Sender
) -> None:
    """The writer keeps its connection between batches; when the server ends it meanwhile (a
    restart, an idle timeout, an operator), the next batch is written on a fresh one instead of
    failing. On SQLite there is no server: two batches in a row are written."""
    engine = create_engine(settings.database_url)
    writer = IngestWriter(engine, max_batch_events=100, retry_after=7)
    source_id = await db.scalar("SELECT id FROM source WHERE name = :name", name=sender.source)

    writer.start()
    try:
        await writer.submit(one_event_job(source_id, "before"))
        if db.engine.dialect.name == "postgresql":
            ended = await db.scalar(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
            assert ended >= 1
        await writer.submit(one_event_job(source_id, "after"))
    finally:
        await writer.stop()
        await engine.dispose()
    assert {row[0] for row in await db.rows("SELECT external_id FROM inbound_event")} == {"before", "after"}


async def _let_aiosqlite_threads_finish() -> None:
    # After a failed connect, aiosqlite's worker thread still hands the close() result back to
    # the event loop a moment later; if the test's loop is closed by then, the thread raises.
    await asyncio.sleep(0.2)


async def test_readyz_and_healthz(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["database"] == "ok"


async def _set_schema_version(db: Db, version: str) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": version})


async def test_readyz_is_503_when_schema_is_behind(client: httpx.AsyncClient, db: Db) -> None:
    # The migration job of this release has not run: the database is at an earlier revision.
    head = migrate.head()
    assert head is not None
    previous = ScriptDirectory(str(migrate.MIGRATIONS_DIR)).get_revision(head).down_revision
    assert isinstance(previous, str)
    await _set_schema_version(db, previous)
    ready = await client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json() == {"status": "unavailable", "database": "ok", "migration": previous, "head": head}


async def test_readyz_stays_ready_when_a_newer_release_has_migrated(client: httpx.AsyncClient, db: Db) -> None:
    # A rolling upgrade migrates before it replaces this replica: a revision this code does not
    # know is ahead of it, and the replica keeps serving until it is replaced.
    await _set_schema_version(db, "9999_from_a_newer_release")
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ok",
        "database": "ok",
        "migration": "9999_from_a_newer_release",
        "head": migrate.head(),
    }


async def test_metrics_count_events_by_source_and_outcome(client: httpx.AsyncClient, sender: Sender) -> None:
    def sample(text: str, prefix: str) -> float:
        for line in text.splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    accepted = 'leadscore_webhook_events_total{outcome="accepted",source="demo"}'
    duplicate = 'leadscore_webhook_events_total{outcome="duplicate",source="demo"}'
    rejected = 'leadscore_webhook_events_total{outcome="InvalidSignature",source="demo"}'
    before = (await client.get("/metrics")).text
    await sender.post(client, lead_event(id="m1"))
    await sender.post(client, lead_event(id="m1"))
    await client.post("/v1/webhooks/demo", content=b"{}", headers={"content-type": "application/json"})
    after = (await client.get("/metrics")).text
    assert sample(after, accepted) - sample(before, accepted) == 1
    assert sample(after, duplicate) - sample(before, duplicate) == 1
    assert sample(after, rejected) - sample(before, rejected) == 1
    assert 'route="/v1/webhooks/{source}"' in after
    assert "leadscore_db_errors_total" in after


async def test_openapi_publishes_the_lead_event_schema(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    assert "LeadEvent" in schema["components"]["schemas"]
    body = schema["paths"]["/v1/webhooks/{source}"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["oneOf"][0]["$ref"] == "#/components/schemas/LeadEvent"
    for ref in json.dumps(schema).split('"$ref": "')[1:]:
        name = ref.split('"', 1)[0].rsplit("/", 1)[1]
        assert name in schema["components"]["schemas"], name
