"""Fenced per-meeting state in Redis (SPEC §7.2, §7.3); trio-flavoured.

Every write goes through one hand-written Lua script, ``mc/fencing.lua``,
which compares the writer's generation and MC id with the stored ones and
writes only if the writer holds the newest generation - atomically, so two
MCs given the same meeting can never both believe they own it.

The script is a module-level object: its SHA-1 is computed locally once at
import, it is loaded with ``SCRIPT LOAD`` (eagerly by :meth:`MeetingStateStore.load_scripts`
at start-up, or lazily by the first call) and invoked with ``EVALSHA``. A
``NOSCRIPT`` reply (Redis restarted, failed over or ``SCRIPT FLUSH``\\ ed) loads
it again and retries the refused operations exactly once. coredis's own
:class:`coredis.commands.Script` does the same, but it swallows every error of
the reload (bare ``except``) and cannot be counted; this is the same dozen
lines, explicit.

Group commit. A lone ``EVALSHA`` through coredis costs about 375 µs of CPU on
trio (connection lease, cancel scopes, telemetry hooks, per command); the same
``EVALSHA`` inside a pipeline of 8 costs about 65 µs, of 32 about 42 µs. So
fenced operations (:meth:`~MeetingStateStore.claim`,
:meth:`~MeetingStateStore.release`, :meth:`~MeetingStateStore.write` and their
``*_many`` forms) are not sent by their callers: they are queued for one
batching task, :meth:`MeetingStateStore.run`, which sends whatever is queued
as one pipeline (one batch of requests on one connection, no ``MULTI``: each
``EVALSHA`` is atomic by itself, and operations of different callers must not
fail together on another's error), waits for the answers, hands every caller
its own reply or error, and sends what queued up meanwhile as the next
pipeline - the way a database group-commits its log. Nothing waits to fill a
batch: an operation arriving while the pipe is idle goes out at once, alone;
under load the batches grow by themselves (bounded by ``max_batch``). How much
depends on how the callers arrive: the fencing watch hands over a hundred
writes at once (``write_many``); assignments arrive in bunches because the
seam's asyncio loop runs every ready gRPC callback in one trio round
(:mod:`darktower.shared.seam`), so under ``dt bench assign`` (64 concurrent
calls) a claim batch carries about 25 claims - with trio-asyncio's stock
loop, one callback per round, they trickled in one by one and a batch
averaged about 1.2. Every batch is bounded in time (``batch_timeout_s``, the
``NOSCRIPT`` reload and retry included); when it runs out, every operation of
the batch fails with :class:`RedisUnavailable` (coredis drops the connection
the batch was waiting on) and the next batch goes out as usual.

The batcher must be running for fenced operations (start it with
``nursery.start(store.run)`` in the nursery that owns the store's users, or
``async with store.running():``); without it they raise
:class:`StoreNotRunning` at once. A caller cancelled while it waits is just
forgotten: its operation is not sent if it is still queued (if it is already
on the wire, Redis applies it, as with any cancelled request), and no other
caller nor the batcher notices. :meth:`~MeetingStateStore.read` and
:meth:`~MeetingStateStore.load_scripts` are plain direct calls.

Keys, for meeting ``m`` and the store's ``key_prefix`` ``p``::

    p meeting:{m}:gen     generation of the last claim or release
    p meeting:{m}:owner   MC id holding it (absent once released)
    p meeting:{m}:mh      MH assignments payload
    p meeting:{m}:state   hash of further fenced state (:meth:`MeetingStateStore.write`)

The ``{m}`` hash tag keeps one meeting's keys in one cluster slot; different
meetings never share a key, so they never contend.

Errors: inputs are validated before any I/O (:class:`~darktower.shared.validation.InvalidArgument`);
coredis exceptions are translated here, once (:data:`_UNAVAILABLE`), into
:class:`RedisUnavailable` or :class:`MeetingStateError` - nothing above this
module catches coredis exceptions by name.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import importlib.resources
import json
import re
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

import coredis
import coredis.exceptions
import trio
from coredis.commands import CommandRequest
from coredis.commands.constants import CommandName

from darktower.shared.logging import get_logger
from darktower.shared.validation import InvalidArgument, node_id

log = get_logger(__name__)

#: The fencing script's source and its SHA-1 (what ``SCRIPT LOAD`` returns).
FENCING_SCRIPT: bytes = (
    importlib.resources.files("darktower.mc").joinpath("fencing.lua").read_bytes()
)
FENCING_SHA: str = hashlib.sha1(FENCING_SCRIPT, usedforsecurity=False).hexdigest()

#: MH assignments as stored: compact JSON with sorted keys, so an idempotent
#: repeat stores identical bytes. Built once (``json.dumps`` with options
#: builds an encoder per call).
_PAYLOAD_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)

#: Generations are the wire's ``uint64``.
GENERATION_MAX = 2**64 - 1
#: How long a released meeting's generation is kept, so that a late retry of
#: the released assignment is still fenced out (and the key still expires).
DEFAULT_TOMBSTONE_TTL_S = 24 * 3600.0

#: Most fenced operations sent in one pipeline: big enough that a fencing
#: watch round over thousands of meetings costs a few tens of µs per meeting,
#: small enough that one batch never holds Redis (or an assignment queued
#: behind it) for long.
DEFAULT_MAX_BATCH = 128
#: Bound on one batch, its NOSCRIPT reload and retry included: a half-open
#: connection fails the batch's operations instead of stalling every caller.
DEFAULT_BATCH_TIMEOUT_S = 5.0

#: Meeting ids become part of key names: printable ASCII without braces (a
#: brace would break the ``{id}`` hash tag), at most 255 characters.
_MEETING_ID_RE = re.compile(r"[\x21-\x7a\x7c\x7e]{1,255}")

#: The one map from coredis exceptions to ours: these mean "Redis cannot
#: answer right now" (connection refused or lost, timeout, loading, a replica
#: after failover, cluster reconfiguring); callers may retry later.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    coredis.exceptions.ConnectionError,  # includes BusyLoadingError, ProtocolError
    coredis.exceptions.ReadOnlyError,
    coredis.exceptions.ClusterDownError,
    coredis.exceptions.TryAgainError,
    TimeoutError,
    OSError,
)
#: Everything a call into coredis may raise on Redis trouble or an error reply.
_REDIS_ERRORS: tuple[type[BaseException], ...] = (coredis.exceptions.RedisError, *_UNAVAILABLE)


class MeetingStateError(Exception):
    """Redis answered something this module cannot make sense of (a bug)."""


class RedisUnavailable(MeetingStateError):
    """Redis could not be reached or cannot serve writes right now."""


class StoreNotRunning(RedisUnavailable):
    """The store's batcher (:meth:`MeetingStateStore.run`) is not running -
    not started yet, or stopped (the MC is shutting down): no fenced write
    can be made through it now."""


class ClaimOutcome(enum.Enum):
    #: Nothing was stored: the writer now owns the meeting.
    CLAIMED = "CLAIMED"
    #: An older generation was stored (any owner, possibly the writer itself):
    #: replaced. Its fenced state (:meth:`MeetingStateStore.write`) is dropped.
    TOOK_OVER = "TOOK_OVER"
    #: Same generation, same owner: an idempotent repeat (payload rewritten).
    ALREADY_OWNED = "ALREADY_OWNED"
    #: A newer generation is stored, or this generation was released.
    FENCED_OUT = "FENCED_OUT"
    #: Same generation, another MC: the GC handed one generation out twice.
    SPLIT_BRAIN = "SPLIT_BRAIN"


class ReleaseOutcome(enum.Enum):
    #: State deleted (or nothing was there); the generation stays as a tombstone.
    RELEASED = "RELEASED"
    FENCED_OUT = "FENCED_OUT"
    SPLIT_BRAIN = "SPLIT_BRAIN"


class WriteOutcome(enum.Enum):
    WRITTEN = "WRITTEN"
    #: The writer's generation is newer than the stored one (or nothing is
    #: stored): it must :meth:`~MeetingStateStore.claim` first.
    NOT_CLAIMED = "NOT_CLAIMED"
    FENCED_OUT = "FENCED_OUT"
    SPLIT_BRAIN = "SPLIT_BRAIN"


_REFUSALS = frozenset({"FENCED_OUT", "SPLIT_BRAIN", "NOT_CLAIMED"})

OutcomeT = TypeVar("OutcomeT", ClaimOutcome, ReleaseOutcome, WriteOutcome)


@dataclasses.dataclass(frozen=True, slots=True)
class FenceResult(Generic[OutcomeT]):
    """What one fenced operation did, and the stored state after it.

    On a refusal ``generation``/``owner`` are the stored state that refused
    the writer (unchanged); on success they are the writer's. ``owner`` is
    ``None`` for a released meeting, ``generation`` ``None`` when nothing is
    stored. ``previous_*`` is what was stored before a successful operation.
    """

    outcome: OutcomeT
    generation: int | None
    owner: str | None
    previous_generation: int | None = None
    previous_owner: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the write happened (not fenced out, split-brained or unclaimed)."""
        return self.outcome.value not in _REFUSALS


