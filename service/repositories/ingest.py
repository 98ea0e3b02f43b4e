"""The statements of one group-commit transaction of the ingest path: SQLAlchemy Core for SQLite and
the rarer paths, the driver's own SQL for PostgreSQL's hot path."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from service.db import DRIVER_TRANSACTION
from service.identity import Identity, LeadState, Merge
from service.repositories.tables import (
    inbound_event,
    inbound_request,
    insert_ignoring_conflicts,
    lead,
    lead_identity,
    lead_merge,
    outcome,
    score_record,
)

# Larger IN lists are split so no statement exceeds SQLite's bound-parameter limit.
_CHUNK = 500


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory-lock key for a logical name."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def in_list(column: sa.ColumnElement[Any], name: str, dialect: str) -> sa.ColumnElement[bool]:
    """`column IN :name`, with the list bound at execution. On PostgreSQL it is `= ANY(:array)`:
    one SQL text whatever the count, so asyncpg prepares it once (each IN-list length would be a new
    statement to prepare)."""
    if dialect == "postgresql":
        return column == sa.any_(sa.bindparam(name, type_=postgresql.ARRAY(column.type)))
    return column.in_(sa.bindparam(name, expanding=True))


_LEAD_COLUMNS = (
    lead.c.id,
    lead.c.created_at,
    lead.c.traits,
    lead.c.trait_times,
    lead.c.first_event_at,
    lead.c.last_event_at,
    lead.c.merged_into_id,
    lead.c.stage,
)


class _SqliteStatements:
    """The SQLite hot path's statements, built once: building a SQLAlchemy statement costs more CPU
    than executing it (measured: 330 us built per call, 160 us prebuilt). PostgreSQL runs its own
    SQL on the driver (see `driver`)."""

    find_events = sa.select(inbound_event.c.external_id, inbound_event.c.id, inbound_event.c.lead_id).where(
        inbound_event.c.source_id == sa.bindparam("source_id"),
        inbound_event.c.external_id.in_(sa.bindparam("external_ids", expanding=True)),
    )
    # SQLite takes the write lock at BEGIN IMMEDIATE, so these need no row locks.
    find_leads = (
        sa.select(lead_identity.c.namespace, lead_identity.c.value, *_LEAD_COLUMNS)
        .select_from(lead_identity.join(lead, lead.c.id == lead_identity.c.lead_id))
        .where(
            sa.tuple_(lead_identity.c.namespace, lead_identity.c.value).in_(sa.bindparam("identities", expanding=True))
        )
        .order_by(lead.c.id)
    )
    leads = sa.select(*_LEAD_COLUMNS).where(lead.c.id.in_(sa.bindparam("ids", expanding=True))).order_by(lead.c.id)
    update_lead = (
        lead.update()
        .where(lead.c.id == sa.bindparam("b_id"))
        .values(
            updated_at=sa.bindparam("b_now"),
            traits=sa.bindparam("b_traits"),
            trait_times=sa.bindparam("b_trait_times"),
            first_event_at=sa.bindparam("b_first"),
            last_event_at=sa.bindparam("b_last"),
            # Evaluated on the row as it was, so the time only moves when the stage does.
            stage_changed_at=sa.case(
                (lead.c.stage != sa.bindparam("b_stage"), sa.bindparam("b_now")), else_=lead.c.stage_changed_at
            ),
            stage=sa.bindparam("b_stage"),
        )
    )


_BEGIN = sa.text("SELECT 1")
_LOCK = sa.text("SELECT pg_advisory_xact_lock(k) FROM unnest(CAST(:keys AS bigint[])) AS t(k)")


async def lock_names(conn: AsyncConnection, keys: Iterable[int]) -> None:
    """Take transaction-scoped advisory locks on PostgreSQL, in a fixed order (no deadlock between
    batches). SQLite needs none: `BEGIN IMMEDIATE` already serialises writers.

    Where the transaction has not begun yet, this is its first statement: on the ingest writer's
    connection (`DRIVER_TRANSACTION`, see `service.ingest`) the lock and BEGIN go to the driver in
    one round trip, and the writer commits there; otherwise the lock begins SQLAlchemy's
    transaction."""
    ordered = sorted(set(keys))
    if conn.dialect.name != "postgresql":
        return
    raw = (await conn.get_raw_connection()).driver_connection
    if raw is not None and raw.is_in_transaction():
        if ordered:
            await raw.execute(_PG_LOCK, ordered)
        return
    if raw is not None and _driver_transaction(conn):
        # Two statements in one simple-protocol message; the keys are integers written into its
        # text (nothing from outside).
        await raw.execute("BEGIN; " + _pg_lock_literal(ordered) if ordered else "BEGIN")
        return
    if not ordered:
        # Nothing to lock (a vendor body that mapped to no event): the transaction must still begin
        # here, as the driver statements that follow run inside it.
        await conn.execute(_BEGIN)
        return
    await conn.execute(_LOCK, {"keys": ordered})


_PG_LOCK = "SELECT pg_advisory_xact_lock(k) FROM unnest($1::bigint[]) AS t(k)"


def _driver_transaction(conn: AsyncConnection) -> bool:
    sync = conn.sync_connection
    return sync is not None and bool(sync.get_execution_options().get(DRIVER_TRANSACTION))


def _pg_lock_literal(keys: Sequence[int]) -> str:
    return (
        "SELECT pg_advisory_xact_lock(k) FROM unnest('{" + ",".join(map(str, map(int, keys))) + "}'::bigint[]) AS t(k)"
    )


async def driver(conn: AsyncConnection) -> Any:
    """The asyncpg connection under `conn`, for the PostgreSQL hot path.

    Each statement through SQLAlchemy costs about twice the client CPU of the same statement on
    asyncpg (measured: 160 vs 80 us). The statements run inside the transaction the batch's first
    statement (`lock_names`) began: on the driver for the ingest writer (its connection is
    AUTOCOMMIT to SQLAlchemy, and the writer commits on the driver), else SQLAlchemy's, whose commit
    or rollback then covers them.
    """
    raw = (await conn.get_raw_connection()).driver_connection
    if raw is None or not raw.is_in_transaction():
        raise RuntimeError("driver statements need the transaction that lock_names began")
    return raw


def _grouped(keys: Iterable[tuple[Any, str]]) -> dict[Any, list[str]]:
    groups: dict[Any, list[str]] = {}
    for first, second in sorted(set(keys)):
        groups.setdefault(first, []).append(second)
    return groups


async def _sqlite_find_events(
    conn: AsyncConnection, keys: Sequence[tuple[int, str]]
) -> dict[tuple[int, str], tuple[uuid.UUID, uuid.UUID]]:
    found: dict[tuple[int, str], tuple[uuid.UUID, uuid.UUID]] = {}
    statement = _SqliteStatements.find_events
    for source_id, external_ids in _grouped(keys).items():
        for chunk in _chunks(external_ids):
            rows = await conn.execute(statement, {"source_id": source_id, "external_ids": list(chunk)})
            for external_id, event_id, lead_id in rows:
                found[(source_id, external_id)] = (event_id, lead_id)
    return found


_PG_LEAD_COLUMNS = (
    "l.id, l.created_at, l.traits, l.trait_times, l.first_event_at, l.last_event_at, l.merged_into_id, l.stage"
)
_PG_LOCK_LEADS = f"SELECT {_PG_LEAD_COLUMNS} FROM lead l WHERE l.id = ANY($1::uuid[]) ORDER BY l.id FOR UPDATE"
# The locked leads' rows, then the stored events' rows, told apart by which columns are null. One
# row per lead with the identities it owns (a lead named by its email and its CRM id came twice,
# its traits sent, decoded and thrown away once more).
_PG_FIND_ALL = (
    f"WITH owners AS (SELECT m.namespaces, m.vals, {_PG_LEAD_COLUMNS} FROM ("
    "SELECT i.lead_id, array_agg(i.namespace) AS namespaces, array_agg(i.value) AS vals FROM lead_identity i "
    "JOIN unnest($3::text[], $4::text[]) AS k(ns, v) ON i.namespace = k.ns AND i.value = k.v GROUP BY i.lead_id) AS m "
    "JOIN lead l ON l.id = m.lead_id ORDER BY l.id FOR UPDATE OF l) "
    "SELECT namespaces, vals, id, created_at, traits, trait_times, first_event_at, last_event_at, merged_into_id, "
    "stage, NULL::bigint AS source_id, NULL::text AS external_id, NULL::uuid AS event_id, NULL::uuid AS event_lead_id "
    "FROM owners UNION ALL "
    "SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, e.source_id, e.external_id, e.id, e.lead_id "
    "FROM inbound_event e JOIN unnest($1::bigint[], $2::text[]) AS k(s, x) ON e.source_id = k.s AND e.external_id = k.x"
)


async def find_events_and_leads(
    conn: AsyncConnection, event_refs: Sequence[tuple[int, str]], identity_keys: Sequence[Identity]
) -> tuple[
    dict[tuple[int, str], tuple[uuid.UUID, uuid.UUID]],
    dict[Identity, uuid.UUID],
    dict[uuid.UUID, LeadState],
    dict[uuid.UUID, uuid.UUID],
]:
    """What the batch finds before it resolves anything, on PostgreSQL in one statement: the events
    already stored under `(source_id, external_id)` (their id and lead id), which lead owns each
    identity, and those leads, locked in id order.

    Returns `(stored events, identity -> lead id, lead states, {merged id: survivor id})`; the last
    lists leads that a concurrent transaction merged away while we waited for their lock.
    """
    if conn.dialect.name != "postgresql":
        found = await _sqlite_find_events(conn, event_refs)
        return (found, *await _sqlite_find_leads(conn, identity_keys))
    refs = sorted(set(event_refs))
    unique = sorted(set(identity_keys))
    stored: dict[tuple[int, str], tuple[uuid.UUID, uuid.UUID]] = {}
    identities: dict[Identity, uuid.UUID] = {}
    states: dict[uuid.UUID, LeadState] = {}
    merged: dict[uuid.UUID, uuid.UUID] = {}
    records = await (await driver(conn)).fetch(
        _PG_FIND_ALL,
        [source for source, _ in refs],
        [external for _, external in refs],
        [ns for ns, _ in unique],
        [v for _, v in unique],
    )
    for record in records:
        if record["id"] is None:
            stored[(record["source_id"], record["external_id"])] = (record["event_id"], record["event_lead_id"])
            continue
        for identity in zip(record["namespaces"], record["vals"], strict=True):
            identities[identity] = record["id"]
        _keep(record, states, merged)
    return stored, identities, states, merged


async def _sqlite_find_leads(
    conn: AsyncConnection, keys: Sequence[Identity]
) -> tuple[dict[Identity, uuid.UUID], dict[uuid.UUID, LeadState], dict[uuid.UUID, uuid.UUID]]:
    identities: dict[Identity, uuid.UUID] = {}
    states: dict[uuid.UUID, LeadState] = {}
    merged: dict[uuid.UUID, uuid.UUID] = {}
    for chunk in _chunks(sorted(set(keys))):
        for row in await conn.execute(_SqliteStatements.find_leads, {"identities": list(chunk)}):
            identities[(row.namespace, row.value)] = row.id
            _keep(row._mapping, states, merged)
    return identities, states, merged


def _keep(row: Mapping[Any, Any], states: dict[uuid.UUID, LeadState], merged: dict[uuid.UUID, uuid.UUID]) -> None:
    lead_id = row["id"]
    if lead_id in states:
        return
    states[lead_id] = LeadState(
        id=lead_id,
        created_at=row["created_at"],
        traits=dict(row["traits"]),
        trait_times=dict(row["trait_times"]),
        first_event_at=row["first_event_at"],
        last_event_at=row["last_event_at"],
        stage=row["stage"],
    )
    if row["merged_into_id"] is not None:
        merged[lead_id] = row["merged_into_id"]


async def lock_leads(
    conn: AsyncConnection, ids: Iterable[uuid.UUID]
) -> tuple[dict[uuid.UUID, LeadState], dict[uuid.UUID, uuid.UUID]]:
    """Lock and load leads by id (in id order), as `find_events_and_leads` does."""
    states: dict[uuid.UUID, LeadState] = {}
    merged: dict[uuid.UUID, uuid.UUID] = {}
    if conn.dialect.name == "postgresql":
        for record in await (await driver(conn)).fetch(_PG_LOCK_LEADS, sorted(set(ids))):
            _keep(record, states, merged)
        return states, merged
    statement = _SqliteStatements.leads
    for chunk in _chunks(sorted(set(ids))):
        for row in await conn.execute(statement, {"ids": list(chunk)}):
            _keep(row._mapping, states, merged)
    return states, merged


async def bulk_insert(
    conn: AsyncConnection, table: sa.Table, rows: Sequence[dict[str, Any]], *, ignore_conflicts: bool = False
) -> None:
    """Insert rows (all with the same keys, no binary columns). On PostgreSQL one
    `INSERT ... SELECT FROM json_populate_recordset` for the whole batch: executemany runs the
    executor once per row, which cost 3-4 times more server CPU per row (measured). SQLite, in
    process, takes the rows as executemany."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        statement = insert_ignoring_conflicts(table, conn.dialect.name) if ignore_conflicts else table.insert()
        await conn.execute(statement, list(rows))
        return
    columns = tuple(rows[0])
    raw = await driver(conn)
    # The whole batch as one JSON document: asyncpg's array parameters check every element against
    # collection ABCs, which cost more than the insert (measured on score records: 7 % of a
    # worker's CPU); orjson and PostgreSQL's JSON parser are both C.
    document = orjson.dumps(list(rows), default=str).decode()
    await raw.execute(_pg_json_insert(table, columns, ignore_conflicts), document)


