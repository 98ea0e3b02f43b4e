"""Scoring in the service: scores on ingest, explanations, previews, shadow versions, rescoring."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from scoring.profile import Activity, LeadProfile
from service.app import create_app
from service.db import create_engine
from service.events import LeadEvent
from service.pipelines import (
    InvalidPipeline,
    assign_slot,
    pack_explanation,
    profile_of,
    rescore_leads,
    unpack_explanation,
)
from service.repositories import pipelines as repo
from service.repositories.tables import score_record
from service.settings import Settings
from tests.conftest import Db, Sender, lead_event

pytestmark = pytest.mark.anyio

GOOD = {
    "Lead Origin": "Lead Add Form",
    "What is your current occupation": "Working Professional",
    "TotalVisits": "6",
    "Total Time Spent on Website": "1500",
}
POOR = {"Lead Origin": "API", "Do Not Email": "Yes", "TotalVisits": "0"}


async def register(settings: Settings, trained: Any, *, slot: str | None = "active", artifact: Any = None) -> int:
    engine = create_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            version_id = await repo.insert_version(
                conn,
                name="x-education",
                spec=trained.spec_dict,
                artifact=artifact or trained.result.artifact,
                metrics=trained.result.metrics,
                sklearn_version="test",
                training_data_sha256=None,
                created_by="test",
                now=dt.datetime.now(dt.UTC),
            )
        if slot is not None:
            await assign_slot(engine, slot=slot, version_id=version_id, actor="test")
        return version_id
    finally:
        await engine.dispose()


async def latest_record(conn: Any, lead_id: uuid.UUID) -> Any:
    """The lead's latest active (non-shadow) score record."""
    return (
        await conn.execute(
            sa.select(score_record)
            .where(score_record.c.lead_id == lead_id, score_record.c.shadow.is_(False))
            .order_by(score_record.c.scored_at.desc(), score_record.c.id.desc())
            .limit(1)
        )
    ).one()


@pytest.fixture
async def ops(settings: Settings) -> dict[str, str]:
    from service.auth import create_key

    engine = create_engine(settings.database_url)
    try:
        key = (await create_key(engine, name="t", role="ops", now=dt.datetime.now(dt.UTC))).key
    finally:
        await engine.dispose()
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
async def scored_client(settings: Settings, trained: Any) -> AsyncIterator[tuple[httpx.AsyncClient, int]]:
    version = await register(settings, trained)
    fast = settings.model_copy(update={"pipeline_refresh_seconds": 0.05})
    app = create_app(fast)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c,
    ):
        yield c, version


async def test_ingest_scores_the_lead_and_answers_with_score_and_grade(
    scored_client: tuple[httpx.AsyncClient, int], sender: Sender, db: Db, trained: Any
) -> None:
    client, version = scored_client
    good = (await sender.post(client, lead_event(id="g", traits=GOOD))).json()
    poor = (await sender.post(client, lead_event(id="p", email="bo@acme.io", traits=POOR))).json()
    assert good["score"] > poor["score"]
    assert good["grade"][0] < poor["grade"][0]  # A is the best fit letter
    [record] = await db.rows(
        "SELECT pipeline_version_id, shadow, score, grade, probability, inputs_digest, explanation "
        "FROM score_record WHERE lead_id = :lead",
        lead=uuid.UUID(good["lead_id"]) if "postgresql" in str(db.engine.url) else uuid.UUID(good["lead_id"]).hex,
    )
    assert (record.pipeline_version_id, record.shadow, record.grade) == (version, False, good["grade"])
    assert record.score == good["score"]
    assert len(record.inputs_digest) == 64
    # The stored score is what the pipeline gives for the lead's profile.
    expected = trained.compiled.score(trained.profile(GOOD), now=dt.datetime.now(dt.UTC))
    assert record.probability == pytest.approx(expected.probability, abs=1e-12)