ClaimResult = FenceResult[ClaimOutcome]
ReleaseResult = FenceResult[ReleaseOutcome]
WriteResult = FenceResult[WriteOutcome]


@dataclasses.dataclass(frozen=True, slots=True)
class MeetingState:
    """A meeting's stored state, as :meth:`MeetingStateStore.read` saw it."""

    generation: int | None
    owner: str | None
    mh_assignments: bytes | None
    state: dict[bytes, bytes]

    def mh_assignments_json(self) -> object:
        """The payload decoded as JSON (what :meth:`MeetingStateStore.claim`
        stores for a list of dicts); ``None`` when there is none."""
        return None if self.mh_assignments is None else json.loads(self.mh_assignments)


@dataclasses.dataclass(slots=True)
class MeetingStateStoreStatistics:
    #: ``SCRIPT LOAD`` calls made by this store (start-up and NOSCRIPT reloads).
    script_loads: int = 0
    #: ``NOSCRIPT`` replies that made it reload (at most one reload per batch).
    noscript_reloads: int = 0
    #: Operations sent again after their batch reloaded the script.
    noscript_retried: int = 0
    #: Pipelines sent by the batcher (NOSCRIPT retries not counted).
    batches: int = 0
    #: Fenced operations sent in them (cancelled-while-queued ones are not sent).
    operations: int = 0
    #: The most operations one pipeline carried.
    largest_batch: int = 0


