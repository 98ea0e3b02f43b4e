"""HubSpot enrichment on a real database (both backends), against a local HTTP server that answers as
HubSpot's CRM API: signed app webhooks ask for fetches in the ingest transaction, the worker fetches
the contacts and feeds them back through the ingest path."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import structlog
from click.testing import CliRunner
from fastapi import FastAPI
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

import service.enrichment
from service.app import create_app
from service.auth import SYSTEM, create_key
from service.change_requests import bootstrap_routing
from service.change_schemas import RoutingRulesChange
from service.cli import main
from service.db import create_engine, write_transaction
from service.delivery.policy import RetryPolicy
from service.enrichment import EnrichmentConfig, EnrichmentWorker, standalone_worker
from service.repositories import enrichment as repo
from service.repositories import qualification as qualification_repo
from service.settings import Settings
from service.sources import SourceError, configure_source, list_all
from service.webhooks.base import SourceConfig
from service.webhooks.hubspot import contact_properties
from tests.conftest import Db, Sender, lead_event
from tests.peers.hubspot_api import HubSpotApi, Step
from tests.service.qualification_env import policy, score_line, scores_of
from tests.service.sources_support import create_source, u
from tests.service.test_scoring_service import GOOD, register
from tests.service.test_source_hubspot import PATH, app_events, hs_event, signed

pytestmark = pytest.mark.anyio

TOKEN = "pat-na1-5e0f3c1a-7d2b-4c59-9a41-3f6e8b2d1c07"  # a made-up private-app token
SOURCE = "hubspot"
# HubSpot property -> the trait the demo pipeline reads.
MAPPING = {
    "leadorigin": "Lead Origin",
    "occupation": "What is your current occupation",
    "totalvisits": "TotalVisits",
    "timeonsite": "Total Time Spent on Website",
}
CONTACT = {
    "email": "Ana@Acme.io",
    "firstname": "Ana",
    "lastname": "Silva",
    "company": "Acme",
    "leadorigin": GOOD["Lead Origin"],
    "occupation": GOOD["What is your current occupation"],
    "totalvisits": GOOD["TotalVisits"],
    "timeonsite": GOOD["Total Time Spent on Website"],
    "hs_lead_status": "NEW",
    "favourite_colour": "teal",  # defined in HubSpot, but nobody asks for it
}
HOOK_SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo="
DESTINATIONS = [{"name": "crm", "kind": "webhook", "url": "http://127.0.0.1:9/hooks", "secret": HOOK_SECRET}]
ROUTING = {
    "spec_version": 1,
    "name": "enrichment routing",
    "pools": [{"id": "sdr", "strategy": "round_robin", "members": [{"owner": "o-1"}]}],
    "rules": [{"id": "mql-to-sdr", "when": {"field": "stage", "op": "eq", "value": "mql"}, "target": {"pool": "sdr"}}],
    "fallback": {"queue": "unassigned"},
}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def millis(at: dt.datetime) -> int:
    return int(at.timestamp() * 1000)


def iso(at: dt.datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def fetches(outcome: str) -> float:
    return REGISTRY.get_sample_value("leadscore_enrichment_fetches_total", {"source": SOURCE, "outcome": outcome}) or 0


@pytest.fixture
def api() -> Iterator[HubSpotApi]:
    peer = HubSpotApi(TOKEN)
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


@dataclass
class Env:
    settings: Settings
    app: FastAPI
    client: httpx.AsyncClient
    secret: str
    api: HubSpotApi
    viewer: dict[str, str]

    async def post(self, *events: dict[str, Any]) -> httpx.Response:
        body = app_events(*events)
        return await self.client.post(PATH, content=body, headers=signed(body, self.secret))

    def worker(self, client: httpx.AsyncClient, **kw: Any) -> EnrichmentWorker:
        """A worker storing through this app's ingest writer (as the in-process one does)."""
        services = self.app.state.services
        config = EnrichmentConfig(
            concurrency=4,
            poll_s=0.05,
            lease=dt.timedelta(seconds=30),
            policy=RetryPolicy(
                max_attempts=5,
                max_age=dt.timedelta(hours=1),
                backoff_base_s=0.01,
                backoff_max_s=0.05,
                retry_after_max_s=10.0,
            ),
        )
        return EnrichmentWorker(
            services.engine,
            ingest=services.writer.submit,
            client=client,
            config=config,
            pipelines=lambda: services.pipelines.current,
            **kw,
        )

    async def lead(self, lead_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/leads/{lead_id}", headers=self.viewer)
        assert response.status_code == 200, response.text
        answer: dict[str, Any] = response.json()
        return answer


async def hubspot_source(settings: Settings, api: HubSpotApi, *, token: str | None = TOKEN) -> str:
    """The HubSpot source: its client secret, the mapping to the pipeline's traits, and (unless
    `token` is None) an API token and the peer as HubSpot's API."""
    secret = await create_source(settings, SOURCE, "hubspot", secret=str(uuid.uuid4()), mapping=MAPPING)
    engine = create_engine(settings.database_url)
    try:
        await configure_source(
            engine, name=SOURCE, api_token=token, api_base_url=api.url, properties=["hs_lead_status"]
        )
    finally:
        await engine.dispose()
    return secret


@asynccontextmanager
async def open_env(settings: Settings, api: HubSpotApi, secret: str) -> AsyncIterator[Env]:
    engine = create_engine(settings.database_url)
    try:
        viewer = (await create_key(engine, name="vi", role="viewer", now=now())).key
    finally:
        await engine.dispose()
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield Env(settings, app, client, secret, api, {"authorization": f"Bearer {viewer}"})


@pytest.fixture
def quiet_settings(settings: Settings) -> Settings:
    # No worker in the app: the tests run it, one batch at a time.
    return settings.model_copy(update={"delivery_in_process": False})


@pytest.fixture
async def env(quiet_settings: Settings, trained: Any, api: HubSpotApi) -> AsyncIterator[Env]:
    await register(quiet_settings, trained)
    secret = await hubspot_source(quiet_settings, api)
    async with open_env(quiet_settings, api, secret) as opened:
        yield opened


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as client:
        yield client


async def jobs(db: Db) -> list[Any]:
    return await db.rows(
        "SELECT id, object_id, status, requests, attempts, next_attempt_at, last_status_code, last_error, event_id "
        "FROM enrichment_job ORDER BY object_id"
    )


async def attempts(db: Db) -> list[tuple[int, str, int | None]]:
    rows = await db.rows("SELECT attempt, outcome, status_code FROM enrichment_attempt ORDER BY started_at, attempt")
    return [(r.attempt, r.outcome, r.status_code) for r in rows]


def as_time(value: Any) -> dt.datetime:
    when = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


async def wait_for(check: Callable[[], Awaitable[bool]], *, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


# The whole path


async def test_an_app_event_is_enriched_scored_qualified_and_handed_off(
    quiet_settings: Settings, trained: Any, api: HubSpotApi, db: Db
) -> None:
    """Signed app webhook -> a fetch asked for in the ingest transaction -> `leadscore worker`'s
    enrichment (its own ingest writer) -> the lead has the contact's traits and email, a new score,
    and qualifies and is handed off as any event would make it."""
    settings = quiet_settings.model_copy(update={"delivery_destinations": json.dumps(DESTINATIONS)})
    await register(settings, trained)
    secret = await hubspot_source(settings, api)
    bare, good = scores_of(trained, {}, GOOD)
    engine = create_engine(settings.database_url)
    try:
        await bootstrap_routing(
            engine, RoutingRulesChange(kind="routing_rules", spec=ROUTING), principal=SYSTEM, reason="t", now=now()
        )
        async with write_transaction(engine) as conn:
            spec = policy(score_line("score", "gte", (bare + good) / 2))
            policy_id = await qualification_repo.insert_policy(
                conn, name="t", spec=spec, change_request_id=None, created_by="test", now=now()
            )
            await qualification_repo.set_active_policy(conn, policy_id=policy_id, actor="test", now=now())
    finally:
        await engine.dispose()
    updated = now() - dt.timedelta(minutes=30)
    api.add_contact("123", CONTACT, updated_at=iso(updated))

    async with open_env(settings, api, secret) as env:
        answer = await env.post(hs_event(1, "contact.creation", occurredAt=millis(updated)))
        assert answer.status_code == 202, answer.text
        lead_id = answer.json()["lead_id"]
        assert answer.json()["stage"] == "lead"
        assert answer.json()["score"] == pytest.approx(bare, abs=0.01)
        # Stored and scored on what arrived; the fetch is only asked for: no HTTP yet.
        [job] = await jobs(db)
        assert (job.object_id, job.status, job.requests, job.attempts) == ("123", "pending", 1, 0)
        assert api.seen() == []

        fetched_before = fetches("fetched")
        engine = create_engine(settings.database_url)
        try:
            async with httpx.AsyncClient(timeout=5.0) as http, standalone_worker(engine, settings, http) as worker:
                assert await worker.run_once() == 1
                assert await worker.run_once() == 0
        finally:
            await engine.dispose()

        [request] = api.seen()
        assert (request["method"], request["path"]) == ("GET", "/crm/v3/objects/contacts/123")
        assert request["headers"]["authorization"] == f"Bearer {TOKEN}"
        asked = set(request["properties"])
        # The defaults, the source's own, those its mapping renames, the pipeline's that can be
        # HubSpot names; not the pipeline's traits with spaces (the mapping says where they come from).
        assert {"email", "firstname", "lastname", "company", "hs_lead_status"} <= asked
        assert set(MAPPING) <= asked
        assert {"Country", "City", "Specialization"} <= asked
        assert not any(" " in p for p in asked)
        assert "favourite_colour" not in asked

        lead = await env.lead(lead_id)
        assert lead["traits"]["Lead Origin"] == GOOD["Lead Origin"]
        assert lead["traits"]["What is your current occupation"] == GOOD["What is your current occupation"]
        assert lead["traits"]["TotalVisits"] == GOOD["TotalVisits"]
        assert (lead["traits"]["firstname"], lead["traits"]["hs_lead_status"]) == ("Ana", "NEW")
        assert "favourite_colour" not in lead["traits"]
        identities = {(i["namespace"], i["value"]) for i in lead["identities"]}
        assert identities == {("hubspot", "123"), ("email", "ana@acme.io")}
        assert len(lead["score_history"]) == 2
        assert lead["score"]["score"] == pytest.approx(good, abs=0.01)
        assert lead["score"]["score"] != pytest.approx(bare, abs=0.01)
        assert lead["stage"] == "mql"
        # One lead event of the source, keyed by the contact, its updatedAt and a digest: it made the new score.
        [event] = [e for e in lead["events"] if e["external_id"].startswith("contact:")]
        assert (event["source"], event["type"]) == (SOURCE, "lead.identified")
        assert event["external_id"].startswith(f"contact:123:{iso(updated)}:")
        assert lead["score"]["event_id"] == event["id"]

    [job] = await jobs(db)
    assert (job.status, job.attempts, job.last_status_code, job.last_error) == ("done", 1, 200, None)
    assert u(job.event_id) == event["id"]
    assert await attempts(db) == [(1, "fetched", 200)]
    # The answer is kept as the stored request of that event, as a webhook's body is.
    [raw] = await db.rows("SELECT body FROM inbound_request WHERE webhook_id = :w", w=f"enrichment:{u(job.id)}")
    assert json.loads(bytes(raw.body))["id"] == "123"
    [delivery] = await db.rows("SELECT lead_id, destination, status FROM delivery")
    assert (u(delivery.lead_id), delivery.destination, delivery.status) == (lead_id, "crm", "pending")
    assert fetches("fetched") == fetched_before + 1


async def test_the_fetched_email_merges_the_contact_with_the_lead_known_by_it(
    env: Env, sender: Sender, db: Db, http: httpx.AsyncClient
) -> None:
    form = await sender.post(env.client, lead_event(id="form-1", email="ana@acme.io", traits={"Country": "PT"}))
    assert form.status_code == 202, form.text
    known = form.json()["lead_id"]
    contact = (await env.post(hs_event(1, "contact.creation", occurredAt=millis(now())))).json()["lead_id"]
    assert contact != known
    env.api.add_contact("123", CONTACT, updated_at=iso(now()))

    assert await env.worker(http).run_once() == 1

    # The older lead survives; the HubSpot contact's lead was found to be the same person.
    survivor = await env.lead(contact)
    assert survivor["id"] == known
    assert contact in survivor["merged_ids"]
    assert {(i["namespace"], i["value"]) for i in survivor["identities"]} == {
        ("email", "ana@acme.io"),
        ("hubspot", "123"),
    }
    assert survivor["traits"]["Country"] == "PT"
    assert survivor["traits"]["Lead Origin"] == GOOD["Lead Origin"]
    assert await db.scalar("SELECT count(*) FROM lead_merge") == 1


# Deduplication


async def test_a_burst_of_changes_to_one_contact_is_one_fetch(env: Env, db: Db, http: httpx.AsyncClient) -> None:
    at = millis(now())
    env.api.add_contact("123", CONTACT, updated_at=iso(now()))
    env.api.add_contact("456", CONTACT | {"email": "bo@acme.io"}, updated_at=iso(now()))
    changes = [hs_event(i, propertyName="hs_lead_status", propertyValue=f"S{i}", occurredAt=at) for i in range(20)]
    for start in range(0, 20, 5):
        assert (await env.post(*changes[start : start + 5])).status_code == 202
    assert (await env.post(hs_event(99, "contact.creation", objectId=456, occurredAt=at))).status_code == 202
    # HubSpot retrying a request: the events are repeats and ask for nothing more.
    assert (await env.post(*changes[:5])).status_code == 200

    assert [(j.object_id, j.status, j.requests) for j in await jobs(db)] == [
        ("123", "pending", 20),
        ("456", "pending", 1),
    ]
    worker = env.worker(http)
    assert await worker.run_once() == 2
    assert await worker.run_once() == 0
    assert sorted(r["path"] for r in env.api.seen()) == [
        "/crm/v3/objects/contacts/123",
        "/crm/v3/objects/contacts/456",
    ]

    # A later change asks again: the same job, pending again with a fresh retry budget.
    assert (
        await env.post(hs_event(100, propertyName="firstname", propertyValue="Anna", occurredAt=at))
    ).status_code == 202
    assert [(j.object_id, j.status, j.requests, j.attempts) for j in await jobs(db)][0] == ("123", "pending", 21, 0)
    assert await worker.run_once() == 1
    assert len(env.api.seen()) == 3


@pytest.mark.parametrize(("ended", "status_code", "outcome"), [("done", 200, "fetched"), ("dead", 401, "dead")])
async def test_a_request_while_the_fetch_is_in_flight_fetches_again(
    env: Env, db: Db, ended: str, status_code: int, outcome: str
) -> None:
    """The fetch in flight may have read the contact before the change that asked again; and when it
    was refused (a 401 while the token was being replaced), the newer request is not lost with it."""
    lead_id = uuid.uuid4()
    [source_id] = [r.id for r in await db.rows("SELECT id FROM source WHERE name = :n", n=SOURCE)]
    ask = [repo.FetchRequest(source_id, "123", lead_id)]
    t0 = now()
    async with write_transaction(env.app.state.services.engine) as conn:
        await repo.request_fetches(conn, ask, now=t0)
    async with write_transaction(env.app.state.services.engine) as conn:
        [claimed] = await repo.claim_due(conn, limit=5, worker="w", now=t0, lease=dt.timedelta(seconds=30))
        await repo.request_fetches(conn, ask * 3, now=t0)
    [job] = await jobs(db)
    assert (job.status, job.requests) == ("in_flight", 4)

    done = repo.FetchOutcome(
        claimed=claimed, status=ended, worker="w", started_at=t0, duration_ms=1.0, status_code=status_code, error=None
    )
    async with write_transaction(env.app.state.services.engine) as conn:
        assert await repo.record_outcomes(conn, [done], now=t0) == 1
    [job] = await jobs(db)
    assert (job.status, job.attempts, job.last_status_code) == ("pending", 0, status_code)
    assert as_time(job.next_attempt_at) <= t0
    assert await attempts(db) == [(1, outcome, status_code)]

    # Recording the same claim again changes nothing: it no longer holds the job.
    async with write_transaction(env.app.state.services.engine) as conn:
        assert await repo.record_outcomes(conn, [done], now=t0) == 0
    assert sorted(await attempts(db)) == sorted([(1, outcome, status_code), (1, "stale", status_code)])

    # Claimed again, and this time nobody asks during the fetch: it ends as it ended.
    async with write_transaction(env.app.state.services.engine) as conn:
        [again] = await repo.claim_due(conn, limit=5, worker="w", now=t0, lease=dt.timedelta(seconds=30))
    async with write_transaction(env.app.state.services.engine) as conn:
        last = repo.FetchOutcome(
            claimed=again, status=ended, worker="w", started_at=t0, duration_ms=1.0, status_code=status_code, error=None
        )
        assert await repo.record_outcomes(conn, [last], now=t0) == 1
    [job] = await jobs(db)
    assert (job.status, job.attempts) == (ended, 1)


async def test_a_request_committed_during_a_fetch_fetches_again(env: Env, db: Db, http: httpx.AsyncClient) -> None:
    """Two real connections (on PostgreSQL, two sessions): the worker's claim is committed and its
    fetch is in flight when a webhook's ingest transaction asks for the same contact and commits;
    the worker then records its success, and the job runs once more and reads the newer contact."""
    first = now() - dt.timedelta(minutes=5)
    env.api.add_contact("123", CONTACT, updated_at=iso(first))
    assert (await env.post(hs_event(1, "contact.creation", occurredAt=millis(first)))).status_code == 202
    worker = env.worker(http)
    env.api.hold()
    fetching = asyncio.create_task(worker.run_once())
    try:

        async def in_flight() -> bool:
            return env.api.held() == 1

        await wait_for(in_flight)
        # Read on a connection of its own: the claim is committed.
        [job] = await jobs(db)
        assert (job.status, job.requests, job.attempts) == ("in_flight", 1, 1)

        later = now()
        env.api.add_contact("123", CONTACT | {"hs_lead_status": "OPEN"}, updated_at=iso(later))
        change = hs_event(2, propertyName="hs_lead_status", propertyValue="OPEN", occurredAt=millis(later))
        assert (await env.post(change)).status_code == 202
        [job] = await jobs(db)
        assert (job.status, job.requests) == ("in_flight", 2)
    finally:
        env.api.release()
        claimed = await fetching
    assert claimed == 1

    [job] = await jobs(db)
    assert (job.status, job.attempts, job.requests) == ("pending", 0, 2)
    assert await worker.run_once() == 1
    [job] = await jobs(db)
    assert (job.status, job.attempts) == ("done", 1)
    assert await attempts(db) == [(1, "fetched", 200), (1, "fetched", 200)]
    assert len(env.api.seen()) == 2
    fetched = await db.rows("SELECT external_id FROM inbound_event WHERE external_id LIKE 'contact:%' ORDER BY id")
    assert len(fetched) == 2
    assert fetched[0].external_id.startswith(f"contact:123:{iso(first)}:")
    assert fetched[1].external_id.startswith(f"contact:123:{iso(later)}:")


# Retries and giving up


@pytest.mark.parametrize(
    ("step", "wait_s"),
    [
        (Step(429, {"retry-after": "2"}), 2.0),
        (Step(503), 0.0),
        (Step(200, stall_seconds=3.0), 0.0),  # slower than the client's timeout
    ],
    ids=["429-retry-after", "503", "timeout"],
)
async def test_a_failed_fetch_is_retried_with_backoff(env: Env, db: Db, step: Step, wait_s: float) -> None:
    env.api.add_contact("123", CONTACT, updated_at=iso(now()))
    env.api.script(step)
    assert (await env.post(hs_event(1, "contact.creation", occurredAt=millis(now())))).status_code == 202
    offset = dt.timedelta(0)
    retries_before = fetches("retry")

    def clock() -> dt.datetime:
        return now() + offset

    async with httpx.AsyncClient(timeout=httpx.Timeout(0.5)) as http:
        worker = env.worker(http, clock=clock)
        tried_at = now()
        assert await worker.run_once() == 1
        [job] = await jobs(db)
        assert (job.status, job.attempts) == ("pending", 1)
        assert job.last_status_code == (None if step.status == 200 else step.status)
        assert as_time(job.next_attempt_at) >= tried_at + dt.timedelta(seconds=wait_s)
        if wait_s:
            assert await worker.run_once() == 0  # not before its Retry-After
        offset = dt.timedelta(seconds=10)
        assert await worker.run_once() == 1

    [job] = await jobs(db)
    assert (job.status, job.last_status_code, job.last_error) == ("done", 200, None)
    assert await attempts(db) == [(1, "retry", None if step.status == 200 else step.status), (2, "fetched", 200)]
    assert len(env.api.seen()) == 2
    assert fetches("retry") == retries_before + 1


@pytest.mark.parametrize(
    ("case", "status"),
    [("unknown-contact", 404), ("wrong-token", 401), ("missing-scope", 403)],
)
async def test_a_refused_fetch_gives_up_at_once(
    env: Env, db: Db, http: httpx.AsyncClient, case: str, status: int
) -> None:
    if case == "wrong-token":
        env.api.token = "pat-na1-another"
    if case != "unknown-contact":
        env.api.add_contact("123", CONTACT, updated_at=iso(now()))
    if case == "missing-scope":
        env.api.script(Step(403))
    answer = await env.post(hs_event(1, "contact.creation", occurredAt=millis(now())))
    dead_before = fetches("dead")

    worker = env.worker(http)
    assert await worker.run_once() == 1
    assert await worker.run_once() == 0

    [job] = await jobs(db)
    assert (job.status, job.attempts, job.last_status_code) == ("dead", 1, status)
    assert job.last_error == f"rejected with {status}"
    assert await attempts(db) == [(1, "dead", status)]
    assert len(env.api.seen()) == 1
    assert fetches("dead") == dead_before + 1
    lead = await env.lead(answer.json()["lead_id"])
    assert lead["traits"] == {}
    assert len(lead["score_history"]) == 1


async def configure(settings: Settings, **changes: Any) -> SourceConfig:
    engine = create_engine(settings.database_url)
    try:
        return await configure_source(engine, name=SOURCE, **changes)
    finally:
        await engine.dispose()


def state(value: Any) -> dict[str, Any]:
    """An audit entry's before/after (JSON text on SQLite)."""
    return value if isinstance(value, dict) else json.loads(value)


async def test_a_new_token_revives_the_fetches_a_refused_token_gave_up(
    env: Env, db: Db, http: httpx.AsyncClient
) -> None:
    env.api.add_contact("123", CONTACT, updated_at=iso(now()))
    # 456 is unknown to HubSpot: a 404 is about the contact, and a new token changes nothing for it.
    assert (await env.post(hs_event(1, "contact.creation", objectId=456, occurredAt=millis(now())))).status_code == 202
    worker = env.worker(http)
    assert await worker.run_once() == 1
    env.api.token = "pat-na1-rotated"  # ours was revoked
    assert (await env.post(hs_event(2, "contact.creation", occurredAt=millis(now())))).status_code == 202
    assert await worker.run_once() == 1
    assert [(j.object_id, j.status, j.last_status_code) for j in await jobs(db)] == [
        ("123", "dead", 401),
        ("456", "dead", 404),
    ]

    await configure(env.settings, api_token="pat-na1-rotated", reason="token rotated")
    job, unknown = await jobs(db)
    assert (job.status, job.attempts) == ("pending", 0)
    assert as_time(job.next_attempt_at) <= now()  # due at once
    assert (unknown.status, unknown.attempts) == ("dead", 1)
    [entry] = await db.rows(
        "SELECT before, after, reason FROM audit_entry WHERE action = 'source.configured' ORDER BY id DESC LIMIT 1"
    )
    assert state(entry.after)["fetches_revived"] == 1
    assert "fetches_revived" not in state(entry.before)
    assert entry.reason == "token rotated"

    assert await worker.run_once() == 1
    job, unknown = await jobs(db)
    assert (job.status, job.attempts, job.last_status_code) == ("done", 1, 200)
    assert env.api.seen()[-1]["headers"]["authorization"] == "Bearer pat-na1-rotated"
    assert unknown.status == "dead"
    # Setting the same token again revives nothing, and says nothing about it.
    await configure(env.settings, api_token="pat-na1-rotated")
    [entry] = await db.rows("SELECT after FROM audit_entry WHERE action = 'source.configured' ORDER BY id DESC LIMIT 1")
    assert "fetches_revived" not in state(entry.after)


async def test_a_fetch_refused_while_the_token_is_replaced_runs_again(
    env: Env, db: Db, http: httpx.AsyncClient
) -> None:
    """The worker read the old token and its fetch is in flight when the new one is set: HubSpot
    refuses the old one, and the job runs again with the new one instead of dying."""
    env.api.add_contact("123", CONTACT, updated_at=iso(now()))
    env.api.token = "pat-na1-rotated"
    assert (await env.post(hs_event(1, "contact.creation", occurredAt=millis(now())))).status_code == 202
    worker = env.worker(http)
    env.api.hold()
    fetching = asyncio.create_task(worker.run_once())
    try:

        async def in_flight() -> bool:
            return env.api.held() == 1

        await wait_for(in_flight)
        await configure(env.settings, api_token="pat-na1-rotated")
    finally:
        env.api.release()
        assert await fetching == 1
    [job] = await jobs(db)
    assert (job.status, job.attempts, job.last_status_code) == ("pending", 0, 401)

    assert await worker.run_once() == 1
    [job] = await jobs(db)
    assert (job.status, job.last_status_code) == ("done", 200)
    assert await attempts(db) == [(1, "dead", 401), (1, "fetched", 200)]
    assert [r["headers"]["authorization"] for r in env.api.seen()] == [f"Bearer {TOKEN}", "Bearer pat-na1-rotated"]


# Which changes ask for a fetch


async def test_changes_to_properties_the_source_does_not_read_fetch_nothing(env: Env, db: Db) -> None:
    """Our own HubSpot delivery writes the owner, the lifecycle stage and the score properties; HubSpot
    sends those changes back as webhooks. Fetching after them would store the contact again and score
    it again for nothing, after every handoff. Only a change to a property the source reads fetches."""
    at = millis(now())
    echoes = [
        hs_event(1, propertyName="hubspot_owner_id", propertyValue="o-1", objectId=1, occurredAt=at),
        hs_event(2, propertyName="lifecyclestage", propertyValue="marketingqualifiedlead", objectId=2, occurredAt=at),
        hs_event(3, propertyName="leadscore_score", propertyValue="71.5", objectId=3, occurredAt=at),
        hs_event(4, propertyName="leadscore_grade", propertyValue="B", objectId=4, occurredAt=at),
        hs_event(5, propertyName="favourite_colour", propertyValue="red", objectId=5, occurredAt=at),
    ]
    answer = await env.post(*echoes)
    assert answer.status_code == 202, answer.text
    # Stored and scored as they came, all the same.
    assert await db.scalar("SELECT count(*) FROM inbound_event") == len(echoes)
    assert await jobs(db) == []

    read = [
        hs_event(11, propertyName="email", propertyValue="ana@acme.io", objectId=11, occurredAt=at),  # a default
        hs_event(12, propertyName="hs_lead_status", propertyValue="OPEN", objectId=12, occurredAt=at),  # `properties`
        hs_event(13, propertyName="leadorigin", propertyValue="API", objectId=13, occurredAt=at),  # mapped
        hs_event(14, propertyName="Country", propertyValue="PT", objectId=14, occurredAt=at),  # the pipeline's trait
        hs_event(15, "contact.creation", objectId=15, occurredAt=at),
        hs_event(16, "contact.restore", objectId=16, occurredAt=at),
        hs_event(17, "contact.deletion", objectId=17, occurredAt=at),
    ]
    assert (await env.post(*read)).status_code == 202
    assert [j.object_id for j in await jobs(db)] == ["11", "12", "13", "14", "15", "16"]


# Configuration


async def test_without_a_token_nothing_is_fetched(quiet_settings: Settings, api: HubSpotApi, db: Db) -> None:
    secret = await hubspot_source(quiet_settings, api, token=None)
    async with open_env(quiet_settings, api, secret) as env:
        answer = await env.post(
            hs_event(1, "contact.creation", occurredAt=millis(now())),
            hs_event(2, propertyName="leadorigin", propertyValue="API", occurredAt=millis(now())),
        )
        assert answer.status_code == 202, answer.text
        # Scored on what arrived, as before enrichment existed.
        assert (await env.lead(answer.json()["lead_id"]))["traits"] == {"Lead Origin": "API"}
    assert await jobs(db) == []
    assert api.seen() == []


async def test_clearing_the_token_turns_enrichment_off(env: Env, db: Db, http: httpx.AsyncClient) -> None:
    assert (await env.post(hs_event(1, "contact.creation", occurredAt=millis(now())))).status_code == 202
    engine = create_engine(env.settings.database_url)
    try:
        await configure_source(engine, name=SOURCE, clear_api_token=True)
    finally:
        await engine.dispose()
    # The job asked for before: given up without a request (there is nothing to fetch with).
    assert await env.worker(http).run_once() == 1
    [job] = await jobs(db)
    assert (job.status, job.last_status_code) == ("dead", None)
    assert env.api.seen() == []
    assert (await env.post(hs_event(2, "contact.creation", objectId=456, occurredAt=millis(now())))).status_code == 202
    assert len(await jobs(db)) == 1


async def test_the_in_process_worker_enriches_on_its_own(
    settings: Settings, trained: Any, api: HubSpotApi, db: Db
) -> None:
    """SQLite's default (and PostgreSQL's when asked): the worker runs inside the service."""
    in_process = settings.model_copy(update={"delivery_in_process": True, "enrichment_poll_seconds": 0.05})
    await register(in_process, trained)
    secret = await hubspot_source(in_process, api)
    api.add_contact("123", CONTACT, updated_at=iso(now()))
    async with open_env(in_process, api, secret) as env:
        assert env.app.state.services.enrichment is not None
        answer = await env.post(hs_event(1, "contact.creation", occurredAt=millis(now())))
        lead_id = answer.json()["lead_id"]

        async def enriched() -> bool:
            return "Lead Origin" in (await env.lead(lead_id))["traits"]

        await wait_for(enriched)
    [job] = await jobs(db)
    assert job.status == "done"


def test_contact_properties_defaults() -> None:
    config = SourceConfig(mapping={"jobtitle": "Job Title", "fax": None}, properties=("hs_lead_status",))
    traits = ["Job Title", "country", "Lead Origin", "hubspotscore"]
    assert contact_properties(config, traits) == [
        "company",
        "country",
        "email",
        "firstname",
        "hs_lead_status",
        "hubspotscore",
        "jobtitle",
        "lastname",
    ]
    assert contact_properties(SourceConfig()) == ["company", "email", "firstname", "lastname"]


async def test_only_a_hubspot_source_takes_a_token_and_a_sane_one(settings: Settings, api: HubSpotApi) -> None:
    await create_source(settings, "form", "standard")
    await hubspot_source(settings, api, token=None)
    engine = create_engine(settings.database_url)
    try:
        with pytest.raises(SourceError, match="HubSpot setting"):
            await configure_source(engine, name="form", api_token=TOKEN)
        with pytest.raises(SourceError, match="HubSpot setting"):
            await configure_source(engine, name="form", properties=["jobtitle"])
        with pytest.raises(SourceError, match="printable"):
            await configure_source(engine, name=SOURCE, api_token="pat-na1\nx-injected: 1")
        with pytest.raises(SourceError, match="properties"):
            await configure_source(engine, name=SOURCE, properties=["job title"])
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://api.hubapi.com", "https only"),
        ("http://10.0.0.7:8080", "https only"),
        ("ftp://api.hubapi.com", "https:// URL"),
        ("https://user:pass@api.hubapi.com", "user or password"),
        ("https://api.hubapi.com@collector.example", "user or password"),
        ("https://api.hubapi.com/?next=1", "query or fragment"),
        ("https://api.hubapi.com/#x", "query or fragment"),
        ("https://api.hubapi.com:99999", "not a URL"),
        ("https://api.hubapi.com\n", "whitespace"),
    ],
)
async def test_the_api_base_url_is_https_or_this_machine(
    settings: Settings, api: HubSpotApi, url: str, problem: str
) -> None:
    """The API token is sent to it as a bearer token."""
    await hubspot_source(settings, api, token=None)
    with pytest.raises(SourceError, match=problem):
        await configure(settings, api_base_url=url)
    for fine in (
        "https://api.hubapi.com/",
        "https://eu1.api.example:8443/hubspot",
        "http://localhost:9",
        "http://[::1]:9",
    ):
        assert (await configure(settings, api_base_url=fine)).api_base_url == fine