async def test_repeat_answers_with_the_current_score(
    scored_client: tuple[httpx.AsyncClient, int], sender: Sender, db: Db
) -> None:
    client, _ = scored_client
    first = await sender.post(client, lead_event(id="g", traits=GOOD), msg_id="m")
    again = await sender.post(client, lead_event(id="g", traits=GOOD), msg_id="m")
    assert again.status_code == 200
    assert (again.json()["score"], again.json()["grade"]) == (first.json()["score"], first.json()["grade"])
    assert await db.scalar("SELECT count(*) FROM score_record") == 1


async def test_activities_raise_engagement(scored_client: tuple[httpx.AsyncClient, int], sender: Sender) -> None:
    client, _ = scored_client
    now = dt.datetime.now(dt.UTC)
    before = (await sender.post(client, lead_event(id="g", traits=GOOD))).json()
    views = [
        lead_event(
            id=f"v{i}",
            type="lead.activity",
            name="Page Viewed",
            traits={},
            occurred_at=(now - dt.timedelta(hours=i)).isoformat(),
        )
        for i in range(3)
    ]
    after = (await sender.post(client, views)).json()
    lead_id = before["lead_id"]
    assert after["scores"][lead_id]["score"] > before["score"]


async def test_a_batch_scores_on_the_activities_a_read_back_would_give(
    scored_client: tuple[httpx.AsyncClient, int], sender: Sender, db: Db, trained: Any, settings: Settings
) -> None:
    """The batch scores before it writes: its leads' stored activities plus its own new ones (out of
    order, one day-capped, one of a lead merged in by the batch) must make the score that reading
    everything back after the commit makes."""
    client, _ = scored_client
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)

    def view(event_id: str, hours_ago: float, **subject: Any) -> dict[str, Any]:
        return lead_event(
            id=event_id,
            email=None,
            subject=subject,
            type="lead.activity",
            name="Page Viewed",
            traits={},
            properties={"url": "/pricing"},
            occurred_at=(now - dt.timedelta(hours=hours_ago)).isoformat(),
        )

    await sender.post(
        client, [lead_event(id="a", email="a@acme.io", traits=GOOD), view("a-old", 30, email="a@acme.io")]
    )
    await sender.post(
        client,
        [
            lead_event(id="b", email=None, subject={"external_ids": {"hubspot": "b-1"}}),
            view("b-old", 50, external_ids={"hubspot": "b-1"}),
        ],
    )
    batch = [
        view("a-new", 1, email="a@acme.io"),
        # The same person under both names: B is merged into A, and its page view counts for A.
        lead_event(
            id="both", email="a@acme.io", subject={"external_ids": {"hubspot": "b-1"}}, traits={"TotalVisits": "9"}
        ),
        view("a-earlier", 40, email="a@acme.io"),
        *(view(f"a-burst-{i}", 2 + i / 60, email="a@acme.io") for i in range(7)),
    ]
    answer = (await sender.post(client, batch)).json()
    [survivor] = set(answer["lead_ids"])
    lead_id = uuid.UUID(survivor)
    async with db.engine.connect() as conn:
        record = await latest_record(conn, lead_id)
    scored_at = record.scored_at
    async with db.engine.connect() as conn:
        traits = (await repo.lead_traits(conn, [lead_id]))[lead_id]
        activities = await repo.lead_activities(
            conn, [lead_id], since=scored_at - dt.timedelta(days=settings.activity_lookback_days)
        )
    assert len(activities) == 11  # a-old, b-old, a-new, a-earlier and the burst of 7
    expected = trained.compiled.score(profile_of(traits, activities), now=scored_at)
    assert (record.score, record.fit, record.engagement, record.inputs_digest) == (
        expected.value,
        expected.fit,
        expected.engagement,
        expected.inputs_digest,
    )
    assert record.probability == pytest.approx(expected.probability, abs=1e-12)
    assert answer["scores"][survivor]["score"] == expected.value