def encode_mh_assignments(mh_assignments: Sequence[Mapping[str, Any]]) -> bytes:
    """The bytes :meth:`MeetingStateStore.claim` stores for a list of MH
    assignments (compact JSON, sorted keys)."""
    return _PAYLOAD_ENCODER.encode([dict(a) for a in mh_assignments]).encode()


def _validate_common(meeting_id: str, generation: int, mc_id: str) -> None:
    if not _MEETING_ID_RE.fullmatch(meeting_id):
        raise InvalidArgument(
            "meeting_id", "must be 1-255 printable ASCII characters without '{' or '}'"
        )
    # bool is an int: refuse it rather than fence with generation 1.
    if isinstance(generation, bool) or not isinstance(generation, int):
        raise InvalidArgument("generation", "must be an integer")
    if not 1 <= generation <= GENERATION_MAX:
        raise InvalidArgument("generation", f"must be between 1 and {GENERATION_MAX}")
    node_id("mc_id", mc_id)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, str):
        return value
    raise MeetingStateError(f"fencing script: unexpected reply element {value!r}")


def _optional_int(value: str) -> int | None:
    return int(value) if value else None


def _translated(exc: BaseException, what: str) -> MeetingStateError:
    """The one map from a coredis (or socket) exception to ours."""
    error: MeetingStateError
    if isinstance(exc, _UNAVAILABLE):
        error = RedisUnavailable(f"Redis unavailable: {exc}")
    else:
        error = MeetingStateError(f"{what} failed: {exc}")
    error.__cause__ = exc
    return error


class _Waiter:
    """One caller's operations: the event is set once every one of them has
    a reply or an error. ``abandoned`` marks a caller that was cancelled (its
    still-queued operations are then not sent)."""

    __slots__ = ("abandoned", "done", "remaining")

    def __init__(self, count: int) -> None:
        self.done = trio.Event()
        self.remaining = count
        self.abandoned = False


