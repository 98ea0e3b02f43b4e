"""Which lead an event belongs to, decided in memory for a whole batch of events.

The caller loads the identities the batch mentions and the leads they point at (locked), then
applies events one by one here; what comes out is the set of rows to write. Doing it in memory
lets one transaction write a whole group commit with a handful of statements.

Rules:
- an event attaches to the lead that owns any of its identities (normalised email, external ids);
- when its identities belong to two or more leads, those leads are one person: the oldest lead
  (by creation time, then id) survives, the others are merged into it and the merge is recorded;
- each trait keeps the value with the latest event time (ties broken by the value itself), so
  applying the same events in any order gives the same traits.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Identity = tuple[str, str]


def time_key(at: dt.datetime) -> str:
    """An event time as a string that sorts like the time itself (UTC, microseconds)."""
    return at.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass
class LeadState:
    id: uuid.UUID
    created_at: dt.datetime
    traits: dict[str, Any] = field(default_factory=dict)
    trait_times: dict[str, str] = field(default_factory=dict)
    first_event_at: dt.datetime | None = None
    last_event_at: dt.datetime | None = None
    # The lifecycle stage; new leads start as `lead` (the threshold policy moves them on).
    stage: str = "lead"
    is_new: bool = False
    changed: bool = False

    def apply_traits(self, traits: Mapping[str, Any], times: Mapping[str, str] | str) -> None:
        for name, value in traits.items():
            at = times if isinstance(times, str) else times[name]
            seen = self.trait_times.get(name)
            if seen is None or at > seen or (at == seen and _canonical(value) > _canonical(self.traits.get(name))):
                self.traits[name] = value
                self.trait_times[name] = at
                self.changed = True

    def saw_event_at(self, first: dt.datetime | None, last: dt.datetime | None) -> None:
        if first is not None and (self.first_event_at is None or first < self.first_event_at):
            self.first_event_at = first
            self.changed = True
        if last is not None and (self.last_event_at is None or last > self.last_event_at):
            self.last_event_at = last
            self.changed = True


@dataclass(frozen=True)
class Merge:
    survivor_id: uuid.UUID
    merged_id: uuid.UUID
    event_id: uuid.UUID
    identities: tuple[Identity, ...]


@dataclass
class Resolver:
    """Applies events to leads in memory. Start it with what the database holds for the batch."""

    identities: dict[Identity, uuid.UUID]
    leads: dict[uuid.UUID, LeadState]
    now: dt.datetime
    new_id: Callable[[], uuid.UUID]
    new_identities: dict[Identity, uuid.UUID] = field(default_factory=dict)
    merges: list[Merge] = field(default_factory=list)
    _redirect: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)

    def redirect(self, merged_id: uuid.UUID, survivor_id: uuid.UUID) -> None:
        """Record that `merged_id` was already merged into `survivor_id` (found in the database)."""
        self._redirect[merged_id] = survivor_id

    def final(self, lead_id: uuid.UUID) -> uuid.UUID:
        """The surviving lead for `lead_id`, following merges."""
        while lead_id in self._redirect:
            lead_id = self._redirect[lead_id]
        return lead_id

    def apply(
        self,
        *,
        event_id: uuid.UUID,
        identities: Iterable[Identity],
        occurred_at: dt.datetime,
        traits: Mapping[str, Any],
    ) -> uuid.UUID:
        """Attach one event; returns its lead's id (which a later merge may still redirect)."""
        keys = list(dict.fromkeys(identities))
        owners = sorted(
            {self.final(self.identities[k]) for k in keys if k in self.identities},
            key=lambda lead_id: (self.leads[lead_id].created_at, lead_id),
        )
        if not owners:
            lead = LeadState(id=self.new_id(), created_at=self.now, is_new=True, changed=True)
            self.leads[lead.id] = lead
        else:
            lead = self.leads[owners[0]]
            for other in owners[1:]:
                self._merge(lead, self.leads[other], event_id, keys)
        for key in keys:
            if key not in self.identities:
                self.identities[key] = lead.id
                self.new_identities[key] = lead.id
        lead.apply_traits(traits, time_key(occurred_at))
        lead.saw_event_at(occurred_at, occurred_at)
        return lead.id

    def _merge(self, survivor: LeadState, merged: LeadState, event_id: uuid.UUID, keys: list[Identity]) -> None:
        survivor.apply_traits(merged.traits, merged.trait_times)
        survivor.saw_event_at(merged.first_event_at, merged.last_event_at)
        survivor.changed = True
        self._redirect[merged.id] = survivor.id
        for key, owner in self.identities.items():
            if owner == merged.id:
                self.identities[key] = survivor.id
        for key, owner in self.new_identities.items():
            if owner == merged.id:
                self.new_identities[key] = survivor.id
        self.merges.append(Merge(survivor.id, merged.id, event_id, tuple(keys)))
