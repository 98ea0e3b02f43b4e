"""CRM outcomes become training labels: `leadscore outcomes export` writes a CSV that
`leadscore train` reads, with the label of each lead's latest decisive outcome and the traits it
had before its first outcome of any kind, rebuilt from its events."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import hashlib
import io
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fastapi import FastAPI

from scoring.features import model_matrix
from service.cli import main
from service.db import write_transaction
from service.outcomes import OutcomeReport, record_outcomes
from service.pipelines import parse_spec
from service.training_data import ExportSummary, InvalidExport, export_training_data
from tests.conftest import REPO_ROOT, SHARED, Db, Sender, lead_event
from tests.service.sources_support import lead_traits

pytestmark = pytest.mark.anyio

# Event and outcome times: whole days before the run (the webhook refuses events in the future).
BASE = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0) - dt.timedelta(days=60)


def day(n: float) -> dt.datetime:
    return BASE + dt.timedelta(days=n)


async def post(
    client: httpx.AsyncClient,
    sender: Sender,
    traits: dict[str, Any],
    *,
    on: dt.datetime,
    email: str | None = None,
    external_ids: dict[str, str] | None = None,
) -> str:
    event = lead_event(email=email, traits=traits, occurred_at=on.isoformat())
    if external_ids:
        event["subject"]["external_ids"] = external_ids
    response = await sender.post(client, event)
    assert response.status_code == 202, response.text
    lead_id: str = response.json()["lead_id"]
    return lead_id


async def outcomes(app: FastAPI, *reports: tuple[str, str, dt.datetime]) -> None:
    async with write_transaction(app.state.services.engine) as conn:
        await record_outcomes(
            conn,
            source="crm-outcomes",
            outcomes=[
                OutcomeReport(lead_id=uuid.UUID(lead), kind=kind, occurred_at=on)  # type: ignore[arg-type]
                for lead, kind, on in reports
            ],
            lost_stage="recycled",
            now=dt.datetime.now(dt.UTC),
        )


async def export(app: FastAPI, **options: Any) -> tuple[list[str], list[dict[str, str]], ExportSummary]:
    out = io.StringIO(newline="")
    options.setdefault("label_column", "Converted")
    summary = await export_training_data(app.state.services.engine, out, page_size=2, **options)
    reader = csv.DictReader(io.StringIO(out.getvalue(), newline=""))
    rows = list(reader)
    assert reader.fieldnames is not None
    return list(reader.fieldnames), rows, summary


def labels(rows: list[dict[str, str]], column: str = "Converted") -> dict[str, str]:
    return {row["lead_id"]: row[column] for row in rows}


async def test_labels_by_kind_and_the_latest_decisive_outcome(
    app: FastAPI, client: httpx.AsyncClient, sender: Sender
) -> None:
    traits = {"Lead Origin": "API", "country": "PT"}
    a, b, c, d, e, f, g = [
        await post(client, sender, traits | {"n": i}, on=day(0), email=f"{name}@acme.io")
        for i, name in enumerate("abcdefg")
    ]
    await outcomes(
        app,
        (a, "converted", day(5)),
        (b, "won", day(5)),
        (c, "lost", day(5)),
        (d, "accepted", day(5)),
        (e, "won", day(5)),
        (e, "lost", day(7)),
        (f, "lost", day(5)),
        (f, "won", day(7)),
        (f, "accepted", day(9)),
    )  # g: no outcome
    header, rows, summary = await export(app)
    assert labels(rows) == {a: "1", b: "1", c: "0", e: "0", f: "1"}
    assert [r["lead_id"] for r in rows] == sorted(r["lead_id"] for r in rows)  # paged in id order
    assert {r["lead_id"]: r["outcome_at"] for r in rows} == {
        a: day(5).isoformat(),
        b: day(5).isoformat(),
        c: day(5).isoformat(),
        e: day(7).isoformat(),
        f: day(7).isoformat(),
    }
    # The trait names verbatim (spaces kept), sorted, after the fixed columns; values as stored.
    assert header == ["lead_id", "outcome_at", "Converted", "Lead Origin", "country", "n"]
    assert [(r["Lead Origin"], r["country"]) for r in rows] == [("API", "PT")] * 5
    assert (summary.rows, summary.positive, summary.negative) == (5, 3, 2)
    assert (summary.leads_without_traits_before_outcome, summary.empty_cells) == (0, 0)

    # Only `won` positive: a converted lead decides nothing; accepted may count as positive too.
    _, rows, _ = await export(app, positive=["won"], label_column="Won")
    assert labels(rows, "Won") == {b: "1", c: "0", e: "0", f: "1"}
    _, rows, _ = await export(app, positive=["accepted", "converted", "won"])
    assert labels(rows) == {a: "1", b: "1", c: "0", d: "1", e: "0", f: "1"}
    assert {r["lead_id"]: r["outcome_at"] for r in rows}[f] == day(9).isoformat()


async def test_values_are_written_as_the_feature_layer_reads_them(
    app: FastAPI, client: httpx.AsyncClient, sender: Sender
) -> None:
    traits = {"Do Not Email": True, "TotalVisits": 5, "Page Views Per Visit": 2.5, "City": "", "Tags": None}
    # A trait named like the label column (here the CSV's own label) is left out, not duplicated.
    lead = await post(client, sender, traits | {"Converted": "1"}, on=day(0), email="v@acme.io")
    await outcomes(app, (lead, "lost", day(3)))
    header, [row], summary = await export(app)
    assert header == [
        "lead_id",
        "outcome_at",
        "Converted",
        "City",
        "Do Not Email",
        "Page Views Per Visit",
        "Tags",
        "TotalVisits",
    ]
    assert row == {
        "lead_id": lead,
        "outcome_at": day(3).isoformat(),
        "Converted": "0",
        "City": "",
        "Do Not Email": "true",
        "Page Views Per Visit": "2.5",
        "Tags": "",
        "TotalVisits": "5",
    }
    assert summary.dropped_traits == ["Converted"]


async def test_merged_leads_are_not_exported_and_their_events_and_outcomes_are_the_survivors(
    app: FastAPI, client: httpx.AsyncClient, sender: Sender, db: Db
) -> None:
    survivor = await post(client, sender, {"country": "PT"}, on=day(0), email="ana@acme.io")
    merged = await post(client, sender, {"title": "CTO"}, on=day(1), email=None, external_ids={"hubspot": "7"})
    await outcomes(app, (merged, "won", day(2)), (survivor, "lost", day(3)))
    # After the merged lead's outcome (day 2), before the survivor's own (day 3).
    await post(
        client, sender, {"title": "VP", "seniority": "senior"}, on=day(2.5), email=None, external_ids={"hubspot": "7"}
    )
    await post(client, sender, {"country": "ES"}, on=day(2.5), email="ana@acme.io")
    _, rows, _ = await export(app)
    # Before the merge each lead is its own: the survivor's first outcome is its day-3 loss.
    assert {r["lead_id"]: (r["Converted"], r["title"], r["country"]) for r in rows} == {
        merged: ("1", "CTO", ""),
        survivor: ("0", "", "ES"),
    }

    # One event naming both identities: one person; the younger lead is merged into the older.
    both = await post(client, sender, {}, on=day(4), email="ana@acme.io", external_ids={"hubspot": "7"})
    assert both == survivor
    assert await db.scalar("SELECT count(*) FROM lead WHERE merged_into_id IS NOT NULL") == 1
    # What either lead sent and what sales reported about it now belong to the survivor.
    live = "JOIN lead ON lead.id = {0}.lead_id WHERE lead.merged_into_id IS NULL"
    assert await db.scalar(f"SELECT count(*) FROM outcome {live.format('outcome')}") == 2
    assert await db.scalar(f"SELECT count(*) FROM inbound_event {live.format('inbound_event')}") == 5
    header, rows, _ = await export(app)
    # The merged lead has no row. The survivor's latest decisive outcome (lost, day 3) labels it;
    # its traits are both leads' events before the first outcome of either (the won, day 2), so
    # neither day-2.5 event counts any more.
    assert header[3:] == ["country", "title"]
    assert [(r["lead_id"], r["Converted"], r["country"], r["title"]) for r in rows] == [(survivor, "0", "PT", "CTO")]
    # An outcome reported for the merged lead after the merge is recorded on the survivor.
    await outcomes(app, (merged, "won", day(6)))
    _, rows, _ = await export(app)
    assert [(r["lead_id"], r["Converted"], r["outcome_at"], r["title"]) for r in rows] == [
        (survivor, "1", day(6).isoformat(), "CTO")
    ]


async def test_traits_are_those_before_the_first_outcome_of_any_kind(
    app: FastAPI, client: httpx.AsyncClient, sender: Sender
) -> None:
    email = "first@acme.io"
    lead = await post(client, sender, {"country": "PT", "title": "CTO"}, on=day(0), email=email)
    await post(client, sender, {"title": "CEO"}, on=day(1), email=email)
    # At the very time sales accepted the lead, and after it: sales' own view, not used.
    await post(client, sender, {"title": "Founder", "budget": "high"}, on=day(2), email=email)
    await post(client, sender, {"country": "ES", "Lead Quality": "High"}, on=day(3), email=email)
    other = await post(client, sender, {"budget": "low"}, on=day(0), email="other@acme.io")
    await outcomes(
        app, (lead, "accepted", day(2)), (lead, "lost", day(4)), (lead, "won", day(6)), (other, "lost", day(1))
    )
    header, rows, summary = await export(app)
    # The label is the latest decisive outcome (won), the traits those before the first (accepted).
    assert header[3:] == ["budget", "country", "title"]  # no trait first seen after an outcome
    by_id = {r["lead_id"]: r for r in rows}
    assert {k: by_id[lead][k] for k in ("outcome_at", "Converted", "budget", "country", "title")} == {
        "outcome_at": day(6).isoformat(),
        "Converted": "1",
        "budget": "",
        "country": "PT",
        "title": "CEO",
    }
    assert {k: by_id[other][k] for k in header[2:]} == {"Converted": "0", "budget": "low", "country": "", "title": ""}
    assert (summary.empty_cells, summary.empty_by_trait) == (3, {"budget": 1, "country": 1, "title": 1})
    assert summary.leads_without_traits_before_outcome == 0

    # An outcome outside the period still marks when sales had the lead.
    header, rows, _ = await export(app, since=day(5))
    assert header[3:] == ["country", "title"]
    assert [(r["lead_id"], r["Converted"], r["country"], r["title"]) for r in rows] == [(lead, "1", "PT", "CEO")]


async def test_values_resent_or_overwritten_after_the_outcome_keep_the_value_before_it(
    app: FastAPI, client: httpx.AsyncClient, sender: Sender, db: Db
) -> None:
    traits = {"country": "PT", "title": "CTO", "TotalVisits": 4}
    won = await post(client, sender, traits, on=day(0), email="won@acme.io")
    lost = await post(client, sender, traits, on=day(0), email="lost@acme.io")
    await outcomes(app, (won, "won", day(5)), (lost, "lost", day(5)))
    # After the deal, enrichment re-sends every property (the same values, a later time) and the
    # CRM overwrites some: the lead's current traits move on, the export does not.
    await post(client, sender, traits, on=day(6), email="won@acme.io")
    await post(client, sender, {"title": "Customer", "TotalVisits": 9}, on=day(7), email="won@acme.io")
    await post(client, sender, {"title": "Churn risk"}, on=day(7), email="lost@acme.io")
    current = await lead_traits(db, won)
    assert (current["title"], current["TotalVisits"]) == ("Customer", 9)
    _, rows, summary = await export(app)
    assert {r["lead_id"]: (r["Converted"], r["country"], r["title"], r["TotalVisits"]) for r in rows} == {
        won: ("1", "PT", "CTO", "4"),
        lost: ("0", "PT", "CTO", "4"),
    }
    assert (summary.empty_cells, summary.empty_by_trait) == (0, {})


async def test_events_out_of_order_give_the_traits_ingest_gives(
    app: FastAPI, client: httpx.AsyncClient, sender: Sender, db: Db
) -> None:
    email = "order@acme.io"
    # Arrival order is not time order; the latest event time wins, a tie goes to the larger value.
    lead = await post(client, sender, {"t1": "late", "t2": "late"}, on=day(7), email=email)
    await post(client, sender, {"t1": "b"}, on=day(3), email=email)
    await post(client, sender, {"t1": "a", "t2": "a", "t3": "a"}, on=day(1), email=email)
    await post(client, sender, {"t3": "at"}, on=day(5), email=email)  # at the outcome: not before it
    await post(client, sender, {"t2": "b", "t4": "y"}, on=day(4), email=email)
    await post(client, sender, {"t4": "x"}, on=day(4), email=email)
    # The same events before the outcome, for a lead whose current traits are those of the export.
    twin = await post(client, sender, {"t2": "b", "t4": "x"}, on=day(4), email="twin@acme.io")
    await post(client, sender, {"t1": "b"}, on=day(3), email="twin@acme.io")
    await post(client, sender, {"t4": "y"}, on=day(4), email="twin@acme.io")
    await post(client, sender, {"t1": "a", "t2": "a", "t3": "a"}, on=day(1), email="twin@acme.io")
    await outcomes(app, (lead, "lost", day(5)), (twin, "won", day(5)))
    header, rows, _ = await export(app)
    by_id = {r["lead_id"]: {k: r[k] for k in header[3:]} for r in rows}
    assert by_id[lead] == by_id[twin] == {"t1": "b", "t2": "b", "t3": "a", "t4": "y"}
    assert await lead_traits(db, twin) == by_id[twin]


async def test_a_lead_without_traits_before_its_first_outcome_gets_an_empty_row(
    app: FastAPI, client: httpx.AsyncClient, sender: Sender
) -> None:
    # Its only events are after the outcome (the CRM reported an earlier time), or carry no traits.
    late = await post(client, sender, {"country": "PT"}, on=day(3), email="late@acme.io")
    bare = await post(client, sender, {}, on=day(0), email="bare@acme.io")
    await post(client, sender, {"country": "ES"}, on=day(2), email="bare@acme.io")
    known = await post(client, sender, {"title": "CTO"}, on=day(0), email="known@acme.io")
    await outcomes(app, (late, "won", day(1)), (bare, "lost", day(1)), (known, "won", day(1)))
    header, rows, summary = await export(app)
    assert header[3:] == ["title"]
    assert {r["lead_id"]: (r["Converted"], r["title"]) for r in rows} == {
        late: ("1", ""),
        bare: ("0", ""),
        known: ("1", "CTO"),
    }
    assert summary.leads_without_traits_before_outcome == 2
    assert summary.as_dict()["empty_by_trait"] == {"title": 2}


async def test_period_filters_choose_the_outcomes_that_count(
    app: FastAPI, client: httpx.AsyncClient, sender: Sender
) -> None:
    early = await post(client, sender, {"early_only": "y"}, on=day(0), email="early@acme.io")
    middle = await post(client, sender, {"country": "PT"}, on=day(0), email="middle@acme.io")
    late = await post(client, sender, {"country": "ES"}, on=day(0), email="late@acme.io")
    flip = await post(client, sender, {"country": "FR"}, on=day(0), email="flip@acme.io")
    await outcomes(
        app,
        (early, "won", day(2)),
        (middle, "lost", day(5)),
        (late, "won", day(8)),
        (flip, "lost", day(2)),
        (flip, "converted", day(8)),
    )
    header, rows, _ = await export(app, since=day(3), until=day(8))
    assert labels(rows) == {middle: "0"}
    # Trait columns come from the exported leads only.
    assert header[3:] == ["country"]
    _, rows, _ = await export(app, since=day(5))  # inclusive
    assert labels(rows) == {middle: "0", late: "1", flip: "1"}
    header, rows, _ = await export(app, until=day(8))  # exclusive: flip's label is its day-2 outcome
    assert labels(rows) == {early: "1", middle: "0", flip: "0"}
    assert header[3:] == ["country", "early_only"]
    _, rows, _ = await export(app)
    assert labels(rows) == {early: "1", middle: "0", late: "1", flip: "1"}


async def test_options_that_cannot_make_a_labelled_file_are_refused(app: FastAPI) -> None:
    for options in (
        {"positive": ["lost"]},
        {"positive": []},
        {"positive": ["won", "sold"]},
        {"label_column": "lead_id"},
        {"label_column": " "},
        {"since": day(3), "until": day(3)},
    ):
        with pytest.raises(InvalidExport):
            await export(app, **options)


# --- the command line, end to end ------------------------------------------------------------------

DATA = SHARED / "data" / "x-education" / "leads_train.csv"
SPEC = REPO_ROOT / "pipelines" / "x-education.yaml"


def matrix(spec: Any, rows: list[dict[str, str]]) -> list[list[Any]]:
    return [[None if v != v else v for v in line] for line in model_matrix(spec, rows).tolist()]  # NaN -> None


def cli(db_url: str, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, Any, str]:
    monkeypatch.setenv("LEADSCORE_DATABASE_URL", db_url)
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout) if result.exit_code == 0 else None, result.stderr


async def test_export_then_train_on_the_exported_file(
    app: FastAPI,
    client: httpx.AsyncClient,
    sender: Sender,
    db: Db,
    db_url: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    with DATA.open(newline="", encoding="utf-8-sig") as f:
        source = list(csv.DictReader(f))
    # 60 leads of the X Education data, 30 of each class; the CSV's label becomes a CRM outcome.
    chosen = [r for r in source if r["Converted"] == "1"][:30] + [r for r in source if r["Converted"] == "0"][:30]
    events = [
        lead_event(
            id=f"x{i}",
            email=f"p{i}@example.org",
            occurred_at=day(0).isoformat(),
            traits={k: v for k, v in row.items() if k not in ("Converted", "Prospect ID")},
        )
        for i, row in enumerate(chosen)
    ]
    for start in range(0, len(events), 20):
        response = await sender.post(client, events[start : start + 20])
        assert response.status_code == 202, response.text
    by_email = {
        str(row[0]): str(uuid.UUID(str(row[1])))  # SQLite keeps a uuid as 32 hex digits
        for row in await db.rows("SELECT value, lead_id FROM lead_identity WHERE namespace = 'email'")
    }
    lead_of = [by_email[f"p{i}@example.org"] for i in range(60)]
    kinds = {"1": ("converted", "won"), "0": ("lost", "lost")}
    await outcomes(app, *[(lead_of[i], kinds[row["Converted"]][i % 2], day(10)) for i, row in enumerate(chosen)])
    # After the outcome, five leads have every property re-sent (as enrichment does after a won
    # deal) and five have their lead quality overwritten: neither reaches the file.
    for i in range(10):
        traits = events[i]["traits"] if i < 5 else {"Lead Quality": "High in Relevance"}
        late = lead_event(email=f"p{i}@example.org", occurred_at=day(11).isoformat(), traits=traits)
        assert (await sender.post(client, late)).status_code == 202

    out = tmp_path / "labels.csv"

    def export_and_train() -> tuple[tuple[int, Any, str], tuple[int, Any, str]]:
        exported = cli(db_url, monkeypatch, "outcomes", "export", "--out", str(out))
        trained = cli(db_url, monkeypatch, "train", "--spec", str(SPEC), "--data", str(out), "--label", "Converted")
        return exported, trained

    (code, summary, stderr), (train_code, trained, train_err) = await asyncio.to_thread(export_and_train)
    assert code == 0, stderr
    assert (summary["rows"], summary["positive"], summary["negative"]) == (60, 30, 30)
    empty: dict[str, int] = {}
    for row in chosen:
        for name, value in row.items():
            if name not in ("Converted", "Prospect ID") and not value:
                empty[name] = empty.get(name, 0) + 1
    assert (summary["leads_without_traits_before_outcome"], summary["empty_by_trait"]) == (0, empty)
    assert f"0 leads had none, {sum(empty.values())} trait cells are empty" in stderr
    with out.open(newline="", encoding="utf-8") as f:
        exported = {row["lead_id"]: row for row in csv.DictReader(f)}
    # Every value comes back verbatim under its original column name, as it was before the outcome.
    for i, row in enumerate(chosen):
        line = exported[lead_of[i]]
        assert line["Converted"] == row["Converted"]
        assert {k: line[k] for k in row if k not in ("Converted", "Prospect ID")} == {
            k: v for k, v in row.items() if k not in ("Converted", "Prospect ID")
        }

    # The model sees exactly what it would from the source rows (Lead Quality is no model feature).
    spec = parse_spec(SPEC.read_text())
    assert matrix(spec, [exported[lead_of[i]] for i in range(60)]) == matrix(spec, chosen)

    assert train_code == 0, train_err
    assert trained["metrics"]["rows"] == 60
    [version] = await db.rows("SELECT training_data_sha256 FROM pipeline_version")
    assert version[0] == hashlib.sha256(out.read_bytes()).hexdigest()


async def test_a_refused_export_leaves_no_file(db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "export").mkdir()
    out = tmp_path / "export" / "labels.csv"
    export = ("outcomes", "export", "--out", str(out))
    for args, message in (
        (("--positive", "lost"), "InvalidExport: positive outcome kinds must be among"),
        (("--since", "2026-11-05", "--until", "2026-11-01T00:00:00Z"), "InvalidExport: since must be before until"),
        (("--since", "last week"), "'last week' is not an ISO 8601 date or time"),
    ):
        code, _, stderr = await asyncio.to_thread(cli, db_url, monkeypatch, *export, *args)
        assert code in (1, 2)
        assert message in stderr
    assert list(out.parent.iterdir()) == []
