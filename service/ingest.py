"""Ingest use case: persist verified webhook requests, with a group commit.

Each request becomes an `IngestJob`; a writer task takes every job that is waiting when it is
free and writes them all in one transaction (deduplicate, resolve identities, store), then answers
each job only after that commit. Under load the batches grow, so the disk's commit rate stops being
the ceiling; when idle a batch is a single job, so there is no added latency (no timer).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scoring.lifecycle import rank
from service.db import DRIVER_TRANSACTION, writer_connection
from service.errors import StorageUnavailable
from service.events import LeadEvent
from service.handoff import NO_TARGETS, HandoffTargets
from service.identity import Resolver
from service.ids import uuid7
from service.metrics import DB_ERRORS, GROUP_COMMIT_EVENTS
from service.pipelines import Pipelines, profile_of, score_profiles, scores_anything
from service.qualification import LoadedPolicy, decide_after_scores, record_transitions, transition_row
from service.repositories import enrichment as enrichment_repo
from service.repositories import ingest as repo
from service.repositories import pipelines as pipelines_repo
from service.repositories import qualification as qualification_repo
from service.repositories.pipelines import ActivityRow

log = structlog.get_logger(__name__)
NO_PIPELINES = Pipelines()
ACTIVITY = "lead.activity"


@dataclass(frozen=True)
class IngestJob:
    """One verified request: its events and the raw body they came from."""

    source_id: int
    webhook_id: str | None
    content_type: str
    body: bytes
    events: list[LeadEvent]
    event_keys: list[str]
    received_at: dt.datetime
    # Events after which the vendor's full record is fetched (HubSpot app events of a source with an
    # API token): index in `events` -> the record's id. Asked for only for events stored new.
    fetch: Mapping[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class IngestResult:
    lead_ids: list[uuid.UUID]
    event_ids: list[uuid.UUID]
    duplicates: list[bool]
    # The active pipeline's current score of each lead: score, grade, probability, pipeline_version.
    scores: dict[uuid.UUID, dict[str, Any]]
    # Each lead's lifecycle stage after the batch.
    stages: dict[uuid.UUID, str]

    @property
    def duplicate(self) -> bool:
        """Every event had been received before (a body that mapped to no event is not a repeat)."""
        return bool(self.duplicates) and all(self.duplicates)


def event_keys(events: list[LeadEvent], webhook_id: str | None) -> list[str]:
    """The deduplication key of each event: the sender's event id, else the request's webhook id
    (with the position in a list body). Raises ValueError when there is neither."""
    keys: list[str] = []
    for index, event in enumerate(events):
        if event.id:
            keys.append(event.id)
        elif webhook_id:
            keys.append(webhook_id if len(events) == 1 else f"{webhook_id}#{index}")
        else:
            raise ValueError(f"event {index} has no id and the request has no webhook id")
    return keys


def _summary(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "score": record["score"],
        "grade": record["grade"],
        "probability": record["probability"],
        "pipeline_version": record["pipeline_version_id"],
    }


async def write_batch(
    conn: AsyncConnection,
    jobs: list[IngestJob],
    now: dt.datetime,
    *,
    pipelines: Pipelines = NO_PIPELINES,
    policy: LoadedPolicy | None = None,
    lookback: dt.timedelta = dt.timedelta(days=365),
    handoff: HandoffTargets = NO_TARGETS,
) -> list[IngestResult]:
    """Write the jobs in one transaction, re-scoring every lead an event touched with the active
    (and shadow) pipeline and applying the active threshold policy to the new scores; the caller
    commits. The transaction is the caller's (SQLAlchemy's `begin()`), or on the ingest writer's
    PostgreSQL connection one the batch's first statement begins on the driver (`lock_names`)."""
    event_refs = [(job.source_id, key) for job in jobs for key in job.event_keys]
    identity_keys = [k for job in jobs for e in job.events for k in e.subject.identities()]
    await repo.lock_names(
        conn,
        [repo.lock_key("event", str(s), k) for s, k in event_refs]
        + [repo.lock_key("identity", ns, v) for ns, v in identity_keys],
    )
    stored, identities, leads, merged = await repo.find_events_and_leads(conn, event_refs, identity_keys)
    # Leads merged away by a transaction we waited for: load their survivors too.
    pending = set(merged.values()) - leads.keys()
    while pending:
        more, more_merged = await repo.lock_leads(conn, pending)
        leads.update(more)
        merged.update(more_merged)
        pending = set(more_merged.values()) - leads.keys()
    resolver = Resolver(identities=identities, leads=leads, now=now, new_id=uuid7)
    for merged_id, survivor_id in merged.items():
        resolver.redirect(merged_id, survivor_id)

    seen: dict[tuple[int, str], tuple[uuid.UUID, uuid.UUID]] = {}
    event_rows: list[dict[str, Any]] = []
    request_rows: list[dict[str, Any]] = []
    raw: list[tuple[list[tuple[uuid.UUID, uuid.UUID]], list[bool]]] = []
    fetches: list[tuple[int, str, uuid.UUID]] = []
    for job in jobs:
        request_id = uuid7()
        refs: list[tuple[uuid.UUID, uuid.UUID]] = []
        dups: list[bool] = []
        for index, (event, key) in enumerate(zip(job.events, job.event_keys, strict=True)):
            ref = (job.source_id, key)
            if ref in stored or ref in seen:
                refs.append(stored.get(ref) or seen[ref])
                dups.append(True)
                continue
            event_id = uuid7()
            lead_id = resolver.apply(
                event_id=event_id,
                identities=event.subject.identities(),
                occurred_at=event.occurred_at,
                traits=event.traits,
            )
            seen[ref] = (event_id, lead_id)
            refs.append((event_id, lead_id))
            dups.append(False)
            if index in job.fetch:
                fetches.append((job.source_id, job.fetch[index], lead_id))
            event_rows.append(
                {
                    "id": event_id,
                    "source_id": job.source_id,
                    "external_id": key,
                    "request_id": request_id,
                    "lead_id": lead_id,
                    "type": event.type,
                    "name": event.name,
                    "occurred_at": event.occurred_at,
                    "received_at": job.received_at,
                    "payload": event.model_dump(mode="json", exclude_none=True),
                }
            )
        # A vendor body whose items all mapped to no event is still kept, for audit and replay.
        if not all(dups) or not dups:
            request_rows.append(
                {
                    "id": request_id,
                    "source_id": job.source_id,
                    "webhook_id": job.webhook_id,
                    "content_type": job.content_type,
                    "body": job.body,
                    "received_at": job.received_at,
                }
            )
        raw.append((refs, dups))

    for row in event_rows:
        row["lead_id"] = resolver.final(row["lead_id"])
    # The event rows carry final lead ids; the last new event of a lead is what triggered its score.
    triggers = {row["lead_id"]: row["id"] for row in event_rows}
    score_rows, records = await _score(
        conn, resolver, event_rows, triggers, pipelines=pipelines, now=now, lookback=lookback
    )
    # Qualification: the policy decides in memory; a stage that moves rides on the lead rows written
    # below (no statement of its own), and the transitions are one insert for the batch.
    transitions = merged_stages(resolver, now)
    if policy is not None and records:
        current = {lead_id: (resolver.leads[lead_id].stage, resolver.leads[lead_id].traits) for lead_id in records}
        transitions += decide_after_scores(policy, current, records, now=now)
    moved: set[uuid.UUID] = set()
    for transition in transitions:
        state = resolver.leads[transition["lead_id"]]
        state.stage = transition["to_stage"]
        moved.add(state.id)
    await repo.write_rows(
        conn,
        requests=request_rows,
        new_leads=[s for s in resolver.leads.values() if s.is_new],
        identities={k: resolver.final(v) for k, v in resolver.new_identities.items()},
        events=event_rows,
        scores=score_rows,
        changed_leads=[s for s in resolver.leads.values() if not s.is_new and (s.changed or s.id in moved)],
        stage_moved=moved,
        now=now,
    )
    # After the rows above: a merge moves the merged lead's identities, events and outcomes to the
    # survivor and marks the merged lead, which may be new in this batch.
    await repo.record_merges(conn, resolver.merges, now)
    # Fetching the full record is the enrichment worker's: here only the durable request for it.
    await enrichment_repo.request_fetches(
        conn,
        [enrichment_repo.FetchRequest(source, record, resolver.final(lead)) for source, record, lead in fetches],
        now=now,
    )
    await record_transitions(conn, transitions, now=now, handoff=handoff, lead_rows_written=True)
    results = [
        IngestResult(
            lead_ids=[resolver.final(lead_id) for _, lead_id in refs],
            event_ids=[event_id for event_id, _ in refs],
            duplicates=dups,
            scores={},
            stages={},
        )
        for refs, dups in raw
    ]
    unscored = {lead_id for r in results for lead_id in r.lead_ids} - records.keys()
    if unscored and pipelines.active is not None:
        # Repeats re-score nothing: answer with the lead's current score.
        records.update(await pipelines_repo.latest_scores(conn, sorted(unscored)))
    named = {lead_id for r in results for lead_id in r.lead_ids}
    stages = {lead_id: resolver.leads[lead_id].stage for lead_id in named if lead_id in resolver.leads}
    if len(stages) < len(named):
        stages.update(await qualification_repo.lead_stages(conn, sorted(named - stages.keys())))
    for result in results:
        result.scores.update({lead_id: _summary(records[lead_id]) for lead_id in result.lead_ids if lead_id in records})
        result.stages.update({lead_id: stages[lead_id] for lead_id in result.lead_ids if lead_id in stages})
    return results


