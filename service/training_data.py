"""CRM outcomes as training labels: a CSV that `leadscore train --label <column>` reads.

One row per live (not merged) lead with a decisive outcome, in lead id order:

- **Label.** The kinds in `positive` (default `converted`, `won`) are 1, `lost` is 0; other kinds
  (by default `accepted`) decide nothing, so a lead whose only outcomes are those gets no row.
  A lead with several decisive outcomes takes its latest (by `occurred_at`, then by the order
  they were recorded): won then lost is 0, lost then won is 1. With `since`/`until`, only outcomes
  that occurred in `[since, until)` count.
- **Traits as they were before sales had the lead.** A label's features must be what was known
  before any outcome: once sales has the lead, what they type into the CRM flows back to us as
  events (and enrichment re-sends every property after a deal is won). So each lead's traits are
  rebuilt from its stored events that occurred strictly before its *first outcome of any kind*
  (`accepted` included, whether or not in `[since, until)`; the model report judges the score at
  the same moment), applied as ingest applies them (`LeadState.apply_traits`: the latest event
  time wins, ties by value), in whatever order they arrived. The lead's current traits are not
  read. A lead with no trait before its first outcome still gets a row, every trait empty, and
  is counted.
- **Columns.** `lead_id`, `outcome_at` (the deciding outcome's time, ISO 8601 UTC), the label
  column, then one column per trait: the union of the rebuilt traits' names, sorted, kept
  verbatim (spaces and all). A trait named like one of the first three columns is left out and
  reported. Values are written as the feature layer reads them: strings as they are, booleans as
  `true`/`false`, numbers as Python prints them, a missing value as an empty cell; the empty cells
  are counted per trait.
- A merge moves the merged lead's events and outcomes to the survivor, so its traits and labels
  are the survivor's.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import uuid
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from sqlalchemy.ext.asyncio import AsyncEngine

from service.errors import LeadscoreError
from service.identity import LeadState, time_key
from service.repositories import training_data as repo

POSITIVE_KINDS = ("accepted", "converted", "won")
DEFAULT_POSITIVE = ("converted", "won")
NEGATIVE_KIND = "lost"
LEAD_ID_COLUMN = "lead_id"
OUTCOME_AT_COLUMN = "outcome_at"


class InvalidExport(LeadscoreError):
    """The export's options contradict each other or name unknown outcome kinds (422)."""

    status = 422


@dataclass
class ExportSummary:
    """What an export wrote."""

    rows: int = 0
    positive: int = 0
    negative: int = 0
    trait_columns: list[str] = field(default_factory=list)
    # Traits named like the lead id, outcome time or label column: left out of the file.
    dropped_traits: list[str] = field(default_factory=list)
    # Rows whose lead had no trait in any event before its first outcome (every trait cell empty).
    leads_without_traits_before_outcome: int = 0
    empty_cells: int = 0
    empty_by_trait: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "positive": self.positive,
            "negative": self.negative,
            "trait_columns": len(self.trait_columns),
            "dropped_traits": self.dropped_traits,
            "leads_without_traits_before_outcome": self.leads_without_traits_before_outcome,
            "empty_cells": self.empty_cells,
            "empty_by_trait": dict(sorted(self.empty_by_trait.items())),
        }


def latest_decisive(outcomes: Iterable[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The outcome that decides a lead's label: the latest by `occurred_at`, then by `id` (the
    later recorded). `outcomes` must not be empty."""
    return max(outcomes, key=lambda o: (o["occurred_at"], o["id"]))


def replay_traits(events: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The traits that applying `events` (each with `occurred_at` and a `traits` dict) gives a lead,
    by the rule ingest applies (whatever their order)."""
    # A scratch lead: only its traits (and their times) are used.
    state = LeadState(id=uuid.UUID(int=0), created_at=dt.datetime.min.replace(tzinfo=dt.UTC))
    for event in events:
        state.apply_traits(event["traits"] or {}, time_key(event["occurred_at"]))
    return state.traits


def cell(value: Any) -> str:
    """A trait value as a CSV cell that the feature layer reads as it reads the stored value."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def check_options(
    *, label_column: str, positive: Collection[str], since: dt.datetime | None, until: dt.datetime | None
) -> None:
    """`InvalidExport` for options that cannot make a labelled file."""
    unknown = sorted(set(positive) - set(POSITIVE_KINDS))
    if unknown:
        raise InvalidExport(f"positive outcome kinds must be among {', '.join(POSITIVE_KINDS)}; got {unknown}")
    if not positive:
        raise InvalidExport("give at least one positive outcome kind")
    if not label_column.strip() or label_column in (LEAD_ID_COLUMN, OUTCOME_AT_COLUMN):
        raise InvalidExport(f"the label column cannot be empty, {LEAD_ID_COLUMN!r} or {OUTCOME_AT_COLUMN!r}")
    if since is not None and until is not None and since >= until:
        raise InvalidExport("since must be before until")


async def export_training_data(
    engine: AsyncEngine,
    out: TextIO,
    *,
    label_column: str,
    positive: Collection[str] = DEFAULT_POSITIVE,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    page_size: int = 1000,
) -> ExportSummary:
    """Write the labelled training CSV (see the module doc) to `out`, reading one snapshot of the
    database a page of `page_size` leads at a time."""
    check_options(label_column=label_column, positive=positive, since=since, until=until)
    positive = frozenset(positive)
    kinds = positive | {NEGATIVE_KIND}
    fixed = (LEAD_ID_COLUMN, OUTCOME_AT_COLUMN, label_column)
    summary = ExportSummary()
    writer = csv.writer(out)
    async with repo.read_snapshot(engine) as conn:
        names = await repo.labelled_trait_names(conn, kinds=kinds, since=since, until=until)
        summary.trait_columns = [n for n in names if n not in fixed]
        summary.dropped_traits = [n for n in names if n in fixed]
        writer.writerow([*fixed, *summary.trait_columns])
        after = None
        while True:
            ids = await repo.labelled_lead_ids_page(
                conn, kinds=kinds, since=since, until=until, after=after, limit=page_size
            )
            if not ids:
                return summary
            after = ids[-1]
            live = await repo.live_lead_ids(conn, ids)
            by_lead: dict[Any, list[dict[str, Any]]] = {}
            for row in await repo.labelled_outcomes(conn, ids, kinds=kinds, since=since, until=until):
                by_lead.setdefault(row["lead_id"], []).append(row)
            events: dict[Any, list[dict[str, Any]]] = {}
            for row in await repo.events_before_first_outcome(conn, live):
                events.setdefault(row["lead_id"], []).append(row)
            for lead_id in live:
                # Every paged id has a labelled outcome: the same filter, in the same snapshot.
                decisive = latest_decisive(by_lead[lead_id])
                occurred_at: dt.datetime = decisive["occurred_at"]
                label = 1 if decisive["kind"] in positive else 0
                traits = replay_traits(events.get(lead_id, ()))
                cells = [cell(traits.get(name)) for name in summary.trait_columns]
                writer.writerow([str(lead_id), occurred_at.astimezone(dt.UTC).isoformat(), str(label), *cells])
                summary.rows += 1
                summary.positive += label
                summary.negative += 1 - label
                if not traits:
                    summary.leads_without_traits_before_outcome += 1
                for name, text in zip(summary.trait_columns, cells, strict=True):
                    if not text:
                        summary.empty_cells += 1
                        summary.empty_by_trait[name] = summary.empty_by_trait.get(name, 0) + 1
