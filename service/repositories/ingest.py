"""The statements of one group-commit transaction of the ingest path (SQLAlchemy Core)."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from models.types import UtcDateTime
from service.identity import Identity, LeadState, Merge
from service.repositories.tables import (
    inbound_event,
    inbound_request,
    insert_ignoring_conflicts,
    lead,
    lead_identity,
    lead_merge,
    outcome,
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
    batches). SQLite needs none: `BEGIN IMMEDIATE` already serialises writers."""
    ordered = sorted(set(keys))
    if conn.dialect.name != "postgresql":
        return
    if not ordered:
        # Nothing to lock (a vendor body that mapped to no event): the transaction must still begin
        # here, as the driver statements that follow run inside it.
        await conn.execute(_BEGIN)
        return
    await conn.execute(_LOCK, {"keys": ordered})


async def driver(conn: AsyncConnection) -> Any:
    """The asyncpg connection under `conn`, for the PostgreSQL hot path.

    Each statement through SQLAlchemy costs about twice the client CPU of the same statement on
    asyncpg (measured: 160 vs 80 us), and the ingest writer runs ten per batch. The statements run
    inside the transaction SQLAlchemy began (its first statement, `lock_names`, starts it), so
    SQLAlchemy's commit or rollback covers them.
    """
    raw = (await conn.get_raw_connection()).driver_connection
    if raw is None or not raw.is_in_transaction():
        raise RuntimeError("driver statements need the transaction that SQLAlchemy began")
    return raw


def _grouped(keys: Iterable[tuple[Any, str]]) -> dict[Any, list[str]]:
    groups: dict[Any, list[str]] = {}
    for first, second in sorted(set(keys)):
        groups.setdefault(first, []).append(second)
    return groups


async def find_events(
    conn: AsyncConnection, keys: Sequence[tuple[int, str]]
) -> dict[tuple[int, str], tuple[uuid.UUID, uuid.UUID]]:
    """Events already stored under `(source_id, external_id)`: their id and lead id."""
    found: dict[tuple[int, str], tuple[uuid.UUID, uuid.UUID]] = {}
    if conn.dialect.name == "postgresql":
        raw = await driver(conn)
        for source_id, external_ids in _grouped(keys).items():
            for external_id, event_id, lead_id in await raw.fetch(_PG_FIND_EVENTS, source_id, external_ids):
                found[(source_id, external_id)] = (event_id, lead_id)
        return found
    statement = _SqliteStatements.find_events
    for source_id, external_ids in _grouped(keys).items():
        for chunk in _chunks(external_ids):
            rows = await conn.execute(statement, {"source_id": source_id, "external_ids": list(chunk)})
            for external_id, event_id, lead_id in rows:
                found[(source_id, external_id)] = (event_id, lead_id)
    return found


_PG_FIND_EVENTS = (
    "SELECT external_id, id, lead_id FROM inbound_event WHERE source_id = $1 AND external_id = ANY($2::text[])"
)
_PG_LEAD_COLUMNS = (
    "l.id, l.created_at, l.traits, l.trait_times, l.first_event_at, l.last_event_at, l.merged_into_id, l.stage"
)
_PG_FIND_AND_LOCK = (
    f"SELECT i.namespace, i.value, {_PG_LEAD_COLUMNS} FROM lead_identity i "
    "JOIN unnest($1::text[], $2::text[]) AS k(ns, v) ON i.namespace = k.ns AND i.value = k.v "
    "JOIN lead l ON l.id = i.lead_id ORDER BY l.id FOR UPDATE OF l"
)
_PG_LOCK_LEADS = f"SELECT {_PG_LEAD_COLUMNS} FROM lead l WHERE l.id = ANY($1::uuid[]) ORDER BY l.id FOR UPDATE"


async def find_and_lock_leads(
    conn: AsyncConnection, keys: Sequence[Identity]
) -> tuple[dict[Identity, uuid.UUID], dict[uuid.UUID, LeadState], dict[uuid.UUID, uuid.UUID]]:
    """In one statement: which lead owns each identity, and those leads, locked in id order.

    Returns `(identity -> lead id, lead states, {merged id: survivor id})`; the last lists leads
    that a concurrent transaction merged away while we waited for their lock.
    """
    identities: dict[Identity, uuid.UUID] = {}
    states: dict[uuid.UUID, LeadState] = {}
    merged: dict[uuid.UUID, uuid.UUID] = {}
    unique = sorted(set(keys))
    if conn.dialect.name == "postgresql":
        raw = await driver(conn)
        for record in await raw.fetch(_PG_FIND_AND_LOCK, [ns for ns, _ in unique], [v for _, v in unique]):
            identities[(record["namespace"], record["value"])] = record["id"]
            _keep(record, states, merged)
        return identities, states, merged
    statement = _SqliteStatements.find_leads
    for chunk in _chunks(unique):
        for row in await conn.execute(statement, {"identities": list(chunk)}):
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
    """Lock and load leads by id (in id order), as `find_and_lock_leads` does."""
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


_PG = postgresql.dialect()  # type: ignore[no-untyped-call]


