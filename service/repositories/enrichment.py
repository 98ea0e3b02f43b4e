"""Enrichment jobs: ask for fetches (in the ingest transaction), claim due ones, record outcomes."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from service.ids import uuid7
from service.repositories import claims
from service.repositories.claims import WAITING
from service.repositories.ingest import bulk_insert
from service.repositories.tables import enrichment_attempt, enrichment_job

ERROR_CHARS = 1000


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """An event of `lead_id` from `source_id` asks for the vendor record `object_id` to be fetched."""

    source_id: int
    object_id: str
    lead_id: uuid.UUID


async def request_fetches(conn: AsyncConnection, requests: Sequence[FetchRequest], *, now: dt.datetime) -> None:
    """Record fetch requests in the caller's open transaction, one statement for the batch. A record
    with a job already waiting (pending, or in flight) gets no second job: the waiting one counts
    the request (a burst of changes to one contact is one fetch; one that arrives while the fetch is
    in flight makes that job run again once it ends, done or dead). A done or dead job becomes
    pending again."""
    if not requests:
        return
    counted: dict[tuple[int, str], tuple[uuid.UUID, int]] = {}
    for r in requests:
        _, count = counted.get((r.source_id, r.object_id), (r.lead_id, 0))
        counted[(r.source_id, r.object_id)] = (r.lead_id, count + 1)
    # In key order, so two transactions asking for the same records lock their rows in one order.
    rows = [
        {
            "id": uuid7(),
            "source_id": source_id,
            "object_id": object_id,
            "lead_id": lead_id,
            "status": "pending",
            "requests": count,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
            "requested_at": now,
        }
        for (source_id, object_id), (lead_id, count) in sorted(counted.items())
    ]
    statement = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(enrichment_job)
    # Not `in_(WAITING)`: its expanding parameter cannot go into a statement run for many rows.
    waiting = sa.or_(*(enrichment_job.c.status == s for s in WAITING))
    # Every expression below reads the row as it was before this update.
    statement = statement.on_conflict_do_update(
        index_elements=[enrichment_job.c.source_id, enrichment_job.c.object_id],
        set_={
            "requests": enrichment_job.c.requests + statement.excluded.requests,
            "lead_id": statement.excluded.lead_id,
            "requested_at": statement.excluded.requested_at,
            "updated_at": statement.excluded.updated_at,
            "status": sa.case((waiting, enrichment_job.c.status), else_="pending"),
            "attempts": sa.case((waiting, enrichment_job.c.attempts), else_=0),
            # A waiting job keeps its time: one backing off after a 429 is not sent early.
            "next_attempt_at": sa.case(
                (waiting, enrichment_job.c.next_attempt_at), else_=statement.excluded.next_attempt_at
            ),
        },
    )
    await conn.execute(statement, rows)


# A fetch refused for its token (wrong, revoked, or without the contacts read scope).
TOKEN_REFUSED = (401, 403)


async def revive_token_refused(conn: AsyncConnection, *, source_id: int, now: dt.datetime) -> int:
    """In the transaction that gives a source a new API token: its jobs that died of a refused token
    are pending again (due now, with a fresh retry budget), and those in flight count as asked again,
    so one that ends refused (sent with the old token) runs once more. Returns how many jobs were
    revived or asked again.

    The source's waiting jobs are locked first, in the order ingest locks jobs in: on PostgreSQL a
    worker cannot claim one of them until the new token is committed (it reads the token after
    claiming), and this cannot deadlock with an ingest transaction asking for the same contacts."""
    refused = sa.and_(enrichment_job.c.status == "dead", enrichment_job.c.last_status_code.in_(TOKEN_REFUSED))
    rows = (
        await conn.execute(
            sa.select(enrichment_job.c.id, enrichment_job.c.status)
            .where(enrichment_job.c.source_id == source_id, sa.or_(enrichment_job.c.status.in_(WAITING), refused))
            .order_by(enrichment_job.c.object_id)
            .with_for_update()
        )
    ).all()
    dead = [r.id for r in rows if r.status == "dead"]
    flying = [r.id for r in rows if r.status == "in_flight"]
    for start in range(0, len(dead), _CHUNK):
        await conn.execute(
            enrichment_job.update()
            .where(enrichment_job.c.id.in_(dead[start : start + _CHUNK]))
            .values(status="pending", attempts=0, next_attempt_at=now, updated_at=now)
        )
    for start in range(0, len(flying), _CHUNK):
        await conn.execute(
            enrichment_job.update()
            .where(enrichment_job.c.id.in_(flying[start : start + _CHUNK]))
            .values(requests=enrichment_job.c.requests + 1, updated_at=now)
        )
    return len(dead) + len(flying)


_CHUNK = 500  # ids per statement (SQLite allows 999 parameters in older builds)


async def any_due(conn: AsyncConnection, *, now: dt.datetime) -> bool:
    return await claims.any_due(conn, enrichment_job, now=now)


@dataclass(frozen=True, slots=True)
class ClaimedFetch:
    """A job claimed by a worker: which record of which source to fetch."""

    id: uuid.UUID
    source_id: int
    object_id: str
    lead_id: uuid.UUID
    attempt: int
    requested_at: dt.datetime
    claim_token: uuid.UUID


async def claim_due(
    conn: AsyncConnection, *, limit: int, worker: str, now: dt.datetime, lease: dt.timedelta
) -> list[ClaimedFetch]:
    """Claim up to `limit` due jobs (see `service.repositories.claims.claim_due`); each claim
    remembers how many requests the job had, so a later one is noticed when it is done."""
    token, rows = await claims.claim_due(
        conn,
        enrichment_job,
        limit=limit,
        worker=worker,
        now=now,
        lease=lease,
        values={"claimed_requests": enrichment_job.c.requests},
        returning=(
            enrichment_job.c.id,
            enrichment_job.c.source_id,
            enrichment_job.c.object_id,
            enrichment_job.c.lead_id,
            enrichment_job.c.attempts,
            enrichment_job.c.requested_at,
        ),
    )
    return [
        ClaimedFetch(
            id=r.id,
            source_id=r.source_id,
            object_id=r.object_id,
            lead_id=r.lead_id,
            attempt=r.attempts,
            requested_at=r.requested_at,
            claim_token=token,
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class FetchOutcome:
    """What one attempt came to. `status` is the job's next state: `done`, `pending` (retry at
    `next_attempt_at`) or `dead`; `event_id` is the lead event a fetched record was stored as."""

    claimed: ClaimedFetch
    status: str
    worker: str
    started_at: dt.datetime
    duration_ms: float
    status_code: int | None
    error: str | None
    next_attempt_at: dt.datetime | None = None
    event_id: uuid.UUID | None = None


_HELD = (enrichment_job.c.status == "in_flight",)
_RELEASED = {"claimed_by": None, "claim_token": None, "lease_expires_at": None, "claimed_requests": None}


def _values(outcome: FetchOutcome, now: dt.datetime) -> dict[str, Any]:
    common: dict[str, Any] = {
        **_RELEASED,
        "updated_at": now,
        "last_status_code": outcome.status_code,
        "last_error": _cut(outcome.error),
    }
    if outcome.status == "pending":
        return common | {"status": "pending", "next_attempt_at": outcome.next_attempt_at or now}
    # Asked again while this fetch was in flight: the job runs once more, now, with a fresh retry
    # budget. After a success the fetch may have read the record before the change that asked; after
    # a refusal the request is newer than the attempt (a 401 while the token was being replaced), and
    # giving up would lose it.
    again = enrichment_job.c.requests > enrichment_job.c.claimed_requests
    final = outcome.status
    ended = common | {
        "status": sa.case((again, "pending"), else_=final),
        "attempts": sa.case((again, 0), else_=enrichment_job.c.attempts),
        "next_attempt_at": sa.case((again, now), else_=enrichment_job.c.next_attempt_at),
    }
    if final == "done":
        return ended | {"fetched_at": now, "event_id": outcome.event_id}
    return ended


async def record_outcomes(conn: AsyncConnection, outcomes: Sequence[FetchOutcome], *, now: dt.datetime) -> int:
    """Apply attempts' outcomes to their jobs, each only if the job is still held by the same claim
    (one whose lease ran out may have been claimed by another worker: then the attempt changes
    nothing and is recorded as `stale`). Every attempt is recorded. Returns how many jobs changed."""
    applied: set[tuple[uuid.UUID, uuid.UUID]] = set()
    # In the order `request_fetches` locks jobs in, so this and an ingest transaction asking for the
    # same contacts cannot deadlock on PostgreSQL.
    for outcome in sorted(outcomes, key=lambda o: (o.claimed.source_id, o.claimed.object_id)):
        claimed = outcome.claimed
        result = await conn.execute(
            enrichment_job.update()
            .where(enrichment_job.c.id == claimed.id, enrichment_job.c.claim_token == claimed.claim_token, *_HELD)
            .values(_values(outcome, now))
        )
        if result.rowcount:
            applied.add((claimed.id, claimed.claim_token))
    await bulk_insert(
        conn,
        enrichment_attempt,
        [
            {
                "id": uuid7(),
                "job_id": o.claimed.id,
                "attempt": o.claimed.attempt,
                "worker": o.worker,
                "started_at": o.started_at,
                "duration_ms": o.duration_ms,
                "outcome": _ATTEMPT[o.status] if (o.claimed.id, o.claimed.claim_token) in applied else "stale",
                "status_code": o.status_code,
                "error": _cut(o.error),
            }
            for o in outcomes
        ],
    )
    return len(applied)


_ATTEMPT = {"done": "fetched", "pending": "retry", "dead": "dead"}


def _cut(text: str | None) -> str | None:
    return None if text is None else text[:ERROR_CHARS]
