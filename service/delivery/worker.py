"""The delivery worker: drains the outbox into the CRMs.

One worker per process. A claimer takes due rows in batches (`FOR UPDATE SKIP LOCKED` on
PostgreSQL, so any number of worker processes share the outbox; each claim is a lease, so the rows
of a worker killed mid-delivery are claimed again once it runs out), `concurrency` senders deliver
them through the destination's adapter, and a recorder writes outcomes in batches, each only if the
claim still holds: a delivery is recorded as delivered exactly once, even when the CRM received it
twice (the idempotency key lets the CRM tell).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx
import structlog
from httpx_aiohttp import AiohttpTransport
from sqlalchemy.ext.asyncio import AsyncEngine

from service.crm import CrmAdapter, CrmError, CrmRejected, CrmTransportError
from service.db import write_transaction
from service.delivery.policy import CircuitBreaker, RetryPolicy
from service.metrics import DB_ERRORS, DELIVERIES, DELIVERY_DURATION
from service.repositories import deliveries as repo
from service.settings import Settings

log = structlog.get_logger(__name__)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    concurrency: int
    batch_size: int
    poll_s: float
    lease: dt.timedelta
    policy: RetryPolicy
    circuit_failures: int
    circuit_open_s: float

    @classmethod
    def from_settings(cls, settings: Settings, *, concurrency: int | None = None) -> WorkerConfig:
        return cls(
            concurrency=concurrency or settings.delivery_concurrency,
            batch_size=settings.delivery_batch_size,
            poll_s=settings.delivery_poll_seconds,
            lease=dt.timedelta(seconds=settings.delivery_lease_seconds),
            policy=RetryPolicy(
                max_attempts=settings.delivery_max_attempts,
                max_age=dt.timedelta(seconds=settings.delivery_max_age_seconds),
                backoff_base_s=settings.delivery_backoff_base_seconds,
                backoff_max_s=settings.delivery_backoff_max_seconds,
                retry_after_max_s=settings.delivery_retry_after_max_seconds,
            ),
            circuit_failures=settings.delivery_circuit_failures,
            circuit_open_s=settings.delivery_circuit_open_seconds,
        )


def http_client(settings: Settings, *, concurrency: int | None = None) -> httpx.AsyncClient:
    """The worker's one HTTP client: pooled connections, timeouts, no redirects (a CRM API that
    redirects is misconfigured, and a redirect would carry our credentials elsewhere)."""
    timeout = settings.delivery_timeout_seconds
    slots = concurrency or settings.delivery_concurrency
    limits = httpx.Limits(max_connections=slots * 2, max_keepalive_connections=slots)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
        limits=limits,
        # aiohttp under httpx's API: httpcore's own pool cost most of a worker's CPU per delivery
        # (see pyproject.toml). The timeouts above still apply (connect, read, and pool wait).
        transport=AiohttpTransport(limits=limits),
        follow_redirects=False,
        headers={"user-agent": "leadscore-delivery/0.1"},
    )


class DeliveryWorker:
    """Claims, sends and records deliveries until stopped. `start()` runs it as tasks of the
    current loop (the app's lifespan, the CLI); `stop()` stops claiming, lets sends in flight
    finish, gives back claimed rows not yet sent, and writes every outcome."""

    def __init__(
        self,
        engine: AsyncEngine,
        adapters: Mapping[str, CrmAdapter],
        client: httpx.AsyncClient,
        config: WorkerConfig,
        *,
        name: str | None = None,
        clock: Callable[[], dt.datetime] = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name or worker_name()
        self._engine = engine
        self._adapters = dict(adapters)
        self._client = client
        self._config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._breakers = {
            d: CircuitBreaker(d, failures=config.circuit_failures, open_for=config.circuit_open_s) for d in adapters
        }
        self._ready: asyncio.Queue[repo.Claimed] = asyncio.Queue()
        self._outcomes: list[repo.Outcome] = []
        self._released: list[repo.Claimed] = []
        self._more_results = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self._senders_done = False
        self._sending = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._recorder: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        # SQLite has one write lock for the whole file, and a connection waiting for it sleeps in
        # growing steps (up to 100 ms): the claimer and the recorder take turns here instead
        # (measured on a busy machine: 36 handoffs/s contending, 82 taking turns).
        self._sqlite_turns = asyncio.Lock() if engine.dialect.name == "sqlite" else None

    @property
    def breakers(self) -> Mapping[str, CircuitBreaker]:
        return self._breakers

    def start(self) -> None:
        if not self._adapters:
            log.info("no delivery destinations configured; the delivery worker is idle")
        self._tasks = [asyncio.create_task(self._claim_loop(), name="delivery-claimer")]
        self._tasks += [
            asyncio.create_task(self._send_loop(), name=f"delivery-sender-{i}") for i in range(self._config.concurrency)
        ]
        self._recorder = asyncio.create_task(self._record_loop(), name="delivery-recorder")
        if self._engine.dialect.name == "postgresql" and self._adapters:
            self._listener = asyncio.create_task(self._listen_loop(), name="delivery-listener")
        log.info("delivery worker started", worker=self.name, destinations=sorted(self._adapters))

    def wake(self) -> None:
        """Look for due rows now (after a commit that enqueued some) instead of at the next poll."""
        self._wake.set()

    async def stop(self) -> None:
        if not self._tasks:
            return
        self._stopping = True
        self._wake.set()
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        claimer, senders = self._tasks[0], self._tasks[1:]
        with contextlib.suppress(asyncio.CancelledError):
            await claimer
        while not self._ready.empty():
            self._released.append(self._ready.get_nowait())
        # Senders wait on the queue when idle; the ones sending finish their request first.
        while self._sending:
            await asyncio.sleep(0.01)
        for task in senders:
            task.cancel()
        for task in senders:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._senders_done = True
        self._more_results.set()
        if self._recorder is not None:
            await self._recorder
        self._tasks = []
        log.info("delivery worker stopped", worker=self.name)

    async def run_until(self, stop: asyncio.Event) -> None:
        self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()

    # Claiming

    async def _claim_loop(self) -> None:
        # At most `concurrency` claimed rows wait for a sender, so none waits longer than one
        # request's timeout before it is sent: leases are not spent in the queue (a row whose lease
        # runs out is claimed, and sent, by another worker too).
        room = min(self._config.concurrency, self._config.batch_size)
        while not self._stopping:
            self._wake.clear()  # before the claim, so a wake during it is not lost
            limit = room - self._ready.qsize()
            claimed = await self._claim(limit) if limit >= max(1, room // 2) else 0
            if claimed and claimed == limit:
                # A full claim: more may be due; claim again when the senders have taken some.
                while self._ready.qsize() > room // 2 and not self._stopping:
                    await asyncio.sleep(0.002)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._config.poll_s)

    async def _listen_loop(self) -> None:
        """PostgreSQL: wake the claimer when a transaction that enqueued deliveries commits, rather
        than at its next poll. Polling goes on regardless (retries come due with no commit, and a
        notification can be missed while the listening connection is down)."""
        failures = 0
        while True:
            try:
                async with repo.outbox_notifications(self._engine, self.wake) as lost:
                    failures = 0
                    self.wake()  # what was committed before the listening began
                    await lost.wait()
                log.warning("lost the connection listening for new deliveries; polling until it is back")
            except Exception as exc:
                log.warning("could not listen for new deliveries; polling", error=str(exc))
            failures += 1
            await asyncio.sleep(min(30.0, 0.5 * 2**failures))

    async def _claim(self, limit: int) -> int:
        destinations = [d for d, b in self._breakers.items() if b.claimable()]
        if not destinations or limit <= 0:
            return 0
        try:
            if self._sqlite_turns is not None:
                # An idle poll on SQLite only reads: the claim's write lock is the whole file's.
                async with self._engine.connect() as conn:
                    if not await repo.any_due(conn, destinations=destinations, now=self._clock()):
                        return 0
            async with self._turn(), write_transaction(self._engine) as conn:
                claims = await repo.claim_due(
                    conn,
                    destinations=destinations,
                    limit=limit,
                    worker=self.name,
                    now=self._clock(),
                    lease=self._config.lease,
                )
        except Exception as exc:  # the database may be down for a while: keep polling
            DB_ERRORS.labels(operation="delivery_claim").inc()
            log.warning("could not claim deliveries", error=str(exc))
            return 0
        for claim in claims:
            self._ready.put_nowait(claim)
        return len(claims)

    # Sending

    async def _send_loop(self) -> None:
        while True:
            claimed = await self._ready.get()
            self._sending += 1
            try:
                await self._send(claimed)
            finally:
                self._sending -= 1

    async def _send(self, claimed: repo.Claimed) -> None:
        breaker = self._breakers[claimed.destination]
        if not breaker.permit():
            # The circuit opened after the claim: give the row back untried.
            self._released.append(claimed)
            self._more_results.set()
            return
        adapter = self._adapters[claimed.destination]
        started_at = self._clock()
        started = time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        excerpt: str | None = None
        next_at: dt.datetime | None = None
        try:
            receipt = await adapter.deliver(
                self._client, claimed.payload, idempotency_key=claimed.idempotency_key, now=started_at
            )
        except CrmError as exc:
            status_code, error, excerpt = exc.status_code, exc.message, exc.excerpt
            if isinstance(exc, CrmRejected):
                breaker.success()  # the CRM answered: it is up
            else:
                breaker.failure()
            age = started_at - (claimed.replayed_at or claimed.created_at)
            status, wait = self._config.policy.decide(exc, attempt=claimed.attempt, age=age, rng=self._rng)
            if status == "retry":
                next_at = self._clock() + dt.timedelta(seconds=wait)
                outcome_status = "pending"
            else:
                outcome_status = "dead"
        except Exception as exc:  # an adapter bug must not lose the row: retry it, and say why
            log.exception("delivery adapter failed", destination=claimed.destination, delivery=str(claimed.id))
            breaker.failure()
            error = f"internal error: {type(exc).__name__}"
            status, wait = self._config.policy.decide(
                CrmTransportError(error), attempt=claimed.attempt, age=dt.timedelta(0), rng=self._rng
            )
            outcome_status = "pending" if status == "retry" else "dead"
            next_at = self._clock() + dt.timedelta(seconds=wait) if status == "retry" else None
        else:
            breaker.success()
            status_code, excerpt, outcome_status = receipt.status_code, receipt.excerpt, "delivered"
        took = time.perf_counter() - started
        DELIVERY_DURATION.labels(claimed.destination).observe(took)
        DELIVERIES.labels(claimed.destination, _OUTCOME[outcome_status]).inc()
        self._outcomes.append(
            repo.Outcome(
                claimed=claimed,
                status=outcome_status,
                worker=self.name,
                started_at=started_at,
                duration_ms=took * 1000.0,
                status_code=status_code,
                error=error,
                response_excerpt=excerpt,
                next_attempt_at=next_at,
            )
        )
        self._more_results.set()

    # Recording

    async def _record_loop(self) -> None:
        failures = 0
        while True:
            if not self._outcomes and not self._released:
                if self._senders_done:
                    return
                self._more_results.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._more_results.wait(), timeout=0.5)
                continue
            outcomes, self._outcomes = self._outcomes, []
            released, self._released = self._released, []
            try:
                now = self._clock()
                async with self._turn(), write_transaction(self._engine) as conn:
                    await repo.record_outcomes(conn, outcomes, now=now)
                    if released:
                        await repo.release_claims(conn, released, now=now, retry_at=now + self._reopen_delay(released))
                failures = 0
            except Exception as exc:
                # Keep them and try again: until written, the rows stay claimed, and if this process
                # dies their leases run out and they are delivered again (at least once).
                DB_ERRORS.labels(operation="delivery_record").inc()
                log.warning("could not record delivery outcomes", error=str(exc), pending=len(outcomes))
                self._outcomes = outcomes + self._outcomes
                self._released = released + self._released
                failures += 1
                await asyncio.sleep(min(5.0, 0.1 * 2**failures))

    def _turn(self) -> contextlib.AbstractAsyncContextManager[object]:
        return self._sqlite_turns if self._sqlite_turns is not None else contextlib.nullcontext()

    def _reopen_delay(self, released: list[repo.Claimed]) -> dt.timedelta:
        wait = max(self._breakers[c.destination].reopens_in() for c in released)
        return dt.timedelta(seconds=wait)


_OUTCOME = {"delivered": "delivered", "pending": "retry", "dead": "dead_letter"}