@functools.cache
def _pg_json_insert(table: sa.Table, columns: tuple[str, ...], ignore_conflicts: bool) -> str:
    names = ", ".join(columns)
    conflict = " ON CONFLICT DO NOTHING" if ignore_conflicts else ""
    return (
        f"INSERT INTO {table.name} ({names}) SELECT {names} "
        f"FROM json_populate_recordset(NULL::{table.name}, $1::json){conflict}"
    )


def _new_lead_rows(
    leads: Sequence[LeadState], now: dt.datetime, stage_moved: Collection[uuid.UUID]
) -> list[dict[str, Any]]:
    """New lead rows; a lead whose stage moved in its first batch has the time it moved."""
    return [
        {
            "id": s.id,
            "created_at": s.created_at,
            "updated_at": now,
            "traits": s.traits,
            "trait_times": s.trait_times,
            "first_event_at": s.first_event_at,
            "last_event_at": s.last_event_at,
            "merged_into_id": None,
            "stage": s.stage,
            "stage_changed_at": now if s.id in stage_moved else None,
        }
        for s in leads
    ]


def _identity_rows(identities: Mapping[Identity, uuid.UUID], now: dt.datetime) -> list[dict[str, Any]]:
    return [
        {"lead_id": lead_id, "namespace": ns, "value": value, "created_at": now}
        for (ns, value), lead_id in identities.items()
    ]


