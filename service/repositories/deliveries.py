"""The CRM outbox: enqueue handoffs, claim due deliveries, record what happened, read and replay."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from service.ids import uuid7
from service.repositories import claims
from service.repositories.claims import WAITING
from service.repositories.ingest import bulk_insert, driver
from service.repositories.tables import delivery, delivery_attempt

# Delivery ids are derived from the idempotency key, so an enqueue repeated with the same key (which
# inserts nothing) still answers the id of the row that holds it.
_ID_NAMESPACE = uuid.UUID("6f1c1d9e-4a53-4c55-9d51-0c8f3b7f0a11")
# PostgreSQL: a transaction that enqueued deliveries notifies this channel; it reaches the listening
# workers when (and only if) the transaction commits.
OUTBOX_CHANNEL = "leadscore_outbox"
ERROR_CHARS = 1000


def delivery_id(idempotency_key: str) -> uuid.UUID:
    return uuid.uuid5(_ID_NAMESPACE, idempotency_key)


@dataclass(frozen=True, slots=True)
class DeliveryItem:
    """One handoff to enqueue: a lead's payload for one destination (see `service.crm.Handoff`)."""

    lead_id: uuid.UUID
    destination: str
    idempotency_key: str
    payload: Mapping[str, Any]


async def enqueue_deliveries(
    conn: AsyncConnection, items: Sequence[DeliveryItem], *, now: dt.datetime
) -> list[uuid.UUID]:
    """Add outbox rows inside the caller's open transaction, in one statement for the batch; an item
    whose idempotency key is already in the outbox (or earlier in `items`) is ignored. Returns the
    delivery id of every item, in order (for an ignored item, the id of the row that has its key)."""
    ids = [delivery_id(item.idempotency_key) for item in items]
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for item, row_id in zip(items, ids, strict=True):
        if item.idempotency_key in seen:
            continue
        seen.add(item.idempotency_key)
        rows.append(
            {
                "id": row_id,
                "lead_id": item.lead_id,
                "destination": item.destination,
                "idempotency_key": item.idempotency_key,
                "payload": dict(item.payload),
                "status": "pending",
                "attempts": 0,
                "replays": 0,
                "next_attempt_at": now,
                "created_at": now,
                "updated_at": now,
            }
        )
    if rows:
        await _begin(conn)
        await bulk_insert(conn, delivery, rows, ignore_conflicts=True)
        if conn.dialect.name == "postgresql":
            await (await driver(conn)).execute(f"NOTIFY {OUTBOX_CHANNEL}")
    return ids


@contextlib.asynccontextmanager
async def outbox_notifications(engine: AsyncEngine, notified: Callable[[], None]) -> AsyncIterator[asyncio.Event]:
    """PostgreSQL: hold a connection listening on `OUTBOX_CHANNEL`, calling `notified` after each
    commit that enqueued deliveries. Yields an event set if the connection is lost (the listening
    then stops: leave the block and enter it again)."""
    lost = asyncio.Event()

    def on_notify(*_: Any) -> None:
        notified()

    def on_lost(*_: Any) -> None:
        lost.set()

    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        if raw is None:
            raise RuntimeError("no driver connection to listen on")
        raw.add_termination_listener(on_lost)
        await raw.add_listener(OUTBOX_CHANNEL, on_notify)
        try:
            yield lost
        finally:
            raw.remove_termination_listener(on_lost)
            if raw.is_closed():
                await conn.invalidate()  # not back to the pool
            else:
                await raw.remove_listener(OUTBOX_CHANNEL, on_notify)


async def _begin(conn: AsyncConnection) -> None:
    # `bulk_insert` runs on the asyncpg connection inside the caller's transaction, and SQLAlchemy
    # begins one only with its first statement: in the ingest transaction one is open (begun on
    # the driver, or by SQLAlchemy); a caller whose first statement this is gets it begun here.
    if conn.dialect.name == "postgresql":
        raw = (await conn.get_raw_connection()).driver_connection
        if raw is not None and not raw.is_in_transaction():
            await conn.execute(sa.select(sa.literal(1)))


