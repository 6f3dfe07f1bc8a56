"""Randomized requests against a whole GC (issue 3: "Nothing a client sends
can produce a 500, a stack trace, or another org's data").

One GC runs in-process (:func:`gc_harness.running_gc`) on the real database,
with two fake MCs that accept (:mod:`mc_fakes`) and two MHs, exactly as the
HTTP tests of ``test_gc_join`` run it. Org A and org B each have a meeting
that admits guests and one that does not, made over HTTP; B's have
distinctive display names. Then a fixed prelude (:func:`prelude`: one
request for each case the run must reach, so reaching them is never luck)
and :data:`PROBES` requests generated from :data:`SEED` (``random.Random``:
the same requests every run, whatever the GC answers) go to it one at a
time over real HTTP/1.1 (httpx): random methods on the API routes, the
operational routes, the published documents and random paths; meeting codes
of either org (exact, upper or mixed case, percent-encoded), unknown codes,
malformed, over-long and non-ASCII ones; valid user tokens of either org and
tokens that are expired, not yet valid, for another audience, without the
scope, with an unusable ``sub`` or ``org_id``, signed by another key, with
``alg`` none or HS256, tampered, garbage, non-ASCII, doubled or absent;
``Content-Type`` right, wrong, doubled or non-ASCII; bodies that are valid,
of wrong types, deeply nested, with huge numbers, odd Unicode, invalid
UTF-8, not JSON, over the size limit or chunked; odd extra headers (non-ASCII
values, large ones, ``Host``, ``Expect``, forwarding headers) and query
strings. Requests leave from 16 loopback addresses in turn, so the
per-address guest limit (raised to its maximum) never decides an outcome.

Each response is checked against a model of the API (:func:`expected`): the
set of statuses the request may get, derived from SPEC §6.5 and the order in
which the handlers check things (credentials, then the code, then the body).
The statuses any request may get at all (:data:`ERROR_CODES` and the
successes):

* 200, 201: the successes (201 only for a create).
* 400 ``INVALID_REQUEST``: malformed code, ``Content-Type`` or body. The GC
  has no 413, 415 or 422: SPEC §6.5 names no code for them, so an over-long
  body, a wrong media type and an invalid field are all 400.
* 401 ``UNAUTHORIZED`` (with ``WWW-Authenticate: Bearer``): no or untrusted
  credentials. 403 ``FORBIDDEN``: trusted but not granting this (scope,
  audience, unusable ``sub`` or ``org_id``).
* 404 ``NOT_FOUND``: no such route (a path that differs from one by a
  trailing slash included: the GC does not redirect), or no such meeting
  *for this caller* (another org's meeting, and for a guest a members-only
  one, are answered exactly like a missing one).
* 405 ``METHOD_NOT_ALLOWED`` (with ``Allow`` naming the route's methods): a
  route asked with another method.
* 429 ``RATE_LIMITED`` (with ``Retry-After``): only the two limited routes,
  create and guest join.
* 503 ``SERVICE_UNAVAILABLE`` (with ``Retry-After``): only where the request
  could otherwise succeed (a join or create reached the database and MCs),
  and from ``/health/ready`` (without ``Retry-After``) when its database
  round trip times out. No other 5xx, ever.

And on every response: an error (>= 400) is exactly ``{"error": {"code",
"message"}}`` with the code of its status, and its message quotes nothing
the request carried (a canary, ``qx7``, is in every made-up code and many
names); no body or header holds a traceback, a source path or an exception
class name; no body or header holds another org's meeting ids, codes,
display names or org id - except the one case where that is the point, a
guest join (200) of a meeting that admits guests, which shows that meeting;
a successful join answers for the meeting asked for, in the SPEC's shape.
Where a status depends on unpinned library details (Starlette's route
anchoring, hypercorn's path decoding, h11's strictness) rather than on our
code, each plausible answer is allowed (:func:`routes_of`,
:func:`raw_requests`). Afterwards: no log record at ERROR or with a
traceback, and no warning from the HTTP layer but one per 503 received
(:data:`UNAVAILABLE_WARNINGS`); every meeting row was made by the two valid
users in their own orgs; ``/health/ready`` still answers 200.

A few raw requests that no well-behaved client library can send (non-ASCII
bytes in the request line, conflicting framing, bad chunking, folded
headers, huge headers) follow; those the HTTP server refuses before the app
sees them must get a 4xx and no traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote, unquote

import asyncpg
import httpx
import jwt
import pytest
import trio
from gc_fleet import ORG, add_mc, add_mh, fakes, fetch
from gc_harness import DevKeys, gc_environ, running_gc
from mc_fakes import ACCEPT

from darktower.shared import keys as keylib
from darktower.shared import tokens

pytest_plugins = ("gc_fixtures",)  # keys

SEED: Final = 0x5EED_0003
PROBES: Final = 600
#: Wall-clock limit of the test: a quiet run takes about 3 s, so the floor
#: of 120 s (room for a loaded CI machine, and for a few requests that wait
#: for the GC's own deadline).
TEST_TIMEOUT_S: Final = 120
#: Loopback source addresses the requests take in turn (Linux routes 127/8
#: to ``lo``): each address's guest bucket (burst 5, one token per 6 ms at
#: the maximum rate) is touched at most every 16th request.
SOURCE_ADDRESSES: Final = 16

ORG_A: Final = ORG
ORG_B: Final = uuid.UUID("22222222-2222-4222-8222-222222222222")
USER_A: Final = "user-a"
USER_B: Final = "user-b"
#: In every made-up code and many made-up names; never in an error message.
CANARY: Final = "qx7"

GRANTED: Final = 0
ERROR_CODES: Final = {
    400: "INVALID_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    429: "RATE_LIMITED",
    503: "SERVICE_UNAVAILABLE",
}
METHODS: Final = ("GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS")
#: Text that means an exception escaped into a response.
LEAKED_INTERNALS: Final = re.compile(
    r"Traceback|File \"|\b[A-Z]\w*(?:Error|Exception|Group)\b|site-packages|"
    r"\.py\b|darktower\.|asyncpg|starlette|hypercorn|trio_asyncio|grpclib"
)
JOIN_KEYS: Final = {"meeting_id", "display_name", "token", "expires_in", "mc", "media_handlers"}


# --- the world: meetings and credentials ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Meeting:
    org: uuid.UUID
    meeting_id: str
    code: str
    display_name: str
    allow_guests: bool
    #: Whether the display name is worth looking for in responses (made-up
    #: names like "Ada" could turn up anywhere).
    distinctive: bool

    def secrets(self) -> list[str]:
        found = [self.meeting_id, self.code]
        return [*found, self.display_name] if self.distinctive else found


@dataclass(frozen=True, slots=True)
class Credential:
    """The ``Authorization`` header(s) of a request and what the GC makes of
    them: ``create`` and ``join`` are the outcomes of authenticating for each
    (:data:`GRANTED`, 401 or 403); ``org`` is whose meetings it can see."""

    name: str
    headers: tuple[tuple[bytes, bytes], ...]
    org: uuid.UUID | None
    create: frozenset[int]
    join: frozenset[int]


def _b64(data: bytes) -> str:
    return keylib.b64url_encode(data)


def credentials(keys: DevKeys) -> list[Credential]:
    key, kid = keys.private_key, keys.kid
    both = (tokens.SCOPE_MEETING_JOIN, tokens.SCOPE_MEETING_CREATE)
    now = time.time()

    def user(
        sub: str = USER_A, org: str = str(ORG_A), scopes: Sequence[str] = both, **kw: float
    ) -> str:
        return tokens.mint_user_token(
            key, kid=kid, user_id=sub, org_id=org, scopes=scopes, now=kw.get("now")
        )

    def raw(
        audience: str = tokens.AUD_GC, extra: dict[str, object] | None = None, sub: str = USER_A
    ) -> str:
        return tokens.mint_token(
            key, kid=kid, sub=sub, audience=audience, scopes=both, ttl_s=3600, extra=extra
        )

    def bearer(token: str | bytes) -> tuple[tuple[bytes, bytes], ...]:
        value = token if isinstance(token, bytes) else token.encode()
        return ((b"authorization", b"Bearer " + value),)

    def auth(value: bytes) -> tuple[tuple[bytes, bytes], ...]:
        return ((b"authorization", value),)

    valid_a, valid_b = user(), user(USER_B, str(ORG_B))
    other = keylib.generate_private_key()
    header_a, payload_a, signature_a = valid_a.split(".")
    payload_b = valid_b.split(".")[1]
    payload: dict[str, object] = {"sub": USER_A, "aud": "gc", "scope": " ".join(both)}
    payload |= {"org_id": str(ORG_A), "iat": int(now), "exp": int(now) + 600}
    none_alg = f"{_b64(json.dumps({'alg': 'none', 'kid': kid}).encode())}.{payload_a}."
    hs256 = jwt.encode(payload, "k" * 32, "HS256", headers={"kid": kid})
    random_tail = f"{header_a}.{_b64(b'{not json')}.{_b64(bytes(64))}"

    ok, e401, e403 = frozenset({GRANTED}), frozenset({401}), frozenset({403})

    def untrusted(name: str, headers: tuple[tuple[bytes, bytes], ...]) -> Credential:
        return Credential(name, headers, None, e401, e401)

    def refused(name: str, token: str) -> Credential:
        return Credential(name, bearer(token), None, e403, e403)

    return [
        Credential("valid-a", bearer(valid_a), ORG_A, ok, ok),
        Credential("valid-b", bearer(valid_b), ORG_B, ok, ok),
        Credential(
            "a-join-only", bearer(user(scopes=[tokens.SCOPE_MEETING_JOIN])), ORG_A, e403, ok
        ),
        Credential(
            "b-create-only",
            bearer(user(USER_B, str(ORG_B), [tokens.SCOPE_MEETING_CREATE])),
            ORG_B,
            ok,
            e403,
        ),
        refused("a-other-scope", user(scopes=[tokens.SCOPE_MC_REGISTER])),
        refused("a-audience-mc", raw(tokens.AUD_MC, {"org_id": str(ORG_A)})),
        refused("a-org-not-uuid", user(org="org-a")),
        refused("a-org-b-and-a-digit", user(org=str(ORG_B) + "0")),
        refused("a-no-org", raw()),
        refused("a-guest-sub", user(sub="Guest-1234")),
        refused("a-sub-with-space", user(sub="ada lovelace")),
        refused("a-sub-non-ascii", user(sub="adä")),
        refused("a-sub-too-long", user(sub="u" * 300)),
        untrusted("a-expired", bearer(user(now=now - 7200))),
        untrusted("a-not-yet-valid", bearer(raw(extra={"org_id": str(ORG_A), "nbf": now + 3600}))),
        untrusted("a-org-not-a-string", bearer(raw(extra={"org_id": 7}))),
        untrusted(
            "a-signed-by-another-key",
            bearer(tokens.mint_user_token(other, kid=kid, user_id=USER_A, org_id=str(ORG_A))),
        ),
        untrusted(
            "unknown-kid",
            bearer(
                tokens.mint_user_token(
                    other,
                    kid=keylib.key_id(other.public_key()),
                    user_id=USER_A,
                    org_id=str(ORG_A),
                )
            ),
        ),
        untrusted("a-payload-swapped-to-b", bearer(f"{header_a}.{payload_b}.{signature_a}")),
        untrusted("alg-none", bearer(none_alg)),
        untrusted("alg-hs256", bearer(hs256)),
        untrusted("real-header-junk-payload", bearer(random_tail)),
        untrusted("garbage", bearer("not-a-jwt")),
        untrusted("garbage-segments", bearer("a.b.c")),
        untrusted("four-segments", bearer(valid_a + ".x")),
        untrusted("oversized", bearer("A" * 9000)),
        untrusted("non-ascii", bearer(b"\xc3\xa9\xff." + payload_a.encode() + b".x")),
        untrusted("lowercase-scheme", auth(b"bearer " + valid_a.encode())),
        untrusted("basic", auth(b"Basic dXNlcjpwYXNz")),
        untrusted("no-scheme", auth(valid_a.encode())),
        untrusted("scheme-only", auth(b"Bearer")),
        untrusted("double-space", auth(b"Bearer  " + valid_a.encode())),
        untrusted("none", ()),
        Credential(
            "valid-a-then-garbage",
            bearer(valid_a) + bearer("junk"),
            ORG_A,
            ok | e401,
            ok | e401,
        ),
        Credential(
            "garbage-then-valid-b",
            bearer("junk") + bearer(valid_b),
            ORG_B,
            ok | e401,
            ok | e401,
        ),
    ]


#: How often each credential is drawn: mostly valid ones, so requests get
#: past authentication and exercise codes and bodies.
def credential_weight(credential: Credential) -> float:
    return {"valid-a": 12.0, "valid-b": 8.0, "none": 4.0}.get(credential.name, 1.0)


# --- codes, names, bodies, headers -----------------------------------------------------------

CODE_RE: Final = re.compile(r"[a-z0-9-]{3,32}")  # the schema's rule, SPEC §6.5

#: Path segments that are not codes at all (percent-encoded where needed).
BAD_CODES: Final = [
    "ab",
    CANARY + "-" + "a" * 30,
    "abc_" + CANARY,
    "abc.def",
    "abc%20" + CANARY,
    "%00abc",
    CANARY + "%00",
    "%FF%FE%FD",
    "%",
    "%zz" + CANARY,
    quote("ünïcode-" + CANARY),
    quote("😀😀😀"),
    quote("\uff41\uff42\uff43-" + CANARY),  # fullwidth "abc"
    quote("\u212aab-" + CANARY),  # KELVIN SIGN lowers to ASCII "k"
    quote("abc\u200b" + CANARY),
    quote("İab-" + CANARY),
    "..",
    "%2e%2e",
    "-" * 40,
    CANARY * 700,
    "abc%0A",
    "abc%2F" + CANARY,
    "%2F%2F",
    "%252F" + CANARY,
    "'%20OR%201=1--",
    "%3Cscript%3E",
]
#: Segments of the code's shape that no meeting has.
UNKNOWN_CODES: Final = ["---", "000", "a-b", CANARY + "-zzzz-zzz", CANARY + "-" + "9" * 28]

#: (name, valid for create (1-200 chars), valid for guests (2-100 chars));
#: the first nine are valid for both.
NAMES: Final[list[tuple[str, bool, bool]]] = [
    ("Ada", True, True),
    ("Zoë " + CANARY.upper(), True, True),
    ("李小龙", True, True),
    ("مرحبا بالعالم", True, True),
    ("Straße 42", True, True),
    ("O'Brien-Smith <b>", True, True),
    ("👩\u200d💻 night shift", True, True),
    ("  padded  ", True, True),
    ("n" * 100, True, True),
    ("Q", True, False),
    ("m" * 150, True, False),
    ("", False, False),
    ("   \t ", False, False),
    ("\u202e" + CANARY + "evil", False, False),
    (CANARY + "\x00nul", False, False),
    ("\u200b", False, False),
    ("ab\u200d", False, False),
    ("\ue000private", False, False),
    ("a\ud800b", False, False),  # a lone surrogate (JSON escape)
    ("line\u2028" + CANARY, False, False),
    (CANARY * 70, False, False),
    ("\U0010fffe" + CANARY, False, False),  # a noncharacter
]

#: (Content-Type header values, whether the body is declared acceptably).
CONTENT_TYPES: Final[list[tuple[tuple[bytes, ...], bool]]] = [
    ((b"application/json",), True),
    ((b"application/json",), True),
    ((b"application/json",), True),
    ((b"APPLICATION/JSON; charset=UTF-8",), True),
    ((b'application/json; charset="utf-8"',), True),
    ((b"application/json;",), True),
    ((), False),
    ((b"text/plain",), False),
    ((b"application/json; charset=latin-1",), False),
    ((b"application/json; boundary=x",), False),
    ((b"application/json-patch+json",), False),
    ((b"multipart/form-data; boundary=----x",), False),
    ((b"application/x-www-form-urlencoded",), False),
    ((b"application/json", b"application/json"), False),
    ((b"application/json", b"text/plain"), False),
    ((b"application/json; charset=\xc3\xbc",), False),
    ((b"\xff\xfe",), False),
]


def random_json(rng: random.Random, depth: int = 0) -> object:
    """A JSON value of awkward types and sizes."""
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**64), 10**30, 1001, 5])
    if kind == 1:
        return rng.choice([0.5, -0.0, 5.0, 1e308, -1e-308, 100.0])
    if kind == 2:
        return rng.choice(NAMES)[0]
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4:
        return None
    if kind == 5:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(12)))
    if kind == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["display_name", "allow_guests", "max_participants", "x", "", "display_name "]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def encode(rng: random.Random, value: object) -> bytes:
    # ``surrogatepass``: a lone surrogate sent raw is invalid UTF-8 on the wire.
    return json.dumps(value, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")


#: Bodies that are wrong whatever the route (validity ``False``).
def bad_body(rng: random.Random) -> bytes:
    choice = rng.randrange(14)
    if choice == 0:
        return b""
    if choice == 1:
        return b"not json " + CANARY.encode()
    if choice == 2:
        return b'{"display_name": "\xff\xfe' + CANARY.encode() + b'"}'  # invalid UTF-8
    if choice == 3:
        return b"[" * 20_000 if rng.random() < 0.5 else b'{"display_name":' + b"[" * 5000
    if choice == 4:
        return b'{"display_name": "Ada", "max_participants": ' + b"9" * 5000 + b"}"
    if choice == 5:
        return b'{"display_name": "Ada", "display_name": "Bob"}'
    if choice == 6:
        return b'{"display_name": "Ada", "max_participants": NaN}'
    if choice == 7:
        return b'{"display_name": "Ada"} trailing'
    if choice == 8:
        return b"\xef\xbb\xbf" + b'{"display_name": "Ada"}'  # a UTF-8 BOM
    if choice == 9:
        return encode(rng, rng.choice([[], "Ada", 5, None, True, [{"display_name": "Ada"}]]))
    if choice == 10:
        return encode(rng, {"display_name": "Ada", "allow_guest": True})  # misspelt
    if choice == 11:
        return b'{"display_name": "' + b"x" * 17_000 + b'"}'  # over 16 KiB
    if choice == 12:
        return encode(rng, {"display_name": rng.choice([5, None, [], {}, True, 1.5])})
    return b'{"display_name": "Ada\\ud800"}'


def create_body(rng: random.Random) -> tuple[bytes, bool | None]:
    """A create body and whether it is valid (``None``: not worked out)."""
    roll = rng.random()
    if roll < 0.45:
        name, ok, _ = rng.choice(NAMES[:9] if rng.random() < 0.5 else NAMES)
        body: dict[str, object] = {"display_name": name}
        if rng.random() < 0.5:
            body["allow_guests"] = rng.random() < 0.5
        if rng.random() < 0.4:
            body["max_participants"] = rng.choice([1, 100, 1000])
        return encode(rng, body), ok
    if roll < 0.65:
        field_name, value = rng.choice(
            [
                ("allow_guests", "true"), ("allow_guests", 1), ("allow_guests", None),
                ("max_participants", 0), ("max_participants", 1001), ("max_participants", 5.0),
                ("max_participants", True), ("max_participants", "5"),
                ("max_participants", 10**30), ("max_participants", -1),
                ("max_participants", 1e400),
            ]
        )  # fmt: skip
        return encode(rng, {"display_name": "Ada", field_name: value}), False
    if roll < 0.85:
        return bad_body(rng), False
    return encode(rng, random_json(rng)), None


def guest_body(rng: random.Random) -> tuple[bytes, bool | None]:
    roll = rng.random()
    if roll < 0.55:
        name, _, ok = rng.choice(NAMES[:9] if rng.random() < 0.5 else NAMES)
        return encode(rng, {"display_name": name}), ok
    if roll < 0.85:
        return bad_body(rng), False
    return encode(rng, random_json(rng)), None


#: Extra headers: odd but well-formed HTTP/1.1 (the client library refuses
#: malformed ones; the raw requests at the end send those).
EXTRA_HEADERS: Final[list[tuple[bytes, bytes]]] = [
    (b"x-forwarded-for", b"203.0.113.9, 10.0.0.1"),
    (b"forwarded", b"for=198.51.100.7;proto=https"),
    (b"x-real-ip", b"192.0.2.1"),
    (b"accept", b"application/xml"),
    (b"accept-encoding", b"gzip, br, zstd, *;q=0"),
    (b"accept-language", b"\xc3\xa9\xff\xfe"),
    (b"x-" + CANARY.encode(), b"\xe2\x80\xae\xff"),  # U+202E, then not UTF-8
    (b"user-agent", b"fuzz/" + b"u" * 3000),
    (b"cookie", b"session=" + b"c" * 2000),
    (b"content-encoding", b"gzip"),
    (b"expect", b"100-continue"),
    (b"origin", b"https://evil.example"),
    (b"x-http-method-override", b"DELETE"),
    (b"x-original-url", b"/metrics"),
    (b"x-rewrite-url", b"/api/v1/meetings"),
    (b"range", b"bytes=0-1"),
    (b"if-none-match", b"*"),
    (b"te", b"trailers"),
]
HOSTS: Final = [b"evil.example", b"evil.example:1", b"[::1]:99", b"\xc3\xa9.example", b"a" * 300]


# --- the probes and the model ------------------------------------------------------------------


@dataclass
class Probe:
    index: int
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    chunked: bool
    credential: Credential
    note: str
    #: Whether ``body`` is valid for the route the probe was made for
    #: (``None``: not worked out, e.g. random JSON).
    body_ok: bool | None

    def describe(self) -> str:
        body = "" if self.body is None else f" body={self.body[:80]!r}"
        extra = [(k.decode(), v[:60]) for k, v in self.headers if k != b"authorization"]
        return (
            f"#{self.index} {self.method} {self.target[:120]} [{self.credential.name}]"
            f" ({self.note}, body_ok={self.body_ok}) headers={extra}{body}"
        )


@dataclass
class World:
    meetings: list[Meeting]
    credentials: list[Credential]
    weights: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.weights = [credential_weight(c) for c in self.credentials]

    def by_code(self, code: str) -> Meeting | None:
        return next((m for m in self.meetings if m.code == code), None)


def code_variant(rng: random.Random, code: str) -> str:
    """``code`` as a client might spell it in a path: each spelling names
    the same meeting."""
    roll = rng.randrange(6)
    if roll == 0:
        return code.upper()
    if roll == 1:
        return "".join(c.upper() if rng.random() < 0.5 else c for c in code)
    if roll == 2:
        return "".join(f"%{ord(c):02X}" if rng.random() < 0.4 else c for c in code)
    if roll == 3:
        return "".join(f"%{ord(c):02x}" for c in code)
    return code


def pick_meeting(rng: random.Random, meetings: Sequence[Meeting]) -> Meeting:
    """One of ``meetings``, drawn with exactly one ``rng.random()`` whatever
    their number (``rng.choice`` draws a varying number of bits): a create
    that got a 503 leaves the world one meeting short, and that must not
    shift every later draw of the seed."""
    return meetings[min(int(rng.random() * len(meetings)), len(meetings) - 1)]


def pick_code(rng: random.Random, world: World, *, guest: bool = False) -> tuple[str, str]:
    roll = rng.random()
    if roll < 0.6:
        # A guest asks mostly for meetings that admit guests (the successes).
        pool = [m for m in world.meetings if m.allow_guests or not guest or roll < 0.2]
        meeting = pick_meeting(rng, pool)
        return code_variant(rng, meeting.code), f"code of {meeting.display_name[:24]!r}"
    if roll < 0.75:
        return rng.choice(UNKNOWN_CODES), "unknown code"
    return rng.choice(BAD_CODES), "bad code"


def random_path(rng: random.Random, world: World) -> str:
    code = pick_meeting(rng, world.meetings).code
    return rng.choice(
        [
            "/", "/api", "/api/v1", "/api/v2/meetings", "/API/v1/meetings", "/api/v1/Meetings",
            f"/api/v1/meetings/{code}/guest-token/x", f"/api/v1/meetings/{code}/x",
            "/api/v1//meetings", "//api/v1/meetings", "/health", "/health/", "/health/LIVE",
            "/health/%6Cive", "/health/live%0A", "/metrics%00", "/admin", "/.env",
            "/%2e%2e/%2e%2e/etc/passwd", "/api/v1/openapi.yaml", "/openapi.json", "/docs",
            "/.well-known/", "/.well-known/jwks.json.bak",
            f"/api/v1/meetings/{code}/guest-token%2F",
            "/" + CANARY * 300, "/api/v1/meetings/%2F/guest-token", "/%FF%FE",
            "/api/v1/meetings/" + code + "#frag", "/api/v1/meetings/" + code + "/%2e%2e",
        ]
    )  # fmt: skip


def make_probe(rng: random.Random, index: int, world: World) -> Probe:
    kind = rng.choices(
        ["create", "join", "guest", "static", "random", "slash"], [22, 28, 26, 9, 10, 5]
    )[0]
    if kind in ("create", "join") and rng.random() < 0.5:
        # A valid user's: past authentication, so codes and bodies are judged.
        credential = world.credentials[rng.randrange(2)]
    else:
        credential = rng.choices(world.credentials, world.weights)[0]
    route_method = {"create": "POST", "join": "GET", "guest": "POST"}.get(kind, "GET")
    method = route_method if rng.random() < 0.8 else rng.choice(METHODS)
    body: bytes | None = None
    body_ok: bool | None = None
    note = kind
    if kind == "create":
        target = "/api/v1/meetings"
        body, body_ok = create_body(rng)
    elif kind == "join":
        code, note = pick_code(rng, world)
        target = f"/api/v1/meetings/{code}"
    elif kind == "guest":
        code, note = pick_code(rng, world, guest=True)
        target = f"/api/v1/meetings/{code}/guest-token"
        body, body_ok = guest_body(rng)
    elif kind == "static":
        target = rng.choice(
            ["/health/live", "/health/ready", "/metrics", "/api/v1/openapi.json",
             "/.well-known/jwks.json"]
        )  # fmt: skip
    elif kind == "slash":
        target = rng.choice(
            ["/health/live/", "/metrics//", "/api/v1/meetings/", "/api/v1/openapi.json/",
             f"/api/v1/meetings/{pick_meeting(rng, world.meetings).code}/guest-token/"]
        )  # fmt: skip
    else:
        target = random_path(rng, world)
    if body is None and rng.random() < 0.15:
        body = bad_body(rng) if rng.random() < 0.5 else encode(rng, random_json(rng))
    if rng.random() < 0.2:
        target += rng.choice(
            ["?", "?x=1", f"?code={CANARY}", "?%ff=%fe", "?a=" + "b" * 1000, "?display_name=Ada"]
        )
    headers = list(credential.headers)
    if body is not None or rng.random() < 0.1:
        # Mostly declared right, so bodies get read.
        content_types, _ = CONTENT_TYPES[0] if rng.random() < 0.5 else rng.choice(CONTENT_TYPES)
        headers += [(b"content-type", value) for value in content_types]
    for _ in range(rng.choices([0, 1, 2, 4], [55, 25, 12, 8])[0]):
        headers.append(rng.choice(EXTRA_HEADERS))
    if rng.random() < 0.04:
        headers.append((b"host", rng.choice(HOSTS)))
    chunked = body is not None and rng.random() < 0.15
    return Probe(index, method, target, headers, body, chunked, credential, note, body_ok)


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    methods: frozenset[str]
    code: str | None = None


#: The app's routes, matched the way Starlette matches them (``^...$`` with
#: ``re.match``, so a path may end in one newline; ``{code}`` is ``[^/]+``).
ROUTES: Final[list[tuple[re.Pattern[str], str, frozenset[str]]]] = [
    (re.compile(rf"^{re.escape(path)}$"), name, frozenset({"GET", "HEAD"}))
    for path, name in [
        ("/health/live", "static"), ("/health/ready", "ready"), ("/metrics", "static"),
        ("/api/v1/openapi.json", "static"), ("/.well-known/jwks.json", "static"),
    ]
] + [
    (re.compile(r"^/api/v1/meetings$"), "create", frozenset({"POST"})),
    (re.compile(r"^/api/v1/meetings/(?P<code>[^/]+)$"), "join", frozenset({"GET", "HEAD"})),
    (re.compile(r"^/api/v1/meetings/(?P<code>[^/]+)/guest-token$"), "guest", frozenset({"POST"})),
]  # fmt: skip


def decoded_path(target: str) -> str:
    """The path the app sees: the target up to ``?``, percent-decoded as
    UTF-8 with replacement (hypercorn's ``unquote``)."""
    return unquote(target.partition("?")[0])


def route_of(path: str, *, strict_end: bool = False) -> Route | None:
    """The route Starlette matches ``path`` to; ``strict_end``: as if its
    patterns ended in ``\\Z`` rather than ``$`` (no trailing newline)."""
    for pattern, name, methods in ROUTES:
        match = pattern.fullmatch(path) if strict_end else pattern.match(path)
        if match is not None:
            return Route(name, methods, match.groupdict().get("code"))
    return None


def routes_of(target: str) -> list[Route | None]:
    """Every route the app may plausibly see ``target`` as (first the one
    the HTTP libraries installed today give).

    Where the answer depends on details of Starlette, hypercorn or h11 (none
    of them pinned) rather than on our code, the model accepts each
    plausible reading:

    * Starlette anchors its route patterns with ``$``, which also matches
      before a final newline: ``/health/live%0A`` is ``/health/live`` today,
      a 404 if it ever anchors with ``\\Z``.
    * h11 passes a ``#fragment`` in the request target on and hypercorn
      keeps it in ``path``; a server that drops it would route without it.
    * hypercorn decodes ``%2F`` into a ``/`` that splits segments; a server
      or router that routes on the raw path would see one segment.

    Percent-decoding itself is not among them: ASGI defines ``path`` as the
    decoded target, so an encoded spelling of a code names its meeting (and
    hypercorn's handling of invalid UTF-8 escapes changes no status here:
    such a segment is never a code, such a path never a route).
    """
    raw = target.partition("?")[0]
    paths = [unquote(raw)]
    if "#" in raw:
        paths.append(unquote(raw.partition("#")[0]))
    if "%2f" in raw.lower():
        paths.append(unquote(re.sub("%2[fF]", "%252F", raw)))
    routes: list[Route | None] = []
    for path in paths:
        for strict_end in (False, True):
            route = route_of(path, strict_end=strict_end)
            if route not in routes:
                routes.append(route)
    return routes


def normalized_code(segment: str) -> str | None:
    """The code the handlers look up (ASCII letters in either case), or
    ``None`` if the segment cannot be one."""
    code = segment.lower() if segment.isascii() else segment
    return code if CODE_RE.fullmatch(code) else None


def _declared_json(probe: Probe) -> bool:
    declared = tuple(v for k, v in probe.headers if k == b"content-type")
    return next((ok for values, ok in CONTENT_TYPES if values == declared), False)


def expected(probe: Probe, world: World) -> frozenset[int]:
    """Every status ``probe`` may get (see the module docstring), under
    every plausible reading of its target (:func:`routes_of`)."""
    return frozenset().union(*(_expected(probe, route, world) for route in routes_of(probe.target)))


def _expected(probe: Probe, route: Route | None, world: World) -> frozenset[int]:
    if route is None:
        return frozenset({404})  # trailing-slash variants too: the GC never redirects
    if probe.method not in route.methods:
        return frozenset({405})
    if route.name == "static":
        return frozenset({200})
    if route.name == "ready":
        # Readiness is a database round trip bounded by short timeouts: on
        # a loaded machine it may answer 503, which is its contract.
        return frozenset({200, 503})
    credential = probe.credential
    body_ok = probe.body_ok
    if body_ok is not False and len(probe.body or b"") > 16 * 1024:
        body_ok = False
    if route.name == "create":
        body = frozenset({201, 503} if body_ok else {400} if body_ok is False else {201, 400, 503})
        statuses = {429}
        for outcome in credential.create:
            statuses |= body if outcome == GRANTED and _declared_json(probe) else {outcome or 400}
        return frozenset(statuses)
    assert route.code is not None
    code = normalized_code(route.code)
    meeting = world.by_code(code) if code else None
    if route.name == "join":
        statuses = set()
        for outcome in credential.join:
            if outcome != GRANTED:
                statuses.add(outcome)
            elif code is None:
                statuses.add(400)
            elif meeting is not None and meeting.org == credential.org:
                statuses |= {200, 503}
            else:
                statuses.add(404)
        return frozenset(statuses)
    # The guest join: the limit first, then the code, the body, the meeting.
    if code is None or not _declared_json(probe) or body_ok is False:
        return frozenset({400, 429})
    joined = {200, 503} if meeting is not None and meeting.allow_guests else {404}
    return frozenset({429} | joined | ({400} if body_ok is None else set()))


def coverage_tags(probe: Probe, status: int, world: World) -> list[str]:
    """What this exchange shows, for the check that the seed reached the
    cases that matter (each tag at least once)."""
    route = route_of(decoded_path(probe.target))
    tags = [f"credential {probe.credential.name}", f"status {status}"]
    if route is None or route.code is None:
        if route is not None and route.name == "create" and status == 201:
            tags.append(f"created in {probe.credential.org}")
        if (
            route is not None
            and route.name == "create"
            and status == 400
            and probe.credential.create == {GRANTED}
            and _declared_json(probe)
        ):
            tags.append("create body refused")
        return tags
    code = normalized_code(route.code)
    meeting = world.by_code(code) if code else None
    if route.name == "guest" and status == 400 and code and _declared_json(probe):
        tags.append("guest body refused")
    if meeting is None:
        return tags
    mine = meeting.org == probe.credential.org
    if route.name == "join" and status == 200:
        tags.append(f"joined in {meeting.org}")
    if route.name == "join" and status == 404 and probe.credential.join == {GRANTED}:
        tags.append("own org's meeting 404" if mine else "other org's meeting 404")
    if route.name == "guest" and status in (200, 404):
        guests = "open" if meeting.allow_guests else "members-only"
        tags.append(f"guest {status} {guests} of {'own' if mine else 'other'} org")
    return tags


REQUIRED_TAGS: Final = [
    *(f"status {s}" for s in (200, 201, 400, 401, 403, 404, 405)),
    *(f"joined in {o}" for o in (ORG_A, ORG_B)),
    *(f"created in {o}" for o in (ORG_A, ORG_B)),
    "other org's meeting 404",
    "create body refused",
    "guest body refused",
    "guest 200 open of other org",
    "guest 404 members-only of other org",
]


def guest_meetings(probe: Probe, world: World) -> list[Meeting]:
    """The meeting a guest join names, if it admits guests (under any
    plausible reading of the target: at most one in practice)."""
    found = []
    for route in routes_of(probe.target):
        if route is None or route.name != "guest" or route.code is None:
            continue
        code = normalized_code(route.code)
        meeting = world.by_code(code) if code else None
        if meeting is not None and meeting.allow_guests:
            found.append(meeting)
    return found


def prelude(world: World) -> list[tuple[str, Probe]]:
    """Fixed requests, sent before the random ones, that reach every case
    of :data:`REQUIRED_TAGS` (and every credential) by construction: each
    with the tag it is there for. Only a 503 (which the model allows a join
    or a create) can keep one from its case; the test then sends it again.
    So whatever the load, the coverage check never fails by the luck of
    the seed."""
    a_members, a_open, b_members, b_open = world.meetings[:4]
    named = {c.name: c for c in world.credentials}
    valid_a, valid_b, nobody = named["valid-a"], named["valid-b"], named["none"]
    create, ada = "/api/v1/meetings", b'{"display_name": "Ada"}'
    cases: list[tuple[str, str, str, Credential, bytes | None, bool | None]] = [
        # Every credential (401 and 403 among them) asks to join a meeting of A.
        *((f"credential {c.name}", "GET", f"{create}/{a_open.code}", c, None, None)
          for c in world.credentials),
        (f"created in {ORG_A}", "POST", create, valid_a, b'{"display_name": "Prelude A"}', True),
        (f"created in {ORG_B}", "POST", create, valid_b, b'{"display_name": "Prelude B"}', True),
        (f"joined in {ORG_A}", "GET", f"{create}/{a_members.code}", valid_a, None, None),
        (f"joined in {ORG_B}", "GET", f"{create}/{b_members.code}", valid_b, None, None),
        ("other org's meeting 404", "GET", f"{create}/{a_members.code}", valid_b, None, None),
        ("create body refused", "POST", create, valid_a, b'{"display_name": ""}', False),
        ("guest body refused",
         "POST", f"{create}/{a_open.code}/guest-token", nobody, b"not json", False),
        ("guest 200 open of other org",
         "POST", f"{create}/{b_open.code}/guest-token", nobody, ada, True),
        ("guest 404 members-only of other org",
         "POST", f"{create}/{b_members.code}/guest-token", nobody, ada, True),
        ("status 405", "DELETE", "/health/live", nobody, None, None),
    ]  # fmt: skip
    json_type = [(b"content-type", b"application/json")]
    probes = []
    for index, (tag, method, target, credential, body, body_ok) in enumerate(cases):
        headers = list(credential.headers) + (json_type if body is not None else [])
        note = f"prelude: {tag}"
        probes.append(
            (tag, Probe(index, method, target, headers, body, False, credential, note, body_ok))
        )
    return probes


# --- checking one response ---------------------------------------------------------------------


def check(probe: Probe, response: httpx.Response, world: World) -> list[str]:
    """What is wrong with ``response`` (nothing: an empty list)."""
    problems: list[str] = []
    status = response.status_code
    allowed = expected(probe, world)
    if status not in allowed:
        problems.append(f"status {status}, expected one of {sorted(allowed)}")
    if status >= 500 and status != 503:
        problems.append(f"server error {status}")
    routes = routes_of(probe.target)
    text = response.content.decode("utf-8", "replace")
    # A meeting token is base64: by chance it could spell anything.
    scrubbed = re.sub(r'"token":"[^"]*"', '"token":""', text)
    headers = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
    # The body of /metrics is the prometheus registry of the whole pytest
    # process: other tests' label values (exception class names, this
    # module's ORG) may be in it. Its headers are still checked, and so are
    # this test's meeting ids, codes and names (random or distinctive).
    metrics = status == 200 and decoded_path(probe.target).rstrip("\n") == "/metrics"
    own_text = headers if metrics else scrubbed + "\n" + headers
    if LEAKED_INTERNALS.search(own_text):
        problems.append(f"internals in the response: {own_text[:300]!r}")
    if status >= 400:
        problems += check_error(probe, response, text)
    elif (
        status == 200
        and probe.method != "HEAD"
        and any(r is not None and r.name in ("join", "guest") for r in routes)
    ):
        problems += check_join(routes, response, world)
    # Another org's data: nobody but that org sees it, but a guest who joins
    # a meeting that admits guests sees that meeting.
    visible = guest_meetings(probe, world) if status == 200 else []
    haystack = (scrubbed + "\n" + headers).lower()
    for meeting in world.meetings:
        if meeting.org == probe.credential.org or meeting in visible:
            continue
        for secret in meeting.secrets():
            if secret.lower() in haystack:
                problems.append(f"shows {secret!r} of org {meeting.org}")
    for org in (ORG_A, ORG_B):
        if org != probe.credential.org and str(org) in own_text.lower():
            problems.append(f"shows org id {org}")
    return problems


def check_error(probe: Probe, response: httpx.Response, text: str) -> list[str]:
    status = response.status_code
    problems = []
    if status == 401 and response.headers.get("www-authenticate") != "Bearer":
        problems.append("401 without WWW-Authenticate: Bearer")
    routes = [r for r in routes_of(probe.target) if r is not None]
    if status == 405 and routes:
        allow = {m.strip() for m in response.headers.get("allow", "").split(",")}
        if all(allow != route.methods for route in routes):
            problems.append(f"405 with Allow {response.headers.get('allow')!r}")
    # The readiness probe is for orchestrators, which poll anyway: its 503
    # carries no Retry-After; the API's 429 and 503 must.
    if status in (429, 503) and all(route.name != "ready" for route in routes):
        retry_after = response.headers.get("retry-after", "")
        if not (retry_after.isdigit() and int(retry_after) >= 1):
            problems.append(f"{status} with Retry-After {retry_after!r}")
    if probe.method == "HEAD":
        return problems  # no body to check
    if response.headers.get("content-type") != "application/json":
        problems.append(f"error content-type {response.headers.get('content-type')!r}")
    try:
        document = json.loads(text)
    except ValueError:
        return [*problems, f"error body not JSON: {text[:200]!r}"]
    error = document.get("error") if isinstance(document, dict) else None
    if (
        not isinstance(document, dict)
        or document.keys() != {"error"}
        or not isinstance(error, dict)
        or error.keys() != {"code", "message"}
        or not isinstance(error["message"], str)
        or not error["message"]
    ):
        return [*problems, f"error body not the SPEC §6.5 shape: {text[:200]!r}"]
    if error["code"] != ERROR_CODES.get(status):
        problems.append(f"code {error['code']!r} for {status}")
    if CANARY in error["message"].lower():
        problems.append(f"message quotes the request: {error['message']!r}")
    return problems


def check_join(routes: list[Route | None], response: httpx.Response, world: World) -> list[str]:
    """A successful join answers, in the SPEC's shape, for the meeting the
    target names (under one of its plausible readings)."""
    meetings = []
    for route in routes:
        code = normalized_code(route.code) if route is not None and route.code else None
        meetings.append(world.by_code(code) if code else None)
    try:
        body = response.json()
    except ValueError:
        return [f"join body not JSON: {response.text[:200]!r}"]
    if not isinstance(body, dict) or body.keys() != JOIN_KEYS:
        return [f"join body not the SPEC shape: {response.text[:200]!r}"]
    if all(meeting is None or body["meeting_id"] != meeting.meeting_id for meeting in meetings):
        return [f"joined {body['meeting_id']} instead of {meetings}"]
    return []


# --- sending -----------------------------------------------------------------------------------


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 7000):
        yield body[start : start + 7000]


