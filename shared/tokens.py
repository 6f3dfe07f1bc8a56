"""JWT validation and minting for every token of SPEC §4.

Validation is synchronous and does no I/O in the common case, because it runs
on the hot path of both flavours: grpclib handlers (asyncio) and HTTP handlers
(trio) call it directly. The only I/O it could need - fetching a JWKS after a
key rotation - is handed back to the caller as :class:`KeyRefreshNeeded`, and
the flavoured wrappers :meth:`TokenValidator.validate_trio` and
:meth:`TokenValidator.validate_asyncio` do that fetch in a worker thread.

Failure classes follow SPEC §3: :class:`Unauthenticated` when we cannot trust
the token at all (missing, malformed, expired, bad signature, unknown key,
too large, wrong algorithm) and :class:`PermissionDenied` when the token is
genuine but does not grant this call (wrong audience, missing scope, ``sub``
not the caller's id). RFC 7519 would call a wrong ``aud`` "invalid"; the spec
deliberately reports it as PERMISSION_DENIED because the signature proved who
the caller is - only the grant is wrong - and that is the more useful answer
to an operator who pointed an MC token at the wrong service.

Tokens and keys never appear in exception messages, ``repr`` or logs.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import math
import threading
import time
import types
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import jwt
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.types import Options

from darktower.shared.jwks import KeyStore
from darktower.shared.keys import b64url_decode

__all__ = [
    "ALGORITHM",
    "AUD_GC",
    "AUD_MC",
    "MAX_IAT_FUTURE_S",
    "MAX_TOKEN_BYTES",
    "MEETING_TOKEN_TTL_S",
    "SCOPE_MC_ASSIGN",
    "SCOPE_MC_REGISTER",
    "SCOPE_MEETING_CREATE",
    "SCOPE_MEETING_JOIN",
    "SCOPE_MEETING_PARTICIPANT",
    "SCOPE_MH_REGISTER",
    "SERVICE_TOKEN_TTL_S",
    "USER_TOKEN_TTL_S",
    "AuthError",
    "Claims",
    "KeyRefreshNeeded",
    "PermissionDenied",
    "TokenValidator",
    "Unauthenticated",
    "ValidatorStatistics",
    "bearer_token",
    "mint_gc_token",
    "mint_mc_token",
    "mint_meeting_token",
    "mint_mh_token",
    "mint_token",
    "mint_user_token",
]

#: The one algorithm any token may use (SPEC §4).
ALGORITHM: Final = "EdDSA"
#: Refused before any parsing: decoding is the expensive, attackable part.
MAX_TOKEN_BYTES: Final = 8192
#: ``iat`` further ahead than this is a clock gone wrong or a forged lifetime.
MAX_IAT_FUTURE_S: Final = 300.0
#: A verified signature is trusted from the cache for at most this long, so a
#: key withdrawn from the JWKS stops being honoured within five minutes.
CACHE_TTL_S: Final = 300.0
DEFAULT_LEEWAY_S: Final = 5.0

AUD_GC: Final = "gc"
AUD_MC: Final = "mc"
SCOPE_MC_REGISTER: Final = "mc.register"
SCOPE_MH_REGISTER: Final = "mh.register"
SCOPE_MC_ASSIGN: Final = "mc.assign"
SCOPE_MEETING_JOIN: Final = "meeting.join"
SCOPE_MEETING_CREATE: Final = "meeting.create"
SCOPE_MEETING_PARTICIPANT: Final = "meeting.participant"

#: Service tokens are configuration (MC_SERVICE_TOKEN, GC_SERVICE_TOKEN), so a
#: dev token lasts a day; a real AC issues and rotates its own.
SERVICE_TOKEN_TTL_S: Final = 24 * 3600
USER_TOKEN_TTL_S: Final = 3600
#: SPEC §4: meeting tokens live ten minutes.
MEETING_TOKEN_TTL_S: Final = 600

_BEARER_PREFIX: Final = "Bearer "
_RESERVED_CLAIMS: Final = frozenset({"sub", "aud", "scope", "iat", "exp", "jti"})
# pyjwt reads the real wall clock for exp/nbf/iat and cannot take an injected
# one, and its iat rule (refuse any future iat) is not ours: it only verifies
# the signature and parses, and every claim rule lives in _check_claims.
_DECODE_OPTIONS: Final[Options] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
}


class AuthError(Exception):
    """A request's credentials were refused.

    ``reason`` is a short fixed phrase from this module (safe to log, never
    token content); ``public_message`` is what a client may be told.
    """

    public_message: ClassVar[str] = "authentication failed"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unauthenticated(AuthError):
    """The token cannot be trusted at all → UNAUTHENTICATED / HTTP 401."""

    public_message: ClassVar[str] = "missing or invalid credentials"


class PermissionDenied(AuthError):
    """The token is genuine but does not grant this call → PERMISSION_DENIED / 403."""

    public_message: ClassVar[str] = "permission denied"


class KeyRefreshNeeded(Unauthenticated):
    """Internal: the token's ``kid`` is unknown and the JWKS may be re-fetched now.

    Raised only by the synchronous :meth:`TokenValidator.validate`, which must
    not block on a fetch. It subclasses :class:`Unauthenticated` so a caller
    that ignores it fails closed; the async wrappers catch it, refresh in a
    thread and validate once more.
    """


def bearer_token(authorization: str | None) -> str:
    """The token in an ``Authorization`` value ``Bearer <jwt>``.

    The prefix is case-sensitive (SPEC §4, RFC 6750 as the spec reads it); a
    missing header, another scheme or an empty token is :class:`Unauthenticated`.
    """
    if authorization is None or not authorization.startswith(_BEARER_PREFIX):
        raise Unauthenticated("missing bearer token")
    token = authorization[len(_BEARER_PREFIX) :]
    if not token:
        raise Unauthenticated("missing bearer token")
    return token


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified claims of a token.

    ``raw`` is the whole payload (read-only), for claims this class does not
    name; it is left out of ``repr`` and comparisons so that logging a
    ``Claims`` prints ids, not everything a token carried.
    """

    sub: str
    audiences: tuple[str, ...]
    scopes: frozenset[str]
    exp: float
    iat: float | None
    org_id: str | None
    meeting_id: str | None
    jti: str | None
    nbf: float | None = None
    raw: Mapping[str, object] = field(
        default_factory=lambda: types.MappingProxyType({}), repr=False, compare=False
    )