async def test_lead_read_has_score_explanation_and_history(
    scored_client: tuple[httpx.AsyncClient, int], sender: Sender, ops: dict[str, str]
) -> None:
    client, version = scored_client
    lead_id = (await sender.post(client, lead_event(id="a", traits=GOOD))).json()["lead_id"]
    await sender.post(client, lead_event(id="b", traits={"TotalVisits": "9"}, occurred_at="2026-11-21T10:00:00Z"))
    lead = (await client.get(f"/v1/leads/{lead_id}", headers=ops)).json()
    score = lead["score"]
    assert score["pipeline_version"] == version
    explanation = score["explanation"]
    assert {r["rule_id"] for r in explanation["rules"]} >= {"working-professional", "lead-add-form"}
    assert all({"name", "value", "contribution"} <= f.keys() for f in explanation["features"])
    assert len(explanation["top_features_up"]) <= 3
    assert [h["score"] for h in lead["score_history"]][0] == score["score"]
    assert len(lead["score_history"]) == 2
    assert lead["score_history"][0]["explanation"] is None
    assert lead["shadow_score"] is None


def test_stored_explanation_reads_back_as_the_scoring_core_gives_it(trained: Any) -> None:
    now = dt.datetime.now(dt.UTC)
    profile = LeadProfile(
        traits=GOOD,
        activities=tuple(Activity("Page Viewed", now - dt.timedelta(hours=h), {"url": "/pricing"}) for h in range(5)),
    )
    explanation = trained.compiled.score(profile, now=now).explanation
    stored = json.loads(json.dumps(pack_explanation(explanation)))  # as it comes back from the database
    assert unpack_explanation(stored) == json.loads(json.dumps(explanation.to_dict()))
    assert len(json.dumps(stored)) < 0.7 * len(json.dumps(explanation.to_dict()))


async def test_score_preview_persists_nothing(
    scored_client: tuple[httpx.AsyncClient, int], ops: dict[str, str], db: Db
) -> None:
    client, version = scored_client
    before = await db.counts()
    now = dt.datetime.now(dt.UTC)
    body = {
        "traits": GOOD,
        "activities": [{"name": "Page Viewed", "occurred_at": now.isoformat(), "properties": {"url": "/pricing"}}],
    }
    preview = await client.post("/v1/score", json=body, headers=ops)
    assert preview.status_code == 200, preview.text
    assert preview.json()["pipeline_version"] == version
    assert preview.json()["explanation"]["rules"]
    assert await db.counts() == before
    assert await db.scalar("SELECT count(*) FROM score_record") == 0
    unauthenticated = await client.post("/v1/score", json=body)
    assert unauthenticated.status_code == 401
    bad = await client.post("/v1/score", json={"traits": {"x": {"nested": 1}}}, headers=ops)
    assert bad.status_code == 422
    missing = await client.post("/v1/score", json={"traits": {}, "pipeline_version": 999}, headers=ops)
    assert (missing.status_code, missing.json()["error"]) == (404, "PipelineNotFound")


async def test_preview_without_an_active_pipeline_is_409(client: httpx.AsyncClient, ops: dict[str, str]) -> None:
    response = await client.post("/v1/score", json={"traits": GOOD}, headers=ops)
    assert (response.status_code, response.json()["error"]) == (409, "NoActivePipeline")


async def test_ingest_without_a_pipeline_stores_unscored(client: httpx.AsyncClient, sender: Sender, db: Db) -> None:
    answer = (await sender.post(client, lead_event())).json()
    assert (answer["score"], answer["grade"], answer["scores"]) == (None, None, {})
    assert await db.scalar("SELECT count(*) FROM inbound_event") == 1