async def send(client: httpx.AsyncClient, probe: Probe) -> httpx.Response:
    content: bytes | AsyncIterator[bytes] | None = probe.body
    if probe.body is not None and probe.chunked:
        content = _chunks(probe.body)
    request = client.build_request(
        probe.method,
        "/",
        headers=probe.headers,
        content=content,
        extensions={"target": probe.target.encode("ascii")},
    )
    return await client.send(request)


#: Longer than the GC's own request deadline (``GC_JOIN_TIMEOUT_S``, 40 s by
#: default): a request slowed down by a loaded machine gets the GC's 503
#: (which the model allows), not a client-side timeout.
CLIENT_TIMEOUT_S: Final = 60
#: Tries of a request the setup or the prelude needs to succeed while it
#: gets a 503 (a statement slower than the GC's fail-fast timeout).
ATTEMPTS: Final = 8


@asynccontextmanager
async def source_clients(port: int) -> AsyncIterator[list[httpx.AsyncClient]]:
    """One client per loopback source address."""
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}",
                    transport=httpx.AsyncHTTPTransport(local_address=f"127.0.0.{i + 1}"),
                    timeout=CLIENT_TIMEOUT_S,
                )
            )
            for i in range(SOURCE_ADDRESSES)
        ]
        yield clients


async def create_meeting(
    client: httpx.AsyncClient,
    credential: Credential,
    name: str,
    *,
    guests: bool,
    statuses: Counter[int],
) -> Meeting:
    """A meeting made over HTTP for the world (tried again on a 503)."""
    for _ in range(ATTEMPTS):
        response = await client.post(
            "/api/v1/meetings",
            json={"display_name": name, "allow_guests": guests},
            headers=list(credential.headers),
        )
        statuses[response.status_code] += 1
        if response.status_code != 503:
            break
    assert response.status_code == 201, response.text
    body = response.json()
    assert credential.org is not None
    return Meeting(credential.org, body["meeting_id"], body["meeting_code"], name, guests, True)


