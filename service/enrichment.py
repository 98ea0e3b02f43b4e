"""HubSpot enrichment: fetch the contact an id-only app webhook event names, and feed its properties
back in as a lead event.

No HTTP happens in the ingest transaction: it only asks for a fetch (`enrichment_job`, one waiting
job per contact however many events ask). `EnrichmentWorker` claims due jobs the way the delivery
worker claims deliveries (`FOR UPDATE SKIP LOCKED`, with a lease, so any number of worker processes
share them and a killed worker's jobs are claimed again), reads each contact through
`service.crm.fetch_contact` with the source's API token, and submits it to an ingest writer as a
`lead.identified` event of that source (`service.webhooks.hubspot.contact_record`): identity by
email, merges, scores, qualification and handoff happen as for any event, and reading the same
contact state twice (a lease that ran out) stores it once. Retries follow the delivery
`RetryPolicy`: 429 after its `Retry-After`, 408, 5xx and transport failures with backoff; any other
4xx (404 no such contact, 401/403 a bad token) makes the job `dead`, unless the contact was asked
for again during the attempt; a new API token revives the jobs a refused token killed
(`service.sources.configure_source`). Every attempt is recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from service.crm import CrmError, CrmTransportError, fetch_contact
from service.db import is_sqlite, write_transaction
from service.delivery.policy import RetryPolicy
from service.delivery.worker import utcnow, worker_name
from service.handoff import HandoffTargets
from service.ingest import IngestJob, IngestResult, IngestWriter
from service.metrics import DB_ERRORS, ENRICHMENT_FETCHES
from service.pipelines import PipelineRegistry, Pipelines
from service.qualification import PolicyRegistry
from service.repositories import enrichment as repo
from service.repositories import sources as sources_repo
from service.repositories.sources import SourceRow
from service.settings import Settings
from service.webhooks.hubspot import contact_properties, contact_record, pipeline_traits

log = structlog.get_logger(__name__)


def http_client(settings: Settings) -> httpx.AsyncClient:
    """Enrichment's own HTTP client. A worker has at most `LEADSCORE_ENRICHMENT_CONCURRENCY` fetches
    in flight, and the pool has a connection for each: a fetch never waits for a connection (a wait
    that timed out would count as a failed attempt). Timeouts are the delivery ones; no redirects (one
    would carry the token elsewhere)."""
    timeout = settings.delivery_timeout_seconds
    slots = settings.enrichment_concurrency
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots),
        follow_redirects=False,
        headers={"user-agent": "leadscore-enrichment/0.1"},
    )


@dataclass(frozen=True, slots=True)
class EnrichmentConfig:
    concurrency: int
    poll_s: float
    lease: dt.timedelta
    policy: RetryPolicy

    @classmethod
    def from_settings(cls, settings: Settings) -> EnrichmentConfig:
        """Leases and backoff are the delivery worker's settings; concurrency, polling and attempts
        have their own (HubSpot's API limits are per app, not per destination)."""
        return cls(
            concurrency=settings.enrichment_concurrency,
            poll_s=settings.enrichment_poll_seconds,
            lease=dt.timedelta(seconds=settings.delivery_lease_seconds),
            policy=RetryPolicy(
                max_attempts=settings.enrichment_max_attempts,
                max_age=dt.timedelta(seconds=settings.delivery_max_age_seconds),
                backoff_base_s=settings.delivery_backoff_base_seconds,
                backoff_max_s=settings.delivery_backoff_max_seconds,
                retry_after_max_s=settings.delivery_retry_after_max_seconds,
            ),
        )


Ingest = Callable[[IngestJob], Awaitable[IngestResult]]


class EnrichmentWorker:
    """Claims, fetches, ingests and records enrichment jobs until stopped. `start()` runs it as a
    task of the current loop; `stop()` stops claiming and lets the batch in hand finish (its fetches
    are bounded by the HTTP client's timeout) and be recorded. `run_once()` does one batch."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        ingest: Ingest,
        client: httpx.AsyncClient,
        config: EnrichmentConfig,
        pipelines: Callable[[], Pipelines] = Pipelines,
        name: str | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name or worker_name()
        self._engine = engine
        self._ingest = ingest
        self._client = client
        self._config = config
        self._pipelines = pipelines
        self._clock = clock
        self._rng = rng or random.Random()
        self._unrecorded: list[repo.FetchOutcome] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._sqlite = engine.dialect.name == "sqlite"

    def start(self) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name="enrichment-worker")
        log.info("enrichment worker started", worker=self.name)

    def wake(self) -> None:
        """Look for due jobs now instead of at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        await self._task
        self._task = None
        if self._unrecorded:
            with contextlib.suppress(Exception):
                await self._record([])
        log.info("enrichment worker stopped", worker=self.name)

    async def run_until(self, stop: asyncio.Event) -> None:
        self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def _loop(self) -> None:
        failures = 0
        while not self._stopping:
            self._wake.clear()  # before the claim, so a wake during it is not lost
            try:
                done = await self.run_once()
                failures = 0
            except Exception as exc:  # the database may be down for a while: keep polling
                DB_ERRORS.labels(operation="enrichment").inc()
                log.warning("enrichment batch failed", error=str(exc))
                failures += 1
                done = 0
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))
            if done:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._config.poll_s)

    async def run_once(self) -> int:
        """Claim up to `concurrency` due jobs, fetch and ingest them concurrently, record what
        happened; returns how many jobs were claimed."""
        if self._unrecorded:
            await self._record([])
        claimed = await self._claim()
        if not claimed:
            return 0
        sources = await self._sources({c.source_id for c in claimed})
        pipelines = self._pipelines()
        traits = pipeline_traits(pipelines.active.compiled.spec) if pipelines.active is not None else []
        outcomes = await asyncio.gather(*(self._fetch(c, sources.get(c.source_id), traits) for c in claimed))
        await self._record(list(outcomes))
        return len(claimed)

    async def _claim(self) -> list[repo.ClaimedFetch]:
        now = self._clock()
        if self._sqlite:
            # An idle poll on SQLite only reads: the claim's write lock is the whole file's.
            async with self._engine.connect() as conn:
                if not await repo.any_due(conn, now=now):
                    return []
        async with write_transaction(self._engine) as conn:
            return await repo.claim_due(
                conn, limit=self._config.concurrency, worker=self.name, now=now, lease=self._config.lease
            )

    async def _sources(self, ids: set[int]) -> dict[int, SourceRow]:
        found: dict[int, SourceRow] = {}
        async with self._engine.connect() as conn:
            for source_id in sorted(ids):
                row = await sources_repo.get_source_by_id(conn, source_id)
                if row is not None:
                    found[source_id] = row
        return found

    async def _fetch(
        self, claimed: repo.ClaimedFetch, source: SourceRow | None, traits: list[str]
    ) -> repo.FetchOutcome:
        started_at = self._clock()
        started = time.perf_counter()
        label = source.name if source is not None else "_unknown"
        status_code: int | None = None
        error: str | None = None
        event_id = None
        next_at: dt.datetime | None = None
        if source is None or not source.enabled or source.api_token is None:
            # Nothing to fetch with: the source went, or its token was cleared, after the request.
            status, error = "dead", "the source is gone, disabled or has no API token"
        else:
            try:
                contact = await fetch_contact(
                    self._client,
                    base_url=source.config.api_base_url,
                    token=source.api_token,
                    contact_id=claimed.object_id,
                    properties=contact_properties(source.config, traits),
                    now=started_at,
                )
                status_code = contact.status_code
                mapped = contact_record(
                    claimed.object_id,
                    contact.properties,
                    updated_at=contact.updated_at,
                    config=source.config,
                    now=started_at,
                )
                if mapped.events:
                    result = await self._ingest(
                        IngestJob(
                            source_id=source.id,
                            webhook_id=f"enrichment:{claimed.id}",
                            content_type="application/json",
                            body=contact.body,
                            events=mapped.events,
                            event_keys=mapped.keys,
                            received_at=started_at,
                        )
                    )
                    event_id = result.event_ids[0]
                else:
                    error = "; ".join(s["reason"] for s in mapped.skipped)
                status = "done"
            except CrmError as exc:
                status_code, error = exc.status_code, exc.message
                decided, wait = self._config.policy.decide(
                    exc, attempt=claimed.attempt, age=started_at - claimed.requested_at, rng=self._rng
                )
                status = "pending" if decided == "retry" else "dead"
                next_at = self._clock() + dt.timedelta(seconds=wait) if decided == "retry" else None
            except Exception as exc:  # storing the contact failed (the database, a bug): try again later
                log.warning("enrichment ingest failed", source=source.name, job=str(claimed.id), error=str(exc))
                error = f"could not store the contact: {type(exc).__name__}"
                decided, wait = self._config.policy.decide(
                    CrmTransportError(error), attempt=claimed.attempt, age=dt.timedelta(0), rng=self._rng
                )
                status = "pending" if decided == "retry" else "dead"
                next_at = self._clock() + dt.timedelta(seconds=wait) if decided == "retry" else None
        if status == "dead":
            log.warning(
                "enrichment fetch given up",
                source=label,
                contact=claimed.object_id,
                status_code=status_code,
                error=error,
                attempt=claimed.attempt,
            )
        ENRICHMENT_FETCHES.labels(label, _OUTCOME[status]).inc()
        return repo.FetchOutcome(
            claimed=claimed,
            status=status,
            worker=self.name,
            started_at=started_at,
            duration_ms=(time.perf_counter() - started) * 1000.0,
            status_code=status_code,
            error=error,
            next_attempt_at=next_at,
            event_id=event_id,
        )

    async def _record(self, results: list[repo.FetchOutcome]) -> None:
        outcomes = self._unrecorded + results
        try:
            async with write_transaction(self._engine) as conn:
                await repo.record_outcomes(conn, outcomes, now=self._clock())
        except Exception:
            # Kept and written with the next batch: until then the jobs stay claimed, and if this
            # process dies their leases run out and they are fetched again (stored once).
            self._unrecorded = outcomes
            raise
        self._unrecorded = []


