"""Public keys for token validation, loaded from JWKS files and URLs.

``AUTH_JWKS`` names one or more JWKS documents (the AC's, the GC's); their
keys are merged into one ``kid`` → key map, so a validator never needs to know
who issued a token. Reads of the map are lock-free (the map is replaced, never
mutated), so validating on the event loop never waits for a fetch running in a
worker thread.

Keys rotate: when a token names a ``kid`` we don't hold, the sources are
fetched again - but at most once per :data:`REFETCH_INTERVAL_S`, because the
``kid`` is attacker-controlled and every unknown one must not cost a fetch.
Fetching is blocking I/O (urllib); callers run :meth:`KeyStore.refresh` in a
worker thread (see :mod:`darktower.shared.tokens`).

Only Ed25519 keys for EdDSA are accepted - the algorithm is pinned system-wide
(SPEC §4). Anything else in a document (RSA keys from a shared AC JWKS, for
instance) is skipped with a warning rather than failing the whole source.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from darktower.shared.keys import b64url_decode, okp_thumbprint
from darktower.shared.logging import get_logger

__all__ = [
    "FETCH_TIMEOUT_S",
    "MAX_JWKS_BYTES",
    "REFETCH_INTERVAL_S",
    "JwksError",
    "KeyStore",
    "KeyStoreStatistics",
    "describe_source",
    "parse_sources",
]

log = get_logger(__name__)

#: Minimum time between two fetches triggered by unknown ``kid`` values.
REFETCH_INTERVAL_S = 30.0
#: Bound on one source's fetch, so a slow JWKS host cannot stall validation
#: (the first request after a rotation waits for it).
FETCH_TIMEOUT_S = 2.0
#: A JWKS holds a handful of keys (~200 bytes each); anything larger is a
#: misconfigured URL or a hostile server.
MAX_JWKS_BYTES = 64 * 1024

_ED25519_KEY_BYTES = 32


class JwksError(Exception):
    """A JWKS source could not be loaded.

    The message names the source (with any URL credentials and query string
    removed) and the problem; it never contains the document or key material.
    """


class _Skip(Exception):
    """One JWK in a document is unusable; the reason is safe to log."""


class _Readable(Protocol):
    def read1(self, n: int = -1, /) -> bytes: ...


def parse_sources(setting: str) -> list[str]:
    """Split an ``AUTH_JWKS`` value (comma-separated paths/URLs) into sources.

    Blank entries are dropped so that a trailing comma is harmless.
    """
    return [part.strip() for part in setting.split(",") if part.strip()]


def _is_url(source: str) -> bool:
    return "://" in source


def describe_source(source: str) -> str:
    """``source`` as it may appear in logs and errors.

    URLs lose their user-info, query and fragment, which is where credentials
    for a JWKS endpoint would live; paths are shown as given.
    """
    if not _is_url(source):
        return source
    parts = urlsplit(source)
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ":<invalid port>"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def _read_capped(stream: _Readable, *, limit: int, deadline: float | None) -> bytes:
    # Read in chunks so that both the size cap and the overall deadline hold
    # even against a server that trickles bytes (urllib's timeout bounds each
    # socket operation, not the whole response). read1 returns whatever one
    # socket read brings - read(n) would wait for all n bytes - so the
    # deadline is checked at least once per socket timeout.
    chunks: list[bytes] = []
    total = 0
    while True:
        if deadline is not None and time.monotonic() > deadline:
            raise JwksError("timed out")
        chunk = stream.read1(min(16 * 1024, limit + 1 - total))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise JwksError(f"larger than {limit} bytes")
        if deadline is not None and time.monotonic() > deadline:
            raise JwksError("timed out")


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A JWKS URL is configured exactly: following a redirect would send the
    Basic-auth credentials to whatever host it names (urllib copies headers),
    and could downgrade https to http. A 3xx becomes an HTTPError instead."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def _parse_jwk(jwk: object) -> tuple[str, Ed25519PublicKey]:
    """``(kid, key)`` for one JWK, or :class:`_Skip` with a loggable reason."""
    if not isinstance(jwk, Mapping):
        raise _Skip("not a JSON object")
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty != "OKP" or crv != "Ed25519":
        raise _Skip(f"unsupported key type kty={kty!r:.20} crv={crv!r:.20}")
    alg = jwk.get("alg")
    if alg not in (None, "EdDSA"):
        raise _Skip(f"unsupported alg={alg!r:.20}")
    use = jwk.get("use")
    if use not in (None, "sig"):
        raise _Skip(f"not a signing key use={use!r:.20}")
    if "d" in jwk:
        # A published private key is a leak, not a key to trust.
        raise _Skip("contains private key material")
    x = jwk.get("x")
    if not isinstance(x, str):
        raise _Skip("missing x")
    try:
        raw = b64url_decode(x)
    except ValueError:
        raise _Skip("x is not base64url") from None
    if len(raw) != _ED25519_KEY_BYTES:
        raise _Skip("x is not a 32-byte Ed25519 key")
    kid = jwk.get("kid", okp_thumbprint(x))
    if not isinstance(kid, str) or not kid:
        raise _Skip("kid is not a non-empty string")
    return kid, Ed25519PublicKey.from_public_bytes(raw)


def _parse_jwks(document: bytes, label: str) -> dict[str, Ed25519PublicKey]:
    try:
        parsed = json.loads(document)
    except (ValueError, UnicodeDecodeError):
        raise JwksError("not valid JSON") from None
    keys = parsed.get("keys") if isinstance(parsed, dict) else None
    if not isinstance(keys, list):
        raise JwksError('not a JWKS (no "keys" list)')
    out: dict[str, Ed25519PublicKey] = {}
    for index, jwk in enumerate(keys):
        try:
            kid, key = _parse_jwk(jwk)
        except _Skip as skip:
            log.warning("jwks_key_ignored", source=label, index=index, reason=str(skip))
            continue
        if kid in out:
            log.warning("jwks_duplicate_kid_ignored", source=label, index=index, kid=kid)
            continue
        out[kid] = key
    return out


@dataclass(frozen=True, slots=True)
class KeyStoreStatistics:
    """What :meth:`KeyStore.statistics` reports (for metrics and tests)."""

    keys: int
    refreshes: int
    failed_fetches: int


class KeyStore:
    """The merged set of public keys from every configured JWKS source.

    Construction loads every source and raises :class:`JwksError` if any of
    them fails, or if together they hold no usable key: a validator that
    starts without its keys would refuse every token while looking healthy.
    Construction blocks on I/O (up to ``fetch_timeout_s`` per source); a
    trio-flavoured caller runs it with ``trio.to_thread.run_sync``.

    ``clock`` drives only the refetch rate limit (monotonic seconds), so tests
    can move time without sleeping.
    """

    def __init__(
        self,
        sources: Sequence[str],
        *,
        clock: Callable[[], float] = time.monotonic,
        refetch_interval_s: float = REFETCH_INTERVAL_S,
        fetch_timeout_s: float = FETCH_TIMEOUT_S,
        max_bytes: int = MAX_JWKS_BYTES,
    ) -> None:
        if isinstance(sources, str):
            raise TypeError("sources is a sequence of paths/URLs; use parse_sources() on a setting")
        if not sources:
            raise JwksError("no JWKS source configured")
        for source in sources:
            if not _is_url(source):
                continue
            try:
                scheme = urlsplit(source).scheme
            except ValueError:
                raise JwksError("invalid JWKS URL") from None
            if scheme not in ("http", "https"):
                raise JwksError(f"unsupported JWKS source {describe_source(source)}: not http(s)")
        self._sources = tuple(sources)
        self._clock = clock
        self._interval = refetch_interval_s
        self._timeout = fetch_timeout_s
        self._max_bytes = max_bytes
        # Serialises refreshes; readers never take it.
        self._lock = threading.Lock()
        # None = no refetch yet: the first unknown kid after startup may fetch
        # at once (a freshly rotated key should not cost 30 s of refusals).
        self._last_refresh: float | None = None
        self._refreshes = 0
        self._failed_fetches = 0
        self._by_source: dict[str, dict[str, Ed25519PublicKey]] = {}
        for source in self._sources:
            self._by_source[source] = self._load(source)
        self._keys = self._merge()
        if not self._keys:
            raise JwksError(
                "no usable Ed25519 (EdDSA) key in "
                + ", ".join(describe_source(s) for s in self._sources)
            )

    @classmethod
    def from_setting(cls, setting: str, *, clock: Callable[[], float] = time.monotonic) -> KeyStore:
        """A store for an ``AUTH_JWKS``-style comma-separated value (blocking)."""
        return cls(parse_sources(setting), clock=clock)

    def __repr__(self) -> str:
        return f"<KeyStore sources={len(self._sources)} keys={len(self._keys)}>"

    @property
    def kids(self) -> frozenset[str]:
        """The ``kid`` of every key currently held (public ids, safe to log)."""
        return frozenset(self._keys)

    def statistics(self) -> KeyStoreStatistics:
        """Keys held, refetches done and source fetches failed since startup."""
        return KeyStoreStatistics(len(self._keys), self._refreshes, self._failed_fetches)

    def get(self, kid: str) -> Ed25519PublicKey | None:
        """The key for ``kid`` from memory, or None. Never does I/O."""
        return self._keys.get(kid)

    def may_refresh(self) -> bool:
        """Whether :meth:`refresh` would fetch now rather than be rate-limited.

        Lock-free (one float read), so the event loop can ask cheaply before
        deciding to hand the refresh to a worker thread.
        """
        last = self._last_refresh
        return last is None or self._clock() - last >= self._interval

    def refresh(self) -> bool:
        """Blocking: re-fetch every source, unless one was fetched too recently.

        Returns True if it fetched, False if rate-limited. Concurrent callers
        queue on the lock; the first fetches and the others then find the
        fetch already done (rate-limited), which is what they wanted anyway.
        A source that fails keeps its previous keys (logged): a JWKS host
        blip must not revoke every key it served.
        """
        with self._lock:
            if not self.may_refresh():
                return False
            # Stamped before fetching so that a failing fetch is rate-limited too.
            self._last_refresh = self._clock()
            self._refreshes += 1
            for source in self._sources:
                try:
                    self._by_source[source] = self._load(source)
                except JwksError as exc:
                    self._failed_fetches += 1
                    log.warning("jwks_refresh_failed_keeping_previous", error=str(exc))
            self._keys = self._merge()
            log.info("jwks_refreshed", count=len(self._keys))
            return True

    def _merge(self) -> dict[str, Ed25519PublicKey]:
        merged: dict[str, Ed25519PublicKey] = {}
        for source, keys in self._by_source.items():
            for kid, key in keys.items():
                if kid in merged and merged[kid] != key:
                    log.warning(
                        "jwks_kid_conflict_earlier_source_wins",
                        source=describe_source(source),
                        kid=kid,
                    )
                    continue
                merged.setdefault(kid, key)
        return merged

    def _load(self, source: str) -> dict[str, Ed25519PublicKey]:
        label = describe_source(source)
        try:
            document = self._read(source)
            return _parse_jwks(document, label)
        except JwksError as exc:
            raise JwksError(f"cannot load JWKS from {label}: {exc}") from None

    def _read(self, source: str) -> bytes:
        try:
            if _is_url(source):
                return self._read_url(source)
            with open(source, "rb") as f:
                return _read_capped(f, limit=self._max_bytes, deadline=None)
        except urllib.error.HTTPError as exc:
            exc.close()  # it is also the response, holding the connection
            raise JwksError(f"HTTP {exc.code}") from None
        except urllib.error.URLError as exc:
            reason = "timed out" if isinstance(exc.reason, TimeoutError) else "connection failed"
            raise JwksError(reason) from None
        except TimeoutError:
            raise JwksError("timed out") from None
        except OSError as exc:
            raise JwksError(exc.strerror or type(exc).__name__) from None
        except http.client.HTTPException:
            raise JwksError("bad HTTP response") from None
        except ValueError:
            raise JwksError("invalid URL") from None

    def _read_url(self, url: str) -> bytes:
        headers = {"Accept": "application/jwk-set+json, application/json"}
        parts = urlsplit(url)
        if parts.username is not None:
            # urllib does not turn URL user-info into Basic auth by itself.
            userinfo = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode()
            netloc = parts.netloc.rpartition("@")[2]
            url = urlunsplit(parts._replace(netloc=netloc))
        request = urllib.request.Request(  # noqa: S310 - scheme checked to be http(s) in __init__
            url, headers=headers
        )
        deadline = time.monotonic() + self._timeout
        with _OPENER.open(request, timeout=self._timeout) as response:
            return _read_capped(response, limit=self._max_bytes, deadline=deadline)


#: A key withdrawn from the JWKS stops being trusted within this period even
#: if no token with an unknown ``kid`` triggers a re-fetch.
_KEY_REFRESH_INTERVAL_S = 300.0


async def refresh_keys_periodically(key_store: KeyStore) -> None:
    """Trio-flavoured task: re-read the JWKS every few minutes, so a key
    withdrawn from it stops being trusted even if no unknown ``kid`` ever
    triggers a re-fetch."""
    while True:
        await trio.sleep(_KEY_REFRESH_INTERVAL_S)
        # A JWKS host that trickles its headers can hold the fetch: stop
        # waiting (the thread is abandoned, its keys kept) and try next time.
        with trio.move_on_after(_KEY_LOAD_TIMEOUT_S):
            await trio.to_thread.run_sync(key_store.refresh, abandon_on_cancel=True)


#: Bound on loading the JWKS at start. Each read of a URL is bounded, but a
#: server trickling its response headers could stretch the whole fetch.
_KEY_LOAD_TIMEOUT_S = 15.0


async def load_key_store(sources: Sequence[str]) -> KeyStore:
    """Trio-flavoured: load the JWKS off the event loop (file reads and URL
    fetches block), failing with :class:`JwksError` rather than hanging the
    start."""
    with trio.move_on_after(_KEY_LOAD_TIMEOUT_S):
        return await trio.to_thread.run_sync(KeyStore, list(sources), abandon_on_cancel=True)
    raise JwksError(f"not loaded within {_KEY_LOAD_TIMEOUT_S:.0f} s")