def meeting_of(response: httpx.Response, credential: Credential) -> Meeting:
    body = response.json()
    assert credential.org is not None
    return Meeting(
        credential.org, body["meeting_id"], body["meeting_code"], body["display_name"],
        body["allow_guests"], distinctive=False,
    )  # fmt: skip


# --- raw requests ------------------------------------------------------------------------------


#: How long a raw exchange waits for the server's answer (and its close):
#: generous, so a loaded CI machine is never taken for a server that hung.
RAW_EXCHANGE_S: Final = 10


async def raw_exchange(port: int, request: bytes) -> tuple[int | None, bytes]:
    """Send ``request`` as it is; the status and body of the answer (status
    ``None``: the server closed without one)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = b""
    async with stream:
        # The server may close while we send (a refusal): read what it said.
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(request)
        with trio.move_on_after(RAW_EXCHANGE_S), contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some(65536):
                received += chunk
    if not received:
        return None, b""
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


#: In the statuses of a raw case: the HTTP server may refuse the request as
#: malformed before the app sees it (a 4xx of its own, or closing).
REFUSED: Final = -1


def raw_requests(code: str, valid_a: bytes) -> list[tuple[str, bytes, frozenset[int]]]:
    """(what, the bytes, the statuses allowed). Where RFC 9112 lets a server
    either process or refuse a message (both framings; a folded header; a
    NUL in a field value, which it may replace by a space), either is
    allowed. So is either where only the HTTP library's strictness decides
    (h11 and hypercorn are not pinned): raw non-ASCII bytes in the target
    (h11 refuses them; a lenient parser would hand the app a join without
    credentials: 401) and obs-text in a field value (h11 passes it on; a
    strict parser would refuse). A guest join that reaches the app may get
    the 503 the model allows any join."""
    guest = f"POST /api/v1/meetings/{code}/guest-token HTTP/1.1\r\nHost: gc\r\n".encode()
    ada = b'{"display_name": "Ada"}'
    close = b"Connection: close\r\n"
    json_type = b"Content-Type: application/json\r\n"
    sized = b"Content-Length: %d\r\n\r\n" % len(ada) + ada
    get_live = b"GET /health/live HTTP/1.1\r\nHost: gc\r\n" + close
    refused = frozenset({REFUSED})
    joined_or_refused = frozenset({200, 503, REFUSED})
    return [
        ("UTF-8 bytes in the path",
         "GET /api/v1/meetings/ééé HTTP/1.1\r\nHost: gc\r\n".encode() + close + b"\r\n",
         frozenset({401, REFUSED})),
        ("invalid UTF-8 in the path",
         b"GET /api/v1/meetings/\xff\xfe\xfd HTTP/1.1\r\nHost: gc\r\n" + close + b"\r\n",
         frozenset({401, REFUSED})),
        ("space in the path",
         b"GET /health/live x HTTP/1.1\r\nHost: gc\r\n" + close + b"\r\n", refused),
        ("Content-Length and chunked",
         guest + json_type + close + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
         + b"%x\r\n" % len(ada) + ada + b"\r\n0\r\n\r\n", joined_or_refused),
        ("bad chunk size", guest + json_type + close
         + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + ada + b"\r\n0\r\n\r\n", refused),
        ("two Content-Lengths",
         guest + json_type + close + b"Content-Length: 23\r\nContent-Length: 5\r\n\r\n" + ada,
         refused),
        ("negative Content-Length",
         guest + json_type + close + b"Content-Length: -1\r\n\r\n" + ada, refused),
        ("folded header",
         guest + json_type + close + b"X-A: a\r\n b\r\n" + sized, joined_or_refused),
        ("space in a header name", guest + json_type + close + b"Bad Header: x\r\n" + sized,
         refused),
        ("20 KiB header", get_live + b"X-Big: " + b"b" * 20_000 + b"\r\n\r\n",
         frozenset({200, REFUSED})),
        ("NUL in a header value", get_live + b"X-Nul: a\x00b\r\n\r\n",
         frozenset({200, REFUSED})),
        ("HTTP/1.1 without Host", b"GET /health/live HTTP/1.1\r\n" + close + b"\r\n", refused),
        ("raw non-ASCII token",
         f"GET /api/v1/meetings/{code} HTTP/1.1\r\nHost: gc\r\n".encode() + close
         + b"Authorization: Bearer \xff\xfe\xc3\xa9." + valid_a[:40] + b"\r\n\r\n",
         frozenset({401, REFUSED})),
        ("raw non-ASCII charset",
         guest + close + b"Content-Type: application/json; charset=\xe9\r\n" + sized,
         frozenset({400, REFUSED})),
        ("lowercase method", b"get" + get_live[3:] + b"\r\n", frozenset({200, 405, REFUSED})),
        ("HTTP/1.0 without Host", b"GET /health/live HTTP/1.0\r\n\r\n", frozenset({200})),
        ("absolute-form target",
         b"GET http://evil.example/health/live HTTP/1.1\r\nHost: gc\r\n" + close + b"\r\n",
         frozenset({200, 404})),
        ("asterisk target", b"OPTIONS * HTTP/1.1\r\nHost: gc\r\n" + close + b"\r\n",
         frozenset({404, REFUSED})),
    ]  # fmt: skip


def check_raw(status: int | None, body: bytes, allowed: frozenset[int]) -> bool:
    """Whether a raw exchange ended acceptably (no traceback in any case)."""
    if LEAKED_INTERNALS.search(body.decode("utf-8", "replace")):
        return False
    if REFUSED in allowed and (status is None or (400 <= status < 500 and b'"error"' not in body)):
        return True  # the HTTP server's own refusal, not the app's
    if status not in allowed:
        return False
    return status < 400 or _is_error_shape(body)


def _is_error_shape(body: bytes) -> bool:
    try:
        document = json.loads(body)
    except ValueError:
        return False
    return (
        isinstance(document, dict)
        and document.keys() == {"error"}
        and isinstance(document["error"], dict)
        and document["error"].keys() == {"code", "message"}
    )


# --- the test ----------------------------------------------------------------------------------


@pytest.fixture
def fuzz_environ(keys: DevKeys, database_dsn: str) -> dict[str, str]:
    return gc_environ(
        keys,
        database_dsn,
        # The maximum: the guest limit is not under test here (and requests
        # rotate over SOURCE_ADDRESSES besides).
        GC_GUEST_TOKENS_PER_MINUTE="10000",
        GC_CREATES_PER_MINUTE="1000000",
        # The fake MCs heartbeat once; they stay fresh for the whole run.
        GC_STALE_AFTER_S="600",
    )


#: The warnings the meetings API logs when it answers 503 for want of time
#: (a statement slower than the fail-fast timeout, or the request deadline):
#: expected on a loaded machine, so long as each stands for a 503 we saw.
UNAVAILABLE_WARNINGS: Final = ("request_database_unavailable", "http_request_timeout")
API_LOGGER: Final = "darktower.gc.meetings_api"


def log_problems(caplog: pytest.LogCaptureFixture, unavailable: int) -> list[str]:
    """Records that mean something went wrong in the GC: any ERROR, any
    traceback, any warning of the HTTP layer - but the meetings API's
    :data:`UNAVAILABLE_WARNINGS`, up to one for each of the ``unavailable``
    503 responses the test received."""
    http_loggers = (API_LOGGER, "darktower.gc.http_app", "hypercorn")
    problems: list[str] = []
    explained: list[str] = []
    for r in caplog.records:
        line = f"{r.levelname} {r.name}: {r.getMessage()}"
        if (
            r.levelno == logging.WARNING
            and not r.exc_info
            and r.name == API_LOGGER
            and r.getMessage() in UNAVAILABLE_WARNINGS
        ):
            explained.append(line)
        elif (
            r.levelno >= logging.ERROR
            or r.exc_info
            or (r.levelno >= logging.WARNING and r.name.startswith(http_loggers))
        ):
            problems.append(line)
    if len(explained) > unavailable:
        problems += [f"{line} ({len(explained)} for {unavailable} 503s)" for line in explained]
    return problems


@pytest.mark.dt_timeout(TEST_TIMEOUT_S)
async def test_random_requests_get_no_500_no_traceback_and_no_other_orgs_data(
    db_pool: asyncpg.Pool,
    keys: DevKeys,
    fuzz_environ: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.WARNING, logger="httpx")  # a line per request otherwise
    rng = random.Random(SEED)
    creds = credentials(keys)
    valid_a, valid_b = creds[0], creds[1]
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    setup_statuses: Counter[int] = Counter()
    covered: Counter[str] = Counter()
    sequence = hashlib.sha256()  # of the statuses in order: equal runs, equal digests
    #: Creates answered 503: whether they made a row is unknown.
    unanswered_creates = 0
    async with (
        fakes(None, ACCEPT, ACCEPT) as mcs,
        running_gc(fuzz_environ) as gc,
        source_clients(gc.endpoints.http_port) as clients,
    ):
        for i, mc in enumerate(mcs):
            await add_mc(db_pool, f"mc-{i}", mc.endpoint, meetings_now=i)
        await add_mh(db_pool, "mh-a", zone="zone-a", max_streams=10_000)
        await add_mh(db_pool, "mh-b", zone="zone-b", max_streams=10_000)
        first = clients[0]
        world = World(
            [
                await create_meeting(
                    first, credential, name, guests=guests, statuses=setup_statuses
                )
                for credential, name, guests in [
                    (valid_a, "Aardvark Alpha Members Board", False),
                    (valid_a, "Aardvark Alpha Open Forum", True),
                    (valid_b, "Bison Bravo Members Board", False),
                    (valid_b, "Bison Bravo Open Forum", True),
                ]
            ],
            creds,
        )
        sent = 0

        async def exchange(probe: Probe) -> list[str] | None:
            """Send ``probe`` and check the answer; its coverage tags."""
            nonlocal sent, unanswered_creates
            client = clients[sent % SOURCE_ADDRESSES]
            sent += 1
            try:
                response = await send(client, probe)
            except httpx.HTTPError as exc:
                failures.append(f"{probe.describe()}: no response ({type(exc).__name__})")
                return None
            statuses[response.status_code] += 1
            sequence.update(response.status_code.to_bytes(2, "big"))
            tags = coverage_tags(probe, response.status_code, world)
            covered.update(tags)
            failures.extend(f"{probe.describe()}: {p}" for p in check(probe, response, world))
            if response.status_code == 201:
                world.meetings.append(meeting_of(response, probe.credential))
            if response.status_code == 503 and any(
                r is not None and r.name == "create" for r in routes_of(probe.target)
            ):
                unanswered_creates += 1
            return [*tags, f"status {response.status_code}"]

        started = time.perf_counter()
        fixed = prelude(world)
        for tag, probe in fixed:
            for _ in range(ATTEMPTS):
                reached = await exchange(probe)
                if reached is None or tag in reached or "status 503" not in reached:
                    break
        # The random requests: make_probe's draws do not depend on what the
        # GC answered (see pick_meeting), so every run sends the same ones.
        for index in range(len(fixed), len(fixed) + PROBES):
            await exchange(make_probe(rng, index, world))
        elapsed = time.perf_counter() - started

        raw_statuses: list[int | None] = []
        code = world.meetings[3].code
        token = valid_a.headers[0][1].removeprefix(b"Bearer ")
        for what, request, allowed in raw_requests(code, token):
            status, body = await raw_exchange(gc.endpoints.http_port, request)
            raw_statuses.append(status)
            if not check_raw(status, body, allowed):
                failures.append(f"raw {what}: status {status}, body {body[:200]!r}")

        for _ in range(ATTEMPTS):  # a 503 is readiness timing out on a loaded machine
            ready = await first.get("/health/ready")
            if ready.status_code != 503:
                break
        assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
        await check_meeting_rows(db_pool, world, failures, unanswered_creates)

    print(
        f"\nfuzz seed={SEED:#x}: {len(fixed)} fixed and {PROBES} random requests"
        f" in {elapsed:.1f} s, status sequence {sequence.hexdigest()[:16]};"
        f" statuses {sorted(statuses.items())}; raw {raw_statuses};"
        f" meetings {len(world.meetings)};"
        f" cases {sorted((t, n) for t, n in covered.items() if not t.startswith('credential'))}"
    )
    unavailable = statuses[503] + setup_statuses[503] + raw_statuses.count(503)
    logged = [f"log: {line}" for line in log_problems(caplog, unavailable)]
    required = [*REQUIRED_TAGS, *(f"credential {c.name}" for c in creds)]
    unreached = [f"no request reached: {tag}" for tag in required if not covered[tag]]
    problems = failures[:30] + logged[:10] + unreached
    count = len(failures) + len(logged) + len(unreached)
    assert not problems, f"{count} problems (the first shown):\n" + "\n".join(problems)


async def check_meeting_rows(
    pool: asyncpg.Pool, world: World, failures: list[str], unanswered_creates: int
) -> None:
    """Every meeting row is one the model knows, made by a valid user of its
    own org (no odd token created anything, anywhere). A create answered
    503 may or may not have made its row (the deadline can fall after the
    commit): up to ``unanswered_creates`` rows the model does not know are
    allowed, each still made by a valid user of its own org."""
    rows = await fetch(pool, "SELECT meeting_id, org_id, created_by FROM meetings")
    known = {m.meeting_id: m.org for m in world.meetings}
    owners = {ORG_A: USER_A, ORG_B: USER_B}
    unknown = 0
    for row in rows:
        meeting_id, org = str(row["meeting_id"]), row["org_id"]
        if owners.get(org) != row["created_by"] or known.get(meeting_id, org) != org:
            failures.append(f"unexpected meeting row {dict(row)}")
        unknown += meeting_id not in known
    if unknown > unanswered_creates or len(rows) - unknown != len(world.meetings):
        failures.append(
            f"{len(rows)} meeting rows ({unknown} unknown) for {len(world.meetings)} meetings"
            f" created and {unanswered_creates} creates answered 503"
        )
