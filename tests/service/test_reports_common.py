"""The report period, CSV rendering and format negotiation every report shares."""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest
from pydantic import BaseModel

from service.api.reports import wants_csv
from service.errors import InvalidReportPeriod
from service.reports.common import csv_text, resolve_period

NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def test_period_defaults_to_the_last_30_days() -> None:
    period = resolve_period(None, None, now=NOW)
    assert (period.since, period.until) == (NOW - dt.timedelta(days=30), NOW)


def test_period_is_converted_to_utc() -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    period = resolve_period(dt.datetime(2026, 11, 1, 1, 0, tzinfo=paris), None, now=NOW)
    assert period.since == dt.datetime(2026, 11, 1, 0, 0, tzinfo=dt.UTC)
    assert period.since.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    ("since", "until"),
    [
        (NOW, NOW),
        (NOW, NOW - dt.timedelta(seconds=1)),
        (NOW - dt.timedelta(days=3661), NOW),
    ],
)
def test_empty_reversed_or_huge_periods_are_refused(since: dt.datetime, until: dt.datetime) -> None:
    with pytest.raises(InvalidReportPeriod):
        resolve_period(since, until, now=NOW)


class _Row(BaseModel):
    name: str
    rate: float | None
    ok: bool
    extra: dict[str, int]


def test_csv_keeps_columns_in_order_and_every_value() -> None:
    rows = [
        _Row(name='A "quoted", name', rate=1 / 3, ok=True, extra={"b": 2, "a": 1}),
        _Row(name="B", rate=None, ok=False, extra={}),
    ]
    text = csv_text(rows, list(_Row.model_fields))
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed == [
        ["name", "rate", "ok", "extra"],
        ['A "quoted", name', repr(1 / 3), "true", '{"a":1,"b":2}'],
        ["B", "", "false", "{}"],
    ]


@pytest.mark.parametrize(
    ("format", "accept", "expected"),
    [
        (None, None, False),
        (None, "application/json", False),
        (None, "text/csv", True),
        (None, "text/csv; charset=utf-8", True),
        (None, "application/json, text/csv", False),
        (None, "text/csv, application/json", True),
        ("csv", "application/json", True),
        ("json", "text/csv", False),
    ],
)
def test_csv_is_chosen_by_format_or_accept(format: str | None, accept: str | None, expected: bool) -> None:
    assert wants_csv(format, accept) is expected  # type: ignore[arg-type]
