"""What every report shares: the period it covers and its CSV form."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Sequence
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from service.errors import InvalidReportPeriod

DEFAULT_DAYS = 30
# Ten years: enough for any look back, small enough that a typo (year 20260) is an error.
MAX_SPAN = dt.timedelta(days=3660)


class ReportPeriod(BaseModel):
    """The half-open interval `[since, until)` a report counts, in UTC."""

    model_config = ConfigDict(frozen=True)

    since: AwareDatetime = Field(description="Inclusive start (UTC).")
    until: AwareDatetime = Field(description="Exclusive end (UTC).")


def resolve_period(
    since: dt.datetime | None, until: dt.datetime | None, *, now: dt.datetime, default_days: int = DEFAULT_DAYS
) -> ReportPeriod:
    """The period asked for: `until` defaults to now, `since` to `default_days` before `until`.

    Raises `InvalidReportPeriod` when the period is empty, reversed or longer than ten years.
    """
    end = (until or now).astimezone(dt.UTC)
    start = since.astimezone(dt.UTC) if since else end - dt.timedelta(days=default_days)
    if start >= end:
        raise InvalidReportPeriod(f"since ({start.isoformat()}) must be before until ({end.isoformat()})")
    if end - start > MAX_SPAN:
        raise InvalidReportPeriod(f"a report covers at most {MAX_SPAN.days} days")
    return ReportPeriod(since=start, until=end)


def csv_text(rows: Sequence[BaseModel], columns: Sequence[str]) -> str:
    """`rows` as CSV with a header of `columns` (the row model's field names, in order).

    `None` is an empty cell; floats keep their full precision; nested values become JSON, so a
    spreadsheet opens every export and nothing is lost."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for row in rows:
        data = row.model_dump(mode="json")
        writer.writerow([_cell(data.get(name)) for name in columns])
    return out.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)
