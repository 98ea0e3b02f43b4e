"""Prometheus metrics of the service, and the middleware that times every request.

With several server processes, set `PROMETHEUS_MULTIPROC_DIR` (the `serve` command does) so that
`/metrics` reports all of them.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

WEBHOOK_EVENTS = Counter(
    "leadscore_webhook_events_total",
    "Webhook events received, by source and outcome.",
    ["source", "outcome"],
)
HTTP_DURATION = Histogram(
    "leadscore_http_request_duration_seconds",
    "HTTP request duration, by route template.",
    ["method", "route", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DB_ERRORS = Counter(
    "leadscore_db_errors_total",
    "Database operations that failed (unreachable, timed out, refused).",
    ["operation"],
)
CRM_OUTCOMES = Counter(
    "leadscore_crm_outcomes_total",
    "Outcomes the CRM reported (accepted, converted, won, lost) and Leadscore stored; repeats not counted.",
    ["outcome"],
)
GROUP_COMMIT_EVENTS = Histogram(
    "leadscore_group_commit_events",
    "Events written per group-commit transaction.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)


# Names below are shared by qualification, delivery and the dashboards in deploy/: keep them stable.
SCORE_DURATION = Histogram(
    "leadscore_score_duration_seconds",
    "Time to score one lead with the active pipeline (rules, model, explanation), per scored batch.",
    buckets=(0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01),
)
STAGE_TRANSITIONS = Counter(
    "leadscore_stage_transitions_total",
    "Lifecycle stage transitions, by stage left and stage entered.",
    ["from_stage", "to_stage"],
)
DELIVERIES = Counter(
    "leadscore_deliveries_total",
    "CRM delivery attempts, by destination and outcome (delivered, retry, dead_letter).",
    ["destination", "outcome"],
)
DELIVERY_DURATION = Histogram(
    "leadscore_delivery_duration_seconds",
    "Duration of one CRM delivery attempt, by destination.",
    ["destination"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
ENRICHMENT_FETCHES = Counter(
    "leadscore_enrichment_fetches_total",
    "HubSpot contact fetches for enrichment, by source and outcome (fetched, retry, dead).",
    ["source", "outcome"],
)
# Gauges set from the database when /metrics is scraped (or by the worker); "livemax" keeps the
# value of the process that saw the most when several processes report.
OUTBOX_PENDING = Gauge(
    "leadscore_outbox_pending",
    "Deliveries waiting to be sent (pending or in flight), by destination.",
    ["destination"],
    multiprocess_mode="livemax",
)
OUTBOX_OLDEST_AGE = Gauge(
    "leadscore_outbox_oldest_pending_age_seconds",
    "Age of the oldest delivery still waiting, by destination.",
    ["destination"],
    multiprocess_mode="livemax",
)
DEAD_LETTERS = Gauge(
    "leadscore_dead_letters",
    "Deliveries in the dead-letter state, by destination.",
    ["destination"],
    multiprocess_mode="livemax",
)
CIRCUIT_STATE = Gauge(
    "leadscore_circuit_state",
    "Circuit breaker state per destination: 0 closed, 1 half-open, 2 open.",
    ["destination"],
    multiprocess_mode="livemax",
)


class RequestMetrics:
    """Raw ASGI middleware (no per-request task or body wrapping) that observes request duration
    labelled by the route template, never the raw path, so label cardinality stays bounded."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            HTTP_DURATION.labels(scope["method"], _route_template(scope), str(status)).observe(
                time.perf_counter() - start
            )


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    app = scope.get("app")
    for candidate in getattr(getattr(app, "router", None), "routes", []):
        template = getattr(candidate, "path", None)
        if isinstance(template, str) and candidate.matches(scope)[0] == Match.FULL:
            return template
    return "unmatched"
