"""What the core knows about one lead: traits (form fields, CRM fields) and timed activities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from scoring.errors import InvalidInput

__all__ = ["Activity", "LeadProfile", "require_aware"]


def require_aware(value: datetime, what: str) -> None:
    """Raise :class:`InvalidInput` unless ``value`` is a timezone-aware datetime.

    Naive datetimes are refused rather than assumed UTC: a silently wrong offset would shift
    decay and daily caps by hours and make replays disagree.
    """
    if not isinstance(value, datetime):
        raise InvalidInput(f"{what} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{what} must be timezone-aware (UTC), got naive {value.isoformat()}")


@dataclass(frozen=True)
class Activity:
    """One thing a lead did, e.g. ``Activity("Page Viewed", at, {"url": "/pricing"})``.

    ``occurred_at`` must be timezone-aware; it is what decay, windows and daily caps use (never the
    time we received the event), so a replay with the same ``now`` gives the same score.
    """

    name: str
    occurred_at: datetime
    properties: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require_aware(self.occurred_at, f"activity {self.name!r} occurred_at")


@dataclass(frozen=True)
class LeadProfile:
    """A lead as the scoring core sees it.

    ``traits`` maps trait names (e.g. ``"Lead Origin"``) to raw values: strings, numbers, booleans or
    None, exactly as the source sent them; the feature layer coerces them. ``activities`` may be in
    any order: scoring sorts them, so the order never changes the score.
    """

    traits: Mapping[str, Any]
    activities: Sequence[Activity] = ()