async def write_rows(
    conn: AsyncConnection,
    *,
    requests: Sequence[dict[str, Any]],
    new_leads: Sequence[LeadState],
    identities: Mapping[Identity, uuid.UUID],
    events: Sequence[dict[str, Any]],
    scores: Sequence[dict[str, Any]],
    changed_leads: Sequence[LeadState],
    stage_moved: Collection[uuid.UUID],
    now: dt.datetime,
) -> None:
    """The rows of one ingest batch: raw requests, new leads and identities, events (a repeat of a
    stored one is skipped), score records, and the stored leads the batch changed; `stage_moved`
    names the leads whose stage moved in this batch.

    On PostgreSQL this is one statement (data-modifying CTEs, each table's rows as one JSON
    parameter): a group commit is mostly small batches, and each statement has a fixed cost on both
    sides (the round trip, planning, the driver's and event loop's work) that five separate
    inserts and an update paid five times over. SQLite, in process, runs them one by one."""
    if conn.dialect.name != "postgresql":
        await bulk_insert(conn, inbound_request, requests)
        await bulk_insert(conn, lead, _new_lead_rows(new_leads, now, stage_moved))
        await bulk_insert(conn, lead_identity, _identity_rows(identities, now), ignore_conflicts=True)
        await bulk_insert(conn, inbound_event, events, ignore_conflicts=True)
        await bulk_insert(conn, score_record, scores)
        await _sqlite_update_leads(conn, changed_leads, now)
        return
    if not (requests or new_leads or identities or events or scores or changed_leads):
        return
    await (await driver(conn)).execute(
        _pg_write_rows(),
        _json_rows(requests, _REQUEST_FIELDS),
        [r["body"] for r in requests],
        _json_rows(_new_lead_rows(new_leads, now, stage_moved), _LEAD_FIELDS),
        _json_rows(_identity_rows(identities, now), _IDENTITY_FIELDS),
        _json_rows(events, _EVENT_FIELDS),
        [orjson.dumps(r["payload"]).decode() for r in events],
        _json_rows(scores, _SCORE_FIELDS),
        [orjson.dumps(r["explanation"]).decode() for r in scores],
        orjson.dumps(
            [
                {
                    "id": s.id,
                    "traits": s.traits,
                    "trait_times": s.trait_times,
                    "first_event_at": s.first_event_at,
                    "last_event_at": s.last_event_at,
                    "stage": s.stage,
                }
                for s in changed_leads
            ],
            default=str,  # the driver's own UUID type
        ).decode(),
        now,
    )