async def test_a_new_api_base_url_takes_the_token_again_or_clears_it(settings: Settings, api: HubSpotApi) -> None:
    """The token is never sent to a host it was not given for."""
    await hubspot_source(settings, api)
    with pytest.raises(SourceError, match="give the token again"):
        await configure(settings, api_base_url="https://api.hubapi.com")
    # Other changes keep the token, and the same URL is no change.
    await configure(settings, properties=["jobtitle"], api_base_url=api.url)
    assert (await configure(settings, api_token=TOKEN, api_base_url="https://api.hubapi.com")).api_base_url == (
        "https://api.hubapi.com"
    )
    await configure(settings, api_base_url=api.url, clear_api_token=True)
    engine = create_engine(settings.database_url)
    try:
        [row] = [r for r in await list_all(engine) if r.name == SOURCE]
    finally:
        await engine.dispose()
    assert (row.config.api_base_url, row.api_token) == (api.url, None)
    # Without a token there is nothing to redirect.
    await configure(settings, api_base_url="https://api.hubapi.com")


async def test_fetches_never_wait_for_a_connection_of_the_delivery_pool(
    settings: Settings, trained: Any, api: HubSpotApi, db: Db
) -> None:
    """Enrichment has its own HTTP client in the service, its pool sized for its fetches: a delivery
    pool sized for one delivery does not make three of four fetches wait (and time out, counted as
    failed attempts). The peer answers only once four requests are in at once."""
    in_process = settings.model_copy(
        update={
            "delivery_in_process": True,
            "delivery_concurrency": 1,
            "delivery_timeout_seconds": 30.0,
            "enrichment_concurrency": 4,
            "enrichment_poll_seconds": 0.05,
        }
    )
    await register(in_process, trained)
    secret = await hubspot_source(in_process, api)
    ids = ["11", "12", "13", "14"]
    for contact_id in ids:
        api.add_contact(contact_id, CONTACT | {"email": f"c{contact_id}@acme.io"}, updated_at=iso(now()))
    api.hold(until=len(ids))
    async with open_env(in_process, api, secret) as env:
        # One body: the four jobs are asked for in one transaction, so the worker claims them together.
        creations = [
            hs_event(i, "contact.creation", objectId=int(c), occurredAt=millis(now())) for i, c in enumerate(ids)
        ]
        assert (await env.post(*creations)).status_code == 202

        async def all_fetched() -> bool:
            return [j.status for j in await jobs(db)] == ["done"] * len(ids)

        await wait_for(all_fetched, timeout=120.0)
    assert await attempts(db) == [(1, "fetched", 200)] * len(ids)
    assert len(api.seen()) == len(ids)


