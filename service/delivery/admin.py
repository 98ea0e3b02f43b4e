"""Delivery use cases for ops and readers: list, read with attempts, replay one, replay dead letters."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import uuid

from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import write_transaction
from service.delivery.schemas import (
    BulkReplayed,
    BulkReplayRequest,
    DeliveryAttemptRead,
    DeliveryDetail,
    DeliveryPage,
    DeliveryRead,
    DeliveryReplayed,
    DeliveryStatus,
)
from service.errors import DeliveryNotFound, DeliveryNotReplayable, InvalidCursor
from service.repositories import deliveries as repo


def _encode_cursor(created_at: dt.datetime, id_: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{id_}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[dt.datetime, uuid.UUID]:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, id_ = text.split("|")
        when = dt.datetime.fromisoformat(at)
        if when.tzinfo is None:
            raise ValueError("naive")
        return when, uuid.UUID(id_)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidCursor("not a cursor from this listing") from None


async def list_deliveries(
    engine: AsyncEngine,
    *,
    status: DeliveryStatus | None,
    destination: str | None,
    lead_id: uuid.UUID | None,
    cursor: str | None,
    limit: int,
) -> DeliveryPage:
    after = _decode_cursor(cursor) if cursor else None
    async with engine.connect() as conn:
        rows = await repo.list_deliveries(
            conn, status=status, destination=destination, lead_id=lead_id, after=after, limit=limit + 1
        )
    items = [DeliveryRead.model_validate(r) for r in rows[:limit]]
    more = len(rows) > limit
    return DeliveryPage(
        items=items, next_cursor=_encode_cursor(items[-1].created_at, items[-1].id) if more and items else None
    )


async def read_delivery(engine: AsyncEngine, id_: uuid.UUID) -> DeliveryDetail:
    async with engine.connect() as conn:
        row = await repo.get_delivery(conn, id_)
        if row is None:
            raise DeliveryNotFound(f"no delivery {id_}")
        attempts = await repo.delivery_attempts(conn, id_)
    return DeliveryDetail.model_validate(
        {**row, "attempt_history": [DeliveryAttemptRead.model_validate(a) for a in attempts]}
    )


async def replay_delivery(engine: AsyncEngine, id_: uuid.UUID, *, now: dt.datetime) -> DeliveryReplayed:
    """Make a dead or delivered delivery pending again, due now, with a fresh retry budget."""
    async with write_transaction(engine) as conn:
        if await repo.replay_delivery(conn, id_, now=now):
            return DeliveryReplayed(id=id_, status="pending")
        row = await repo.get_delivery(conn, id_)
    if row is None:
        raise DeliveryNotFound(f"no delivery {id_}")
    raise DeliveryNotReplayable(f"delivery {id_} is {row['status']}; only dead or delivered ones can be replayed")


async def replay_dead_letters(engine: AsyncEngine, request: BulkReplayRequest, *, now: dt.datetime) -> BulkReplayed:
    """Replay the dead letters matching the filters, oldest first, at most `limit` of them."""
    async with write_transaction(engine) as conn:
        count = await repo.replay_dead(
            conn,
            destination=request.destination,
            status_code=request.status_code,
            created_after=request.created_after,
            created_before=request.created_before,
            limit=request.limit,
            now=now,
        )
    return BulkReplayed(replayed=count)
