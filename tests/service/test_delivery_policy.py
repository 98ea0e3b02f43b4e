"""Retry backoff (bounded, jittered, Retry-After honoured) and the circuit breaker's transitions."""

from __future__ import annotations

import datetime as dt
import random
import statistics

import pytest
from prometheus_client import REGISTRY

from service.crm import CrmRateLimited, CrmRejected, CrmTransportError, parse_retry_after
from service.delivery.policy import CircuitBreaker, RetryPolicy

POLICY = RetryPolicy(
    max_attempts=8,
    max_age=dt.timedelta(hours=1),
    backoff_base_s=1.0,
    backoff_max_s=60.0,
    retry_after_max_s=600.0,
)
NOW = dt.datetime(2026, 11, 29, 22, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 7, 10, 40, 500])
def test_backoff_is_full_jitter_under_a_capped_exponential(attempt: int) -> None:
    rng = random.Random(attempt)
    ceiling = min(60.0, 2.0 ** (attempt - 1))
    samples = [POLICY.backoff(attempt, rng) for _ in range(2000)]
    assert all(0.0 <= s <= ceiling for s in samples)
    # Spread over the whole range, not bunched: that is what keeps retries from arriving together.
    assert min(samples) < 0.05 * ceiling
    assert max(samples) > 0.95 * ceiling
    assert statistics.mean(samples) == pytest.approx(ceiling / 2, rel=0.1)


def test_retry_after_is_honoured_with_a_little_jitter_and_capped() -> None:
    rng = random.Random(1)
    told = CrmRateLimited("slow down", retry_after=30.0)
    delays = [POLICY.delay(told, 1, rng) for _ in range(500)]
    assert all(30.0 <= d <= 31.0 for d in delays)
    assert len(set(delays)) > 1
    too_long = CrmRateLimited("slow down", retry_after=86_400.0)
    assert 600.0 <= POLICY.delay(too_long, 1, rng) <= 601.0
    untold = CrmRateLimited("slow down", retry_after=None)
    assert 0.0 <= POLICY.delay(untold, 3, rng) <= 4.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        ("0", 0.0),
        ("Sun, 29 Nov 2026 22:01:00 GMT", 60.0),
        ("Sun, 29 Nov 2026 21:00:00 GMT", 0.0),  # in the past: now
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_header_in_seconds_or_http_date(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


def test_decisions_dead_letter_rejections_last_attempts_and_old_rows() -> None:
    rng = random.Random(2)
    young = dt.timedelta(minutes=1)
    assert POLICY.decide(CrmRejected("no"), attempt=1, age=young, rng=rng) == ("dead", 0.0)
    status, wait = POLICY.decide(CrmTransportError("down"), attempt=1, age=young, rng=rng)
    assert status == "retry"
    assert 0.0 <= wait <= 1.0
    assert POLICY.decide(CrmTransportError("down"), attempt=8, age=young, rng=rng) == ("dead", 0.0)
    # A retry that would land past the maximum age is not scheduled.
    old = dt.timedelta(minutes=59, seconds=59)
    assert POLICY.decide(CrmRateLimited("x", retry_after=30.0), attempt=2, age=old, rng=rng) == ("dead", 0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gauge(destination: str) -> float | None:
    return REGISTRY.get_sample_value("leadscore_circuit_state", {"destination": destination})


def test_circuit_opens_after_consecutive_failures_probes_once_and_closes_on_success() -> None:
    clock = Clock()
    breaker = CircuitBreaker("cb-test-1", failures=3, open_for=10.0, clock=clock)
    assert (breaker.state, gauge("cb-test-1")) == ("closed", 0)
    breaker.failure()
    breaker.failure()
    breaker.success()  # not consecutive: counting starts again
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed"
    assert breaker.permit()
    breaker.failure()
    assert (breaker.state, gauge("cb-test-1")) == ("open", 2)
    assert not breaker.claimable()
    assert not breaker.permit()
    assert breaker.reopens_in() == 10.0
    clock.now += 9.9
    assert not breaker.permit()
    clock.now += 0.1
    assert breaker.claimable()
    assert breaker.permit()  # the probe
    assert (breaker.state, gauge("cb-test-1")) == ("half_open", 1)
    assert not breaker.permit()  # only one probe at a time
    assert not breaker.claimable()
    breaker.success()
    assert (breaker.state, gauge("cb-test-1")) == ("closed", 0)
    assert breaker.permit()


def test_a_failed_probe_opens_the_circuit_again_for_a_full_wait() -> None:
    clock = Clock()
    breaker = CircuitBreaker("cb-test-2", failures=1, open_for=5.0, clock=clock)
    breaker.failure()
    clock.now += 5.0
    assert breaker.permit()
    clock.now += 2.0
    breaker.failure()
    assert (breaker.state, gauge("cb-test-2")) == ("open", 2)
    assert breaker.reopens_in() == 5.0
    clock.now += 5.0
    assert breaker.permit()