def _numeric(payload: Mapping[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    # bool is an int, and JSON admits NaN/Infinity: exp=Infinity never expires.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise Unauthenticated(f"malformed {name}")
    return float(value)


def _optional_str(payload: Mapping[str, Any], name: str) -> str | None:
    value = payload.get(name)
    if value is None or isinstance(value, str):
        return value
    raise Unauthenticated(f"malformed {name}")


def _claims_from_payload(payload: dict[str, Any]) -> Claims:
    sub = payload.get("sub")
    if not isinstance(sub, str) or not sub:
        raise Unauthenticated("missing sub")
    aud = payload.get("aud")
    if aud is None:
        audiences: tuple[str, ...] = ()
    elif isinstance(aud, str):
        audiences = (aud,)
    elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
        audiences = tuple(aud)
    else:
        raise Unauthenticated("malformed aud")
    scope = payload.get("scope", "")
    if not isinstance(scope, str):
        raise Unauthenticated("malformed scope")
    exp = _numeric(payload, "exp")
    if exp is None:
        raise Unauthenticated("missing exp")
    return Claims(
        sub=sub,
        audiences=audiences,
        scopes=frozenset(scope.split()),
        exp=exp,
        iat=_numeric(payload, "iat"),
        org_id=_optional_str(payload, "org_id"),
        meeting_id=_optional_str(payload, "meeting_id"),
        jti=_optional_str(payload, "jti"),
        nbf=_numeric(payload, "nbf"),
        raw=types.MappingProxyType(payload),
    )


@dataclass(frozen=True, slots=True)
class ValidatorStatistics:
    """What :meth:`TokenValidator.statistics` reports (for metrics and tests)."""

    cache_entries: int
    cache_hits: int
    cache_misses: int


def _unverified_header(token: str) -> dict[str, Any]:
    """The JOSE header, parsed only to learn ``alg`` and ``kid``.

    Not ``jwt.get_unverified_header``: that decodes all three segments, and
    pyjwt decodes them again when verifying - a second full pass on the
    cache-miss path that costs about a quarter of a validation.
    """
    parts = token.split(".")
    if len(parts) != 3:  # header.payload.signature
        raise Unauthenticated("malformed token")
    try:
        header = json.loads(b64url_decode(parts[0]))
    except (ValueError, RecursionError):
        raise Unauthenticated("malformed token") from None
    if not isinstance(header, dict):
        raise Unauthenticated("malformed token")
    return header


class TokenValidator:
    """Validates tokens against a :class:`KeyStore`, with a signature cache.

    Signature verification dominates the cost of a validation, and a GC sees
    the same MC token on every heartbeat, so verified tokens are cached by
    their exact string (bounded LRU of ``cache_size``; 0 disables it). An
    entry lives until the token's ``exp`` or :data:`CACHE_TTL_S`, whichever is
    sooner; a hit skips only the signature - time, audience, scope and subject
    are checked on every call. Only signature-verified tokens enter the
    cache, so garbage cannot evict real entries.

    ``wall_clock`` (epoch seconds) is what ``exp``/``nbf``/``iat`` are compared
    with; tests inject it. Thread-safe.
    """

    def __init__(
        self,
        keys: KeyStore,
        *,
        leeway_s: float = DEFAULT_LEEWAY_S,
        wall_clock: Callable[[], float] = time.time,
        cache_size: int = 10_000,
    ) -> None:
        if leeway_s < 0 or cache_size < 0:
            raise ValueError("leeway_s and cache_size must be >= 0")
        self._keys = keys
        self._leeway = leeway_s
        self._now = wall_clock
        self._cache_size = cache_size
        self._cache: OrderedDict[str, tuple[Claims, float]] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._hits = 0
        self._misses = 0

    def __repr__(self) -> str:
        return (
            f"<TokenValidator leeway_s={self._leeway} cache_size={self._cache_size}"
            f" cached={len(self._cache)}>"
        )

    def statistics(self) -> ValidatorStatistics:
        """Signature-cache size and hit/miss counts since construction."""
        with self._cache_lock:
            return ValidatorStatistics(len(self._cache), self._hits, self._misses)

    def validate(
        self, token: str, *, audience: str, scope: str, subject: str | None = None
    ) -> Claims:
        """Synchronous: the claims of ``token`` if it grants ``scope`` at ``audience``.

        With ``subject``, the token's ``sub`` must equal it (an MC acting as
        itself). Raises :class:`Unauthenticated` or :class:`PermissionDenied`;
        raises :class:`KeyRefreshNeeded` when the key is unknown but the JWKS
        may be re-fetched - call the async wrappers to have that handled.
        """
        return self._validate(token, audience, scope, subject, refresh_allowed=True)

    async def validate_trio(
        self, token: str, *, audience: str, scope: str, subject: str | None = None
    ) -> Claims:
        """Trio-flavoured :meth:`validate` that re-fetches the JWKS on an unknown key.

        The fetch runs in a worker thread (it is blocking urllib) and is
        abandoned if the caller is cancelled; validation is retried exactly
        once after it.
        """
        try:
            return self._validate(token, audience, scope, subject, refresh_allowed=True)
        except KeyRefreshNeeded:
            pass
        await trio.to_thread.run_sync(self._keys.refresh, abandon_on_cancel=True)
        return self._validate(token, audience, scope, subject, refresh_allowed=False)

    async def validate_asyncio(
        self, token: str, *, audience: str, scope: str, subject: str | None = None
    ) -> Claims:
        """Asyncio-flavoured :meth:`validate` (for grpclib handlers), same contract
        as :meth:`validate_trio`; the fetch runs in the loop's default executor.
        """
        try:
            return self._validate(token, audience, scope, subject, refresh_allowed=True)
        except KeyRefreshNeeded:
            pass
        await asyncio.get_running_loop().run_in_executor(None, self._keys.refresh)
        return self._validate(token, audience, scope, subject, refresh_allowed=False)

    def _validate(
        self,
        token: str,
        audience: str,
        scope: str,
        subject: str | None,
        *,
        refresh_allowed: bool,
    ) -> Claims:
        if not isinstance(token, str) or not token:
            raise Unauthenticated("missing token")
        # Character count bounds byte count from below, and a non-ASCII token
        # is garbage anyway: together these enforce the byte limit exactly.
        if len(token) > MAX_TOKEN_BYTES:
            raise Unauthenticated("token too large")
        if not token.isascii():
            raise Unauthenticated("malformed token")
        now = self._now()
        claims = self._cached(token, now)
        if claims is None:
            claims = self._verify(token, refresh_allowed=refresh_allowed)
            self._remember(token, claims, now)
        self._check_claims(claims, now, audience, scope, subject)
        return claims

    def _verify(self, token: str, *, refresh_allowed: bool) -> Claims:
        header = _unverified_header(token)
        # Checked here as well as by pyjwt's algorithms=[...]: the pin must
        # not depend on how a library treats the key type it is handed.
        if header.get("alg") != ALGORITHM:
            raise Unauthenticated("algorithm not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("missing kid")
        key = self._keys.get(kid)
        if key is None:
            if refresh_allowed and self._keys.may_refresh():
                raise KeyRefreshNeeded("unknown kid")
            raise Unauthenticated("unknown kid")
        try:
            payload = jwt.decode(token, key, algorithms=[ALGORITHM], options=_DECODE_OPTIONS)
        except jwt.InvalidSignatureError:
            raise Unauthenticated("bad signature") from None
        except jwt.PyJWTError:
            # `from None`: pyjwt messages can quote decoded token fragments.
            raise Unauthenticated("malformed token") from None
        return _claims_from_payload(payload)

    def _check_claims(
        self, claims: Claims, now: float, audience: str, scope: str, subject: str | None
    ) -> None:
        # Trust first (401), then grant (403): an expired token with the wrong
        # scope is "log in again", not "you may not".
        if claims.exp + self._leeway <= now:
            raise Unauthenticated("token expired")
        if claims.nbf is not None and claims.nbf - self._leeway > now:
            raise Unauthenticated("token not yet valid")
        if claims.iat is not None and claims.iat - MAX_IAT_FUTURE_S > now:
            raise Unauthenticated("iat in the future")
        if audience not in claims.audiences:
            raise PermissionDenied("wrong audience")
        if scope not in claims.scopes:
            raise PermissionDenied("missing scope")
        if subject is not None and claims.sub != subject:
            raise PermissionDenied("subject mismatch")

    def _cached(self, token: str, now: float) -> Claims | None:
        with self._cache_lock:
            entry = self._cache.get(token)
            if entry is not None:
                claims, valid_until = entry
                if now < valid_until:
                    self._cache.move_to_end(token)
                    self._hits += 1
                    return claims
                del self._cache[token]
            self._misses += 1
            return None

    def _remember(self, token: str, claims: Claims, now: float) -> None:
        valid_until = min(claims.exp, now + CACHE_TTL_S)
        if self._cache_size == 0 or valid_until <= now:
            return
        with self._cache_lock:
            self._cache[token] = (claims, valid_until)
            self._cache.move_to_end(token)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)


def mint_token(
    private_key: Ed25519PrivateKey,
    *,
    kid: str,
    sub: str,
    audience: str,
    scopes: Sequence[str],
    ttl_s: int,
    extra: Mapping[str, object] | None = None,
    now: float | None = None,
) -> str:
    """An EdDSA JWT with ``kid`` in its header and iat/exp/aud/sub/scope/jti claims.

    Every token gets a ``jti`` (uuid4), not only meeting tokens: it costs
    nothing, lets logs and revocation name one token, and makes two tokens
    minted in the same second distinct. ``extra`` adds claims (``org_id``,
    ``meeting_id``) but may not override the ones above - a caller doing so
    is a bug. ``now`` (epoch seconds) is for tests.
    """
    if not kid or not sub:
        raise ValueError("kid and sub must be non-empty")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    for s in scopes:
        if s.split() != [s]:  # empty, or with whitespace (str.isspace's)
            raise ValueError("each scope must be non-empty and contain no whitespace")
    if extra is not None and _RESERVED_CLAIMS & extra.keys():
        raise ValueError("extra may not override " + ", ".join(sorted(_RESERVED_CLAIMS)))
    issued = int(time.time() if now is None else now)
    payload: dict[str, object] = {
        "sub": sub,
        "aud": audience,
        "scope": " ".join(scopes),
        "iat": issued,
        "exp": issued + ttl_s,
        "jti": str(uuid.uuid4()),
    }
    if extra is not None:
        payload.update(extra)
    return _sign_compact(private_key, kid, payload)


@functools.lru_cache(maxsize=64)
def _header_segment(kid: str) -> bytes:
    """The encoded JOSE header of our tokens: exactly pyjwt's (sorted keys,
    compact separators), computed once per ``kid``."""
    header = {"alg": ALGORITHM, "kid": kid, "typ": "JWT"}
    return _b64(json.dumps(header, separators=(",", ":"), sort_keys=True).encode())


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _sign_compact(private_key: Ed25519PrivateKey, kid: str, payload: dict[str, object]) -> str:
    """The compact JWS of ``payload``, byte for byte what
    ``jwt.encode(payload, private_key, algorithm="EdDSA", headers={"kid": kid})``
    produces (Ed25519 signatures are deterministic; ``tests/test_tokens.py``
    compares the two). Minting is on every join's path, and pyjwt's generic
    machinery around the signature (header validation, algorithm lookup,
    key preparation, copies) cost as much again as the signature itself."""
    signing_input = (
        _header_segment(kid) + b"." + _b64(json.dumps(payload, separators=(",", ":")).encode())
    )
    return (signing_input + b"." + _b64(private_key.sign(signing_input))).decode("ascii")


def mint_mc_token(
    private_key: Ed25519PrivateKey,
    *,
    kid: str,
    mc_id: str,
    ttl_s: int = SERVICE_TOKEN_TTL_S,
    now: float | None = None,
) -> str:
    """MC service token: MC → GC gRPC (aud ``gc``, scope ``mc.register``, sub = MC id)."""
    return mint_token(
        private_key,
        kid=kid,
        sub=mc_id,
        audience=AUD_GC,
        scopes=[SCOPE_MC_REGISTER],
        ttl_s=ttl_s,
        now=now,
    )


def mint_mh_token(
    private_key: Ed25519PrivateKey,
    *,
    kid: str,
    mh_id: str,
    ttl_s: int = SERVICE_TOKEN_TTL_S,
    now: float | None = None,
) -> str:
    """MH service token: MH → GC gRPC (aud ``gc``, scope ``mh.register``, sub = MH id)."""
    return mint_token(
        private_key,
        kid=kid,
        sub=mh_id,
        audience=AUD_GC,
        scopes=[SCOPE_MH_REGISTER],
        ttl_s=ttl_s,
        now=now,
    )


def mint_gc_token(
    private_key: Ed25519PrivateKey,
    *,
    kid: str,
    gc_id: str,
    ttl_s: int = SERVICE_TOKEN_TTL_S,
    now: float | None = None,
) -> str:
    """GC service token: GC → MC gRPC (aud ``mc``, scope ``mc.assign``, sub = GC id)."""
    return mint_token(
        private_key,
        kid=kid,
        sub=gc_id,
        audience=AUD_MC,
        scopes=[SCOPE_MC_ASSIGN],
        ttl_s=ttl_s,
        now=now,
    )


def mint_user_token(
    private_key: Ed25519PrivateKey,
    *,
    kid: str,
    user_id: str,
    org_id: str,
    scopes: Sequence[str] = (SCOPE_MEETING_JOIN, SCOPE_MEETING_CREATE),
    ttl_s: int = USER_TOKEN_TTL_S,
    now: float | None = None,
) -> str:
    """User token: user → GC HTTP (aud ``gc``, sub = user id, ``org_id``)."""
    return mint_token(
        private_key,
        kid=kid,
        sub=user_id,
        audience=AUD_GC,
        scopes=scopes,
        ttl_s=ttl_s,
        extra={"org_id": org_id},
        now=now,
    )


def mint_meeting_token(
    private_key: Ed25519PrivateKey,
    *,
    kid: str,
    participant_id: str,
    meeting_id: str,
    ttl_s: int = MEETING_TOKEN_TTL_S,
    now: float | None = None,
) -> str:
    """Meeting token: GC → user → MC (aud ``mc``, scope ``meeting.participant``,
    sub = participant, ``meeting_id``, ``jti``; ten minutes by default)."""
    return mint_token(
        private_key,
        kid=kid,
        sub=participant_id,
        audience=AUD_MC,
        scopes=[SCOPE_MEETING_PARTICIPANT],
        ttl_s=ttl_s,
        extra={"meeting_id": meeting_id},
        now=now,
    )
