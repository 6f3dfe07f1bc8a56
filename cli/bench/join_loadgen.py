"""The join load generator: ``python -m darktower.cli.bench.join_loadgen CONFIG.json``.

Like the other load generators (:mod:`.loadgen`, whose helpers it uses) it
runs in a process of its own and is plain asyncio: it imports nothing that
pulls in ``trio_asyncio`` (which patches asyncio process-wide). HTTP/1.1 is
spoken with ``h11`` (hypercorn's own parser, so a dependency already) over
asyncio streams, keep-alive, one request at a time per connection.

One process runs one *job* (``mode`` in the config file):

* ``create`` - create ``count`` meetings through ``POST /api/v1/meetings``
  (``concurrency`` at a time; not measured); the result lists ``[id, code]``.
  With ``join`` each is also joined once (its first join, retried a little)
  and only the meetings joined are listed: a pool for re-joins.
* ``probe`` - create one meeting and join it, retried (bounded) until the
  join answers 200: the proof that GC, MCs and MHs are all in place. The
  result carries the join response's body (the floor serves those bytes).
* ``open`` - **open loop** at a fixed ``rate``: request ``i`` has the
  intended send time ``t0 + i / rate``, computed up front, and its latency is
  *completion - intended send time*. A request the generator dispatched late
  (its loop was busy, or every connection was taken) is charged for the wait,
  so a slow server cannot hide behind the generator slowing down
  (coordinated omission). ``cycle`` false: every code once (first joins);
  true: codes round-robin (re-joins). Requests whose intended time falls in
  the measured window are recorded in an HdrHistogram (µs, 3 significant
  digits); the warm-up before it is discarded.
* ``closed`` - saturation: ``concurrency`` connections each sending the next
  re-join as soon as the previous one answered (:func:`.loadgen.measure_closed_loop`).
* ``mixed`` - open loop as ``open``, over several servers (``port`` and
  ``also_ports``, e.g. two GCs) and both kinds of join at once: a share
  ``first_share`` of the requests are first joins (``first_codes``, each
  once), the rest re-joins (``codes`` round-robin), spread evenly
  (:func:`mixed_schedule`). Latency is also recorded per kind and per server.

(The bench's simulated MHs are ``dt mh-sim``, :mod:`darktower.cli.mh_sim`.)

Every request carries a user token (round-robin over ``tokens``) exactly as
a client would; the floor ignores it. JSON lines on stdout as the other
generators: ``measure_start`` / ``measure_end`` around the measured window,
then ``result``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import h11
from hdrh.histogram import HdrHistogram

from darktower.cli.bench.loadgen import _emit, _error_name, measure_closed_loop

MODES = ("create", "probe", "open", "closed", "mixed")
#: Latencies in µs between 1 µs and one minute, three significant digits.
_HISTOGRAM_MAX_US = 60_000_000
#: The first intended send time is this far ahead of the schedule's start,
#: so that request 0 is not late by construction.
_LEAD_S = 0.05
_READ_CHUNK = 65536
_CREATE_ATTEMPTS = 3
_PROBE_INTERVAL_S = 0.1
_JOIN_PATH = "/api/v1/meetings/"


@dataclass(frozen=True, slots=True)
class JoinLoadConfig:
    """What the parent hands over (a JSON file: tokens stay out of argv)."""

    mode: str
    host: str
    port: int
    tokens: list[str]
    codes: list[str] = field(default_factory=list)
    count: int = 0
    rate: float = 0.0
    cycle: bool = False
    join: bool = False
    concurrency: int = 16
    max_connections: int = 256
    warmup_s: float = 0.0
    duration_s: float = 0.0
    timeout_s: float = 5.0
    ready_timeout_s: float = 60.0
    #: ``mixed``: further servers, joined round-robin with ``port``.
    also_ports: list[int] = field(default_factory=list)
    #: ``mixed``: meetings never joined yet, one per first join.
    first_codes: list[str] = field(default_factory=list)
    #: ``mixed``: the share of requests that are first joins (0 to 1).
    first_share: float = 0.0

    @classmethod
    def load(cls, path: Path) -> JoinLoadConfig:
        raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        config = cls(**raw)
        if config.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if not config.tokens:
            raise ValueError("tokens must not be empty")
        if config.concurrency < 1 or config.max_connections < 1:
            raise ValueError("concurrency and max_connections must be at least 1")
        if config.mode == "open" and (config.rate <= 0 or not config.codes):
            raise ValueError("open loop needs a positive rate and codes")
        if config.mode == "closed" and not config.codes:
            raise ValueError("closed loop needs codes")
        if config.mode == "mixed":
            if config.rate <= 0 or not 0 <= config.first_share <= 1:
                raise ValueError("mixed needs a positive rate and a first_share from 0 to 1")
            if config.first_share < 1 and not config.codes:
                raise ValueError("mixed needs codes for its re-joins")
        return config

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")
        path.chmod(0o600)


# --------------------------------------------------------------------------
# HTTP/1.1 client


class HttpError(Exception):
    """The connection broke or the server spoke something other than HTTP."""


class HttpConnection:
    """One keep-alive HTTP/1.1 connection: h11's state machine over a stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        # asyncio sets TCP_NODELAY on TCP streams.
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
    ) -> tuple[int, bytes]:
        """Send one request, read the whole response: ``(status, body)``."""
        conn = self._h11
        if body:
            headers = [*headers, ("Content-Type", "application/json")]
            headers.append(("Content-Length", str(len(body))))
        out = conn.send(h11.Request(method=method, target=target, headers=headers)) or b""
        if body:
            out += conn.send(h11.Data(data=body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        self._writer.write(out)
        status = 0
        chunks: list[bytes] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await self._reader.read(_READ_CHUNK)
                conn.receive_data(data)  # b"" = the server closed
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpError("connection closed by the server")
        return status, b"".join(chunks)

    def reusable(self) -> bool:
        """Ready for the next request (keep-alive); starts the next cycle."""
        conn = self._h11
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return True
        return False

    def close(self) -> None:
        self._writer.close()


class HttpPool:
    """Connections to one server, at most ``limit`` open: a request takes an
    idle one or opens one, and waits when all ``limit`` are busy."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self._host = host
        self._port = port
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[HttpConnection] = []
        self._open = 0
        #: Most connections open at once.
        self.peak = 0

    async def request(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
    ) -> tuple[int, bytes]:
        async with self._slots:
            if self._idle:
                conn = self._idle.pop()
                try:
                    return await self._send(conn, method, target, headers, body)
                except (OSError, HttpError, h11.ProtocolError):
                    # The server may close an idle keep-alive connection at
                    # any time; like any HTTP client, retry once on a new one.
                    pass
            conn = await HttpConnection.open(self._host, self._port)
            self._open += 1
            self.peak = max(self.peak, self._open)
            return await self._send(conn, method, target, headers, body)

    def _close(self, conn: HttpConnection) -> None:
        conn.close()
        self._open -= 1

    async def _send(
        self,
        conn: HttpConnection,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> tuple[int, bytes]:
        try:
            status, payload = await conn.request(method, target, headers, body)
        except BaseException:
            # Cancelled mid-request (client timeout) or broken: the
            # connection's state is unknown, never reuse it.
            self._close(conn)
            raise
        if conn.reusable():
            self._idle.append(conn)
        else:
            self._close(conn)
        return status, payload

    def close(self) -> None:
        for conn in self._idle:
            self._close(conn)
        self._idle.clear()


def _failure(status: int, body: bytes) -> str:
    """A stable label for an HTTP failure: ``HTTP_503_SERVICE_UNAVAILABLE``."""
    code = ""
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        code = str(json.loads(body)["error"]["code"])
    return f"HTTP_{status}" + (f"_{code}" if code.isidentifier() else "")


def _call_failure(exc: BaseException) -> str:
    if isinstance(exc, h11.ProtocolError):
        return "HTTP_PROTOCOL_ERROR"
    return _error_name(exc)


class Client:
    """The API calls of a job, each returning a failure label or the result."""

    def __init__(self, config: JoinLoadConfig, limit: int) -> None:
        self._host_header = f"{config.host}:{config.port}"
        self._pool = HttpPool(config.host, config.port, limit)
        self._auth = [f"Bearer {token}" for token in config.tokens]

    @property
    def connections(self) -> int:
        """Most connections open at once."""
        return self._pool.peak

    def _headers(self, n: int) -> list[tuple[str, str]]:
        return [("Host", self._host_header), ("Authorization", self._auth[n % len(self._auth)])]

    async def join(self, code: str, n: int) -> tuple[str | None, bytes]:
        """``GET /api/v1/meetings/{code}``: (failure or None, body)."""
        try:
            status, body = await self._pool.request("GET", _JOIN_PATH + code, self._headers(n))
        except (OSError, HttpError, h11.ProtocolError) as exc:
            return _call_failure(exc), b""
        return (None if status == 200 else _failure(status, body)), body

    async def create(self, n: int) -> tuple[str | None, tuple[str, str] | None]:
        """``POST /api/v1/meetings``: (failure or None, (meeting_id, code))."""
        body = json.dumps({"display_name": f"bench meeting {n}"}).encode()
        try:
            status, payload = await self._pool.request(
                "POST", "/api/v1/meetings", self._headers(n), body
            )
        except (OSError, HttpError, h11.ProtocolError) as exc:
            return _call_failure(exc), None
        if status != 201:
            return _failure(status, payload), None
        try:
            created = json.loads(payload)
            return None, (str(created["meeting_id"]), str(created["meeting_code"]))
        except (ValueError, KeyError, TypeError):
            return "BAD_CREATE_RESPONSE", None

    def close(self) -> None:
        self._pool.close()


# --------------------------------------------------------------------------
# Jobs


async def _create(config: JoinLoadConfig, client: Client) -> dict[str, object]:
    """``count`` meetings, ``concurrency`` at a time, each retried a little."""
    meetings: list[tuple[str, str] | None] = [None] * config.count
    errors: Counter[str] = Counter()
    pending = iter(range(config.count))

    async def create(n: int) -> tuple[str, str] | None:
        for _ in range(_CREATE_ATTEMPTS):
            failure, meeting = await client.create(n)
            if failure is None:
                return meeting
            errors[failure] += 1
        return None

    async def join(n: int, code: str) -> bool:
        for _ in range(_CREATE_ATTEMPTS):
            failure, _ = await client.join(code, n)
            if failure is None:
                return True
            errors["JOIN_" + failure] += 1
        return False

    async def worker() -> None:
        for n in pending:
            meeting = await create(n)
            if meeting is not None and (not config.join or await join(n, meeting[1])):
                meetings[n] = meeting

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(config.concurrency, config.count or 1))))
    seconds = time.perf_counter() - started
    created = [list(m) for m in meetings if m is not None]
    return {
        "meetings": created,
        "seconds": seconds,
        "per_s": len(created) / seconds if seconds > 0 else 0.0,
        "errors": dict(errors),
    }


async def _probe(config: JoinLoadConfig, client: Client) -> dict[str, object]:
    """One meeting created and joined, each retried until it works."""
    started = time.perf_counter()
    attempts = 0
    last = "no attempt"
    meeting: tuple[str, str] | None = None
    while time.perf_counter() - started < config.ready_timeout_s:
        attempts += 1
        if meeting is None:
            failure, meeting = await client.create(attempts)
        if meeting is not None:
            failure, body = await client.join(meeting[1], attempts)
            if failure is None:
                return {
                    "seconds": time.perf_counter() - started,
                    "attempts": attempts,
                    "meeting": list(meeting),
                    "body": body.decode(),
                }
        last = failure or last
        await asyncio.sleep(_PROBE_INTERVAL_S)
    raise SystemExit(f"no join succeeded within {config.ready_timeout_s:.0f} s: last {last}")


def _us(seconds: float) -> int:
    return min(max(round(seconds * 1e6), 1), _HISTOGRAM_MAX_US)


def _percentiles(histogram: HdrHistogram, count: int) -> dict[str, float | None]:
    def ms(percentile: float) -> float | None:
        return float(histogram.get_value_at_percentile(percentile)) / 1000.0 if count else None

    return {
        "p50": ms(50.0),
        "p95": ms(95.0),
        "p99": ms(99.0),
        "p999": ms(99.9),
        "max": float(histogram.get_max_value()) / 1000.0 if count else None,
        "mean": float(histogram.get_mean_value()) / 1000.0 if count else None,
    }


def open_loop_counts(rate: float, warmup_s: float, duration_s: float) -> tuple[int, int]:
    """Requests of an open-loop run: (warm-up, measured). By index, so that
    float rounding never moves a request across the window's edge."""
    return round(rate * warmup_s), max(1, round(rate * duration_s))


#: One open-loop request: ``call(i)`` -> failure label or None.
OpenCall = Callable[[int], Awaitable[str | None]]


class _ClassFigures:
    """What one class of requests (a kind of join, a server) got in the
    measured window."""

    def __init__(self) -> None:
        self.latency = HdrHistogram(1, _HISTOGRAM_MAX_US, 3)
        self.errors: Counter[str] = Counter()
        self.ok = 0
        self.ok_in_window = 0
        self.sent = 0

    def result(self, duration_s: float) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "calls": self.ok,
            "throughput": self.ok_in_window / duration_s if duration_s > 0 else 0.0,
            "latency_ms": _percentiles(self.latency, self.ok),
            "errors": dict(self.errors),
        }


async def measure_open_loop(
    *,
    rate: float,
    warmup_s: float,
    duration_s: float,
    timeout_s: float,
    call: OpenCall,
    classes: Callable[[int], Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Send request ``i`` at ``t0 + i / rate`` (whatever became of the
    earlier ones) and time it from that intended instant to its completion.
    A request still unanswered ``timeout_s`` after its intended time -
    waiting for a connection included - is a ``CLIENT_TIMEOUT``. With
    ``classes``, each measured request is also counted under every label
    ``classes(i)`` names (``by_class`` in the result)."""
    loop = asyncio.get_running_loop()
    warmup, measured = open_loop_counts(rate, warmup_s, duration_s)
    interval = 1.0 / rate
    t0 = loop.time() + _LEAD_S
    window_start = t0 + warmup * interval
    window_end = window_start + duration_s
    latency = HdrHistogram(1, _HISTOGRAM_MAX_US, 3)
    lag = HdrHistogram(1, _HISTOGRAM_MAX_US, 3)
    errors: Counter[str] = Counter()
    counts = {"sent": 0, "ok": 0, "ok_in_window": 0, "warmup_ok": 0, "warmup_errors": 0}
    failed: list[int] = []
    by_class: dict[str, _ClassFigures] = {}

    def labels(i: int) -> list[_ClassFigures]:
        if classes is None:
            return []
        return [by_class.setdefault(label, _ClassFigures()) for label in classes(i)]

    async def one(i: int, intended: float) -> None:
        try:
            async with asyncio.timeout_at(intended + timeout_s):
                failure = await call(i)
        except TimeoutError:
            failure = "CLIENT_TIMEOUT"
        end = loop.time()
        in_window = failure is None and window_start <= end < window_end
        if failure is not None:
            failed.append(i)
        elif in_window:
            counts["ok_in_window"] += 1
        for figures in labels(i):
            figures.ok_in_window += in_window
        if i < warmup:
            counts["warmup_errors" if failure else "warmup_ok"] += 1
        elif failure is not None:
            errors[failure] += 1
            for figures in labels(i):
                figures.errors[failure] += 1
        else:
            counts["ok"] += 1
            latency.record_value(_us(end - intended))
            for figures in labels(i):
                figures.ok += 1
                figures.latency.record_value(_us(end - intended))

    async def markers() -> None:
        await asyncio.sleep(max(window_start - loop.time(), 0.0))
        _emit("measure_start")
        await asyncio.sleep(max(window_end - loop.time(), 0.0))
        _emit("measure_end")

    marker_task = asyncio.create_task(markers())
    tasks: set[asyncio.Task[None]] = set()
    for i in range(warmup + measured):
        intended = t0 + i * interval
        delay = intended - loop.time()
        # Yield even when late, so started requests make progress.
        await asyncio.sleep(max(delay, 0.0))
        if i >= warmup:
            counts["sent"] += 1
            lag.record_value(_us(max(loop.time() - intended, 0.0)))
            for figures in labels(i):
                figures.sent += 1
        task = asyncio.create_task(one(i, intended))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await marker_task
    if tasks:
        await asyncio.gather(*tasks)
    ok = counts["ok"]
    extra: dict[str, Any] = {}
    if classes is not None:
        extra["by_class"] = {
            label: figures.result(duration_s) for label, figures in sorted(by_class.items())
        }
    return {
        **extra,
        "rate": rate,
        "sent": counts["sent"],
        "calls": ok,
        "seconds": duration_s,
        # What the server delivered during the window (below ``rate`` when it
        # cannot keep up).
        "throughput": counts["ok_in_window"] / duration_s if duration_s > 0 else 0.0,
        "latency_ms": _percentiles(latency, ok),
        "send_lag_ms": {
            "p99": lag.get_value_at_percentile(99.0) / 1000.0 if counts["sent"] else None,
            "max": lag.get_max_value() / 1000.0 if counts["sent"] else None,
        },
        "errors": dict(errors),
        "warmup_calls": counts["warmup_ok"],
        "warmup_errors": counts["warmup_errors"],
        "failed_indices": sorted(failed),
    }


async def _open(config: JoinLoadConfig, client: Client) -> dict[str, object]:
    codes = config.codes
    total = sum(open_loop_counts(config.rate, config.warmup_s, config.duration_s))
    if not config.cycle and len(codes) < total:
        raise SystemExit(f"first joins need {total} meetings, got {len(codes)}")

    async def join(i: int) -> str | None:
        failure, _ = await client.join(codes[i % len(codes)], i)
        return failure

    result = await measure_open_loop(
        rate=config.rate,
        warmup_s=config.warmup_s,
        duration_s=config.duration_s,
        timeout_s=config.timeout_s,
        call=join,
    )
    failed = result.pop("failed_indices")
    result["failed_codes"] = sorted({codes[i % len(codes)] for i in failed})
    result["connections"] = client.connections
    return result


FIRST_JOIN = "first_join"
RE_JOIN = "re_join"


@dataclass(frozen=True, slots=True)
class MixedRequest:
    """Where request ``i`` of a mixed run goes and what it joins."""

    first: bool
    #: The request's number among those of its kind (first joins consume
    #: meetings in this order; re-joins cycle over theirs with it).
    index: int
    #: Which server (0 = ``port``, then ``also_ports``).
    server: int

    @property
    def kind(self) -> str:
        return FIRST_JOIN if self.first else RE_JOIN


def mixed_schedule(total: int, first_share: float, servers: int) -> list[MixedRequest]:
    """The ``total`` requests of a mixed run. First joins are spread evenly
    (request ``i`` is one when ``floor((i + 1) * share)`` steps up), so every
    stretch of the run has the same mix; each kind takes the servers in turn
    by its own count, so neither kind lands on one server when the share and
    the server count line up (a share of 1/2 over two servers)."""
    share = Fraction(first_share).limit_denominator(10_000)
    counts = {True: 0, False: 0}
    plan = []
    for i in range(total):
        first = (i + 1) * share // 1 > i * share // 1
        index = counts[first]
        counts[first] += 1
        plan.append(MixedRequest(first, index, index % servers))
    return plan


def mixed_first_joins(rate: float, warmup_s: float, duration_s: float, first_share: float) -> int:
    """Meetings a mixed run consumes for its first joins (warm-up included)."""
    total = sum(open_loop_counts(rate, warmup_s, duration_s))
    return sum(request.first for request in mixed_schedule(total, first_share, 1))


async def _mixed(config: JoinLoadConfig, client: Client) -> dict[str, object]:
    total = sum(open_loop_counts(config.rate, config.warmup_s, config.duration_s))
    clients = [client] + [
        Client(replace(config, port=port), config.max_connections) for port in config.also_ports
    ]
    plan = mixed_schedule(total, config.first_share, len(clients))
    firsts = sum(request.first for request in plan)
    if len(config.first_codes) < firsts:
        raise SystemExit(f"first joins need {firsts} meetings, got {len(config.first_codes)}")

    async def join(i: int) -> str | None:
        request = plan[i]
        if request.first:
            code = config.first_codes[request.index]
        else:
            code = config.codes[request.index % len(config.codes)]
        failure, _ = await clients[request.server].join(code, i)
        return failure

    try:
        result = await measure_open_loop(
            rate=config.rate,
            warmup_s=config.warmup_s,
            duration_s=config.duration_s,
            timeout_s=config.timeout_s,
            call=join,
            classes=lambda i: (plan[i].kind, f"server_{plan[i].server}"),
        )
    finally:
        for extra in clients[1:]:
            extra.close()
    result.pop("failed_indices")
    result["first_share"] = config.first_share
    result["connections"] = sum(c.connections for c in clients)
    return result


async def _closed(config: JoinLoadConfig, client: Client) -> dict[str, object]:
    codes = config.codes
    next_index = 0

    async def join(w: int) -> str | None:
        nonlocal next_index
        n = next_index
        next_index += 1
        try:
            async with asyncio.timeout(config.timeout_s):
                failure, _ = await client.join(codes[n % len(codes)], n)
        except TimeoutError:
            return "CLIENT_TIMEOUT"
        return failure

    result = await measure_closed_loop(
        concurrency=config.concurrency,
        warmup_s=config.warmup_s,
        duration_s=config.duration_s,
        call=join,
    )
    result["connections"] = client.connections
    return result


# --------------------------------------------------------------------------


_JOBS: dict[str, Callable[[JoinLoadConfig, Client], Awaitable[dict[str, object]]]] = {
    "create": _create,
    "probe": _probe,
    "open": _open,
    "closed": _closed,
    "mixed": _mixed,
}


async def run(config: JoinLoadConfig) -> None:
    limit = config.concurrency if config.mode in ("create", "closed") else config.max_connections
    client = Client(config, limit)
    try:
        _emit("result", **await _JOBS[config.mode](config, client))
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1:
        print("usage: python -m darktower.cli.bench.join_loadgen CONFIG.json", file=sys.stderr)
        return 2
    asyncio.run(run(JoinLoadConfig.load(Path(args[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