async def test_shadow_version_scores_alongside_without_changing_current(
    scored_client: tuple[httpx.AsyncClient, int],
    sender: Sender,
    settings: Settings,
    trained: Any,
    ops: dict[str, str],
    db: Db,
) -> None:
    client, active = scored_client
    artifact = dict(trained.result.artifact) | {"intercept": trained.result.artifact["intercept"] + 1.0}
    shadow = await register(settings, trained, slot="shadow", artifact=artifact)
    await asyncio.sleep(0.3)  # the app's refresh loop picks the slot up
    answer = (await sender.post(client, lead_event(id="s", traits=GOOD))).json()
    rows = await db.rows("SELECT pipeline_version_id, shadow, score FROM score_record ORDER BY shadow")
    assert [(r.pipeline_version_id, r.shadow) for r in rows] == [(active, False), (shadow, True)]
    assert answer["scores"][answer["lead_id"]]["pipeline_version"] == active
    assert answer["score"] == rows[0].score
    lead = (await client.get(f"/v1/leads/{answer['lead_id']}", headers=ops)).json()
    assert lead["score"]["pipeline_version"] == active
    assert lead["shadow_score"]["pipeline_version"] == shadow

    comparison = (await client.get(f"/v1/pipelines/{shadow}/comparison", headers=ops)).json()
    assert comparison["baseline_version"] == active
    assert comparison["leads_compared"] == 1
    assert comparison["mean_score_difference"] == pytest.approx(rows[1].score - rows[0].score, abs=1e-3)
    listed = (await client.get("/v1/pipelines", headers=ops)).json()
    assert [(p["version"], p["active"], p["shadow"]) for p in listed] == [(active, True, False), (shadow, False, True)]
    detail = (await client.get(f"/v1/pipelines/{active}", headers=ops)).json()
    assert detail["spec"]["name"] == "x-education"
    assert detail["metrics"]["cv"]["roc_auc"] > 0.8
    assert (await client.get("/v1/pipelines/999", headers=ops)).status_code == 404


async def test_pipeline_versions_are_immutable_in_the_database(settings: Settings, trained: Any, db: Db) -> None:
    version = await register(settings, trained)
    for statement in ("UPDATE pipeline_version SET name = 'changed'", "DELETE FROM pipeline_version"):
        with pytest.raises(DBAPIError, match="immutable"):
            async with db.engine.begin() as conn:
                await conn.execute(sa.text(statement))
    assert await db.scalar("SELECT name FROM pipeline_version WHERE id = :v", v=version) == "x-education"


async def test_artifact_from_another_sklearn_version_is_refused(settings: Settings, trained: Any) -> None:
    artifact = dict(trained.result.artifact) | {"sklearn_version": "0.0.1"}
    version = await register(settings, trained, slot=None, artifact=artifact)
    engine = create_engine(settings.database_url)
    try:
        with pytest.raises(InvalidPipeline, match="scikit-learn .0.0.1."):
            await assign_slot(engine, slot="active", version_id=version, actor="test")
    finally:
        await engine.dispose()


async def test_rescore_is_resumable_and_uses_the_version(
    scored_client: tuple[httpx.AsyncClient, int], sender: Sender, settings: Settings, trained: Any, db: Db
) -> None:
    client, active = scored_client
    for i in range(7):
        await sender.post(client, lead_event(id=f"r{i}", email=f"p{i}@acme.io", traits=GOOD))
    other = await register(settings, trained, slot=None)
    engine = create_engine(settings.database_url)
    try:
        lookback = dt.timedelta(days=365)
        assert await rescore_leads(engine, version_id=other, batch_size=3, lookback=lookback) == 7
        # Everything is done: a second run (as after an interruption) finds nothing left.
        assert await rescore_leads(engine, version_id=other, batch_size=3, lookback=lookback) == 0
    finally:
        await engine.dispose()
    # A version that is not active writes shadow records: current scores stay the active one's.
    assert await db.scalar("SELECT count(*) FROM score_record WHERE pipeline_version_id = :v AND shadow", v=other) == 7
    assert await db.scalar("SELECT count(*) FROM score_record WHERE pipeline_version_id = :v", v=active) == 7