async def _score(
    conn: AsyncConnection,
    resolver: Resolver,
    event_rows: list[dict[str, Any]],
    triggers: Mapping[uuid.UUID, uuid.UUID],
    *,
    pipelines: Pipelines,
    now: dt.datetime,
    lookback: dt.timedelta,
) -> tuple[list[dict[str, Any]], dict[uuid.UUID, dict[str, Any]]]:
    """Score every lead an event touched with the active (and shadow) pipeline, before anything of
    the batch is written: its activities are the stored ones (a merged lead's count for its
    survivor) and the batch's new ones. Returns the score rows and the active pipeline's per lead."""
    if not scores_anything(pipelines) or not triggers:
        return [], {}
    since = now - lookback
    activities: dict[uuid.UUID, list[ActivityRow]] = {lead_id: [] for lead_id in triggers}
    stored = [
        lead_id for lead_id, state in resolver.leads.items() if not state.is_new and resolver.final(lead_id) in triggers
    ]
    for row in await pipelines_repo.lead_activities(conn, stored, since=since):
        activities[resolver.final(row.lead_id)].append(row)
    added: set[uuid.UUID] = set()
    for event in event_rows:
        if event["type"] == ACTIVITY and event["occurred_at"] >= since:
            lead_id = event["lead_id"]
            activities[lead_id].append(
                ActivityRow(
                    lead_id, event["name"], event["occurred_at"].astimezone(dt.UTC), event["payload"], event["id"]
                )
            )
            added.add(lead_id)
    for lead_id in added:
        # As the database orders them: the same profile as reading them back after the insert.
        activities[lead_id].sort(key=_activity_order)
    return score_profiles(
        pipelines,
        {lead_id: profile_of(resolver.leads[lead_id].traits, activities[lead_id]) for lead_id in triggers},
        trigger=triggers,
        now=now,
    )