_REQUEST_FIELDS = ("id", "source_id", "webhook_id", "content_type", "received_at")
_LEAD_FIELDS = (
    "id",
    "created_at",
    "updated_at",
    "traits",
    "trait_times",
    "first_event_at",
    "last_event_at",
    "merged_into_id",
    "stage",
    "stage_changed_at",
)
_IDENTITY_FIELDS = ("lead_id", "namespace", "value", "created_at")
_EVENT_FIELDS = (
    "id",
    "source_id",
    "external_id",
    "request_id",
    "lead_id",
    "type",
    "name",
    "occurred_at",
    "received_at",
)
_SCORE_FIELDS = (
    "id",
    "lead_id",
    "pipeline_version_id",
    "shadow",
    "event_id",
    "scored_at",
    "inputs_digest",
    "score",
    "fit",
    "engagement",
    "probability",
    "grade",
)


def _json_rows(rows: Sequence[Mapping[str, Any]], fields: tuple[str, ...]) -> str:
    """The rows' `fields` as one JSON array, for `json_populate_recordset`."""
    return orjson.dumps([{name: row[name] for name in fields} for row in rows], default=str).decode()


@functools.cache
def _pg_write_rows() -> str:
    """The statement of `write_rows`. Scalar columns come as a JSON array of rows; a large column
    (a request's body, an event's payload, a score's explanation) as an array of its own, joined by
    position: nested in the rows' JSON it was lexed three times instead of once (10 us of server
    CPU per score record, measured)."""

    def insert(
        table: sa.Table, fields: tuple[str, ...], rows: int, large: tuple[str, str, int] | None = None, *, skip: bool
    ) -> str:
        names = ", ".join(fields)
        conflict = " ON CONFLICT DO NOTHING" if skip else ""
        source = f"json_populate_recordset(NULL::{table.name}, ${rows}::json)"
        if large is None:
            return f"INSERT INTO {table.name} ({names}) SELECT {names} FROM {source}{conflict}"
        column, kind, param = large
        picks = ", ".join(f"r.{name}" for name in fields)
        return (
            f"INSERT INTO {table.name} ({names}, {column}) SELECT {picks}, l.value::{kind} "
            f"FROM {source} WITH ORDINALITY AS r "
            f"JOIN unnest(${param}::{'bytea' if kind == 'bytea' else 'text'}[]) WITH ORDINALITY AS l(value, n) "
            f"ON l.n = r.ordinality{conflict}"
        )

    return (
        f"WITH requests AS ({insert(inbound_request, _REQUEST_FIELDS, 1, ('body', 'bytea', 2), skip=False)}), "
        f"leads AS ({insert(lead, _LEAD_FIELDS, 3, skip=False)}), "
        f"identities AS ({insert(lead_identity, _IDENTITY_FIELDS, 4, skip=True)}), "
        f"events AS ({insert(inbound_event, _EVENT_FIELDS, 5, ('payload', 'json', 6), skip=True)}), "
        f"scores AS ({insert(score_record, _SCORE_FIELDS, 7, ('explanation', 'json', 8), skip=False)}), "
        "changed AS (UPDATE lead SET updated_at = $10, traits = u.traits, trait_times = u.trait_times, "
        "first_event_at = u.first_event_at, last_event_at = u.last_event_at, stage = u.stage, "
        # Evaluated on the row as it was, so the time only moves when the stage does.
        "stage_changed_at = CASE WHEN lead.stage <> u.stage THEN $10 ELSE lead.stage_changed_at END "
        "FROM json_populate_recordset(NULL::lead, $9::json) AS u WHERE lead.id = u.id) "
        "SELECT 1"
    )


