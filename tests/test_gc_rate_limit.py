"""The HTTP API's rate limiter (guest joins, creates): token buckets on trio's
clock (MockClock-driven), and the keys it is used with."""

from __future__ import annotations

import uuid

import pytest
import trio
import trio.testing

from darktower.gc.rate_limit import (
    UNKNOWN_CLIENT,
    RateDecision,
    RateLimiter,
    client_key,
    user_key,
)


def _drain(limiter: RateLimiter, key: str, count: int) -> None:
    for _ in range(count):
        assert limiter.acquire_nowait(key).allowed


async def test_burst_then_refusal_with_exact_retry_after(
    mock_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(burst=5, refill_interval_s=6.0)
    _drain(limiter, "a", 5)
    decision = limiter.acquire_nowait("a")
    assert decision == RateDecision(False, 6.0)
    assert decision.retry_after_header == "6"


async def test_one_token_per_interval(mock_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(burst=5, refill_interval_s=6.0)
    _drain(limiter, "a", 5)
    mock_clock.jump(2.0)
    assert limiter.acquire_nowait("a") == RateDecision(False, 4.0)
    mock_clock.jump(4.0)
    assert limiter.acquire_nowait("a").allowed
    assert limiter.acquire_nowait("a") == RateDecision(False, 6.0)
    # Ten a minute in the steady state, with no rounding drift over an hour.
    allowed = 0
    for _ in range(3600):
        mock_clock.jump(1.0)
        allowed += limiter.acquire_nowait("a").allowed
    assert allowed == 600


async def test_non_integral_interval_paced_exactly_is_never_refused(
    mock_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(burst=1, refill_interval_s=0.1)
    for _ in range(1000):
        assert limiter.acquire_nowait("a").allowed
        mock_clock.jump(0.1)


async def test_refusals_do_not_postpone_recovery(mock_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(burst=1, refill_interval_s=6.0)
    _drain(limiter, "a", 1)
    for waited in range(5):
        assert limiter.acquire_nowait("a") == RateDecision(False, 6.0 - waited)
        mock_clock.jump(1.0)
    mock_clock.jump(1.0)
    assert limiter.acquire_nowait("a").allowed


async def test_refill_is_capped_at_burst(mock_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(burst=3, refill_interval_s=1.0)
    _drain(limiter, "a", 3)
    mock_clock.jump(1000.0)
    _drain(limiter, "a", 3)
    assert not limiter.acquire_nowait("a").allowed


async def test_keys_are_independent(mock_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(burst=2, refill_interval_s=6.0)
    _drain(limiter, "a", 2)
    assert not limiter.acquire_nowait("a").allowed
    _drain(limiter, "b", 2)
    assert not limiter.acquire_nowait("b").allowed


async def test_memory_is_bounded_least_recently_used_first(
    mock_clock: trio.testing.MockClock,
) -> None:
    limiter = RateLimiter(burst=1, refill_interval_s=60.0, max_keys=2)
    _drain(limiter, "a", 1)
    _drain(limiter, "b", 1)
    assert not limiter.acquire_nowait("a").allowed  # "a" is now the most recent
    _drain(limiter, "c", 1)  # evicts "b"
    assert len(limiter) == 2
    assert not limiter.acquire_nowait("a").allowed  # kept, still empty
    assert limiter.acquire_nowait("b").allowed  # forgotten: starts full again
    assert len(limiter) == 2


def test_injected_clock() -> None:
    now = [100.0]
    limiter = RateLimiter(burst=2, refill_interval_s=10.0, clock=lambda: now[0])
    _drain(limiter, "a", 2)
    now[0] = 105.0
    assert limiter.acquire_nowait("a") == RateDecision(False, 5.0)
    now[0] = 110.0
    assert limiter.acquire_nowait("a").allowed
    assert "burst=2" in repr(limiter)


@pytest.mark.parametrize(
    ("retry_after_s", "header"),
    [(0.001, "1"), (0.2, "1"), (1.0, "1"), (4.1, "5"), (6.0, "6")],
)
def test_retry_after_header_rounds_up_to_whole_seconds(retry_after_s: float, header: str) -> None:
    assert RateDecision(False, retry_after_s).retry_after_header == header


@pytest.mark.parametrize(
    "kwargs",
    [{"burst": 0}, {"refill_interval_s": 0.0}, {"refill_interval_s": -1.0}, {"max_keys": 0}],
)
def test_invalid_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="must be"):
        RateLimiter(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
        ("fe80::1%eth0", "fe80::/64"),
        (None, UNKNOWN_CLIENT),
        ("", UNKNOWN_CLIENT),
        ("testclient", "testclient"),
    ],
)
def test_client_key(host: str | None, key: str) -> None:
    assert client_key(host) == key


ORG_A = uuid.UUID("0b8a3f5e-7d0c-4c4e-9a51-3f2b7c1d9e01")
ORG_B = uuid.UUID("6f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a00")


def test_user_key_is_org_and_sub() -> None:
    assert user_key(ORG_A, "user-1") == "0b8a3f5e-7d0c-4c4e-9a51-3f2b7c1d9e01/user-1"


def test_user_keys_never_collide() -> None:
    """The org's text has a fixed length, so a ``sub`` containing the
    separator (or looking like an org) cannot land in another user's bucket."""
    keys = {
        user_key(ORG_A, "user-1"),
        user_key(ORG_B, "user-1"),
        user_key(ORG_A, "user-2"),
        user_key(ORG_A, f"{ORG_B}/user-1"),
        user_key(ORG_A, "user-1/"),
    }
    assert len(keys) == 5


async def test_a_user_in_two_orgs_has_two_buckets(mock_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(burst=1, refill_interval_s=60.0)
    _drain(limiter, user_key(ORG_A, "user-1"), 1)
    assert not limiter.acquire_nowait(user_key(ORG_A, "user-1")).allowed
    assert limiter.acquire_nowait(user_key(ORG_B, "user-1")).allowed
