"""CRM handoff: the outbox (`enqueue_deliveries`, in the caller's transaction), the worker that
drains it (`DeliveryWorker`), and what ops see of it (`service.delivery.admin`).

An enqueuer (the ingest transaction, right after an assignment) does, set-based:

    items = [handoff_item(handoff, destination, handoff_key=f"{assignment_id}") for ...]
    await enqueue_deliveries(conn, items, now=now)
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from service.crm import CrmAdapter, Handoff, build_adapter, load_destinations
from service.delivery.worker import DeliveryWorker, WorkerConfig, http_client
from service.metrics import DEAD_LETTERS, OUTBOX_OLDEST_AGE, OUTBOX_PENDING
from service.repositories.deliveries import DeliveryItem, enqueue_deliveries, outbox_stats
from service.settings import Settings

__all__ = [
    "DeliveryItem",
    "DeliveryWorker",
    "Handoff",
    "build_adapters",
    "build_worker",
    "enqueue_deliveries",
    "handoff_item",
    "idempotency_key",
    "refresh_outbox_gauges",
]


def idempotency_key(destination: str, handoff_key: str) -> str:
    """The key a CRM sees for one handoff to one destination: stable across retries and replays,
    and across repeated enqueues of the same handoff (which are then ignored)."""
    return f"{destination}:{handoff_key}"


def handoff_item(handoff: Handoff, destination: str, *, handoff_key: str) -> DeliveryItem:
    """An outbox item for `handoff` to `destination`. `handoff_key` names the decision being handed
    off (an assignment or stage-transition id), so enqueuing the same decision twice sends it once."""
    return DeliveryItem(
        lead_id=handoff.lead_id,
        destination=destination,
        idempotency_key=idempotency_key(destination, handoff_key),
        payload=handoff.to_payload(),
    )


def build_adapters(settings: Settings) -> dict[str, CrmAdapter]:
    """The configured destinations' adapters (raises `InvalidDestinations` with what is wrong)."""
    configs = load_destinations(settings.delivery_destinations, settings.delivery_destinations_file)
    return {name: build_adapter(config) for name, config in configs.items()}


def build_worker(
    engine: AsyncEngine, settings: Settings, *, concurrency: int | None = None
) -> tuple[DeliveryWorker, httpx.AsyncClient]:
    """A worker for the configured destinations and the HTTP client it owns (close it after `stop`)."""
    adapters = build_adapters(settings)
    client = http_client(settings, concurrency=concurrency)
    config = WorkerConfig.from_settings(settings, concurrency=concurrency)
    return DeliveryWorker(engine, adapters, client, config), client


async def refresh_outbox_gauges(engine: AsyncEngine, destinations: Iterable[str], *, now: dt.datetime) -> None:
    """Set the outbox gauges from the database: waiting rows, the oldest one's age, dead letters,
    per destination (configured ones report 0 when empty)."""
    async with engine.connect() as conn:
        stats = await outbox_stats(conn)
    for name in set(destinations) | set(stats):
        entry = stats.get(name)
        OUTBOX_PENDING.labels(name).set(entry.pending if entry else 0)
        DEAD_LETTERS.labels(name).set(entry.dead if entry else 0)
        oldest = entry.oldest_pending_at if entry else None
        OUTBOX_OLDEST_AGE.labels(name).set(max(0.0, (now - oldest).total_seconds()) if oldest else 0)