# The token stays secret


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """Every structlog entry the enrichment worker writes. The CLI configures structlog to cache its
    loggers, which `capture_logs` cannot reach: the worker gets a fresh, uncached logger here."""
    structlog.reset_defaults()
    monkeypatch.setattr(service.enrichment, "log", structlog.get_logger("service.enrichment"))
    with capture_logs() as captured:
        yield captured


async def test_the_token_never_shows(env: Env, db: Db, http: httpx.AsyncClient, logs: list[dict[str, Any]]) -> None:
    env.api.token = "pat-na1-another"  # HubSpot refuses ours: the failure is logged
    answer = await env.post(hs_event(1, "contact.creation", occurredAt=millis(now())))
    assert await env.worker(http).run_once() == 1
    assert any(entry["event"] == "enrichment fetch given up" for entry in logs)
    # ...and the webhook, the worker's own HTTP request and the answer are all there was.
    assert [r["headers"]["authorization"] for r in env.api.seen()] == [f"Bearer {TOKEN}"]

    seen: list[str] = [answer.text, json.dumps(await env.lead(answer.json()["lead_id"])), repr(logs)]
    seen += [repr(row) for row in await jobs(db)]
    seen += [repr(row) for row in await db.rows("SELECT * FROM enrichment_attempt")]
    seen += [repr(row) for row in await db.rows("SELECT * FROM audit_entry")]
    seen += [repr(row) for row in await db.rows("SELECT * FROM source")]
    seen.append((await env.client.get("/metrics")).text)
    assert [text for text in seen if TOKEN in text] == []