_OUTCOME = {"done": "fetched", "pending": "retry", "dead": "dead"}


@asynccontextmanager
async def standalone_worker(
    engine: AsyncEngine, settings: Settings, client: httpx.AsyncClient
) -> AsyncIterator[EnrichmentWorker]:
    """An enrichment worker for a process that serves no webhooks (`leadscore worker`), with what the
    ingest path needs there: its own group-commit writer, and the active pipeline and threshold
    policy kept current as the API processes keep them. Not started; stops everything on exit."""
    pipelines = PipelineRegistry(engine, refresh_seconds=settings.pipeline_refresh_seconds)
    policies = PolicyRegistry(engine, refresh_seconds=settings.pipeline_refresh_seconds)
    for registry in (pipelines, policies):
        try:
            await registry.refresh()
        except Exception as exc:  # the database may be down at start; the refresh loops retry
            log.warning("could not load the scoring configuration at start", error=str(exc))
        registry.start()
    writer = IngestWriter(
        engine,
        max_batch_events=settings.group_commit_max_events,
        retry_after=settings.retry_after_seconds,
        writers=1 if is_sqlite(settings.database_url) else settings.group_commit_writers,
        pipelines=lambda: pipelines.current,
        policy=lambda: policies.current,
        lookback=dt.timedelta(days=settings.activity_lookback_days),
        handoff=HandoffTargets.from_settings(settings),
    )
    writer.start()
    worker = EnrichmentWorker(
        engine,
        ingest=writer.submit,
        client=client,
        config=EnrichmentConfig.from_settings(settings),
        pipelines=lambda: pipelines.current,
    )
    try:
        yield worker
    finally:
        await worker.stop()
        await writer.stop()
        await policies.stop()
        await pipelines.stop()
