"""Lead read use cases."""

from __future__ import annotations

import uuid

from sqlalchemy.ext.asyncio import AsyncEngine

from service.errors import LeadNotFound
from service.events import EventRead, IdentityRead, LeadRead
from service.repositories import leads as repo


async def read_lead(engine: AsyncEngine, lead_id: uuid.UUID, *, events_limit: int = 100) -> LeadRead:
    async with engine.connect() as conn:
        row = await repo.get_live_lead(conn, lead_id)
        if row is None:
            raise LeadNotFound(f"no lead {lead_id}")
        live_id: uuid.UUID = row["id"]
        identities = await repo.lead_identities(conn, live_id)
        merged = await repo.merged_into(conn, live_id)
        events, total = await repo.lead_events(conn, live_id, limit=events_limit)
    return LeadRead(
        id=live_id,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        first_event_at=row["first_event_at"],
        last_event_at=row["last_event_at"],
        traits=row["traits"],
        identities=[IdentityRead(**i) for i in identities],
        merged_ids=merged,
        events=[EventRead(**e) for e in events],
        events_total=total,
    )