async def any_due(conn: AsyncConnection, *, destinations: Sequence[str], now: dt.datetime) -> bool:
    """Is anything due? A read, so that an idle worker's polls take no write lock (on SQLite the
    write lock is the whole database's)."""
    if not destinations:
        return False
    return await claims.any_due(conn, delivery, now=now, where=[delivery.c.destination.in_(list(destinations))])


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery claimed by a worker, with what it needs to send it."""

    id: uuid.UUID
    destination: str
    idempotency_key: str
    payload: dict[str, Any]
    attempt: int
    created_at: dt.datetime
    replayed_at: dt.datetime | None
    claim_token: uuid.UUID


async def claim_due(
    conn: AsyncConnection,
    *,
    destinations: Sequence[str],
    limit: int,
    worker: str,
    now: dt.datetime,
    lease: dt.timedelta,
) -> list[Claimed]:
    """Claim up to `limit` due deliveries of `destinations`: pending ones whose time has come, and
    in-flight ones whose worker's lease ran out. On PostgreSQL the rows are picked with
    `FOR UPDATE SKIP LOCKED`, so concurrent workers claim disjoint sets without waiting on each
    other; SQLite's write lock (the caller's `BEGIN IMMEDIATE`) serialises claims."""
    if not destinations or limit <= 0:
        return []
    token, rows = await claims.claim_due(
        conn,
        delivery,
        limit=limit,
        worker=worker,
        now=now,
        lease=lease,
        where=[delivery.c.destination.in_(list(destinations))],
        returning=(
            delivery.c.id,
            delivery.c.destination,
            delivery.c.idempotency_key,
            delivery.c.payload,
            delivery.c.attempts,
            delivery.c.created_at,
            delivery.c.replayed_at,
        ),
    )
    return [
        Claimed(
            id=r.id,
            destination=r.destination,
            idempotency_key=r.idempotency_key,
            payload=r.payload,
            attempt=r.attempts,
            created_at=r.created_at,
            replayed_at=r.replayed_at,
            claim_token=token,
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt came to. `status` is the row's next state: `delivered`, `pending` (retry at
    `next_attempt_at`) or `dead`."""

    claimed: Claimed
    status: str
    worker: str
    started_at: dt.datetime
    duration_ms: float
    status_code: int | None
    error: str | None
    response_excerpt: str | None
    next_attempt_at: dt.datetime | None = None


_PG_FINISH = sa.text(
    """
    UPDATE delivery d SET status = u.status,
        next_attempt_at = COALESCE(u.next_attempt_at, d.next_attempt_at),
        delivered_at = CASE WHEN u.status = 'delivered' THEN CAST(:now AS timestamptz) END,
        last_status_code = u.status_code, last_error = u.error,
        claimed_by = NULL, claim_token = NULL, lease_expires_at = NULL, updated_at = CAST(:now AS timestamptz)
    FROM unnest(CAST(:ids AS uuid[]), CAST(:tokens AS uuid[]), CAST(:statuses AS text[]),
                CAST(:nexts AS timestamptz[]), CAST(:codes AS integer[]), CAST(:errors AS text[]))
        AS u(id, token, status, next_attempt_at, status_code, error)
    WHERE d.id = u.id AND d.claim_token = u.token AND d.status = 'in_flight'
    RETURNING d.id, u.token
    """
)
_SQLITE_FINISH = (
    delivery.update()
    .where(
        delivery.c.id == sa.bindparam("b_id"),
        delivery.c.claim_token == sa.bindparam("b_token"),
        delivery.c.status == "in_flight",
    )
    .values(
        status=sa.bindparam("b_status"),
        next_attempt_at=sa.func.coalesce(
            sa.bindparam("b_next", type_=delivery.c.next_attempt_at.type), delivery.c.next_attempt_at
        ),
        delivered_at=sa.bindparam("b_delivered_at", type_=delivery.c.delivered_at.type),
        last_status_code=sa.bindparam("b_code"),
        last_error=sa.bindparam("b_error"),
        claimed_by=None,
        claim_token=None,
        lease_expires_at=None,
        updated_at=sa.bindparam("b_now", type_=delivery.c.updated_at.type),
    )
)


