"""The score-band and model reports, checked against figures computed here from what ingest answered
(each lead's score, probability and grade) and the outcomes the test recorded: plain Python counts,
pairwise ROC-AUC, Brier and log loss by their formulas."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import math
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fastapi import FastAPI

from service.app import create_app
from service.auth import SYSTEM, create_key
from service.change_requests import bootstrap_pipeline
from service.cli import main
from service.db import create_engine, write_transaction
from service.outcomes import OutcomeReport, record_outcomes
from service.pipelines import assign_slot
from service.settings import Settings
from tests.conftest import Sender, lead_event
from tests.service.test_scoring_service import GOOD, POOR, register

pytestmark = pytest.mark.anyio

BANDS = "/v1/reports/score-bands"
MODEL = "/v1/reports/model"
GRADES = [f"{letter}{digit}" for letter in "ABCD" for digit in "1234"]
MIN_OUTCOMES = 20


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def varied_traits(n: int) -> list[dict[str, str]]:
    """Traits that the demo pipeline scores all over the range (0 to 92 points, every grade letter)."""
    origins = ["API", "Landing Page Submission", "Lead Add Form"]
    occupations = ["Unemployed", "Working Professional", "Student", ""]
    return [
        {
            "Lead Origin": origins[i % 3],
            "What is your current occupation": occupations[(i // 3) % 4],
            "TotalVisits": str(i % 7),
            "Total Time Spent on Website": str((i * 137) % 2000),
        }
        for i in range(n)
    ]


@dataclass
class Env:
    app: FastAPI
    client: httpx.AsyncClient
    sender: Sender
    viewer: dict[str, str]
    ops: dict[str, str]
    version: int
    bootstrap_id: int

    async def get(self, url: str, **params: Any) -> Any:
        response = await self.client.get(url, params=params, headers=self.viewer)
        assert response.status_code == 200, response.text
        return response.json()

    async def csv_rows(self, url: str, **params: Any) -> list[dict[str, str]]:
        response = await self.client.get(url, params=params, headers={**self.viewer, "accept": "text/csv"})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/csv")
        return list(csv.DictReader(io.StringIO(response.text)))

    async def refresh(self) -> None:
        await self.app.state.services.pipelines.refresh()


@pytest.fixture
async def env(settings: Settings, trained: Any, sender: Sender) -> AsyncIterator[Env]:
    """The app over a database where the demo pipeline was made active by a bootstrap change request,
    with a viewer and an ops key; proposals apply at once (no second approver needed)."""
    configured = settings.model_copy(update={"report_model_min_outcomes": MIN_OUTCOMES, "require_approval": False})
    version = await register(configured, trained, slot=None)
    engine = create_engine(configured.database_url)
    try:
        request = await bootstrap_pipeline(engine, version, principal=SYSTEM, reason="first", now=now())
        viewer = await create_key(engine, name="vi", role="viewer", now=now())
        ops = await create_key(engine, name="ana", role="ops", now=now())
    finally:
        await engine.dispose()
    app = create_app(configured)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield Env(
            app,
            client,
            sender,
            {"authorization": f"Bearer {viewer.key}"},
            {"authorization": f"Bearer {ops.key}"},
            version,
            request.id,
        )


@dataclass
class Lead:
    """A lead as ingest scored it, and the outcomes the test recorded for it."""

    lead_id: str
    score: float
    probability: float
    grade: str
    kinds: list[str] = field(default_factory=list)

    @property
    def converted(self) -> bool:
        return bool({"converted", "won"} & set(self.kinds))

    @property
    def lost(self) -> bool:
        return "lost" in self.kinds and not self.converted


async def ingest(env: Env, prefix: str, traits: Sequence[dict[str, Any]]) -> list[Lead]:
    events = [lead_event(id=f"{prefix}-{i}", email=f"{prefix}{i}@acme.io", traits=t) for i, t in enumerate(traits)]
    response = await env.sender.post(env.client, events)
    assert response.status_code == 202, response.text
    answer = response.json()
    leads = []
    for lead_id in answer["lead_ids"]:
        score = answer["scores"][lead_id]
        leads.append(Lead(lead_id, score["score"], score["probability"], score["grade"]))
    return leads


async def record(env: Env, *outcomes: tuple[Lead, str], at: dt.datetime | None = None) -> None:
    """Record outcomes (kind per lead), happening at `at` (default: now), and note them on the leads."""
    async with write_transaction(env.app.state.services.engine) as conn:
        await record_outcomes(
            conn,
            source="hubspot",
            outcomes=[
                OutcomeReport(lead_id=uuid.UUID(lead.lead_id), kind=kind, occurred_at=at or now())  # type: ignore[arg-type]
                for lead, kind in outcomes
            ],
            lost_stage="recycled",
            now=now(),
        )
    for lead, kind in outcomes:
        lead.kinds.append(kind)


# --- the figures, computed here ------------------------------------------------------------------------


def expected_band_rows(leads: Sequence[Lead], edges: Sequence[float]) -> list[dict[str, Any]]:
    groups: list[tuple[str, str, float | None, float | None, list[Lead]]] = []
    for i, (lower, upper) in enumerate(zip(edges, edges[1:], strict=False)):
        last = i == len(edges) - 2
        members = [lead for lead in leads if lower <= lead.score and (lead.score < upper or last)]
        groups.append(("band", f"{lower:g}-{upper:g}", lower, upper, members))
    for grade in GRADES:
        groups.append(("grade", grade, None, None, [lead for lead in leads if lead.grade == grade]))
    return [expected_row(*group) for group in groups]


def expected_row(
    dimension: str, group: str, lower: float | None, upper: float | None, members: Sequence[Lead]
) -> dict[str, Any]:
    n = len(members)
    converted = sum(lead.converted for lead in members)
    lost = sum(lead.lost for lead in members)
    accepted = sum(bool({"accepted", "converted", "won"} & set(lead.kinds)) for lead in members)
    return {
        "dimension": dimension,
        "group": group,
        "lower": lower,
        "upper": upper,
        "leads": n,
        "accepted": accepted,
        "with_outcome": converted + lost,
        "converted": converted,
        "lost": lost,
        "open": n - converted - lost,
        "conversion_rate": converted / (converted + lost) if converted + lost else None,
        "conversion_rate_of_leads": converted / n if n else None,
        "mean_probability": sum(lead.probability for lead in members) / n if n else None,
        "mean_score": sum(lead.score for lead in members) / n if n else None,
    }


def assert_rows(actual: Sequence[dict[str, Any]], expected: Sequence[dict[str, Any]]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == (pytest.approx(value) if isinstance(value, float) else value), (want["group"], key)


def assert_csv_equals_json(rows: Sequence[dict[str, str]], json_rows: Sequence[dict[str, Any]]) -> None:
    assert len(rows) == len(json_rows)
    for line, row in zip(rows, json_rows, strict=True):
        assert list(line) == list(row)
        for key, value in row.items():
            if value is None:
                assert line[key] == ""
            elif isinstance(value, int | float):
                assert float(line[key]) == value
            else:
                assert line[key] == value


def pairwise_auc(pairs: Sequence[tuple[float, bool]]) -> float:
    positives = [p for p, y in pairs if y]
    negatives = [p for p, y in pairs if not y]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in positives for b in negatives)
    return wins / (len(positives) * len(negatives))


def brier(pairs: Sequence[tuple[float, bool]]) -> float:
    return sum((p - y) ** 2 for p, y in pairs) / len(pairs)


def log_loss(pairs: Sequence[tuple[float, bool]]) -> float:
    return -sum(math.log(p) if y else math.log(1 - p) for p, y in pairs) / len(pairs)


def expected_calibration(pairs: Sequence[tuple[float, bool]]) -> list[dict[str, Any]]:
    rows = []
    for b in range(10):
        members = [(p, y) for p, y in pairs if b / 10 <= p < (b + 1) / 10 or (b == 9 and p == 1.0)]
        rows.append(
            {
                "bin": b,
                "count": len(members),
                "mean_predicted": sum(p for p, _ in members) / len(members) if members else None,
                "observed_rate": sum(y for _, y in members) / len(members) if members else None,
            }
        )
    return rows


# --- score bands ---------------------------------------------------------------------------------------


async def test_score_bands_and_grades_match_counts_computed_here(env: Env) -> None:
    leads = await ingest(env, "b", varied_traits(48))
    pattern = [["accepted", "won"], ["converted"], ["lost"], ["accepted"], [], ["accepted", "lost"], ["won", "lost"]]
    for i, lead in enumerate(leads):
        kinds = pattern[i % len(pattern)]
        if kinds:
            await record(env, *((lead, kind) for kind in kinds))

    report = await env.get(BANDS)
    edges = [0, 20, 40, 60, 80, 100]
    expected = expected_band_rows(leads, edges)
    assert_rows(report["rows"], expected)
    assert [row["group"] for row in report["rows"]][:5] == ["0-20", "20-40", "40-60", "60-80", "80-100"]
    assert [row["group"] for row in report["rows"]][5:] == GRADES
    assert_rows([report["totals"]], [expected_row("all", "all", None, None, leads)])
    assert report["totals"]["leads"] == 48
    assert (report["pipeline_version"], report["active"], report["bands"]) == (env.version, True, edges)

    rates = [(row["group"], row["conversion_rate"]) for row in expected[:5] if row["conversion_rate"] is not None]
    falls = [(a, b) for (a, ra), (b, rb) in zip(rates, rates[1:], strict=False) if rb < ra]
    check = report["monotonicity"]
    assert check["bands_compared"] == len(rates)
    assert check["monotonic"] is (not falls)
    assert [(x["lower_band"], x["upper_band"]) for x in check["inversions"]] == falls


async def test_a_band_that_converts_less_than_the_one_below_breaks_monotonicity(env: Env) -> None:
    leads = await ingest(env, "m", varied_traits(48))
    # Every lead under 50 points converts, every lead from 50 up is lost: bands 40-60 and up fall.
    for lead in leads:
        await record(env, (lead, "won" if lead.score < 50 else "lost"))
    check = (await env.get(BANDS, bands="0,50,100"))["monotonicity"]
    assert check == {
        "monotonic": False,
        "bands_compared": 2,
        "inversions": [{"lower_band": "0-50", "upper_band": "50-100", "lower_rate": 1.0, "upper_rate": 0.0}],
    }
    for lead in leads:
        await record(env, (lead, "won"))
    assert (await env.get(BANDS))["monotonicity"]["monotonic"] is True


@pytest.mark.parametrize(
    ("params", "edges"),
    [({"bands": "0,25,50,75,100"}, [0, 25, 50, 75, 100]), ({"band_width": "30"}, [0, 30, 60, 90, 100])],
)
async def test_custom_bands_and_the_csv_equals_the_json(env: Env, params: dict[str, str], edges: list[float]) -> None:
    leads = await ingest(env, "c", varied_traits(30))
    for lead in leads[::3]:
        await record(env, (lead, "converted"))
    for lead in leads[1::3]:
        await record(env, (lead, "lost"))
    report = await env.get(BANDS, **params)
    assert report["bands"] == edges
    assert_rows(report["rows"], expected_band_rows(leads, edges))

    table = await env.csv_rows(BANDS, **params)
    assert_csv_equals_json(table, report["rows"])
    assert {line["dimension"] for line in table} == {"band", "grade"}
    by_format = await env.client.get(BANDS, params={**params, "format": "csv"}, headers=env.viewer)
    assert by_format.headers["content-disposition"] == 'attachment; filename="leadscore-score-bands.csv"'
    assert list(csv.DictReader(io.StringIO(by_format.text))) == table


async def test_the_period_counts_scores_made_in_it_and_outcomes_before_its_end(env: Env) -> None:
    early = await ingest(env, "early", varied_traits(6))
    await record(env, (early[0], "won"))
    boundary = now()
    late = await ingest(env, "late", varied_traits(6))
    await record(env, (late[0], "won"), (late[1], "lost"))
    end = now()
    after_end = end + dt.timedelta(hours=1)
    # Happens after the period's end: in the report that ends at `end`, `late[2]` is still open.
    await record(env, (late[2], "converted"), at=after_end)

    first = await env.get(BANDS, since=(boundary - dt.timedelta(days=1)).isoformat(), until=boundary.isoformat())
    assert_rows([first["totals"]], [expected_row("all", "all", None, None, early)])
    assert (first["totals"]["leads"], first["totals"]["converted"]) == (6, 1)

    second = await env.get(BANDS, since=boundary.isoformat(), until=end.isoformat())
    as_at_end = [replace(lead, kinds=[]) if lead is late[2] else lead for lead in late]
    assert_rows([second["totals"]], [expected_row("all", "all", None, None, as_at_end)])
    assert (second["totals"]["leads"], second["totals"]["converted"], second["totals"]["lost"]) == (6, 1, 1)

    until = after_end + dt.timedelta(seconds=1)
    later = await env.get(BANDS, since=boundary.isoformat(), until=until.isoformat())
    assert_rows([later["totals"]], [expected_row("all", "all", None, None, late)])
    assert later["totals"]["converted"] == 2
    assert [dt.datetime.fromisoformat(later["period"][k]) for k in ("since", "until")] == [boundary, until]


async def test_a_lead_is_reported_with_its_score_before_its_first_outcome(env: Env) -> None:
    [poor] = await ingest(env, "p", [POOR])
    await record(env, (poor, "accepted"))
    # Scored again, much higher, after sales took it up: the report keeps the score sales saw.
    response = await env.sender.post(env.client, lead_event(id="p-again", email="p0@acme.io", traits=GOOD))
    assert response.json()["score"] > poor.score + 20
    await record(env, (poor, "won"))
    report = await env.get(BANDS)
    assert_rows([report["totals"]], [expected_row("all", "all", None, None, [poor])])
    assert_rows(report["rows"], expected_band_rows([poor], [0, 20, 40, 60, 80, 100]))


async def test_merged_leads_are_left_out(env: Env) -> None:
    [first] = await ingest(env, "mg", [POOR])
    response = await env.sender.post(
        env.client, lead_event(id="mg-other", email=None, subject={"external_ids": {"hubspot": "77"}}, traits=GOOD)
    )
    other = response.json()["lead_id"]
    # An outcome is about the person: when its lead is merged away, it moves to the survivor.
    await record(env, (Lead(other, 0.0, 0.0, ""), "lost"))
    # One event names both: the newer lead is merged into the older one, which is scored again.
    response = await env.sender.post(
        env.client,
        lead_event(id="mg-both", email="mg0@acme.io", subject={"external_ids": {"hubspot": "77"}}, traits=GOOD),
    )
    merged = response.json()
    assert merged["lead_id"] == first.lead_id != other
    survivor = Lead(first.lead_id, merged["score"], merged["scores"][first.lead_id]["probability"], merged["grade"])
    await record(env, (survivor, "won"))
    # The survivor's first outcome is the moved `lost`, so the score it is reported with is the one
    # it had then (its own, from before the merge); with the `won` after it, it converted.
    reported = replace(first, kinds=["lost", "won"])
    report = await env.get(BANDS)
    assert_rows([report["totals"]], [expected_row("all", "all", None, None, [reported])])
    model = await env.get(MODEL)
    assert (model["outcomes"], model["positives"], model["negatives"], model["unscored"]) == (1, 1, 0, 0)


async def test_shadow_scores_are_ignored(env: Env, settings: Settings, trained: Any) -> None:
    shadow = await register(settings, trained, slot="shadow")
    await env.refresh()
    leads = await ingest(env, "s", varied_traits(8))
    await record(env, (leads[0], "won"), (leads[1], "lost"))
    # Each lead has an active and a shadow record; the shadow version has nothing else.
    assert (await env.get(BANDS))["totals"]["leads"] == 8
    for report in (await env.get(BANDS, pipeline=shadow), await env.get(MODEL, pipeline=shadow)):
        assert (report["pipeline_version"], report["active"]) == (shadow, False)
    empty = await env.get(BANDS, pipeline=shadow)
    assert (empty["totals"]["leads"], empty["monotonicity"]["monotonic"]) == (0, None)
    assert all(row["leads"] == 0 and row["conversion_rate"] is None for row in empty["rows"])
    model = await env.get(MODEL, pipeline=shadow)
    assert (model["outcomes"], model["unscored"]) == (0, 2)


async def test_scores_a_version_made_in_shadow_do_not_count_once_it_is_active(env: Env, settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    try:
        await assign_slot(engine, slot="active", version_id=None, actor="test")
        await assign_slot(engine, slot="shadow", version_id=env.version, actor="test")
        await env.refresh()
        answer = (await env.sender.post(env.client, lead_event(id="sh", email="sh@acme.io", traits=GOOD))).json()
        assert answer["scores"] == {}  # scored, but in shadow only
        await assign_slot(engine, slot="shadow", version_id=None, actor="test")
        await assign_slot(engine, slot="active", version_id=env.version, actor="test")
        await env.refresh()
    finally:
        await engine.dispose()
    shadowed = Lead(answer["lead_id"], 0.0, 0.0, "")
    active = await ingest(env, "ac", [POOR])
    await record(env, (shadowed, "won"), (active[0], "won"))
    assert_rows([(await env.get(BANDS))["totals"]], [expected_row("all", "all", None, None, active)])
    assert (await env.get(MODEL))["unscored"] == 1


# --- model -----------------------------------------------------------------------------------------------


async def test_model_figures_match_the_formulas_beside_training(env: Env, trained: Any) -> None:
    leads = await ingest(env, "md", varied_traits(48))
    # Mostly as the model says, with every fifth lead the other way, so the figures are not perfect.
    for i, lead in enumerate(leads):
        says = lead.probability >= 0.5
        await record(env, (lead, "won" if says != (i % 5 == 0) else "lost"))
    # One lead's outcome happened before it was scored: unscored, not counted.
    before = now()
    [late] = await ingest(env, "md-late", [GOOD])
    await record(env, (late, "lost"), at=before)
    pairs = [(lead.probability, lead.converted) for lead in leads]

    report = await env.get(MODEL)
    holdout = trained.result.metrics["holdout"]
    assert (report["outcomes"], report["positives"], report["negatives"], report["unscored"]) == (
        48,
        sum(y for _, y in pairs),
        sum(not y for _, y in pairs),
        1,
    )
    figures = report["figures"]
    assert figures["roc_auc"] == pytest.approx(pairwise_auc(pairs))
    assert figures["brier"] == pytest.approx(brier(pairs))
    assert figures["log_loss"] == pytest.approx(log_loss(pairs))
    assert report["training"] == pytest.approx({k: holdout[k] for k in ("roc_auc", "pr_auc", "brier", "log_loss")})
    warned = []
    if figures["roc_auc"] < holdout["roc_auc"] - 0.05:
        warned.append("roc_auc")
    if figures["brier"] > holdout["brier"] + 0.05:
        warned.append("brier")
    assert [w["metric"] for w in report["drift"]] == warned
    assert report["status"] == ("drift" if warned else "ok")
    assert report["min_outcomes"] == MIN_OUTCOMES

    calibration = expected_calibration(pairs)
    training_table = trained.result.metrics["calibration_table"]
    assert len(report["rows"]) == 10
    for row, want, trained_row in zip(report["rows"], calibration, training_table, strict=True):
        assert {k: row[k] for k in want} == pytest.approx(want)
        assert (row["lower"], row["upper"]) == pytest.approx((row["bin"] / 10, (row["bin"] + 1) / 10))
        assert row["training_count"] == trained_row["count"]
        assert row["training_observed_rate"] == pytest.approx(trained_row["observed_rate"])
    assert_csv_equals_json(await env.csv_rows(MODEL), report["rows"])


async def test_outcomes_that_contradict_the_scores_raise_drift_warnings(env: Env, trained: Any) -> None:
    leads = await ingest(env, "dr", varied_traits(40))
    for lead in leads:
        await record(env, (lead, "lost" if lead.probability >= 0.5 else "converted"))
    pairs = [(lead.probability, lead.converted) for lead in leads]
    holdout = trained.result.metrics["holdout"]
    assert pairwise_auc(pairs) < holdout["roc_auc"] - 0.05
    assert brier(pairs) > holdout["brier"] + 0.05

    report = await env.get(MODEL)
    assert report["status"] == "drift"
    drift = {w["metric"]: w for w in report["drift"]}
    assert drift.keys() == {"roc_auc", "brier"}
    assert drift["roc_auc"]["observed"] == pytest.approx(pairwise_auc(pairs))
    assert drift["roc_auc"]["training"] == pytest.approx(holdout["roc_auc"])
    assert drift["brier"]["observed"] == pytest.approx(brier(pairs))
    assert (drift["roc_auc"]["tolerance"], drift["brier"]["tolerance"]) == (0.05, 0.05)
    assert "roc_auc" in drift["roc_auc"]["detail"]


async def test_too_few_outcomes_or_one_kind_only_is_insufficient_data(env: Env) -> None:
    few = await ingest(env, "few", varied_traits(MIN_OUTCOMES - 1))
    await record(env, *((lead, "won" if i % 2 else "lost") for i, lead in enumerate(few)))
    report = await env.get(MODEL)
    assert (report["status"], report["outcomes"], report["figures"], report["drift"], report["rows"]) == (
        "insufficient_data",
        MIN_OUTCOMES - 1,
        None,
        [],
        [],
    )
    assert "insufficient data" in report["warnings"][0]
    assert report["training"]["roc_auc"] is not None
    response = await env.client.get(MODEL, headers={**env.viewer, "accept": "text/csv"})
    assert response.text.splitlines()[0].split(",")[:3] == ["bin", "lower", "upper"]
    assert list(csv.DictReader(io.StringIO(response.text))) == []

    # Enough outcomes in the period asked for, but all of them losses.
    since = now()
    lost = await ingest(env, "lost", varied_traits(MIN_OUTCOMES + 2))
    await record(env, *((lead, "lost") for lead in lost))
    only_lost = await env.get(MODEL, since=since.isoformat())
    assert (only_lost["status"], only_lost["outcomes"], only_lost["positives"], only_lost["figures"]) == (
        "insufficient_data",
        MIN_OUTCOMES + 2,
        0,
        None,
    )
    both = await env.get(MODEL)
    assert (both["outcomes"], both["status"] != "insufficient_data") == (2 * MIN_OUTCOMES + 1, True)
    assert both["figures"]["roc_auc"] is not None
    assert len(both["rows"]) == 10


async def test_the_model_window_starts_when_the_version_was_last_made_active(
    env: Env, settings: Settings, trained: Any
) -> None:
    start = now()
    first = await ingest(env, "w1", varied_traits(6))
    await record(env, *((lead, "won" if i % 2 else "lost") for i, lead in enumerate(first)))
    report = await env.get(MODEL)
    bootstrap = (await env.client.get(f"/v1/change-requests/{env.bootstrap_id}", headers=env.viewer)).json()
    assert report["activated_at"] == bootstrap["applied_at"]
    assert report["period"]["since"] == bootstrap["applied_at"]
    assert (report["outcomes"], report["unscored"]) == (6, 0)

    # Another version is made active, then the first is rolled back to: its window starts again.
    other = await register(settings, trained, slot=None)
    for change in (
        {"kind": "active_pipeline", "version": other},
        {"kind": "rollback", "target": "active_pipeline", "version": env.version},
    ):
        response = await env.client.post(
            "/v1/change-requests", json={"change": change, "reason": "test"}, headers=env.ops
        )
        assert response.json()["status"] == "applied", response.text
    rollback = response.json()
    await env.refresh()
    second = await ingest(env, "w2", varied_traits(4))
    await record(env, *((lead, "won" if i % 2 else "lost") for i, lead in enumerate(second)))

    report = await env.get(MODEL)
    assert report["activated_at"] == rollback["applied_at"] == report["period"]["since"]
    assert (report["outcomes"], report["positives"], report["negatives"]) == (4, 2, 2)
    whole = await env.get(MODEL, since=start.isoformat())
    assert (whole["outcomes"], whole["positives"]) == (10, 5)
    # The other version scored none of these leads: their outcomes since its activation are unscored.
    theirs = await env.get(MODEL, pipeline=other)
    assert (theirs["active"], theirs["outcomes"], theirs["unscored"]) == (False, 0, 4)


# --- errors and access -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        {"bands": "0,50"},
        {"bands": "10,50,100"},
        {"bands": "0,60,40,100"},
        {"bands": "0,x,100"},
        {"bands": ""},
        {"band_width": "0"},
        {"band_width": "0.5"},
        {"bands": "0,50,100", "band_width": "10"},
    ],
)
async def test_bad_bands_are_422(env: Env, params: dict[str, str]) -> None:
    response = await env.client.get(BANDS, params=params, headers=env.viewer)
    assert (response.status_code, response.json()["error"]) == (422, "InvalidReportBands"), response.text


@pytest.mark.parametrize("url", [BANDS, MODEL])
async def test_bad_periods_unknown_versions_and_access(env: Env, url: str) -> None:
    at = now().isoformat()
    reversed_period = await env.client.get(url, params={"since": at, "until": at}, headers=env.viewer)
    assert (reversed_period.status_code, reversed_period.json()["error"]) == (422, "InvalidReportPeriod")
    naive = await env.client.get(url, params={"since": "2026-11-01T00:00:00"}, headers=env.viewer)
    assert naive.status_code == 422
    unknown = await env.client.get(url, params={"pipeline": 999}, headers=env.viewer)
    assert (unknown.status_code, unknown.json()["error"]) == (404, "PipelineNotFound")
    assert (await env.client.get(url)).status_code == 401
    webhook_secret = {"authorization": f"Bearer {env.sender.secret}"}
    assert (await env.client.get(url, headers=webhook_secret)).json()["error"] == "Unauthenticated"
    assert (await env.client.get(url, headers=env.ops)).status_code == 200


async def test_no_active_version_is_409(client: httpx.AsyncClient, settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    try:
        key = (await create_key(engine, name="vi", role="viewer", now=now())).key
    finally:
        await engine.dispose()
    for url in (BANDS, MODEL):
        response = await client.get(url, headers={"authorization": f"Bearer {key}"})
        assert (response.status_code, response.json()["error"]) == (409, "NoActivePipeline")


async def test_the_cli_prints_the_same_reports(env: Env, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    leads = await ingest(env, "cli", varied_traits(30))
    for lead in leads[::2]:
        await record(env, (lead, "won"))
    for lead in leads[1::2]:
        await record(env, (lead, "lost"))
    monkeypatch.setenv("LEADSCORE_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("LEADSCORE_REPORT_MODEL_MIN_OUTCOMES", str(MIN_OUTCOMES))

    async def cli(*args: str) -> str:
        # The command runs its own event loop: keep it off this test's.
        printed = await asyncio.to_thread(CliRunner().invoke, main, ["reports", *args], catch_exceptions=False)
        assert printed.exit_code == 0, printed.output
        return printed.stdout

    def same(printed: dict[str, Any], served: dict[str, Any]) -> None:
        assert {k: v for k, v in printed.items() if k not in ("generated_at", "period")} == {
            k: v for k, v in served.items() if k not in ("generated_at", "period")
        }

    same(json.loads(await cli("score-bands", "--bands", "0,50,100")), await env.get(BANDS, bands="0,50,100"))
    assert list(csv.DictReader(io.StringIO(await cli("score-bands", "--format", "csv")))) == await env.csv_rows(BANDS)
    model = json.loads(await cli("model"))
    assert model["status"] != "insufficient_data"
    same(model, await env.get(MODEL))
    assert list(csv.DictReader(io.StringIO(await cli("model", "--format", "csv")))) == await env.csv_rows(MODEL)
    refused = await asyncio.to_thread(CliRunner().invoke, main, ["reports", "score-bands", "--bands", "0,200"])
    assert refused.exit_code == 1
    assert "InvalidReportBands" in refused.output