def test_the_cli_sets_and_clears_a_token_and_never_shows_it(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEADSCORE_DATABASE_URL", db_url)
    cli = CliRunner()

    def run(*args: str, stdin: str | None = None) -> Any:
        result = cli.invoke(main, list(args), input=stdin, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert TOKEN not in result.output
        return json.loads(result.stdout)

    run("sources", "add", SOURCE, "--scheme", "hubspot", "--secret-stdin", stdin=str(uuid.uuid4()) + "\n")
    configured = run(
        "sources", "configure", SOURCE, "--api-token-stdin", "--properties", "hs_lead_status,jobtitle",
        "--reason", "enrichment on", stdin=TOKEN + "\n",
    )  # fmt: skip
    assert configured["config"]["properties"] == ["hs_lead_status", "jobtitle"]
    assert run("sources", "list")[0]["api_token"] is True
    run("sources", "configure", SOURCE, "--clear-api-token", "--reason", "enrichment off")
    assert "api_token" not in run("sources", "list")[0]

    refused = cli.invoke(main, ["sources", "add", "form"], catch_exceptions=False)
    assert refused.exit_code == 0
    refused = cli.invoke(main, ["sources", "configure", "form", "--api-token-stdin"], input=TOKEN + "\n")
    assert refused.exit_code != 0
    assert "HubSpot setting" in refused.output
    assert TOKEN not in refused.output

    async def audit() -> list[Any]:
        engine = create_engine(db_url)
        try:
            async with engine.connect() as conn:
                return list(await conn.execute(sa.text("SELECT action, before, after FROM audit_entry ORDER BY id")))
        finally:
            await engine.dispose()

    entries = asyncio.run(audit())
    assert TOKEN not in repr(entries)

    def state(value: Any) -> dict[str, Any]:
        return value if isinstance(value, dict) else json.loads(value)

    configured_entries = [(state(e.before), state(e.after)) for e in entries if e.action == "source.configured"]
    assert [("api_token" in before, "api_token" in after) for before, after in configured_entries] == [
        (False, True),
        (True, False),
    ]
