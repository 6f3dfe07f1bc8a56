"""Fenced per-meeting state in Redis (SPEC §7.2, §7.3); trio-flavoured.

Every write goes through one hand-written Lua script, ``mc/fencing.lua``,
which compares the writer's generation and MC id with the stored ones and
writes only if the writer holds the newest generation - atomically, so two
MCs given the same meeting can never both believe they own it.

The script is a module-level object: its SHA-1 is computed locally once at
import, it is loaded with ``SCRIPT LOAD`` (eagerly by :meth:`MeetingStateStore.load_scripts`
at start-up, or lazily by the first call) and invoked with ``EVALSHA``. A
``NOSCRIPT`` reply (Redis restarted, failed over or ``SCRIPT FLUSH``\\ ed) loads
it again and retries exactly once. coredis's own :class:`coredis.commands.Script`
does the same, but it swallows every error of the reload (bare ``except``) and
cannot be counted; this is the same dozen lines, explicit.

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
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar

import coredis
import coredis.exceptions

from darktower.shared.validation import InvalidArgument, node_id

#: The fencing script's source and its SHA-1 (what ``SCRIPT LOAD`` returns).
FENCING_SCRIPT: bytes = (
    importlib.resources.files("darktower.mc").joinpath("fencing.lua").read_bytes()
)
FENCING_SHA: str = hashlib.sha1(FENCING_SCRIPT, usedforsecurity=False).hexdigest()

#: Generations are the wire's ``uint64``.
GENERATION_MAX = 2**64 - 1
#: How long a released meeting's generation is kept, so that a late retry of
#: the released assignment is still fenced out (and the key still expires).
DEFAULT_TOMBSTONE_TTL_S = 24 * 3600.0

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


class MeetingStateError(Exception):
    """Redis answered something this module cannot make sense of (a bug)."""


class RedisUnavailable(MeetingStateError):
    """Redis could not be reached or cannot serve writes right now."""


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
    #: ``NOSCRIPT`` replies that made it reload.
    noscript_reloads: int = 0


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


class MeetingStateStore:
    """Fenced per-meeting state on one coredis client. Trio-flavoured: create
    and call it from trio code, like the client itself.

    Cheap to create (no I/O): the script is loaded by :meth:`load_scripts`
    or by the first call. Safe to share between tasks. Use a client with
    ``decode_responses=False`` (coredis's default): payloads are bytes.
    """

    def __init__(
        self,
        client: coredis.Redis[Any],
        *,
        key_prefix: str = "",
        tombstone_ttl_s: float = DEFAULT_TOMBSTONE_TTL_S,
    ) -> None:
        if tombstone_ttl_s < 0:
            raise ValueError("tombstone_ttl_s must be >= 0 (0 keeps tombstones forever)")
        self._client = client
        self._prefix = key_prefix
        self._tombstone_ttl_ms = round(tombstone_ttl_s * 1000)
        self._statistics = MeetingStateStoreStatistics()

    def statistics(self) -> MeetingStateStoreStatistics:
        """A copy of the counters."""
        return dataclasses.replace(self._statistics)

    def keys(self, meeting_id: str) -> tuple[str, str, str, str]:
        """The meeting's keys: gen, owner, mh, state (see the module docs)."""
        base = f"{self._prefix}meeting:{{{meeting_id}}}:"
        return base + "gen", base + "owner", base + "mh", base + "state"

    async def load_scripts(self) -> None:
        """``SCRIPT LOAD`` the fencing script now (at start-up, so a Redis
        that cannot run it fails the start rather than the first assignment).
        Raises :class:`RedisUnavailable` if Redis cannot be reached."""
        try:
            await self._load()
        except _UNAVAILABLE as exc:
            raise RedisUnavailable(f"Redis unavailable: {exc}") from exc
        except coredis.exceptions.RedisError as exc:
            raise MeetingStateError(f"loading the fencing script failed: {exc}") from exc

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
        _validate_common(meeting_id, generation, mc_id)
        if isinstance(mh_assignments, bytes):
            payload = mh_assignments
        else:
            payload = json.dumps(
                [dict(a) for a in mh_assignments], separators=(",", ":"), sort_keys=True
            ).encode()
        reply = await self._run(meeting_id, "claim", generation, mc_id, [payload])
        return _result(ClaimOutcome, reply)

    async def release(self, meeting_id: str, generation: int, mc_id: str) -> ReleaseResult:
        """Delete the meeting's state if ``mc_id`` owns it at ``generation``
        (or ``generation`` is newer than the stored one). The generation is
        kept as a tombstone for ``tombstone_ttl_s``, so a late claim at it or
        below is still :attr:`~ClaimOutcome.FENCED_OUT`. Releasing an already
        released generation again is :attr:`~ReleaseOutcome.RELEASED`."""
        _validate_common(meeting_id, generation, mc_id)
        reply = await self._run(
            meeting_id, "release", generation, mc_id, [str(self._tombstone_ttl_ms).encode()]
        )
        return _result(ReleaseOutcome, reply)

    async def write(
        self,
        meeting_id: str,
        generation: int,
        mc_id: str,
        fields: Mapping[str, str | bytes],
    ) -> WriteResult:
        """Set ``fields`` in the meeting's state hash, only if ``mc_id`` owns
        the meeting at exactly ``generation`` (claimed and not released)."""
        _validate_common(meeting_id, generation, mc_id)
        if not fields:
            raise InvalidArgument("fields", "must not be empty")
        args: list[bytes] = []
        for name, value in fields.items():
            if not name:
                raise InvalidArgument("fields", "names must not be empty")
            args += [name.encode(), value if isinstance(value, bytes) else value.encode()]
        reply = await self._run(meeting_id, "write", generation, mc_id, args)
        return _result(WriteOutcome, reply)

    async def read(self, meeting_id: str) -> MeetingState:
        """The meeting's stored state (for tests and operators; not fenced,
        and not one atomic snapshot of the four keys)."""
        if not _MEETING_ID_RE.fullmatch(meeting_id):
            raise InvalidArgument(
                "meeting_id", "must be 1-255 printable ASCII characters without '{' or '}'"
            )
        gen_key, owner_key, mh_key, state_key = self.keys(meeting_id)
        try:
            values = await self._client.mget([gen_key, owner_key, mh_key])
            state = await self._client.hgetall(state_key)
        except _UNAVAILABLE as exc:
            raise RedisUnavailable(f"Redis unavailable: {exc}") from exc
        except coredis.exceptions.RedisError as exc:
            raise MeetingStateError(f"reading meeting state failed: {exc}") from exc
        gen, owner, mh = (None if v is None else _bytes(v) for v in values)
        return MeetingState(
            generation=None if gen is None else int(gen),
            owner=None if owner is None else owner.decode(),
            mh_assignments=mh,
            state={_bytes(k): _bytes(v) for k, v in state.items()},
        )

    async def _load(self) -> None:
        self._statistics.script_loads += 1
        sha = _text(await self._client.script_load(FENCING_SCRIPT))
        if sha != FENCING_SHA:
            raise MeetingStateError(f"SCRIPT LOAD returned {sha}, expected {FENCING_SHA}")

    async def _run(
        self, meeting_id: str, op: str, generation: int, mc_id: str, extra: list[bytes]
    ) -> list[str]:
        keys = self.keys(meeting_id)
        args: list[str | bytes] = [op, str(generation), mc_id, *extra]
        try:
            try:
                reply = await self._client.evalsha(FENCING_SHA, keys, args)
            except coredis.exceptions.NoScriptError:
                # Redis lost its script cache (restart, failover, SCRIPT FLUSH).
                # Retry once only: a second NOSCRIPT is not a cache miss but a bug.
                self._statistics.noscript_reloads += 1
                await self._load()
                reply = await self._client.evalsha(FENCING_SHA, keys, args)
        except _UNAVAILABLE as exc:
            raise RedisUnavailable(f"Redis unavailable: {exc}") from exc
        except coredis.exceptions.RedisError as exc:
            raise MeetingStateError(f"fencing script failed: {exc}") from exc
        if not isinstance(reply, list | tuple) or len(reply) != 5:
            raise MeetingStateError(f"fencing script: unexpected reply {reply!r}")
        return [_text(v) for v in reply]


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise MeetingStateError(f"unexpected reply element {value!r}")


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
