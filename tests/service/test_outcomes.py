"""Outcomes from sales: stored once, move the lifecycle stage by the documented mapping, and feed
the threshold recommendation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.db import write_transaction
from service.errors import LeadNotFound
from service.events import LeadEvent
from service.ingest import IngestJob, event_keys, write_batch
from service.outcomes import OutcomeReport, RecordedOutcome, record_outcomes
from service.settings import Settings
from tests.conftest import Db, Sender, lead_event
from tests.service.qualification_env import Env, now, open_env, scores_of
from tests.service.test_scoring_service import GOOD, POOR

pytestmark = pytest.mark.anyio


@pytest.fixture
async def env(settings: Settings, trained: Any) -> AsyncIterator[Env]:
    async with open_env(settings, trained) as opened:
        yield opened


async def record(
    env: Env, *reports: tuple[str, str, str | None], lost_stage: str = "recycled"
) -> list[RecordedOutcome]:
    async with write_transaction(env.app.state.services.engine) as conn:
        return await record_outcomes(
            conn,
            source="hubspot",
            outcomes=[
                OutcomeReport(lead_id=uuid.UUID(lead), kind=kind, occurred_at=now(), external_id=ext)  # type: ignore[arg-type]
                for lead, kind, ext in reports
            ],
            lost_stage=lost_stage,  # type: ignore[arg-type]
            now=now(),
        )


async def stage(env: Env, lead_id: str) -> str:
    value: str = (await env.client.get(f"/v1/leads/{lead_id}", headers=env.viewer)).json()["stage"]
    return value


async def test_outcomes_move_stages_by_the_mapping(env: Env, sender: Sender, db: Db) -> None:
    ids = [
        (await sender.post(env.client, lead_event(email=f"l{i}@acme.io", traits=GOOD))).json()["lead_id"]
        for i in range(4)
    ]
    done = await record(
        env, (ids[0], "accepted", "o1"), (ids[1], "converted", "o2"), (ids[2], "won", "o3"), (ids[3], "lost", "o4")
    )
    assert [(r.from_stage, r.to_stage) for r in done] == [
        ("lead", "sql"),
        ("lead", "opportunity"),
        ("lead", "customer"),
        ("lead", "recycled"),
    ]
    assert [await stage(env, i) for i in ids] == ["sql", "opportunity", "customer", "recycled"]
    # A repeat is ignored; a late "accepted" never takes a customer back; a lost customer stays one.
    again = await record(env, (ids[0], "accepted", "o1"), (ids[2], "accepted", "o5"), (ids[2], "lost", "o6"))
    assert [(r.duplicate, r.to_stage) for r in again] == [(True, None), (False, None), (False, None)]
    assert await db.scalar("SELECT count(*) FROM outcome") == 6
    # Lost leads may be disqualified instead; a recycled lead that is won becomes a customer.
    assert [r.to_stage for r in await record(env, (ids[0], "lost", None), lost_stage="disqualified")] == [
        "disqualified"
    ]
    assert [r.to_stage for r in await record(env, (ids[3], "won", None))] == ["customer"]
    lead = (await env.client.get(f"/v1/leads/{ids[3]}", headers=env.viewer)).json()
    latest = lead["transitions"][0]
    assert (latest["cause"], latest["actor"], latest["reason"], latest["downstream"]) == (
        "crm",
        "crm:hubspot",
        "CRM outcome won",
        False,
    )
    assert latest["outcome_id"] is not None
    with pytest.raises(LeadNotFound):
        await record(env, (str(uuid.uuid4()), "won", None))


async def test_recommendation_from_outcomes(env: Env, sender: Sender, trained: Any) -> None:
    good_score, poor_score = scores_of(trained, GOOD, POOR)
    leads = []
    for i, traits in enumerate((GOOD, GOOD, POOR, POOR)):
        leads.append(
            (await sender.post(env.client, lead_event(email=f"r{i}@acme.io", traits=traits))).json()["lead_id"]
        )
    await record(env, (leads[0], "won", None), (leads[1], "lost", None), (leads[2], "lost", None))
    url = "/v1/thresholds/recommendation"
    # At the good score: 1 converted of 2 labelled (precision 0.5), the only converted lead (recall 1),
    # 2 leads over 2 weeks. At the poor score: 1 of 3.
    answer = (await env.client.get(url, params={"target_precision": 0.5, "window_days": 14}, headers=env.viewer)).json()
    assert answer == {
        "target": {"precision": 0.5},
        "window_days": 14,
        "leads": 4,
        "labelled": 3,
        "cutoff": good_score,
        "precision": 0.5,
        "recall": 1.0,
        "weekly_volume": 1.0,
        "policy_example": {"mql": {"field": "score", "op": "gte", "value": good_score}},
    }
    volume = (await env.client.get(url, params={"weekly_volume": 5, "window_days": 14}, headers=env.viewer)).json()
    assert (volume["cutoff"], volume["weekly_volume"]) == (poor_score, 2.0)
    assert volume["precision"] == pytest.approx(1 / 3)
    unreachable = (await env.client.get(url, params={"target_precision": 0.9}, headers=env.viewer)).json()
    assert unreachable["cutoff"] is None
    both = await env.client.get(url, params={"target_precision": 0.5, "weekly_volume": 3}, headers=env.viewer)
    assert (both.status_code, both.json()["error"]) == (422, "InvalidRecommendationRequest")
    assert (await env.client.get(url, params={"target_precision": 2}, headers=env.viewer)).status_code == 422
    assert (await env.client.get(url, params={"target_precision": 0.5})).status_code == 401


async def test_an_outcome_recorded_while_its_lead_is_merged_lands_on_the_survivor(
    env: Env, sender: Sender, db: Db
) -> None:
    survivor = (await sender.post(env.client, lead_event(email="race@acme.io", traits=GOOD))).json()["lead_id"]
    merged = (
        await sender.post(
            env.client, lead_event(email=None, subject={"external_ids": {"hubspot": "race"}}, traits=GOOD)
        )
    ).json()["lead_id"]
    engine = env.app.state.services.engine
    source_id = await db.scalar("SELECT id FROM source WHERE name = :name", name=sender.source)
    event = LeadEvent.model_validate(
        lead_event(id="race-both", email="race@acme.io", subject={"external_ids": {"hubspot": "race"}}, traits=GOOD)
    )
    job = IngestJob(
        source_id=source_id,
        webhook_id=None,
        content_type="application/json",
        body=b"{}",
        events=[event],
        event_keys=event_keys([event], None),
        received_at=now(),
    )
    if engine.dialect.name == "postgresql":
        # The merge holds its locks, uncommitted, while the CRM reports on the lead it merges away:
        # the outcome waits for the merge and then follows it.
        async with engine.connect() as merging:
            transaction = await merging.begin()
            await write_batch(merging, [job], now())
            reporting = asyncio.create_task(record(env, (merged, "won", "race-won")))
            await asyncio.sleep(0.5)
            assert not reporting.done()
            await transaction.commit()
            [recorded] = await reporting
    else:
        # SQLite runs one writer at a time: the merge commits first, then the outcome follows it.
        async with write_transaction(engine) as conn:
            await write_batch(conn, [job], now())
        [recorded] = await record(env, (merged, "won", "race-won"))
    assert str(recorded.lead_id) == survivor
    assert await db.scalar("SELECT count(*) FROM lead WHERE merged_into_id IS NOT NULL") == 1
    assert [str(uuid.UUID(str(row.lead_id))) for row in await db.rows("SELECT lead_id FROM outcome")] == [survivor]