def _activity_order(row: ActivityRow) -> tuple[dt.datetime, uuid.UUID]:
    return row.occurred_at, row.id


def merged_stages(resolver: Resolver, now: dt.datetime) -> list[dict[str, Any]]:
    """When a merged lead was further down the funnel than the lead it merged into, the survivor
    takes its stage (a customer found to be a known lead stays a customer); one transition each.
    Stages off the funnel (disqualified, recycled) are not carried over: the survivor's stands."""
    rows: list[dict[str, Any]] = []
    for merge in resolver.merges:
        survivor = resolver.leads[resolver.final(merge.survivor_id)]
        merged = resolver.leads[merge.merged_id]
        ahead, behind = rank(merged.stage), rank(survivor.stage)
        if ahead is not None and behind is not None and ahead > behind:
            rows.append(
                transition_row(
                    lead_id=survivor.id,
                    from_stage=survivor.stage,
                    to_stage=merged.stage,
                    now=now,
                    cause="merge",
                    actor="merge",
                    reason=f"merged with lead {merged.id}",
                    downstream=False,
                )
            )
            survivor.stage = merged.stage
    return rows


_Pending = tuple[IngestJob, "asyncio.Future[IngestResult]"]


class IngestWriter:
    """The group-commit writer of one process. `submit` returns after the job's own commit."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_batch_events: int,
        retry_after: int,
        writers: int = 1,
        pipelines: Callable[[], Pipelines] = lambda: NO_PIPELINES,
        policy: Callable[[], LoadedPolicy | None] = lambda: None,
        lookback: dt.timedelta = dt.timedelta(days=365),
        handoff: HandoffTargets = NO_TARGETS,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self._handoff = handoff
        self._pipelines = pipelines
        self._policy = policy
        self._lookback = lookback
        self._engine = engine
        self._max_batch_events = max_batch_events
        self._retry_after = retry_after
        self._clock = clock
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._writers = writers
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(), name=f"ingest-writer-{i}") for i in range(self._writers)]

    async def stop(self) -> None:
        """Write what is queued, then stop."""
        if not self._tasks:
            return
        await self._queue.join()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def submit(self, job: IngestJob) -> IngestResult:
        if not self._tasks or any(task.done() for task in self._tasks):
            raise RuntimeError("the ingest writer is not running")
        future: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        await self._queue.put((job, future))
        return await future

    async def _run(self) -> None:
        # This writer's own connection, kept between batches: a pool checkout, begin and return per
        # batch cost more than some of its statements. Dropped on failure, made anew when needed.
        held: list[AsyncConnection] = []
        try:
            await self._loop(held)
        finally:
            for conn in held:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _loop(self, held: list[AsyncConnection]) -> None:
        while True:
            batch = [await self._queue.get()]
            events = len(batch[0][0].events)
            while events < self._max_batch_events and not self._queue.empty():
                item = self._queue.get_nowait()
                batch.append(item)
                events += len(item[0].events)
            try:
                await self._commit(batch, held)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _commit(self, batch: list[_Pending], held: list[AsyncConnection]) -> None:
        live = [(job, fut) for job, fut in batch if not fut.cancelled()]
        if not live:
            return
        try:
            results = await self._write([job for job, _ in live], held)
        except Exception as exc:
            if len(live) > 1 and _statement_failed(exc):
                # One bad job must not fail its neighbours: write each on its own.
                log.warning("group commit failed; retrying jobs one by one", error=str(exc), jobs=len(live))
                for item in live:
                    await self._commit([item], held)
                return
            storage_down = isinstance(
                exc,
                DBAPIError
                | asyncpg.PostgresError
                | asyncpg.InterfaceError
                | asyncpg.exceptions.InternalClientError
                | OSError
                | TimeoutError,
            )
            if storage_down:
                DB_ERRORS.labels(operation="ingest").inc()
                log.error("ingest write failed", error=str(exc))
            for _, fut in live:
                if not fut.done():
                    fut.set_exception(
                        StorageUnavailable("the database is unavailable; retry later", retry_after=self._retry_after)
                        if storage_down
                        else exc
                    )
            return
        GROUP_COMMIT_EVENTS.observe(sum(len(job.events) for job, _ in live))
        for (_, fut), result in zip(live, results, strict=True):
            if not fut.done():
                fut.set_result(result)

    async def _write(self, jobs: list[IngestJob], held: list[AsyncConnection]) -> list[IngestResult]:
        reused = bool(held)
        try:
            return await self._write_on(jobs, held)
        except Exception as exc:
            if not reused or _statement_failed(exc):
                raise
            # The kept connection may have gone stale (database restarted, an idle timeout). How
            # that shows depends on when the driver hears of it (a closed-connection error, or an
            # internal one when the server's notice arrives mid-query), so anything but a refused
            # statement gets one more try on a fresh connection; the failed batch's transaction
            # ended with its connection.
            return await self._write_on(jobs, held)

    async def _write_on(self, jobs: list[IngestJob], held: list[AsyncConnection]) -> list[IngestResult]:
        if not held:
            held.append(await _writer_connection(self._engine))
        conn = held[0]
        raw = (await conn.get_raw_connection()).driver_connection if conn.dialect.name == "postgresql" else None
        try:
            if raw is None:
                async with conn.begin():
                    return await self._batch(conn, jobs)
            # The batch's first statement (`lock_names`) begins the transaction on the driver.
            results = await self._batch(conn, jobs)
            if not raw.is_in_transaction():
                raise RuntimeError("the ingest batch's transaction was not open at commit")
            status = await raw.execute("COMMIT")
            if status != "COMMIT":
                # PostgreSQL answers COMMIT of a failed transaction with ROLLBACK, not an error.
                raise RuntimeError(f"the ingest batch was not committed (the server answered {status})")
            return results
        except BaseException:
            held.clear()
            if raw is not None:
                # SQLAlchemy does not see the driver's transaction (its reset on return would pool the
                # connection with it open). Ending the connection ends it (the server rolls back):
                # no await, so a second cancellation cannot leave its locks held.
                raw.terminate()
                with contextlib.suppress(Exception):
                    await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()
            raise

    async def _batch(self, conn: AsyncConnection, jobs: list[IngestJob]) -> list[IngestResult]:
        return await write_batch(
            conn,
            jobs,
            self._clock(),
            pipelines=self._pipelines(),
            policy=self._policy(),
            lookback=self._lookback,
            handoff=self._handoff,
        )


async def _writer_connection(engine: AsyncEngine) -> AsyncConnection:
    """The writer's own connection. On PostgreSQL its batches are transactions begun and committed
    on the driver: SQLAlchemy is set to leave transactions alone (AUTOCOMMIT, which its asyncpg
    adapter takes as "begin nothing"), so its statements on the rarer paths (merges, stage
    transitions) run inside the driver's transaction like the rest; `lock_names` begins it (see
    `DRIVER_TRANSACTION`). SQLAlchemy's begin and commit and the statement that began its
    transaction were a third of a batch's fixed cost in the client, and BEGIN now rides with the
    batch's first statement."""
    conn = await writer_connection(engine)
    if conn.dialect.name == "postgresql":
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT", **{DRIVER_TRANSACTION: True})
    return conn


def _connection_lost(exc: BaseException) -> bool:
    """The error says the connection is gone (closed by the server, a restart, a network cut)."""
    if isinstance(exc, DBAPIError):
        return exc.connection_invalidated
    return isinstance(
        exc,
        OSError
        | asyncpg.InterfaceError  # "connection is closed", from the driver's own checks
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.OperatorInterventionError,  # shutdown, idle session timeout
    )


def _statement_failed(exc: BaseException) -> bool:
    """A statement of the batch was refused (a constraint, a value too long): the batch's other jobs
    may be fine on their own."""
    return isinstance(exc, DBAPIError | asyncpg.PostgresError) and not _connection_lost(exc)