class _Op:
    """One fenced operation: the script's keys and arguments, then its raw
    reply or its (already translated) error."""

    __slots__ = ("args", "error", "keys", "noscript", "reply", "settled", "waiter")

    def __init__(self, keys: tuple[str, ...], args: list[str | bytes], waiter: _Waiter) -> None:
        self.keys = keys
        self.args = args
        self.waiter = waiter
        self.reply: object = None
        self.error: MeetingStateError | None = None
        self.settled = False
        self.noscript = False

    def resolve(self, reply: object) -> None:
        if not self.settled:
            self.reply = reply
            self._settle()

    def fail(self, error: MeetingStateError) -> None:
        if not self.settled:
            self.error = error
            self._settle()

    def _settle(self) -> None:
        self.settled = True
        waiter = self.waiter
        waiter.remaining -= 1
        if waiter.remaining == 0:
            waiter.done.set()


#: (meeting id, generation, MH assignments) of one claim in :meth:`MeetingStateStore.claim_many`.
ClaimItem = tuple[str, int, Sequence[Mapping[str, Any]] | bytes]
#: (meeting id, generation, fields) of one write in :meth:`MeetingStateStore.write_many`.
WriteItem = tuple[str, int, Mapping[str, str | bytes]]


class MeetingStateStore:
    """Fenced per-meeting state on one coredis client. Trio-flavoured: create
    and call it from trio code, like the client itself.

    Cheap to create (no I/O). Fenced operations need the batcher running
    (:meth:`run`, or :meth:`running`); the script is loaded by
    :meth:`load_scripts` or by the first batch. Safe to share between tasks.
    Use a client with ``decode_responses=False`` (coredis's default):
    payloads are bytes.
    """

    def __init__(
        self,
        client: coredis.Redis[Any],
        *,
        key_prefix: str = "",
        tombstone_ttl_s: float = DEFAULT_TOMBSTONE_TTL_S,
        max_batch: int = DEFAULT_MAX_BATCH,
        batch_timeout_s: float = DEFAULT_BATCH_TIMEOUT_S,
    ) -> None:
        if tombstone_ttl_s < 0:
            raise ValueError("tombstone_ttl_s must be >= 0 (0 keeps tombstones forever)")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if not batch_timeout_s > 0:
            raise ValueError("batch_timeout_s must be > 0")
        self._client = client
        self._prefix = key_prefix
        self._tombstone_ttl = str(round(tombstone_ttl_s * 1000)).encode()
        self._max_batch = max_batch
        self._batch_timeout_s = batch_timeout_s
        self._statistics = MeetingStateStoreStatistics()
        self._queue: deque[_Op] = deque()
        self._running = False
        #: Set by a caller to wake the idle batcher; ``None`` while it works.
        self._wakeup: trio.Event | None = None

    def statistics(self) -> MeetingStateStoreStatistics:
        """A copy of the counters."""
        return dataclasses.replace(self._statistics)

    def keys(self, meeting_id: str) -> tuple[str, str, str, str]:
        """The meeting's keys: gen, owner, mh, state (see the module docs)."""
        base = f"{self._prefix}meeting:{{{meeting_id}}}:"
        return base + "gen", base + "owner", base + "mh", base + "state"

    # -- lifecycle ------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The batcher: send queued fenced operations, one pipeline at a time,
        until cancelled (trio-flavoured; ``await nursery.start(store.run)``).

        Ready at once (no I/O). Never raises on Redis trouble - that is every
        affected caller's error, not the batcher's. When it ends, every
        operation still queued or on the wire fails with
        :class:`StoreNotRunning`, and so does every later one.
        """
        if self._running:
            raise RuntimeError("this MeetingStateStore's batcher is already running")
        self._running = True
        batch: list[_Op] = []
        try:
            task_status.started()
            while True:
                if not self._queue:
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    self._wakeup = None
                    continue
                batch = self._take_batch()
                if batch:
                    await self._send_batch(batch)
                batch = []
        finally:
            self._running = False
            self._wakeup = None
            stopped = "the meeting state store's batcher stopped"
            for op in (*batch, *self._queue):
                op.fail(StoreNotRunning(stopped))
            self._queue.clear()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[MeetingStateStore]:
        """The batcher for the duration of the block, in a nursery of its own
        (for code that owns no suitable nursery: tools, tests). Note that an
        exception leaving the block arrives wrapped in an exception group."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.run)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    async def load_scripts(self) -> None:
        """``SCRIPT LOAD`` the fencing script now (at start-up, so a Redis
        that cannot run it fails the start rather than the first assignment).
        Raises :class:`RedisUnavailable` if Redis cannot be reached."""
        try:
            await self._load()
        except _REDIS_ERRORS as exc:
            raise _translated(exc, "loading the fencing script") from exc

    # -- fenced operations -------------------------------------------------------

    async def claim(
        self,
        meeting_id: str,
        generation: int,
        mc_id: str,
        mh_assignments: Sequence[Mapping[str, Any]] | bytes,
    ) -> ClaimResult:
        """Store ``mh_assignments`` for the meeting under ``generation`` and
        ``mc_id``, if the fence allows (:class:`ClaimOutcome`).

        A list of dicts is stored as compact JSON with sorted keys (so an
        idempotent repeat stores identical bytes); bytes are stored as given.
        """
        op = self._claim_op(meeting_id, generation, mc_id, mh_assignments, _Waiter(1))
        await self._submit([op])
        return _raise_or_result(ClaimOutcome, op)

    async def release(self, meeting_id: str, generation: int, mc_id: str) -> ReleaseResult:
        """Delete the meeting's state if ``mc_id`` owns it at ``generation``
        (or ``generation`` is newer than the stored one). The generation is
        kept as a tombstone for ``tombstone_ttl_s``, so a late claim at it or
        below is still :attr:`~ClaimOutcome.FENCED_OUT`. Releasing an already
        released generation again is :attr:`~ReleaseOutcome.RELEASED`."""
        _validate_common(meeting_id, generation, mc_id)
        op = _Op(
            self.keys(meeting_id),
            ["release", str(generation), mc_id, self._tombstone_ttl],
            _Waiter(1),
        )
        await self._submit([op])
        return _raise_or_result(ReleaseOutcome, op)

    async def write(
        self,
        meeting_id: str,
        generation: int,
        mc_id: str,
        fields: Mapping[str, str | bytes],
    ) -> WriteResult:
        """Set ``fields`` in the meeting's state hash, only if ``mc_id`` owns
        the meeting at exactly ``generation`` (claimed and not released)."""
        op = self._write_op(meeting_id, generation, mc_id, fields, _Waiter(1))
        await self._submit([op])
        return _raise_or_result(WriteOutcome, op)

    async def claim_many(
        self, mc_id: str, claims: Sequence[ClaimItem]
    ) -> list[ClaimResult | MeetingStateError]:
        """:meth:`claim` for many meetings at once (queued together, so they
        share pipelines): per claim, its result or its error - one failed
        claim does not fail the others. Inputs are validated first (any bad
        one raises :class:`InvalidArgument` before anything is sent)."""
        waiter = _Waiter(len(claims))
        ops = [self._claim_op(m, g, mc_id, mh, waiter) for m, g, mh in claims]
        await self._submit(ops)
        return [_result_or_error(ClaimOutcome, op) for op in ops]

    async def write_many(
        self, mc_id: str, writes: Sequence[WriteItem]
    ) -> list[WriteResult | MeetingStateError]:
        """:meth:`write` for many meetings at once, as :meth:`claim_many`."""
        waiter = _Waiter(len(writes))
        ops = [self._write_op(m, g, mc_id, fields, waiter) for m, g, fields in writes]
        await self._submit(ops)
        return [_result_or_error(WriteOutcome, op) for op in ops]

    async def read(self, meeting_id: str) -> MeetingState:
        """The meeting's stored state (for tests and operators; not fenced,
        not batched, and not one atomic snapshot of the four keys)."""
        if not _MEETING_ID_RE.fullmatch(meeting_id):
            raise InvalidArgument(
                "meeting_id", "must be 1-255 printable ASCII characters without '{' or '}'"
            )
        gen_key, owner_key, mh_key, state_key = self.keys(meeting_id)
        try:
            values = await self._client.mget([gen_key, owner_key, mh_key])
            state = await self._client.hgetall(state_key)
        except _REDIS_ERRORS as exc:
            raise _translated(exc, "reading meeting state") from exc
        gen, owner, mh = (None if v is None else _bytes(v) for v in values)
        return MeetingState(
            generation=None if gen is None else int(gen),
            owner=None if owner is None else owner.decode(),
            mh_assignments=mh,
            state={_bytes(k): _bytes(v) for k, v in state.items()},
        )

    # -- internals -----------------------------------------------------------

    def _claim_op(
        self,
        meeting_id: str,
        generation: int,
        mc_id: str,
        mh_assignments: Sequence[Mapping[str, Any]] | bytes,
        waiter: _Waiter,
    ) -> _Op:
        _validate_common(meeting_id, generation, mc_id)
        if isinstance(mh_assignments, bytes):
            payload = mh_assignments
        else:
            payload = encode_mh_assignments(mh_assignments)
        return _Op(self.keys(meeting_id), ["claim", str(generation), mc_id, payload], waiter)

    def _write_op(
        self,
        meeting_id: str,
        generation: int,
        mc_id: str,
        fields: Mapping[str, str | bytes],
        waiter: _Waiter,
    ) -> _Op:
        _validate_common(meeting_id, generation, mc_id)
        if not fields:
            raise InvalidArgument("fields", "must not be empty")
        args: list[str | bytes] = ["write", str(generation), mc_id]
        for name, value in fields.items():
            if not name:
                raise InvalidArgument("fields", "names must not be empty")
            args += [name.encode(), value if isinstance(value, bytes) else value.encode()]
        return _Op(self.keys(meeting_id), args, waiter)

    async def _submit(self, ops: list[_Op]) -> None:
        """Queue ``ops`` for the batcher and wait until each has its answer.

        A cancelled caller leaves at once; its operations still queued are
        skipped by the batcher, and nobody else is affected.
        """
        if not self._running:
            raise StoreNotRunning(
                "the meeting state store's batcher is not running (start MeetingStateStore.run)"
            )
        if not ops:
            return
        waiter = ops[0].waiter
        self._queue.extend(ops)
        if self._wakeup is not None:
            self._wakeup.set()
        try:
            await waiter.done.wait()
        finally:
            if not waiter.done.is_set():
                waiter.abandoned = True

    def _take_batch(self) -> list[_Op]:
        """Up to ``max_batch`` queued operations, in order, skipping those of
        cancelled callers."""
        queue = self._queue
        batch: list[_Op] = []
        while queue and len(batch) < self._max_batch:
            op = queue.popleft()
            if not op.waiter.abandoned:
                batch.append(op)
        return batch

    async def _send_batch(self, batch: list[_Op]) -> None:
        """Send one batch and settle every operation in it. Raises nothing
        but cancellation: Redis trouble becomes the operations' errors."""
        statistics = self._statistics
        statistics.batches += 1
        statistics.operations += len(batch)
        statistics.largest_batch = max(statistics.largest_batch, len(batch))
        failure: tuple[type[MeetingStateError], str, BaseException | None] | None = None
        try:
            with trio.fail_after(self._batch_timeout_s):
                await self._pipeline(batch, retry=False)
                refused = [op for op in batch if op.noscript]
                if refused:
                    # Redis lost its script cache (restart, failover, SCRIPT
                    # FLUSH): load once for the batch and retry exactly the
                    # refused operations, once - the others are done, and a
                    # second NOSCRIPT is not a cache miss but a bug.
                    statistics.noscript_reloads += 1
                    statistics.noscript_retried += len(refused)
                    await self._load()
                    await self._pipeline(refused, retry=True)
        except trio.TooSlowError as exc:
            message = f"Redis unavailable: no answer within {self._batch_timeout_s:g} s"
            failure = (RedisUnavailable, message, exc)
        except _REDIS_ERRORS as exc:
            translated = _translated(exc, "fencing script")
            failure = (type(translated), str(translated), exc)
        except Exception as exc:
            # A bug (here or in coredis) must fail this batch's callers, as it
            # would have failed each of them without batching - not the
            # batcher, which serves every meeting of the MC.
            log.exception("meeting_state_batch_failed")
            failure = (MeetingStateError, f"fencing script failed: {exc!r}", exc)
        if failure is not None:
            kind, message, cause = failure
            for op in batch:
                if not op.settled:
                    # One instance per caller: an exception object raised in
                    # several tasks would collect all their tracebacks.
                    error = kind(message)
                    error.__cause__ = cause
                    op.fail(error)

    async def _pipeline(self, ops: list[_Op], *, retry: bool) -> None:
        """One pipeline of ``EVALSHA`` for ``ops`` on a pooled connection;
        settles each operation except those refused with
        ``NOSCRIPT`` on the first try (marked for the retry). Raises what
        fails the pipeline as a whole."""
        commands: list[CommandRequest[Any]] = [
            CommandRequest(
                CommandName.EVALSHA,
                FENCING_SHA,
                len(op.keys),
                *op.keys,
                *op.args,
                execution_parameters={},
            )
            for op in ops
        ]
        # A pipeline is one request batch on one connection - what
        # coredis's ``Redis.pipeline()`` sends too, minus its per-batch
        # context managers, telemetry hooks and per-command wrappers: about
        # 90 µs less CPU per batch on trio, the bulk of a batch of one (a
        # lone claim: 444 µs through ``pipeline()``, 356 µs this way; 41
        # against 26 µs per operation in batches of 64). The connection goes
        # back to the pool before the answers are awaited, as coredis does
        # for its own commands: a connection lost while leased would
        # otherwise cost the pool one of its slots for good.
        pool = self._client.connection_pool
        connection = await pool.get_connection()
        try:
            request = connection.create_request_batch(commands)
        finally:
            pool.release(connection)
        replies = await request
        if len(replies) != len(ops):
            raise MeetingStateError(f"pipeline answered {replies!r} for {len(ops)} operations")
        for op, reply in zip(ops, replies, strict=True):
            if isinstance(reply, coredis.exceptions.NoScriptError) and not retry:
                op.noscript = True
            elif isinstance(reply, BaseException):
                op.fail(_translated(reply, "fencing script"))
            else:
                op.resolve(reply)

    async def _load(self) -> None:
        self._statistics.script_loads += 1
        sha = _text(await self._client.script_load(FENCING_SCRIPT))
        if sha != FENCING_SHA:
            raise MeetingStateError(f"SCRIPT LOAD returned {sha}, expected {FENCING_SHA}")


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise MeetingStateError(f"unexpected reply element {value!r}")


