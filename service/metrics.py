"""Prometheus metrics of the service, and the middleware that times every request.

With several server processes, set `PROMETHEUS_MULTIPROC_DIR` (the `serve` command does) so that
`/metrics` reports all of them.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram
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
GROUP_COMMIT_EVENTS = Histogram(
    "leadscore_group_commit_events",
    "Events written per group-commit transaction.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
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