@pytest.mark.parametrize("moves_the_lead", [True, False], ids=["newest-activity", "out-of-order-activity"])
async def test_a_batch_that_waited_for_a_leads_lock_scores_on_the_activities_committed_meanwhile(
    settings: Settings, sender: Sender, db: Db, trained: Any, moves_the_lead: bool
) -> None:
    """One batch adds a page view to a lead it names by email and holds its locks; another names the
    same lead by its CRM id (no shared advisory lock) and waits for the lead's row lock in its
    lookup, whose snapshot began before the first committed. Its score must still count that page
    view, whether or not the view moved the lead's first or last event time (an out-of-order one
    does not)."""
    from service.ingest import IngestJob, event_keys, write_batch
    from service.pipelines import PipelineRegistry

    await register(settings, trained)
    engine = create_engine(settings.database_url)
    source_id = await db.scalar("SELECT id FROM source WHERE name = :name", name=sender.source)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)

    def job(*events: dict[str, Any]) -> IngestJob:
        parsed = [LeadEvent.model_validate(e) for e in events]
        return IngestJob(
            source_id=source_id,
            webhook_id=None,
            content_type="application/json",
            body=b"[]",
            events=parsed,
            event_keys=event_keys(parsed, None),
            received_at=now,
        )

    def view(event_id: str, hours_ago: float) -> dict[str, Any]:
        return lead_event(
            id=event_id,
            email="race@acme.io",
            type="lead.activity",
            name="Page Viewed",
            traits={},
            properties={"url": "/pricing"},
            occurred_at=(now - dt.timedelta(hours=hours_ago)).isoformat(),
        )

    both = {"external_ids": {"hubspot": "race-1"}}
    # The seed's events are 50 and 30 hours old: a page view 1 hour old moves the lead's last event
    # time, one 40 hours old moves neither its first nor its last.
    meanwhile_hours = 1 if moves_the_lead else 40
    try:
        pipelines = await PipelineRegistry(engine, refresh_seconds=60).refresh()
        async with engine.begin() as conn:
            await write_batch(
                conn,
                [
                    job(
                        lead_event(
                            id="seed",
                            email="race@acme.io",
                            subject=both,
                            traits=GOOD,
                            occurred_at=(now - dt.timedelta(hours=50)).isoformat(),
                        ),
                        view("seed-view", 30),
                    )
                ],
                now,
                pipelines=pipelines,
            )
        viewing = job(view("meanwhile", meanwhile_hours))
        updating = job(
            lead_event(
                id="update",
                email=None,
                subject=both,
                traits={"TotalVisits": "9"},
                occurred_at=(now - dt.timedelta(hours=20)).isoformat(),
            )
        )
        if engine.dialect.name == "postgresql":
            async with engine.connect() as first, engine.connect() as second:
                holding = await first.begin()
                await write_batch(first, [viewing], now, pipelines=pipelines)

                async def waiting() -> None:
                    async with second.begin():
                        await write_batch(second, [updating], now, pipelines=pipelines)

                task = asyncio.create_task(waiting())
                await asyncio.sleep(0.5)
                assert not task.done()  # waiting for the lead's row lock
                await holding.commit()
                await task
        else:
            # SQLite runs one writer at a time: the page view commits first.
            for batch in (viewing, updating):
                async with engine.begin() as conn:
                    await write_batch(conn, [batch], now, pipelines=pipelines)
    finally:
        await engine.dispose()

    [lead_id] = [uuid.UUID(str(row.lead_id)) for row in await db.rows("SELECT DISTINCT lead_id FROM inbound_event")]
    async with db.engine.connect() as conn:
        record = await latest_record(conn, lead_id)
        traits = (await repo.lead_traits(conn, [lead_id]))[lead_id]
        activities = await repo.lead_activities(conn, [lead_id], since=now - dt.timedelta(days=365))
    assert [a.name for a in activities] == ["Page Viewed", "Page Viewed"]
    expected = trained.compiled.score(profile_of(traits, activities), now=now)
    meanwhile_at = now - dt.timedelta(hours=meanwhile_hours)
    without = trained.compiled.score(
        profile_of(traits, [a for a in activities if a.occurred_at != meanwhile_at]), now=now
    )
    assert without.inputs_digest != expected.inputs_digest  # the page view counts: the test can tell
    assert (record.score, record.engagement, record.inputs_digest) == (
        expected.value,
        expected.engagement,
        expected.inputs_digest,
    )