def _reply_fields(reply: object) -> list[str]:
    if not isinstance(reply, list | tuple) or len(reply) != 5:
        raise MeetingStateError(f"fencing script: unexpected reply {reply!r}")
    return [_text(v) for v in reply]


def _raise_or_result(kind: type[OutcomeT], op: _Op) -> FenceResult[OutcomeT]:
    if op.error is not None:
        raise op.error
    return _result(kind, _reply_fields(op.reply))


def _result_or_error(kind: type[OutcomeT], op: _Op) -> FenceResult[OutcomeT] | MeetingStateError:
    if op.error is not None:
        return op.error
    try:
        return _result(kind, _reply_fields(op.reply))
    except MeetingStateError as exc:
        return exc


def _result(kind: type[OutcomeT], reply: list[str]) -> FenceResult[OutcomeT]:
    outcome, gen, owner, prev_gen, prev_owner = reply
    try:
        parsed = kind(outcome)
    except ValueError:
        raise MeetingStateError(f"fencing script: unexpected outcome {outcome!r}") from None
    if parsed.value in _REFUSALS:
        return FenceResult(parsed, _optional_int(gen), owner or None)
    return FenceResult(
        parsed,
        _optional_int(gen),
        owner or None,
        previous_generation=_optional_int(prev_gen),
        previous_owner=prev_owner or None,
    )
