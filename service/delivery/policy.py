"""When to try a delivery again, and when to stop trying a destination for a while.

Both are small and tied to the outbox: retries are scheduled in the database (`next_attempt_at`),
not slept in process, so a retry library's in-process loop does not fit; the circuit breaker's
state decides which destinations a worker claims, which the breaker libraries do not expose.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from service.crm.errors import CrmError, CrmRateLimited, CrmRejected
from service.metrics import CIRCUIT_STATE


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int
    max_age: dt.timedelta
    backoff_base_s: float
    backoff_max_s: float
    retry_after_max_s: float

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds before retry number `attempt` (1 = after the first failure): "full jitter",
        uniform in [0, min(max, base * 2^(attempt-1))], so retries of many rows spread out."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** min(attempt - 1, 62))
        return rng.uniform(0.0, ceiling)

    def delay(self, error: CrmError, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after a retryable failure. A rate limit's `Retry-After` is honoured (no
        retry before it; capped at `retry_after_max_s`), with up to a base backoff of jitter added
        so rows told the same time do not all come back at once."""
        if isinstance(error, CrmRateLimited) and error.retry_after is not None:
            return min(error.retry_after, self.retry_after_max_s) + rng.uniform(0.0, self.backoff_base_s)
        return self.backoff(attempt, rng)

    def decide(
        self, error: CrmError, *, attempt: int, age: dt.timedelta, rng: random.Random
    ) -> tuple[Literal["retry", "dead"], float]:
        """`("dead", 0)` for a rejection, the last attempt, or a retry that would land past the
        maximum age; else `("retry", seconds)`."""
        if isinstance(error, CrmRejected) or attempt >= self.max_attempts:
            return "dead", 0.0
        wait = self.delay(error, attempt, rng)
        if age + dt.timedelta(seconds=wait) > self.max_age:
            return "dead", 0.0
        return "retry", wait


State = Literal["closed", "open", "half_open"]
_GAUGE = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    """Per destination: `failures` consecutive failures open it; while open nothing is sent (rows
    stay pending); after `open_for` seconds one probe is let through (half-open); its success
    closes the circuit, its failure opens it again for another `open_for`."""

    def __init__(
        self, destination: str, *, failures: int, open_for: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.destination = destination
        self._threshold = failures
        self._open_for = open_for
        self._clock = clock
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        self.state: State = "closed"
        CIRCUIT_STATE.labels(destination).set(0)

    def _set(self, state: State) -> None:
        self.state = state
        CIRCUIT_STATE.labels(self.destination).set(_GAUGE[state])

    def _probe_due(self) -> bool:
        return self.state == "open" and self._clock() - self._opened_at >= self._open_for

    def claimable(self) -> bool:
        """May rows of this destination be claimed now?"""
        return self.state == "closed" or self._probe_due() or (self.state == "half_open" and not self._probing)

    def reopens_in(self) -> float:
        """Seconds until an open circuit lets a probe through (0 when not open)."""
        if self.state != "open":
            return 0.0
        return max(0.0, self._open_for - (self._clock() - self._opened_at))

    def permit(self) -> bool:
        """Ask to send one request now; in half-open state only one (the probe) is permitted."""
        if self.state == "closed":
            return True
        if self._probe_due() or (self.state == "half_open" and not self._probing):
            self._set("half_open")
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        if self.state != "closed":
            self._set("closed")

    def failure(self) -> None:
        self._failures += 1
        if self.state == "half_open" or (self.state == "closed" and self._failures >= self._threshold):
            self._probing = False
            self._opened_at = self._clock()
            self._set("open")
