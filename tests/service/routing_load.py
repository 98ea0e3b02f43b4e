"""A routing client process for the concurrency tests: its own engine, its share of the leads,
assigned in small transactions of random sizes through `service.routing.assign_leads`.

    python -m tests.service.routing_load DB_URL LEADS_JSON INDEX COUNT SYNC_DIR

It writes `SYNC_DIR/ready-INDEX`, waits (at most a minute) for `SYNC_DIR/go` so that every process
routes at the same time, and prints how many leads it assigned.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import sys
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

from scoring.routing import RoutingLead
from service.db import create_engine, writer_connection
from service.routing import assign_leads

WAIT_SECONDS = 60.0


async def run(url: str, leads: list[dict[str, str]], index: int, count: int, sync: Path) -> int:
    mine = [
        RoutingLead(lead_id=uuid.UUID(item["id"]), segment=item["segment"], stage="mql") for item in leads[index::count]
    ]
    engine = create_engine(url, pool_size=1)
    try:
        conn = await writer_connection(engine)
        await conn.execute(sa.text("SELECT 1"))
        await conn.commit()
        (sync / f"ready-{index}").touch()
        deadline = time.monotonic() + WAIT_SECONDS
        while not (sync / "go").exists():
            if time.monotonic() > deadline:
                raise SystemExit("no go signal")
            await asyncio.sleep(0.01)
        rng = random.Random(index)
        done = 0
        while done < len(mine):
            batch = mine[done : done + rng.randint(1, 9)]
            async with conn.begin():
                assigned = await assign_leads(conn, batch, now=dt.datetime.now(dt.UTC))
            assert len(assigned) == len(batch)
            done += len(batch)
        await conn.close()
        return done
    finally:
        await engine.dispose()


def main() -> None:
    url, leads_path, index, count, sync = sys.argv[1:6]
    leads = json.loads(Path(leads_path).read_text())
    done = asyncio.run(run(url, leads, int(index), int(count), Path(sync)))
    print(done)  # noqa: T201


if __name__ == "__main__":
    main()
