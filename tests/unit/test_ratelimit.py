"""Token buckets per device."""

from __future__ import annotations

import pytest

from gateway.domain.ratelimit import RateLimiter

pytestmark = pytest.mark.unit


def test_burst_then_steady_rate() -> None:
    """A full bucket allows `burst` at once, then `rate` per second."""
    limiter = RateLimiter(rate=10, burst=5)
    assert [limiter.allow("d", 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert limiter.allow("d", 0.1) is True
    assert limiter.allow("d", 0.1) is False
    # After 1.1 s idle the bucket is full (5, not 11); 0.19 s more at 10/s adds one.
    assert sum(limiter.allow("d", 1.2 + i * 0.01) for i in range(20)) == 5 + 1


def test_devices_have_separate_buckets() -> None:
    """One device's flood does not use another's tokens."""
    limiter = RateLimiter(rate=1, burst=1)
    assert limiter.allow("a", 0.0)
    assert not limiter.allow("a", 0.0)
    assert limiter.allow("b", 0.0)


def test_idle_buckets_are_forgotten_when_full() -> None:
    """Memory stays bounded: past max_keys, buckets that refilled are dropped."""
    limiter = RateLimiter(rate=1, burst=2, max_keys=3)
    for key in "abc":
        limiter.allow(key, 0.0)
    limiter.allow("d", 10.0)
    assert len(limiter) == 1


def test_invalid_settings_are_refused() -> None:
    """A zero rate or an empty bucket would reject everything."""
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(rate=0, burst=1)