async def record_outcomes(
    conn: AsyncConnection, outcomes: Sequence[Outcome], *, now: dt.datetime
) -> set[tuple[uuid.UUID, uuid.UUID]]:
    """Apply attempts' outcomes to their rows, each only if the row is still held by the same claim
    (a row whose lease ran out may have been claimed, and even delivered, by another worker: then
    this attempt changes nothing and is recorded as `stale`; the same worker may even hold two
    claims of one row in one batch). Every attempt is recorded. Returns the `(id, claim token)` of
    the rows that changed. Two statements for the batch on PostgreSQL."""
    if not outcomes:
        return set()
    applied: set[tuple[uuid.UUID, uuid.UUID]] = set()
    if conn.dialect.name == "postgresql":
        rows = await conn.execute(
            _PG_FINISH,
            {
                "now": now,
                "ids": [o.claimed.id for o in outcomes],
                "tokens": [o.claimed.claim_token for o in outcomes],
                "statuses": [o.status for o in outcomes],
                "nexts": [o.next_attempt_at for o in outcomes],
                "codes": [o.status_code for o in outcomes],
                "errors": [_cut(o.error) for o in outcomes],
            },
        )
        applied.update((row_id, token) for row_id, token in rows)
    else:
        for o in outcomes:
            result = await conn.execute(
                _SQLITE_FINISH,
                {
                    "b_id": o.claimed.id,
                    "b_token": o.claimed.claim_token,
                    "b_status": o.status,
                    "b_next": o.next_attempt_at,
                    "b_delivered_at": now if o.status == "delivered" else None,
                    "b_code": o.status_code,
                    "b_error": _cut(o.error),
                    "b_now": now,
                },
            )
            if result.rowcount:
                applied.add((o.claimed.id, o.claimed.claim_token))
    await bulk_insert(
        conn,
        delivery_attempt,
        [
            {
                "id": uuid7(),
                "delivery_id": o.claimed.id,
                "attempt": o.claimed.attempt,
                "worker": o.worker,
                "started_at": o.started_at,
                "duration_ms": o.duration_ms,
                "outcome": o.status.replace("pending", "retry")
                if (o.claimed.id, o.claimed.claim_token) in applied
                else "stale",
                "status_code": o.status_code,
                "error": _cut(o.error),
                "response_excerpt": _cut(o.response_excerpt),
            }
            for o in outcomes
        ],
    )
    return applied


def _cut(text: str | None) -> str | None:
    return None if text is None else text[:ERROR_CHARS]


async def release_claims(
    conn: AsyncConnection, claimed: Sequence[Claimed], *, now: dt.datetime, retry_at: dt.datetime
) -> None:
    """Give back claimed rows that were never sent (a worker stopping, a circuit that opened):
    pending again from `retry_at`, the attempt not counted."""
    await claims.release_claims(conn, delivery, [(c.id, c.claim_token) for c in claimed], now=now, retry_at=retry_at)


# Reads and replays (the API and the CLI).

_LIST_COLUMNS = (
    delivery.c.id,
    delivery.c.lead_id,
    delivery.c.destination,
    delivery.c.idempotency_key,
    delivery.c.status,
    delivery.c.attempts,
    delivery.c.replays,
    delivery.c.next_attempt_at,
    delivery.c.claimed_by,
    delivery.c.lease_expires_at,
    delivery.c.created_at,
    delivery.c.updated_at,
    delivery.c.delivered_at,
    delivery.c.replayed_at,
    delivery.c.last_status_code,
    delivery.c.last_error,
)


async def list_deliveries(
    conn: AsyncConnection,
    *,
    status: str | None,
    destination: str | None,
    lead_id: uuid.UUID | None,
    after: tuple[dt.datetime, uuid.UUID] | None,
    limit: int,
) -> list[dict[str, Any]]:
    """Deliveries newest first, `limit` of them after the `(created_at, id)` keyset cursor."""
    query = sa.select(*_LIST_COLUMNS)
    if status is not None:
        query = query.where(delivery.c.status == status)
    if destination is not None:
        query = query.where(delivery.c.destination == destination)
    if lead_id is not None:
        query = query.where(delivery.c.lead_id == lead_id)
    if after is not None:
        query = query.where(sa.tuple_(delivery.c.created_at, delivery.c.id) < sa.tuple_(*after))
    query = query.order_by(delivery.c.created_at.desc(), delivery.c.id.desc()).limit(limit)
    return [dict(r._mapping) for r in await conn.execute(query)]


