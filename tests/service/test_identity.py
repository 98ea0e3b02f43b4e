"""The in-memory identity resolution, table-driven (no database)."""

from __future__ import annotations

import datetime as dt
import itertools
import uuid

import pytest

from service.identity import LeadState, Resolver

NOW = dt.datetime(2026, 11, 22, 12, tzinfo=dt.UTC)
T0 = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)


def resolver(
    leads: dict[str, tuple[list[tuple[str, str]], int]] | None = None,
) -> tuple[Resolver, dict[str, uuid.UUID]]:
    """A resolver over existing leads `{name: (identities, age rank)}`; lower rank = older."""
    counter = itertools.count(1000)
    ids: dict[str, uuid.UUID] = {}
    identities: dict[tuple[str, str], uuid.UUID] = {}
    states: dict[uuid.UUID, LeadState] = {}
    for name, (keys, rank) in (leads or {}).items():
        ids[name] = uuid.UUID(int=rank + 1)
        states[ids[name]] = LeadState(id=ids[name], created_at=T0 + dt.timedelta(days=rank))
        for key in keys:
            identities[key] = ids[name]
    r = Resolver(identities=identities, leads=states, now=NOW, new_id=lambda: uuid.UUID(int=next(counter)))
    return r, ids


def apply(r: Resolver, keys: list[tuple[str, str]], at: dt.datetime = T0, **traits: object) -> uuid.UUID:
    return r.apply(event_id=uuid.uuid4(), identities=keys, occurred_at=at, traits=traits)


def test_unknown_identities_make_a_new_lead_with_them() -> None:
    r, _ = resolver()
    lead_id = apply(r, [("email", "a@x.io"), ("hubspot", "1")])
    assert r.leads[lead_id].is_new
    assert r.new_identities == {("email", "a@x.io"): lead_id, ("hubspot", "1"): lead_id}


@pytest.mark.parametrize(
    ("keys", "owner"),
    [
        ([("email", "a@x.io")], "a"),
        ([("hubspot", "1")], "a"),
        ([("segment", "s"), ("email", "b@x.io")], "b"),
    ],
)
def test_known_identity_attaches_to_its_lead(keys: list[tuple[str, str]], owner: str) -> None:
    r, ids = resolver({"a": ([("email", "a@x.io"), ("hubspot", "1")], 0), "b": ([("email", "b@x.io")], 1)})
    assert apply(r, keys) == ids[owner]
    assert not r.merges


@pytest.mark.parametrize(("older", "newer"), [("a", "b"), ("b", "a")])
def test_two_leads_in_one_event_merge_into_the_older(older: str, newer: str) -> None:
    r, ids = resolver({older: ([("email", "a@x.io")], 0), newer: ([("hubspot", "1")], 5)})
    lead_id = apply(r, [("hubspot", "1"), ("email", "a@x.io")])
    assert lead_id == ids[older]
    [merge] = r.merges
    assert (merge.survivor_id, merge.merged_id) == (ids[older], ids[newer])
    assert r.final(ids[newer]) == ids[older]
    assert r.identities[("hubspot", "1")] == ids[older]


def test_three_way_merge_and_chained_redirects() -> None:
    r, ids = resolver({"a": ([("email", "a@x.io")], 2), "b": ([("hubspot", "1")], 1), "c": ([("mautic", "9")], 0)})
    apply(r, [("email", "a@x.io"), ("hubspot", "1")])
    apply(r, [("hubspot", "1"), ("mautic", "9")])
    assert {r.final(ids[n]) for n in "abc"} == {ids["c"]}
    assert len(r.merges) == 2


def test_new_lead_made_earlier_in_the_batch_can_be_merged() -> None:
    r, ids = resolver({"a": ([("hubspot", "1")], 0)})
    fresh = apply(r, [("email", "new@x.io")])
    apply(r, [("email", "new@x.io"), ("hubspot", "1")])
    assert r.final(fresh) == ids["a"]
    assert r.new_identities[("email", "new@x.io")] == ids["a"]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_traits_are_last_write_wins_by_event_time_in_any_order(order: tuple[int, ...]) -> None:
    events = [
        (T0, {"stage": "lead", "country": "PT"}),
        (T0 + dt.timedelta(days=2), {"stage": "mql"}),
        (T0 + dt.timedelta(days=1), {"stage": "subscriber", "title": "CTO"}),
    ]
    r, _ = resolver()
    lead_id = None
    for i in order:
        at, traits = events[i]
        lead_id = apply(r, [("email", "a@x.io")], at, **traits)
    assert lead_id is not None
    state = r.leads[lead_id]
    assert state.traits == {"stage": "mql", "country": "PT", "title": "CTO"}
    assert (state.first_event_at, state.last_event_at) == (T0, T0 + dt.timedelta(days=2))


def test_same_time_conflict_is_decided_by_value_not_order() -> None:
    results = []
    for values in (("a", "b"), ("b", "a")):
        r, _ = resolver()
        lead_id = None
        for v in values:
            lead_id = apply(r, [("email", "a@x.io")], T0, tier=v)
        assert lead_id is not None
        results.append(r.leads[lead_id].traits["tier"])
    assert results[0] == results[1]