async def _sqlite_update_leads(conn: AsyncConnection, leads: Sequence[LeadState], now: dt.datetime) -> None:
    if not leads:
        return
    await conn.execute(
        _SqliteStatements.update_lead,
        [
            {
                "b_id": s.id,
                "b_now": now,
                "b_traits": s.traits,
                "b_trait_times": s.trait_times,
                "b_first": s.first_event_at,
                "b_last": s.last_event_at,
                "b_stage": s.stage,
            }
            for s in leads
        ],
    )


async def record_merges(conn: AsyncConnection, merges: Sequence[Merge], now: dt.datetime) -> None:
    """Move everything of each merged lead to its survivor and record the merge.

    What sales reported (outcomes) is about the person, so it moves too: reports and training
    labels read outcomes of live leads only. Stage transitions, scores and assignments stay with
    the lead that had them (they are its history; the survivor takes its stage)."""
    for m in merges:
        await conn.execute(
            lead_identity.update().where(lead_identity.c.lead_id == m.merged_id).values(lead_id=m.survivor_id)
        )
        await conn.execute(
            inbound_event.update().where(inbound_event.c.lead_id == m.merged_id).values(lead_id=m.survivor_id)
        )
        await conn.execute(outcome.update().where(outcome.c.lead_id == m.merged_id).values(lead_id=m.survivor_id))
        await conn.execute(
            lead.update()
            .where(sa.or_(lead.c.id == m.merged_id, lead.c.merged_into_id == m.merged_id))
            .values(merged_into_id=m.survivor_id, updated_at=now)
        )
    if merges:
        await conn.execute(
            lead_merge.insert(),
            [
                {
                    "survivor_id": m.survivor_id,
                    "merged_id": m.merged_id,
                    "event_id": m.event_id,
                    "merged_at": now,
                    "identities": [{"namespace": ns, "value": v} for ns, v in m.identities],
                }
                for m in merges
            ],
        )