async def get_delivery(conn: AsyncConnection, id_: uuid.UUID) -> dict[str, Any] | None:
    row = (await conn.execute(sa.select(*_LIST_COLUMNS, delivery.c.payload).where(delivery.c.id == id_))).one_or_none()
    return None if row is None else dict(row._mapping)


async def delivery_attempts(conn: AsyncConnection, id_: uuid.UUID) -> list[dict[str, Any]]:
    rows = await conn.execute(
        sa.select(delivery_attempt)
        .where(delivery_attempt.c.delivery_id == id_)
        .order_by(delivery_attempt.c.started_at, delivery_attempt.c.id)
    )
    return [dict(r._mapping) for r in rows]


def _replay_values(now: dt.datetime) -> dict[str, Any]:
    return {
        "status": "pending",
        "attempts": 0,
        "replays": delivery.c.replays + 1,
        "replayed_at": now,
        "next_attempt_at": now,
        "delivered_at": None,
        "updated_at": now,
    }


async def replay_delivery(conn: AsyncConnection, id_: uuid.UUID, *, now: dt.datetime) -> bool:
    """A dead or delivered row becomes pending again, with a fresh retry budget (attempts are kept)."""
    result = await conn.execute(
        delivery.update()
        .where(delivery.c.id == id_, delivery.c.status.in_(("dead", "delivered")))
        .values(**_replay_values(now))
    )
    return bool(result.rowcount)


async def replay_dead(
    conn: AsyncConnection,
    *,
    destination: str | None,
    status_code: int | None,
    created_after: dt.datetime | None,
    created_before: dt.datetime | None,
    limit: int,
    now: dt.datetime,
) -> int:
    """Replay up to `limit` dead letters matching the filters; returns how many."""
    chosen = sa.select(delivery.c.id).where(delivery.c.status == "dead")
    if destination is not None:
        chosen = chosen.where(delivery.c.destination == destination)
    if status_code is not None:
        chosen = chosen.where(delivery.c.last_status_code == status_code)
    if created_after is not None:
        chosen = chosen.where(delivery.c.created_at >= created_after)
    if created_before is not None:
        chosen = chosen.where(delivery.c.created_at < created_before)
    chosen = chosen.order_by(delivery.c.created_at).limit(limit)
    result = await conn.execute(
        delivery.update()
        .where(delivery.c.id.in_(chosen.scalar_subquery()), delivery.c.status == "dead")
        .values(**_replay_values(now))
    )
    return int(result.rowcount)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    pending: int
    oldest_pending_at: dt.datetime | None
    dead: int


async def outbox_stats(conn: AsyncConnection) -> dict[str, OutboxStats]:
    """Per destination: rows waiting (pending or in flight), the oldest waiting one's enqueue (or
    replay) time, and dead letters. One grouped statement over the `(destination, status)` index."""
    rows = await conn.execute(
        sa.select(
            delivery.c.destination,
            delivery.c.status,
            sa.func.count(),
            sa.func.min(sa.func.coalesce(delivery.c.replayed_at, delivery.c.created_at)),
        )
        .where(delivery.c.status.in_((*WAITING, "dead")))
        .group_by(delivery.c.destination, delivery.c.status)
    )
    counts: dict[str, dict[str, Any]] = {}
    for destination, status, count, oldest in rows:
        entry = counts.setdefault(destination, {"pending": 0, "oldest": None, "dead": 0})
        if status == "dead":
            entry["dead"] += count
            continue
        entry["pending"] += count
        if isinstance(oldest, str):  # SQLite hands back min() of the stored text
            oldest = dt.datetime.fromisoformat(oldest).replace(tzinfo=dt.UTC)
        if oldest is not None and (entry["oldest"] is None or oldest < entry["oldest"]):
            entry["oldest"] = oldest
    return {
        d: OutboxStats(pending=e["pending"], oldest_pending_at=e["oldest"], dead=e["dead"]) for d, e in counts.items()
    }