@functools.cache
def _pg_type(column: sa.Column[Any]) -> tuple[str, str | None]:
    """The PostgreSQL array element type a column is sent as, and for JSON (sent as text) the type
    to cast each element to."""
    kind = column.type
    if isinstance(kind, UtcDateTime):
        return "timestamptz", None
    if isinstance(kind, sa.JSON):
        return "text", "jsonb" if isinstance(kind.dialect_impl(_PG), postgresql.JSONB) else "json"
    for python_type, name in (
        (sa.Uuid, "uuid"),
        (sa.Boolean, "boolean"),
        (sa.Integer, "bigint"),
        (sa.Float, "float8"),
        (sa.LargeBinary, "bytea"),
        (sa.String, "text"),
    ):
        if isinstance(kind, python_type):
            return name, None
    raise TypeError(f"no bulk type for {column}")


@functools.cache
def _pg_bulk_insert(table: sa.Table, columns: tuple[str, ...], ignore_conflicts: bool) -> str:
    types = [_pg_type(table.c[name]) for name in columns]
    arrays = ", ".join(f"${i}::{kind}[]" for i, (kind, _) in enumerate(types, start=1))
    picks = ", ".join(
        f"u.{name}::{cast}" if cast else f"u.{name}" for name, (_, cast) in zip(columns, types, strict=True)
    )
    conflict = " ON CONFLICT DO NOTHING" if ignore_conflicts else ""
    return (
        f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {picks} "
        f"FROM unnest({arrays}) AS u({', '.join(columns)}){conflict}"
    )


async def bulk_insert(
    conn: AsyncConnection, table: sa.Table, rows: Sequence[dict[str, Any]], *, ignore_conflicts: bool = False
) -> None:
    """Insert rows (all with the same keys). On PostgreSQL one `INSERT ... SELECT FROM unnest(arrays)`
    for the whole batch: executemany runs the executor once per row, which cost 3-4 times more
    server CPU per row (measured). SQLite, in process, takes the rows as executemany."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        statement = insert_ignoring_conflicts(table, conn.dialect.name) if ignore_conflicts else table.insert()
        await conn.execute(statement, list(rows))
        return
    columns = tuple(rows[0])
    raw = await driver(conn)
    if _has_binary(table):
        arrays: list[list[Any]] = []
        for name in columns:
            _, json_cast = _pg_type(table.c[name])
            values = [row[name] for row in rows]
            arrays.append([None if v is None else orjson.dumps(v).decode() for v in values] if json_cast else values)
        await raw.execute(_pg_bulk_insert(table, columns, ignore_conflicts), *arrays)
        return
    # The whole batch as one JSON document: asyncpg's array parameters check every element against
    # collection ABCs, which cost more than the insert (measured on score records: 7 % of a
    # worker's CPU); orjson and PostgreSQL's JSON parser are both C.
    document = orjson.dumps(list(rows), default=str).decode()
    await raw.execute(_pg_json_insert(table, columns, ignore_conflicts), document)


@functools.cache
def _has_binary(table: sa.Table) -> bool:
    return any(isinstance(column.type, sa.LargeBinary) for column in table.columns)


@functools.cache
def _pg_json_insert(table: sa.Table, columns: tuple[str, ...], ignore_conflicts: bool) -> str:
    names = ", ".join(columns)
    conflict = " ON CONFLICT DO NOTHING" if ignore_conflicts else ""
    return (
        f"INSERT INTO {table.name} ({names}) SELECT {names} "
        f"FROM json_populate_recordset(NULL::{table.name}, $1::json){conflict}"
    )


async def insert_requests(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    await bulk_insert(conn, inbound_request, rows)


async def insert_leads(conn: AsyncConnection, leads: Sequence[LeadState], now: dt.datetime) -> None:
    await bulk_insert(
        conn,
        lead,
        [
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
                "stage_changed_at": None,
            }
            for s in leads
        ],
    )


_PG_UPDATE_LEADS = (
    "UPDATE lead SET updated_at = $1, traits = u.traits::jsonb, trait_times = u.trait_times::jsonb, "
    "first_event_at = u.first_event_at, last_event_at = u.last_event_at, stage = u.stage, "
    "stage_changed_at = CASE WHEN lead.stage <> u.stage THEN $1 ELSE lead.stage_changed_at END "
    "FROM unnest($2::uuid[], $3::text[], $4::text[], $5::timestamptz[], $6::timestamptz[], $7::text[]) "
    "AS u(id, traits, trait_times, first_event_at, last_event_at, stage) WHERE lead.id = u.id"
)


async def update_leads(conn: AsyncConnection, leads: Sequence[LeadState], now: dt.datetime) -> None:
    if not leads:
        return
    if conn.dialect.name == "postgresql":
        await (await driver(conn)).execute(
            _PG_UPDATE_LEADS,
            now,
            [s.id for s in leads],
            [orjson.dumps(s.traits).decode() for s in leads],
            [orjson.dumps(s.trait_times).decode() for s in leads],
            [s.first_event_at for s in leads],
            [s.last_event_at for s in leads],
            [s.stage for s in leads],
        )
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


async def insert_identities(conn: AsyncConnection, identities: dict[Identity, uuid.UUID], now: dt.datetime) -> None:
    await bulk_insert(
        conn,
        lead_identity,
        [
            {"lead_id": lead_id, "namespace": ns, "value": value, "created_at": now}
            for (ns, value), lead_id in identities.items()
        ],
        ignore_conflicts=True,
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


async def insert_events(conn: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    await bulk_insert(conn, inbound_event, rows, ignore_conflicts=True)
