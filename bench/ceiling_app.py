"""The framework's ceiling for the ingest benchmark: a bare FastAPI route that validates the same
lead event body with a pydantic body parameter and stores nothing."""

from __future__ import annotations

from fastapi import FastAPI

from service.events import LeadEvent

app = FastAPI()


@app.post("/v1/webhooks/{source}", status_code=202)
async def ceiling(source: str, event: LeadEvent) -> dict[str, str]:
    return {"source": source, "type": event.type}
