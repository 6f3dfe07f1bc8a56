"""Token buckets (GCRA) for the GC's HTTP API (SPEC §6.5), by key.

Two limits use them (:mod:`darktower.gc.meetings_api`):

* the unauthenticated guest join, per client address (:func:`client_key`): it
  costs the GC a database lookup, possibly an MC assignment and an Ed25519
  signature, and needs no credentials - without a limit, anyone could
  enumerate meeting codes or load the fleet for free;
* meeting creation, per user (:func:`user_key`: the token's org and ``sub``):
  every meeting is a row kept for good and can be joined into an MC
  assignment, so one user (or one leaked token) must not create them as fast
  as the GC can write.

Each key gets a bucket of ``burst`` tokens refilled at one token per
``refill_interval_s``; a request takes one token or is refused with the time
until the next one.

Per process. The buckets live in the memory of one GC process: behind a load
balancer spreading requests over N GCs, a client gets up to N times the
configured rate (and a restart refills every bucket). That bounds what one
client costs each GC, which is the point; a fleet-wide quota would need shared
state (PostgreSQL or Redis) on every request.

Time is trio's clock (:func:`trio.current_time`), so tests drive the limiter
with ``MockClock`` and production with the monotonic clock; nothing here does
I/O or awaits. Memory is bounded: at most ``max_keys`` buckets are kept, and
the least recently used one is dropped first - forgetting a bucket only ever
errs towards admitting its client (it restarts full), and the least recently
used bucket is the one most likely to have refilled anyway.

The client address is the peer address of the connection (the ASGI scope's
``client``), never ``X-Forwarded-For``: that header is whatever the client
wants it to be. IPv6 clients are grouped by /64, the block one subscriber
usually holds, so rotating through addresses of one's own network buys no
extra requests.
"""

from __future__ import annotations

import ipaddress
import math
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio

__all__ = ["RateDecision", "RateLimiter", "client_key", "user_key"]

#: Key for connections without a peer address (e.g. a Unix socket): they all
#: share one bucket, which errs towards limiting.
UNKNOWN_CLIENT = "unknown"


@dataclass(frozen=True, slots=True)
class RateDecision:
    """Whether a request may proceed; if not, ``retry_after_s`` (> 0) says
    when the client's next token will be there."""

    allowed: bool
    retry_after_s: float = 0.0

    @property
    def retry_after_header(self) -> str:
        """``retry_after_s`` as an HTTP ``Retry-After`` value: whole seconds,
        rounded up (a client retrying earlier would be refused again), at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


_ALLOWED = RateDecision(True)


class RateLimiter:
    """Token buckets by key; see the module docstring. Trio-clock based by
    default (``clock`` is for callers outside a trio run). Not thread-safe:
    use it from one trio run.

    Each bucket is kept as one number, the GCRA "theoretical arrival time"
    (the time at which the bucket would be full again), rather than as a
    fractional token count: the arithmetic is additions of the interval, so
    a client pacing itself exactly at the refill rate is never refused by
    rounding error accumulating in the count.
    """

    def __init__(
        self,
        *,
        burst: int = 5,
        refill_interval_s: float = 6.0,
        max_keys: int = 10_000,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if burst < 1 or max_keys < 1 or not refill_interval_s > 0:
            raise ValueError("burst and max_keys must be >= 1 and refill_interval_s > 0")
        self._interval = refill_interval_s
        # How far ahead of now a bucket's full-again time may be while it
        # still holds a token.
        self._tolerance = (burst - 1) * refill_interval_s
        self._max_keys = max_keys
        self._clock = clock
        # key -> time at which its bucket is full again; most recently used last.
        self._full_at: OrderedDict[str, float] = OrderedDict()

    def __repr__(self) -> str:
        burst = round(self._tolerance / self._interval) + 1
        return (
            f"<RateLimiter burst={burst} refill_interval_s={self._interval:g}"
            f" keys={len(self._full_at)}/{self._max_keys}>"
        )

    def __len__(self) -> int:
        """How many buckets are held now (at most ``max_keys``)."""
        return len(self._full_at)

    def acquire_nowait(self, key: str) -> RateDecision:
        """Take one token from ``key``'s bucket if it has one."""
        now = self._clock()
        full_at = max(self._full_at.pop(key, now), now)
        if full_at - now > self._tolerance:
            decision = RateDecision(False, full_at - self._tolerance - now)
        else:
            full_at += self._interval
            decision = _ALLOWED
        self._full_at[key] = full_at
        while len(self._full_at) > self._max_keys:
            self._full_at.popitem(last=False)
        return decision


def client_key(host: str | None) -> str:
    """The rate-limit key for a peer address: the address itself for IPv4,
    its /64 network for IPv6 (IPv4-mapped IPv6 counts as the IPv4 address),
    :data:`UNKNOWN_CLIENT` when there is none. A host that is not an IP
    address (an ASGI server may report a name) is used as it is."""
    if not host:
        return UNKNOWN_CLIENT
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def user_key(org_id: uuid.UUID, sub: str) -> str:
    """The rate-limit key for a user: their org and ``sub``. The org's
    canonical text has a fixed length (36), so no two users share a key
    whatever their ``sub``; a user of two orgs has a bucket in each."""
    return f"{org_id}/{sub}"
