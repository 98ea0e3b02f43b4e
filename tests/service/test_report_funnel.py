"""`GET /v1/reports/funnel` on real state (signed events, policy versions, ops moves, a merge), checked
against counts this test derives from what it did, not from the report's queries."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import statistics
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner

from service.cli import main
from service.db import create_engine
from service.settings import Settings
from service.sources import add_source
from tests.conftest import Sender, lead_event
from tests.service.qualification_env import Env, open_env, policy, score_line, scores_of
from tests.service.test_auth import IdentityProvider, idp, oidc_client, oidc_settings, published  # noqa: F401  (fixtures)
from tests.service.test_scoring_service import GOOD, POOR

pytestmark = pytest.mark.anyio

ROUTE = "/v1/reports/funnel"
STAGES = ["subscriber", "lead", "mql", "sql", "opportunity", "customer"]


@pytest.fixture
async def env(settings: Settings, trained: Any) -> AsyncIterator[Env]:
    async with open_env(settings, trained) as opened:
        yield opened


@pytest.fixture
async def other(settings: Settings) -> Sender:
    """A second webhook source, `other`."""
    engine = create_engine(settings.database_url)
    try:
        created = await add_source(engine, name="other", scheme="standard", now=dt.datetime.now(dt.UTC))
    finally:
        await engine.dispose()
    return Sender(source=created.name, secret=created.secret)


@dataclass
class Story:
    """What the test did: lead ids by name, the policy versions, and the times that bound periods."""

    ids: dict[str, str]
    p1: int
    p2: int
    since: dt.datetime  # O's move to mql: the period's first instant
    until: dt.datetime  # Z's creation: the period's end, excluded
    c_opportunity_at: dt.datetime
    env: Env

    async def read(self, name: str) -> dict[str, Any]:
        answer = await self.env.client.get(f"/v1/leads/{self.ids[name]}", headers=self.env.viewer)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())


def at(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


async def tell(env: Env, sender: Sender, other: Sender, trained: Any) -> Story:
    """Before the period: lead O. In it: O moved to mql by ops (the first instant); A, B (demo), C, D
    (other) under policy 1; E, F (demo) under policy 2; G (other) merged into F; H first sent by
    other and then by demo with an earlier event time (so H's first source is demo); A to sql, B to
    mql and then disqualified by ops, C straight to opportunity. At the end instant: Z is created.
    After the period: A becomes customer and E sql."""
    good, poor = scores_of(trained, GOOD, POOR)
    qualifying = policy(score_line("score", "gte", (good + poor) / 2))
    ids: dict[str, str] = {}

    async def send(name: str, via: Sender, email: str | None, traits: dict[str, str], **fields: Any) -> str:
        answer = await via.post(env.client, lead_event(id=f"evt-{name}", email=email, traits=traits, **fields))
        assert answer.status_code == 202, answer.text
        ids.setdefault(name, answer.json()["lead_id"])
        return str(answer.json()["stage"])

    async def move(name: str, stage: str) -> dt.datetime:
        body = {"stage": stage, "reason": "test", "trigger_downstream": False}
        answer = await env.client.post(f"/v1/leads/{ids[name]}/stage", json=body, headers=env.ops)
        assert answer.status_code == 200, answer.text
        return at(answer.json()["transitioned_at"])

    p1 = await env.activate_policy(qualifying)
    assert await send("O", sender, "o@old.io", POOR) == "lead"
    since = await move("O", "mql")
    assert await send("A", sender, "a@acme.io", GOOD) == "mql"
    assert await send("B", sender, "b@acme.io", POOR) == "lead"
    assert await send("C", other, "c@beta.io", GOOD) == "mql"
    assert await send("D", other, "d@beta.io", POOR) == "lead"
    p2 = await env.activate_policy({**qualifying, "name": "second"})
    assert await send("E", sender, "e@acme.io", GOOD) == "mql"
    assert await send("F", sender, "f@gamma.io", GOOD) == "mql"
    assert await send("G", other, None, POOR, subject={"external_ids": {"hubspot": "77"}}) == "lead"
    await send("FG", sender, "f@gamma.io", GOOD, subject={"external_ids": {"hubspot": "77"}})
    await send("H", other, "h@delta.io", POOR, occurred_at="2026-11-20T10:00:00Z")
    await send("H-early", sender, "h@delta.io", POOR, occurred_at="2026-11-19T10:00:00Z")
    await move("A", "sql")
    await move("B", "mql")
    await move("B", "disqualified")
    c_opportunity_at = await move("C", "opportunity")
    assert await send("Z", sender, "z@late.io", POOR) == "lead"
    story = Story(ids, p1, p2, since, dt.datetime.min, c_opportunity_at, env)
    story.until = at((await story.read("Z"))["created_at"])
    await move("A", "customer")
    await move("E", "sql")

    # The merge happened: G's id answers with F, which lists G as merged in.
    merged = await story.read("G")
    assert merged["id"] == ids["F"]
    assert ids["G"] in merged["merged_ids"]
    assert ids["H-early"] == ids["H"]
    return story


def expected_rows(group: str, reached: list[int], entered: list[int]) -> list[dict[str, Any]]:
    """Rows without the medians: shares and conversions from the counts."""
    cohort = reached[0]
    return [
        {
            "group": group,
            "stage": stage,
            "cohort": cohort,
            "reached": reached[i],
            "share": reached[i] / cohort if cohort else None,
            "conversion_from_previous": None if i == 0 else (reached[i] / reached[i - 1] if reached[i - 1] else None),
            "entered_in_period": entered[i],
        }
        for i, stage in enumerate(STAGES)
    ]


def without_medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "median_hours_from_previous"} for row in rows]


async def report(env: Env, **params: Any) -> dict[str, Any]:
    answer = await env.client.get(ROUTE, params=params, headers=env.viewer)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def iso(value: dt.datetime) -> str:
    return value.isoformat()


async def test_the_cohort_and_the_flow_match_what_happened(
    env: Env, sender: Sender, other: Sender, trained: Any
) -> None:
    story = await tell(env, sender, other, trained)
    body = await report(env, since=iso(story.since), until=iso(story.until))

    assert (at(body["period"]["since"]), at(body["period"]["until"])) == (story.since, story.until)
    # Cohort: A B C D E F H (O is older, G merged into F, Z created at `until`). Reached "or later":
    # mql by A B C E F (B before being disqualified), sql by A and C (which skipped it), opportunity
    # by C; A's customer move is after the period. Entered: O's move at `since` counts.
    assert body["cohort"] == 7
    assert without_medians(body["rows"]) == expected_rows("all", [7, 7, 5, 2, 1, 0], [7, 7, 6, 2, 1, 0])
    assert body["groups"] == [{"group": "all", "name": None, "cohort": 7, "entered_in_period": 8}]

    # Medians, from the lead histories: hours from first reaching the previous stage, over leads
    # that reached it strictly before.
    reads = {name: await story.read(name) for name in "ABCDEFH"}

    def first(name: str, stages: set[str]) -> dt.datetime | None:
        times = [at(t["transitioned_at"]) for t in reads[name]["transitions"] if t["to_stage"] in stages]
        times = [t for t in times if t < story.until]
        return min(times) if times else None

    def hours(pairs: list[tuple[dt.datetime | None, dt.datetime | None]]) -> float | None:
        gaps = [(b - a) / dt.timedelta(hours=1) for a, b in pairs if a is not None and b is not None and a < b]
        return statistics.median(gaps) if gaps else None

    created = {name: at(read["created_at"]) for name, read in reads.items()}
    to_mql = {"mql", "sql", "opportunity", "customer"}
    to_sql = to_mql - {"mql"}
    medians = [row["median_hours_from_previous"] for row in body["rows"]]
    assert medians[:2] == [None, None]  # every lead starts at `lead`
    assert medians[2] == pytest.approx(hours([(created[n], first(n, to_mql)) for n in reads]))
    assert medians[2] is not None  # B waited for its ops move at least
    assert medians[3] == pytest.approx(hours([(first(n, to_mql), first(n, to_sql)) for n in "AC"]))
    assert medians[4:] == [None, None]  # C reached sql and opportunity at once


async def test_by_source_uses_the_first_event_and_by_policy_the_qualifying_version(
    env: Env, sender: Sender, other: Sender, trained: Any
) -> None:
    story = await tell(env, sender, other, trained)
    period = {"since": iso(story.since), "until": iso(story.until)}

    by_source = await report(env, **period, by="source")
    # demo: A B E F H (H's earliest event is demo's); other: C D (G is merged away).
    assert without_medians(by_source["rows"]) == expected_rows(
        "demo", [5, 5, 4, 1, 0, 0], [5, 5, 5, 1, 0, 0]
    ) + expected_rows("other", [2, 2, 1, 1, 1, 0], [2, 2, 1, 1, 1, 0])

    by_policy = await report(env, **period, by="policy")
    p1, p2 = f"policy:{story.p1}", f"policy:{story.p2}"
    expected = {
        # B (and O, in the flow only) were qualified by ops.
        "manual": expected_rows("manual", [1, 1, 1, 0, 0, 0], [1, 1, 2, 0, 0, 0]),
        p1: expected_rows(p1, [2, 2, 2, 2, 1, 0], [2, 2, 2, 2, 1, 0]),
        p2: expected_rows(p2, [2, 2, 2, 0, 0, 0], [2, 2, 2, 0, 0, 0]),
        "unqualified": expected_rows("unqualified", [2, 2, 0, 0, 0, 0], [2, 2, 0, 0, 0, 0]),
    }
    assert without_medians(by_policy["rows"]) == [row for key in sorted(expected) for row in expected[key]]
    names = {g["group"]: g["name"] for g in by_policy["groups"]}
    assert names == {"manual": None, p1: "test", p2: "second", "unqualified": None}

    only_other = await report(env, **period, source="other")
    assert without_medians(only_other["rows"]) == expected_rows("all", [2, 2, 1, 1, 1, 0], [2, 2, 1, 1, 1, 0])
    unknown = await env.client.get(ROUTE, params={**period, "source": "nope"}, headers=env.viewer)
    assert (unknown.status_code, unknown.json()["error"]) == (422, "UnknownReportSource")


async def test_the_period_is_half_open(env: Env, sender: Sender, other: Sender, trained: Any) -> None:
    story = await tell(env, sender, other, trained)
    a_created = at((await story.read("A"))["created_at"])

    # Starting at A's creation: A is in (inclusive start); O's move is before it.
    later = await report(env, since=iso(a_created), until=iso(story.until))
    assert without_medians(later["rows"]) == expected_rows("all", [7, 7, 5, 2, 1, 0], [7, 7, 5, 2, 1, 0])

    # Ending at C's move to opportunity: that move is out (exclusive end), so C is at mql.
    earlier = await report(env, since=iso(story.since), until=iso(story.c_opportunity_at))
    assert without_medians(earlier["rows"]) == expected_rows("all", [7, 7, 5, 1, 0, 0], [7, 7, 6, 1, 0, 0])

    # Ending after everything: Z is in, and A's customer and E's sql moves count.
    everything = await report(env, since=iso(story.since), until=iso(story.until + dt.timedelta(hours=1)))
    assert without_medians(everything["rows"]) == expected_rows("all", [8, 8, 5, 3, 2, 1], [8, 8, 6, 3, 2, 1])

    # A period with nothing in it still has the stages, with zeros and no ratios.
    empty = await report(env, since="2020-01-01T00:00:00Z", until="2020-02-01T00:00:00Z")
    assert without_medians(empty["rows"]) == expected_rows("all", [0] * 6, [0] * 6)


async def test_csv_is_the_json_rows(env: Env, sender: Sender, other: Sender, trained: Any) -> None:
    story = await tell(env, sender, other, trained)
    params = {"since": iso(story.since), "until": iso(story.until), "by": "source"}
    body = await report(env, **params)
    answer = await env.client.get(ROUTE, params=params, headers={**env.viewer, "accept": "text/csv"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/csv")
    assert 'filename="leadscore-funnel.csv"' in answer.headers["content-disposition"]
    parsed = list(csv.DictReader(io.StringIO(answer.text)))
    assert parsed == [{k: "" if v is None else str(v) for k, v in row.items()} for row in body["rows"]]
    assert list(parsed[0]) == [
        "group",
        "stage",
        "cohort",
        "reached",
        "share",
        "conversion_from_previous",
        "entered_in_period",
        "median_hours_from_previous",
    ]
    again = await env.client.get(ROUTE, params={**params, "format": "csv"}, headers=env.viewer)
    assert again.text == answer.text


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"since": "2026-11-02T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, id="reversed"),
        pytest.param({"since": "2026-11-01T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, id="empty"),
        pytest.param({"since": "2010-01-01T00:00:00Z", "until": "2026-11-01T00:00:00Z"}, id="too-long"),
    ],
)
async def test_a_bad_period_is_422(env: Env, params: dict[str, str]) -> None:
    answer = await env.client.get(ROUTE, params=params, headers=env.viewer)
    assert (answer.status_code, answer.json()["error"]) == (422, "InvalidReportPeriod")


@pytest.mark.parametrize(
    "params",
    [
        pytest.param({"since": "2026-11-01T00:00:00"}, id="no-offset"),
        pytest.param({"by": "owner"}, id="unknown-breakdown"),
    ],
)
async def test_bad_parameters_are_422(env: Env, params: dict[str, str]) -> None:
    answer = await env.client.get(ROUTE, params=params, headers=env.viewer)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"] == "InvalidRequest"


async def test_readers_need_a_viewer_credential(
    env: Env,
    sender: Sender,
    settings: Settings,
    idp: IdentityProvider,  # noqa: F811  (the fixture, imported from test_auth)
) -> None:
    assert (await env.client.get(ROUTE, headers=env.ops)).status_code == 200
    assert (await env.client.get(ROUTE, headers=env.viewer)).status_code == 200
    nobody = await env.client.get(ROUTE)
    assert (nobody.status_code, nobody.json()["error"]) == (401, "Unauthenticated")
    # The webhook's signing secret is not an API credential.
    webhook = await env.client.get(ROUTE, headers={"authorization": f"Bearer {sender.secret}"})
    assert (webhook.status_code, webhook.json()["error"]) == (401, "Unauthenticated")
    async for client in oidc_client(oidc_settings(settings, idp.url)):
        roleless = await client.get(ROUTE, headers={"authorization": f"Bearer {idp.token(roles=['sales'])}"})
        assert (roleless.status_code, roleless.json()["error"]) == (403, "Forbidden")


def test_the_cli_prints_the_same_report(settings: Settings, trained: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    async def build() -> tuple[dict[str, str], dict[str, Any], str, dict[str, Any]]:
        engine = create_engine(settings.database_url)
        try:
            now = dt.datetime.now(dt.UTC)
            senders = [
                Sender(created.name, created.secret)
                for created in [
                    await add_source(engine, name=name, scheme="standard", now=now) for name in ("demo", "other")
                ]
            ]
        finally:
            await engine.dispose()
        async with open_env(settings, trained) as env:
            story = await tell(env, *senders, trained)
            params = {"since": iso(story.since), "until": iso(story.until), "by": "policy"}
            body = await report(env, **params)
            csv_body = await env.client.get(ROUTE, params={**params, "format": "csv"}, headers=env.viewer)
            routing = await env.client.get(
                "/v1/reports/routing", params={"since": params["since"], "until": params["until"]}, headers=env.viewer
            )
            return params, body, csv_body.text, routing.json()

    params, body, csv_body, routing = asyncio.run(build())
    monkeypatch.setenv("LEADSCORE_DATABASE_URL", settings.database_url)
    args = ["reports", "funnel", "--since", params["since"], "--until", params["until"], "--by", "policy"]
    printed = CliRunner().invoke(main, args, catch_exceptions=False)
    assert printed.exit_code == 0, printed.output
    from_cli = json.loads(printed.stdout)
    assert {k: v for k, v in from_cli.items() if k != "generated_at"} == {
        k: v for k, v in body.items() if k != "generated_at"
    }
    as_csv = CliRunner().invoke(main, [*args, "--format", "csv"], catch_exceptions=False)
    assert as_csv.exit_code == 0, as_csv.output
    assert list(csv.reader(io.StringIO(as_csv.stdout))) == list(csv.reader(io.StringIO(csv_body)))

    # The routing report's command too (no routing rules here: an empty report that says so).
    args = ["reports", "routing", "--since", params["since"], "--until", params["until"]]
    printed = CliRunner().invoke(main, args, catch_exceptions=False)
    assert printed.exit_code == 0, printed.output
    from_cli = json.loads(printed.stdout)
    assert (
        from_cli["warnings"]
        == routing["warnings"]
        == ["no routing rules version is active: expected shares are unknown"]
    )
    assert {k: v for k, v in from_cli.items() if k != "generated_at"} == {
        k: v for k, v in routing.items() if k != "generated_at"
    }

    refused = CliRunner().invoke(main, ["reports", "funnel", "--since", "2026-11-02", "--until", "2026-11-01"])
    assert refused.exit_code != 0
    assert "InvalidReportPeriod" in refused.output
