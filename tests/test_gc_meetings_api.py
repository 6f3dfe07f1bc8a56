"""The GC's meetings API at the HTTP layer (SPEC §4, §6.5).

The app runs in-process (httpx's ASGITransport, on trio) with real token
validation against a JWKS file. The meetings service behind it is a small
fake (:class:`FakeMeetings`, a dict): these tests are about what the HTTP
layer accepts, refuses and answers; the join flow itself is tested against
real PostgreSQL elsewhere.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
import trio
import trio.testing
from gc_harness import DevKeys, gc_environ, running_gc
from starlette.applications import Starlette
from starlette.routing import Route

from darktower.gc.http_app import create_app
from darktower.gc.join_errors import GuestsNotAllowed, MeetingNotFound, ServiceUnavailable
from darktower.gc.join_flow import JoinResult
from darktower.gc.meetings_api import MeetingsApiDeps, meetings_routes
from darktower.gc.metrics import REGISTRY
from darktower.gc.openapi import OPENAPI_DOCUMENT
from darktower.gc.rate_limit import RateLimiter
from darktower.gc.repositories.assignments import ActiveAssignment, AssignedMh
from darktower.gc.repositories.meetings import MeetingRow
from darktower.shared import keys, tokens
from darktower.shared.config import HostPort
from darktower.shared.db import DatabaseUnavailable
from darktower.shared.http_server import run_http
from darktower.shared.jwks import KeyStore

ORG = uuid.UUID("0b8a3f5e-7d0c-4c4e-9a51-3f2b7c1d9e01")
OTHER_ORG = uuid.UUID("6f1e2d3c-4b5a-4978-8a6b-5c4d3e2f1a00")
USER = "user-1"
CODE = "abc-defg-hij"
GUEST_CODE = "gst-defg-hij"
CLIENT_ADDRESS = ("203.0.113.7", 40000)
REQUEST_TIMEOUT_S = 30.0


# --- the fake service ----------------------------------------------------------------------


class FakeMeetings:
    """The dependency of the HTTP layer, faked: meetings in a dict, every
    join answered with one fixed assignment (backup listed first, so the
    response's ordering is the handler's doing)."""

    def __init__(self) -> None:
        self.by_code: dict[str, MeetingRow] = {}
        self.created: list[dict[str, object]] = []
        self.joins: list[tuple[str, uuid.UUID | None]] = []
        self.join_error: Exception | None = None
        self.create_error: Exception | None = None
        self.join_hangs = False
        self.assigned = True

    def add(self, code: str, *, org_id: uuid.UUID = ORG, allow_guests: bool = False) -> MeetingRow:
        row = MeetingRow(
            meeting_id=uuid.uuid4(),
            org_id=org_id,
            meeting_code=code,
            display_name=f"Meeting {code}",
            created_by="someone",
            allow_guests=allow_guests,
            max_participants=100,
            status="scheduled",
        )
        self.by_code[code] = row
        return row

    async def create_meeting(
        self,
        *,
        org_id: uuid.UUID,
        created_by: str,
        display_name: str,
        allow_guests: bool,
        max_participants: int,
    ) -> MeetingRow:
        if self.create_error is not None:
            raise self.create_error
        self.created.append(
            {
                "org_id": org_id,
                "created_by": created_by,
                "display_name": display_name,
                "allow_guests": allow_guests,
                "max_participants": max_participants,
            }
        )
        row = MeetingRow(
            meeting_id=uuid.uuid4(),
            org_id=org_id,
            meeting_code=f"new-mtng-{len(self.created):03d}",
            display_name=display_name,
            created_by=created_by,
            allow_guests=allow_guests,
            max_participants=max_participants,
            status="scheduled",
        )
        self.by_code[row.meeting_code] = row
        return row

    async def join(self, code: str, org_id: uuid.UUID | None) -> JoinResult:
        self.joins.append((code, org_id))
        if self.join_hangs:
            await trio.sleep_forever()
        if self.join_error is not None:
            raise self.join_error
        meeting = self.by_code.get(code)
        if meeting is None or (org_id is not None and meeting.org_id != org_id):
            raise MeetingNotFound("meeting not found")
        if org_id is None and not meeting.allow_guests:
            raise GuestsNotAllowed("this meeting does not admit guests")
        assignment = ActiveAssignment(
            meeting_id=meeting.meeting_id,
            region="local",
            controller_id="mc-1",
            mc_grpc_endpoint="http://127.0.0.1:50052",
            mc_webtransport_endpoint="https://127.0.0.1:4433",
            generation=7,
            mc_live=True,
            media_handlers=(
                AssignedMh("mh-b", "https://127.0.0.1:4435", "backup"),
                AssignedMh("mh-a", "https://127.0.0.1:4434", "primary"),
            ),
        )
        return JoinResult(meeting, assignment, assigned=self.assigned)


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def ac_keys(tmp_path: Path) -> DevKeys:
    """The key users' tokens are signed with (the AC's), published in a JWKS file."""
    return DevKeys.create(tmp_path / "ac")


@pytest.fixture
def gc_key() -> keys.Ed25519PrivateKey:
    """The GC's own signing key (GC_SIGNING_KEY), for meeting tokens."""
    return keys.generate_private_key()


@pytest.fixture
def service() -> FakeMeetings:
    fake = FakeMeetings()
    fake.add(CODE)
    fake.add(GUEST_CODE, allow_guests=True)
    return fake


@pytest.fixture
def limiter() -> RateLimiter:
    return RateLimiter(burst=5, refill_interval_s=6.0)


#: The create limit of the tests' app: the GC's default rate (30 a minute).
CREATE_BURST = 10
CREATE_INTERVAL_S = 2.0


@pytest.fixture
def create_limiter() -> RateLimiter:
    return RateLimiter(burst=CREATE_BURST, refill_interval_s=CREATE_INTERVAL_S)


@pytest.fixture
def app(
    ac_keys: DevKeys,
    gc_key: keys.Ed25519PrivateKey,
    service: FakeMeetings,
    limiter: RateLimiter,
    create_limiter: RateLimiter,
) -> Starlette:
    deps = MeetingsApiDeps(
        validator=tokens.TokenValidator(KeyStore([str(ac_keys.jwks_path)])),
        create_meeting=service.create_meeting,
        join=service.join,
        signing_key=gc_key,
        guest_limiter=limiter,
        create_limiter=create_limiter,
        request_timeout_s=REQUEST_TIMEOUT_S,
    )
    return Starlette(routes=meetings_routes(deps))


@asynccontextmanager
async def open_client(
    app: Starlette, address: tuple[str, int] = CLIENT_ADDRESS
) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=address)
    async with httpx.AsyncClient(transport=transport, base_url="http://gc.test") as client:
        yield client


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with open_client(app) as c:
        yield c


def user_token(
    ac_keys: DevKeys,
    *,
    scopes: tuple[str, ...] = (tokens.SCOPE_MEETING_JOIN, tokens.SCOPE_MEETING_CREATE),
    org_id: object = str(ORG),
    sub: str = USER,
    audience: str = tokens.AUD_GC,
    ttl_s: int = 3600,
    now: float | None = None,
) -> str:
    extra = {} if org_id is None else {"org_id": org_id}
    return tokens.mint_token(
        ac_keys.private_key,
        kid=ac_keys.kid,
        sub=sub,
        audience=audience,
        scopes=scopes,
        ttl_s=ttl_s,
        extra=extra,
        now=now,
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    """The response is SPEC §6.5's error shape with ``status``/``code``; returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    message: str = body["error"]["message"]
    assert message
    assert "Traceback" not in response.text
    return message


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def meeting_token_validator(
    client: httpx.AsyncClient, tmp_path: Path
) -> tokens.TokenValidator:
    """A validator for meeting tokens built the way an MC builds one: from the
    JWKS the GC publishes."""
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    path = tmp_path / "gc-jwks.json"
    path.write_text(response.text)
    return tokens.TokenValidator(KeyStore([str(path)]))


JSON = {"Content-Type": "application/json"}


async def create(
    client: httpx.AsyncClient,
    ac_keys: DevKeys,
    body: object = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """``POST /api/v1/meetings`` as a user (``USER`` unless ``token``), the
    body declared as JSON unless ``headers`` say otherwise."""
    if body is not None:
        kwargs["json"] = body
    all_headers = JSON | bearer(token or user_token(ac_keys)) | (headers or {})
    return await client.post("/api/v1/meetings", headers=all_headers, **kwargs)


async def guest(
    client: httpx.AsyncClient,
    body: object = None,
    code: str = GUEST_CODE,
    *,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> httpx.Response:
    """A guest join, the body declared as JSON unless ``headers`` say otherwise."""
    if body is not None:
        kwargs["json"] = body
    return await client.post(
        f"/api/v1/meetings/{code}/guest-token", headers=JSON | (headers or {}), **kwargs
    )


# --- authentication ------------------------------------------------------------------------


def _other_key_token() -> str:
    other = keys.generate_private_key()
    return tokens.mint_user_token(
        other, kid=keys.key_id(other.public_key()), user_id=USER, org_id=str(ORG)
    )


def _none_alg_token(kid: str) -> str:
    now = int(time.time())
    payload = {"sub": USER, "aud": "gc", "scope": "meeting.join meeting.create", "iat": now}
    payload |= {"exp": now + 600, "org_id": str(ORG)}
    header = b64url(json.dumps({"alg": "none", "kid": kid}).encode())
    return f"{header}.{b64url(json.dumps(payload).encode())}."


def _hs256_token(kid: str) -> str:
    now = int(time.time())
    payload = {"sub": USER, "aud": "gc", "scope": "meeting.join", "iat": now, "exp": now + 600}
    return jwt.encode(payload | {"org_id": str(ORG)}, "k" * 32, "HS256", headers={"kid": kid})


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("Bearer ", id="empty-token"),
        pytest.param("Basic dXNlcjpwYXNz", id="basic"),
        pytest.param("bearer {valid}", id="lowercase-scheme"),
        pytest.param("Bearer not-a-jwt", id="malformed"),
        pytest.param("Bearer a.b.c", id="garbage-segments"),
        pytest.param("Bearer {none_alg}", id="alg-none"),
        pytest.param("Bearer {hs256}", id="alg-hs256"),
        pytest.param("Bearer {expired}", id="expired"),
        pytest.param("Bearer {future_iat}", id="iat-in-future"),
        pytest.param("Bearer {unknown_key}", id="unknown-key"),
        pytest.param("Bearer {tampered}", id="bad-signature"),
        pytest.param("Bearer {oversized}", id="over-8-KiB"),
        pytest.param("Bearer {org_not_string}", id="org-id-not-a-string"),
    ],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/v1/meetings"), ("GET", f"/api/v1/meetings/{CODE}")],
)
async def test_untrusted_credentials_are_401(
    client: httpx.AsyncClient,
    ac_keys: DevKeys,
    service: FakeMeetings,
    authorization: str | None,
    method: str,
    path: str,
) -> None:
    valid = user_token(ac_keys)
    header, payload, signature = valid.split(".")
    forms = {
        "valid": valid,
        "none_alg": _none_alg_token(ac_keys.kid),
        "hs256": _hs256_token(ac_keys.kid),
        "expired": user_token(ac_keys, ttl_s=3600, now=time.time() - 7200),
        "future_iat": user_token(ac_keys, now=time.time() + 3600),
        "unknown_key": _other_key_token(),
        "tampered": f"{header}.{payload}.{signature[:-4]}AAAA",
        "oversized": user_token(ac_keys, sub="u" * 9000),
        "org_not_string": user_token(ac_keys, org_id=12345),
    }
    headers = {} if authorization is None else {"Authorization": authorization.format(**forms)}
    before = metric("gc_joins_total", {"kind": "user", "result": "unauthorized"})
    response = await client.request(
        method, path, headers=headers, json={"display_name": "x"} if method == "POST" else None
    )
    message = assert_error(response, 401, "UNAUTHORIZED")
    assert response.headers["www-authenticate"] == "Bearer"
    assert message == "missing or invalid credentials"
    assert service.created == []
    assert service.joins == []
    if method == "GET":
        assert metric("gc_joins_total", {"kind": "user", "result": "unauthorized"}) == before + 1


@pytest.mark.parametrize(
    ("method", "path", "token_kwargs"),
    [
        ("POST", "/api/v1/meetings", {"audience": tokens.AUD_MC}),
        ("POST", "/api/v1/meetings", {"scopes": (tokens.SCOPE_MEETING_JOIN,)}),
        ("POST", "/api/v1/meetings", {"scopes": ("mc.register",)}),
        ("POST", "/api/v1/meetings", {"org_id": None}),
        ("POST", "/api/v1/meetings", {"org_id": "not-a-uuid"}),
        ("POST", "/api/v1/meetings", {"org_id": ""}),
        ("POST", "/api/v1/meetings", {"sub": "u" * 256}),
        ("POST", "/api/v1/meetings", {"sub": "user\x00one"}),
        ("POST", "/api/v1/meetings", {"sub": "user one"}),
        ("POST", "/api/v1/meetings", {"sub": "user\u202eone"}),
        ("POST", "/api/v1/meetings", {"sub": "ユーザー"}),
        ("POST", "/api/v1/meetings", {"sub": "user/one"}),
        ("POST", "/api/v1/meetings", {"sub": "guest-0123456789abcdef"}),
        ("POST", "/api/v1/meetings", {"sub": "Guest-x"}),
        ("GET", f"/api/v1/meetings/{CODE}", {"sub": "u" * 256}),
        ("GET", f"/api/v1/meetings/{CODE}", {"sub": "user\none"}),
        ("GET", f"/api/v1/meetings/{CODE}", {"sub": "user\u200bone"}),
        ("GET", f"/api/v1/meetings/{CODE}", {"sub": "guest-0123456789abcdef"}),
        ("GET", f"/api/v1/meetings/{CODE}", {"sub": "GUEST-x"}),
        ("GET", f"/api/v1/meetings/{CODE}", {"audience": tokens.AUD_MC}),
        ("GET", f"/api/v1/meetings/{CODE}", {"scopes": (tokens.SCOPE_MEETING_CREATE,)}),
        ("GET", f"/api/v1/meetings/{CODE}", {"org_id": None}),
        ("GET", f"/api/v1/meetings/{CODE}", {"org_id": "12345"}),
    ],
    ids=lambda v: v if isinstance(v, str) and not v.startswith("/") else None,
)
async def test_genuine_tokens_without_the_grant_are_403(
    client: httpx.AsyncClient,
    ac_keys: DevKeys,
    service: FakeMeetings,
    method: str,
    path: str,
    token_kwargs: dict[str, Any],
) -> None:
    response = await client.request(
        method,
        path,
        headers=bearer(user_token(ac_keys, **token_kwargs)),
        json={"display_name": "x"} if method == "POST" else None,
    )
    assert assert_error(response, 403, "FORBIDDEN") == "permission denied"
    assert "www-authenticate" not in response.headers
    assert service.created == []
    assert service.joins == []


async def test_a_rotated_key_is_fetched_once_and_accepted(
    client: httpx.AsyncClient, ac_keys: DevKeys, tmp_path: Path
) -> None:
    """Like the gRPC server: an unknown kid re-reads the JWKS (validate_trio)."""
    rotated = DevKeys.create(tmp_path / "rotated")
    keys.write_jwks(
        ac_keys.jwks_path,
        [
            keys.public_jwk(ac_keys.private_key.public_key()),
            keys.public_jwk(rotated.private_key.public_key()),
        ],
    )
    response = await client.get(f"/api/v1/meetings/{CODE}", headers=bearer(user_token(rotated)))
    assert response.status_code == 200, response.text


# --- POST /api/v1/meetings -----------------------------------------------------------------


async def test_create_returns_201_with_the_meeting(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings
) -> None:
    before = metric("gc_meetings_created_total")
    response = await create(
        client,
        ac_keys,
        {"display_name": "  Weekly sync  ", "allow_guests": True, "max_participants": 12},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == {
        "meeting_id",
        "meeting_code",
        "display_name",
        "allow_guests",
        "max_participants",
    }
    row = service.by_code[body["meeting_code"]]
    assert body == {
        "meeting_id": str(row.meeting_id),
        "meeting_code": row.meeting_code,
        "display_name": "Weekly sync",
        "allow_guests": True,
        "max_participants": 12,
    }
    assert response.headers["location"] == f"/api/v1/meetings/{row.meeting_code}"
    assert service.created == [
        {
            "org_id": ORG,
            "created_by": USER,
            "display_name": "Weekly sync",
            "allow_guests": True,
            "max_participants": 12,
        }
    ]
    assert metric("gc_meetings_created_total") == before + 1


async def test_create_defaults(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings
) -> None:
    response = await create(client, ac_keys, {"display_name": "Standup"})
    assert response.status_code == 201, response.text
    assert response.json()["allow_guests"] is False
    assert response.json()["max_participants"] == 100
    assert service.created[0]["allow_guests"] is False
    assert service.created[0]["max_participants"] == 100


async def test_create_takes_any_uuid_spelling_of_org_id(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings
) -> None:
    token = user_token(ac_keys, org_id=ORG.hex.upper())
    response = await client.post(
        "/api/v1/meetings", headers=bearer(token), json={"display_name": "x"}
    )
    assert response.status_code == 201, response.text
    assert service.created[0]["org_id"] == ORG


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("", False),
        (" " * 5, False),
        ("a", True),
        ("a" * 200, True),
        ("  " + "a" * 200 + "  ", True),
        ("a" * 201, False),
        ("é" * 200, True),
        ("😀" * 200, True),
        ("a\x00b", False),
        ("a\nb", False),
        ("a\tb", False),
        ("a\x7fb", False),
        ("a\x85b", False),
        ("a\u2028b", False),
        # Only whitespace, of any kind: empty once stripped.
        ("\u3000\u2003\u00a0\t", False),
        ("a\u00a0b", True),  # inside a name, a no-break space is a space
        ("Zoë Ådalović 日本語", True),
        ("Ade\u0301", True),  # a combining accent (Mn)
        # Format (Cf): bidi overrides and isolates, zero-width characters,
        # soft hyphen, BOM, tag characters.
        ("a\u202eb", False),
        ("a\u2066b", False),
        ("a\u200bb", False),
        ("\u200b", False),
        # Joiners (ZWJ, ZWNJ) only between two visible characters: names
        # and emoji sequences need them; padding or doubling is refused.
        ("👩\u200d💻", True),
        ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", True),  # Persian with ZWNJ
        ("ab\u200d", False),
        ("\u200dab", False),
        ("a\u200d\u200db", False),
        ("a\u200c\u200db", False),
        ("a \u200db", False),
        ("a\u200d\u202eb", False),
        ("a\u00adb", False),
        ("a\ufeffb", False),
        ("a\U000e0041b", False),
        # Private use (Co), unassigned (Cn, noncharacters included).
        ("a\ue000b", False),
        ("a\U000f0000b", False),
        ("a\u0378b", False),
        ("a\uffffb", False),
    ],
    ids=lambda v: repr(v)[:20] if isinstance(v, str) else None,
)
async def test_create_display_name_rules(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings, name: str, accepted: bool
) -> None:
    response = await create(client, ac_keys, {"display_name": name})
    if accepted:
        assert response.status_code == 201, response.text
        assert response.json()["display_name"] == name.strip()
    else:
        message = assert_error(response, 400, "INVALID_REQUEST")
        assert message.startswith("display_name: ")
        assert service.created == []


async def test_a_lone_surrogate_is_refused(client: httpx.AsyncClient, ac_keys: DevKeys) -> None:
    response = await create(client, ac_keys, content=b'{"display_name": "a\\ud800b"}')
    assert assert_error(response, 400, "INVALID_REQUEST").startswith("display_name: ")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "display_name"),
        ({"display_name": None}, "display_name"),
        ({"display_name": 5}, "display_name"),
        ({"display_name": ["a"]}, "display_name"),
        ({"display_name": "x", "allow_guests": "true"}, "allow_guests"),
        ({"display_name": "x", "allow_guests": 1}, "allow_guests"),
        ({"display_name": "x", "allow_guests": None}, "allow_guests"),
        ({"display_name": "x", "max_participants": 0}, "max_participants"),
        ({"display_name": "x", "max_participants": 1001}, "max_participants"),
        ({"display_name": "x", "max_participants": -1}, "max_participants"),
        ({"display_name": "x", "max_participants": "10"}, "max_participants"),
        ({"display_name": "x", "max_participants": 10.0}, "max_participants"),
        ({"display_name": "x", "max_participants": 10.5}, "max_participants"),
        ({"display_name": "x", "max_participants": True}, "max_participants"),
        ({"display_name": "x", "max_participants": 2**70}, "max_participants"),
        ({"display_name": "x", "max_participants": None}, "max_participants"),
        ({"display_name": "x", "extra": 1}, "body"),
        ({"display_name": "x", "allow_guest": True}, "body"),
        ([], "body"),
        ("x", "body"),
        (3, "body"),
    ],
)
async def test_create_refuses_bad_fields(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings, body: object, field: str
) -> None:
    response = await create(client, ac_keys, content=json.dumps(body).encode())
    message = assert_error(response, 400, "INVALID_REQUEST")
    assert message.startswith(f"{field}: ")
    assert service.created == []


@pytest.mark.parametrize("max_participants", [1, 1000])
async def test_create_max_participants_bounds(
    client: httpx.AsyncClient, ac_keys: DevKeys, max_participants: int
) -> None:
    response = await create(
        client, ac_keys, {"display_name": "x", "max_participants": max_participants}
    )
    assert response.status_code == 201, response.text
    assert response.json()["max_participants"] == max_participants


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b"display_name=x", id="form"),
        pytest.param(b'{"display_name": "x",}', id="trailing-comma"),
        pytest.param(b'{"display_name": "x", "display_name": "y"}', id="duplicate-field"),
        pytest.param(b'{"display_name": "x", "max_participants": NaN}', id="nan"),
        pytest.param(b'{"display_name": "x", "max_participants": Infinity}', id="infinity"),
        pytest.param(b'{"display_name": "\xff"}', id="not-utf8"),
        pytest.param(b"\xef\xbb\xbf" + b'{"display_name": "x"}', id="bom"),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="deep-nesting"),
    ],
)
async def test_create_refuses_invalid_json(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings, content: bytes
) -> None:
    response = await create(client, ac_keys, content=content)
    assert assert_error(response, 400, "INVALID_REQUEST").startswith("body: ")
    assert service.created == []


async def test_errors_never_echo_the_value(client: httpx.AsyncClient, ac_keys: DevKeys) -> None:
    marker = "ZZ-hostile-<script>-ZZ"
    for body in (
        {"display_name": marker * 20},
        {"display_name": "x", marker: 1},
        {"display_name": "x", "max_participants": marker},
        {"display_name": marker, "allow_guests": marker},
    ):
        response = await create(client, ac_keys, body)
        assert_error(response, 400, "INVALID_REQUEST")
        assert marker not in response.text


class ChunkedBody(httpx.AsyncByteStream):
    """A request body sent without Content-Length. A plain iterator, not an
    async generator: the server stops reading it part way, and an async
    generator left unfinished would be finalised by the garbage collector."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = iter(chunks)

    def __aiter__(self) -> ChunkedBody:
        return self

    async def __anext__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            raise StopAsyncIteration from None


async def test_body_size_limit(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings
) -> None:
    limit = 16 * 1024
    prefix = b'{"display_name": "x"'
    exactly = prefix + b" " * (limit - len(prefix) - 1) + b"}"
    assert len(exactly) == limit
    response = await create(client, ac_keys, content=exactly)
    assert response.status_code == 201, response.text

    over = prefix + b" " * (limit - len(prefix)) + b"}"
    response = await create(client, ac_keys, content=over)
    assert_error(response, 400, "INVALID_REQUEST")

    # Without Content-Length the limit is enforced while reading.
    request = client.build_request(
        "POST", "/api/v1/meetings", headers=JSON | bearer(user_token(ac_keys))
    )
    request.stream = ChunkedBody([prefix, *([b" " * 1024] * 100), b"}"])
    response = await client.send(request)
    assert assert_error(response, 400, "INVALID_REQUEST").startswith("body: ")
    assert len(service.created) == 1


async def test_create_database_unavailable_is_503(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings
) -> None:
    service.create_error = DatabaseUnavailable("database unavailable")
    response = await create(client, ac_keys, {"display_name": "x"})
    assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize(
    "sub",
    [
        "auth0|5f1c9a0e",
        "ada@example.com",
        "google-oauth2:1234567890",
        "a.b_c+d-e",
        str(uuid.UUID(int=7)),
        "u" * 255,
        "guest",  # the reserved prefix is "guest-"
        "guest_1",
        "my-guest-1",
    ],
)
async def test_usable_subs_create_and_join_as_themselves(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings, tmp_path: Path, sub: str
) -> None:
    token = user_token(ac_keys, sub=sub)
    created = await create(client, ac_keys, {"display_name": "x"}, token=token)
    assert created.status_code == 201, created.text
    assert service.created[0]["created_by"] == sub
    joined = await client.get(f"/api/v1/meetings/{CODE}", headers=bearer(token))
    assert joined.status_code == 200, joined.text
    validator = await meeting_token_validator(client, tmp_path)
    claims = validator.validate(
        joined.json()["token"], audience=tokens.AUD_MC, scope=tokens.SCOPE_MEETING_PARTICIPANT
    )
    assert claims.sub == sub


async def test_creates_are_limited_per_user_then_recover(
    mock_clock: trio.testing.MockClock,
    client: httpx.AsyncClient,
    ac_keys: DevKeys,
    service: FakeMeetings,
) -> None:
    mine = user_token(ac_keys)
    # Every create counts, whatever its fate: good, bad body, bad Content-Type.
    statuses = [
        (await create(client, ac_keys, {"display_name": "x"}, token=mine)).status_code,
        (await create(client, ac_keys, {"display_name": ""}, token=mine)).status_code,
        (
            await create(
                client,
                ac_keys,
                content=b'{"display_name": "x"}',
                token=mine,
                headers={"Content-Type": "text/plain"},
            )
        ).status_code,
    ]
    assert statuses == [201, 400, 400]
    for _ in range(CREATE_BURST - 3):
        assert (await create(client, ac_keys, {"display_name": "x"}, token=mine)).status_code == 201
    created = len(service.created)

    refused = await create(client, ac_keys, {"display_name": "x"}, token=mine)
    assert assert_error(refused, 429, "RATE_LIMITED") == "too many meetings created; retry later"
    assert refused.headers["retry-after"] == "2"
    # Refused before the body is even looked at.
    refused = await create(client, ac_keys, content=b"not json", token=mine)
    assert_error(refused, 429, "RATE_LIMITED")
    assert len(service.created) == created

    # Other users have their own buckets - another sub, or the same sub in
    # another org - and joins are not creates.
    for other in (user_token(ac_keys, sub="user-2"), user_token(ac_keys, org_id=str(OTHER_ORG))):
        response = await create(client, ac_keys, {"display_name": "x"}, token=other)
        assert response.status_code == 201, response.text
    joined = await client.get(f"/api/v1/meetings/{CODE}", headers=bearer(mine))
    assert joined.status_code == 200

    mock_clock.jump(1.0)
    refused = await create(client, ac_keys, {"display_name": "x"}, token=mine)
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "1"
    mock_clock.jump(1.0)
    assert (await create(client, ac_keys, {"display_name": "x"}, token=mine)).status_code == 201
    assert (await create(client, ac_keys, {"display_name": "x"}, token=mine)).status_code == 429


async def test_unauthenticated_creates_cost_no_users_tokens(
    client: httpx.AsyncClient, ac_keys: DevKeys
) -> None:
    """The key is the verified token's: a request without one cannot drain
    anyone's bucket."""
    for _ in range(CREATE_BURST + 5):
        response = await client.post("/api/v1/meetings", headers=JSON, json={"display_name": "x"})
        assert response.status_code == 401
    assert (await create(client, ac_keys, {"display_name": "x"})).status_code == 201


async def test_the_gc_wires_its_create_limit(
    db_pool: asyncpg.Pool, ac_keys: DevKeys, database_dsn: str
) -> None:
    """GC_CREATES_PER_MINUTE reaches the running GC's API."""
    environ = gc_environ(ac_keys, database_dsn, GC_CREATES_PER_MINUTE="2")
    with trio.fail_after(30):
        async with (
            running_gc(environ) as gc,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gc.endpoints.http_port}") as http,
        ):
            statuses = [
                (await create(http, ac_keys, {"display_name": "x"})).status_code for _ in range(3)
            ]
            other = user_token(ac_keys, sub="user-2")
            other_status = await create(http, ac_keys, {"display_name": "x"}, token=other)
    assert statuses == [201, 201, 429]
    assert other_status.status_code == 201


# --- GET /api/v1/meetings/{code} -----------------------------------------------------------


async def test_join_response_is_exactly_the_spec_shape(
    client: httpx.AsyncClient,
    ac_keys: DevKeys,
    gc_key: keys.Ed25519PrivateKey,
    service: FakeMeetings,
    tmp_path: Path,
) -> None:
    meeting = service.by_code[CODE]
    before = metric("gc_joins_total", {"kind": "user", "result": "assigned"})
    before_seconds = metric("gc_join_seconds_count", {"result": "assigned"})
    response = await client.get(f"/api/v1/meetings/{CODE}", headers=bearer(user_token(ac_keys)))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    token = body.pop("token")
    assert body == {
        "meeting_id": str(meeting.meeting_id),
        "display_name": meeting.display_name,
        "expires_in": 600,
        "mc": {
            "id": "mc-1",
            "grpc_endpoint": "http://127.0.0.1:50052",
            "webtransport_endpoint": "https://127.0.0.1:4433",
        },
        "media_handlers": [
            {"id": "mh-a", "webtransport_endpoint": "https://127.0.0.1:4434", "role": "primary"},
            {"id": "mh-b", "webtransport_endpoint": "https://127.0.0.1:4435", "role": "backup"},
        ],
    }
    assert service.joins == [(CODE, ORG)]
    assert metric("gc_joins_total", {"kind": "user", "result": "assigned"}) == before + 1
    assert metric("gc_join_seconds_count", {"result": "assigned"}) == before_seconds + 1

    # The meeting token: signed by the GC's key, verifiable from the GC's JWKS.
    assert jwt.get_unverified_header(token)["kid"] == keys.key_id(gc_key.public_key())
    validator = await meeting_token_validator(client, tmp_path)
    claims = validator.validate(
        token, audience=tokens.AUD_MC, scope=tokens.SCOPE_MEETING_PARTICIPANT
    )
    assert claims.sub == USER
    assert claims.meeting_id == str(meeting.meeting_id)
    assert claims.jti
    assert claims.iat is not None
    assert claims.exp - claims.iat == 600
    assert abs(claims.iat - time.time()) < 60
    # Not valid where a user token is expected.
    with pytest.raises(tokens.PermissionDenied):
        validator.validate(token, audience=tokens.AUD_GC, scope=tokens.SCOPE_MEETING_JOIN)


async def test_join_of_an_existing_assignment_counts_as_reused(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings
) -> None:
    service.assigned = False
    before = metric("gc_joins_total", {"kind": "user", "result": "reused"})
    response = await client.get(f"/api/v1/meetings/{CODE}", headers=bearer(user_token(ac_keys)))
    assert response.status_code == 200
    assert metric("gc_joins_total", {"kind": "user", "result": "reused"}) == before + 1


async def test_each_join_gets_a_distinct_token(client: httpx.AsyncClient, ac_keys: DevKeys) -> None:
    headers = bearer(user_token(ac_keys))
    first = (await client.get(f"/api/v1/meetings/{CODE}", headers=headers)).json()["token"]
    second = (await client.get(f"/api/v1/meetings/{CODE}", headers=headers)).json()["token"]
    assert (
        jwt.decode(first, options={"verify_signature": False})["jti"]
        != jwt.decode(second, options={"verify_signature": False})["jti"]
    )


async def test_another_orgs_meeting_is_404_like_a_missing_one(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings
) -> None:
    service.add("oth-ermt-ngx", org_id=OTHER_ORG)
    other = await client.get("/api/v1/meetings/oth-ermt-ngx", headers=bearer(user_token(ac_keys)))
    missing = await client.get("/api/v1/meetings/no-such-mtg", headers=bearer(user_token(ac_keys)))
    assert assert_error(other, 404, "NOT_FOUND") == assert_error(missing, 404, "NOT_FOUND")
    assert other.json() == missing.json()
    assert "oth-ermt-ngx" not in other.text


@pytest.mark.parametrize(
    "code",
    [
        "ab",
        "a" * 33,
        "abc_defg",
        "abc.defg",
        "abc defg",
        "äbc-defg",
        "abc-defg\n",
        "%00abc",
    ],
)
async def test_join_refuses_malformed_codes(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings, code: str
) -> None:
    response = await client.get(
        "/api/v1/meetings/" + urllib.parse.quote(code, safe=""),
        headers=bearer(user_token(ac_keys)),
    )
    assert assert_error(response, 400, "INVALID_REQUEST").startswith("code: ")
    assert service.joins == []


@pytest.mark.parametrize("code", ["abc", "a" * 32, "ABC-DEFG-HIJ"])
async def test_join_accepts_codes_in_the_schema_rule(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings, code: str
) -> None:
    service.add(code.lower())
    response = await client.get(f"/api/v1/meetings/{code}", headers=bearer(user_token(ac_keys)))
    assert response.status_code == 200, response.text
    assert service.joins == [(code.lower(), ORG)]


async def test_service_unavailable_is_503_with_its_retry_after(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings
) -> None:
    service.join_error = ServiceUnavailable(
        "no_controller", "no meeting controller available", retry_after_s=3
    )
    before = metric("gc_joins_total", {"kind": "user", "result": "no_controller"})
    response = await client.get(f"/api/v1/meetings/{CODE}", headers=bearer(user_token(ac_keys)))
    assert assert_error(response, 503, "SERVICE_UNAVAILABLE") == "no meeting controller available"
    assert response.headers["retry-after"] == "3"
    assert metric("gc_joins_total", {"kind": "user", "result": "no_controller"}) == before + 1


async def test_database_unavailable_is_503(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings
) -> None:
    service.join_error = DatabaseUnavailable("database unavailable")
    response = await client.get(f"/api/v1/meetings/{CODE}", headers=bearer(user_token(ac_keys)))
    assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert response.headers["retry-after"] == "1"


async def test_an_unexpected_error_is_500_without_detail(
    client: httpx.AsyncClient,
    ac_keys: DevKeys,
    service: FakeMeetings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service.join_error = RuntimeError("SELECT secret FROM internals")
    token = user_token(ac_keys)
    with caplog.at_level(logging.ERROR):
        response = await client.get(f"/api/v1/meetings/{CODE}", headers=bearer(token))
    assert response.json() == {"error": {"code": "INTERNAL", "message": "internal error"}}
    assert response.status_code == 500
    assert "secret" not in response.text
    assert any(r.getMessage() == "http_request_failed" for r in caplog.records)
    assert token not in caplog.text


async def test_the_request_deadline_is_503(
    autojump_clock: trio.testing.MockClock,
    client: httpx.AsyncClient,
    ac_keys: DevKeys,
    service: FakeMeetings,
) -> None:
    service.join_hangs = True
    before = metric("gc_joins_total", {"kind": "user", "result": "timeout"})
    started = trio.current_time()
    response = await client.get(f"/api/v1/meetings/{CODE}", headers=bearer(user_token(ac_keys)))
    assert trio.current_time() - started == pytest.approx(REQUEST_TIMEOUT_S)
    assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert response.headers["retry-after"] == "1"
    assert metric("gc_joins_total", {"kind": "user", "result": "timeout"}) == before + 1


# --- POST /api/v1/meetings/{code}/guest-token ----------------------------------------------


async def test_guest_token(
    client: httpx.AsyncClient, service: FakeMeetings, tmp_path: Path
) -> None:
    meeting = service.by_code[GUEST_CODE]
    response = await guest(client, {"display_name": "  Ada Lovelace "})
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert set(body) == {
        "meeting_id",
        "display_name",
        "token",
        "expires_in",
        "mc",
        "media_handlers",
    }
    assert body["meeting_id"] == str(meeting.meeting_id)
    assert body["display_name"] == meeting.display_name
    assert body["expires_in"] == 600
    assert [mh["role"] for mh in body["media_handlers"]] == ["primary", "backup"]
    assert service.joins == [(GUEST_CODE, None)]

    validator = await meeting_token_validator(client, tmp_path)
    claims = validator.validate(
        body["token"], audience=tokens.AUD_MC, scope=tokens.SCOPE_MEETING_PARTICIPANT
    )
    assert claims.sub.startswith("guest-")
    assert len(claims.sub) > len("guest-") + 16
    assert claims.meeting_id == str(meeting.meeting_id)
    assert claims.jti
    assert claims.iat is not None
    assert claims.exp - claims.iat == 600
    assert claims.raw["guest"] is True
    assert claims.raw["display_name"] == "Ada Lovelace"
    assert "org_id" not in claims.raw

    again = await guest(client, {"display_name": "Ada Lovelace"})
    other = validator.validate(
        again.json()["token"], audience=tokens.AUD_MC, scope=tokens.SCOPE_MEETING_PARTICIPANT
    )
    assert other.sub != claims.sub


async def test_guest_needs_no_credentials_and_ignores_them(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings
) -> None:
    response = await guest(client, {"display_name": "Ada"}, headers=bearer(user_token(ac_keys)))
    assert response.status_code == 200
    assert service.joins == [(GUEST_CODE, None)]  # never the token's org


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("a", False),
        ("  a  ", False),
        ("ab", True),
        (" ab ", True),
        ("a" * 100, True),
        ("a" * 101, False),
        ("a\x00b", False),
        ("a\rb", False),
        ("\u3000\u3000\u3000", False),
        ("Ada\u202e", False),
        ("A\u200bda", False),
        ("Ada\ue000", False),
        ("Ada\u0378", False),
        ("Zoë", True),
    ],
    ids=lambda v: repr(v)[:20] if isinstance(v, str) else None,
)
async def test_guest_display_name_rules(
    client: httpx.AsyncClient, service: FakeMeetings, name: str, accepted: bool
) -> None:
    response = await guest(client, {"display_name": name})
    if accepted:
        assert response.status_code == 200, response.text
    else:
        assert assert_error(response, 400, "INVALID_REQUEST").startswith("display_name: ")
        assert service.joins == []


@pytest.mark.parametrize(
    ("content", "field"),
    [
        (b"{}", "display_name"),
        (b'{"display_name": 42}', "display_name"),
        (b'{"display_name": "Ada", "admin": true}', "body"),
        (b"", "body"),
        (b"not json", "body"),
        (b'["Ada"]', "body"),
    ],
)
async def test_guest_refuses_bad_bodies(
    client: httpx.AsyncClient, service: FakeMeetings, content: bytes, field: str
) -> None:
    response = await guest(client, content=content)
    assert assert_error(response, 400, "INVALID_REQUEST").startswith(f"{field}: ")
    assert service.joins == []


async def test_guest_bad_code_is_400(client: httpx.AsyncClient, service: FakeMeetings) -> None:
    response = await guest(client, {"display_name": "Ada"}, code="x_y")
    assert assert_error(response, 400, "INVALID_REQUEST").startswith("code: ")


async def test_guest_of_a_members_only_meeting_is_404_like_a_missing_one(
    client: httpx.AsyncClient, service: FakeMeetings
) -> None:
    """The real lookup never shows a guest a members-only meeting; should the
    join still refuse one, it answers exactly like a missing meeting, so the
    code does not tell itself apart."""
    before = metric("gc_joins_total", {"kind": "guest", "result": "not_found"})
    response = await guest(client, {"display_name": "Ada"}, code=CODE)
    missing = await guest(client, {"display_name": "Ada"}, code="no-such-mtg")
    assert_error(response, 404, "NOT_FOUND")
    assert response.json() == missing.json()
    assert metric("gc_joins_total", {"kind": "guest", "result": "not_found"}) == before + 2


async def test_guest_of_a_missing_meeting_is_404(client: httpx.AsyncClient) -> None:
    response = await guest(client, {"display_name": "Ada"}, code="no-such-mtg")
    assert_error(response, 404, "NOT_FOUND")


async def test_guest_rate_limit_then_recovery(
    mock_clock: trio.testing.MockClock, app: Starlette, service: FakeMeetings
) -> None:
    async with open_client(app) as client, open_client(app, ("198.51.100.9", 1)) as neighbour:
        # Every request counts, whatever its fate: good, bad body, unknown code.
        assert (await guest(client, {"display_name": "Ada"})).status_code == 200
        assert (await guest(client, {"display_name": "A"})).status_code == 400
        assert (await guest(client, {"display_name": "Ada"}, code="no-such-mtg")).status_code == 404
        assert (await guest(client, {"display_name": "Ada"})).status_code == 200
        assert (await guest(client, {"display_name": "Ada"})).status_code == 200
        joins = len(service.joins)

        before = metric("gc_joins_total", {"kind": "guest", "result": "rate_limited"})
        refused = await guest(client, {"display_name": "Ada"})
        assert_error(refused, 429, "RATE_LIMITED")
        assert refused.headers["retry-after"] == "6"
        assert metric("gc_joins_total", {"kind": "guest", "result": "rate_limited"}) == before + 1
        assert len(service.joins) == joins  # refused before any work

        # Another address has its own bucket.
        assert (await guest(neighbour, {"display_name": "Bob"})).status_code == 200

        mock_clock.jump(2.0)
        refused = await guest(client, {"display_name": "Ada"})
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "4"

        mock_clock.jump(4.0)
        assert (await guest(client, {"display_name": "Ada"})).status_code == 200
        assert (await guest(client, {"display_name": "Ada"})).status_code == 429


async def test_forwarded_headers_do_not_escape_the_limit(
    mock_clock: trio.testing.MockClock, client: httpx.AsyncClient
) -> None:
    statuses = [
        (
            await guest(
                client,
                {"display_name": "Ada"},
                headers={"X-Forwarded-For": f"10.0.0.{i}", "X-Real-IP": f"10.0.0.{i}"},
            )
        ).status_code
        for i in range(7)
    ]
    assert statuses == [200] * 5 + [429] * 2


@pytest.mark.dt_timeout(30)
async def test_the_gc_wires_its_guest_limit(
    db_pool: asyncpg.Pool,
    ac_keys: DevKeys,
    database_dsn: str,
    mock_clock: trio.testing.MockClock,
) -> None:
    """GC_GUEST_TOKENS_PER_MINUTE reaches the running GC's API: at 2 a minute
    an address has a burst of 2 and its next token 30 s later (60 / 2). A
    guest request for an unknown code pays like any other (the limit is taken
    before the code is looked up), so no MC or MH is needed. Trio's clock
    stands still (``mock_clock``), so Retry-After is exactly the interval."""
    environ = gc_environ(ac_keys, database_dsn, GC_GUEST_TOKENS_PER_MINUTE="2")
    async with (
        running_gc(environ) as gc,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gc.endpoints.http_port}") as http,
    ):
        responses = [
            await guest(http, {"display_name": "Ada"}, code="no-such-mtg") for _ in range(3)
        ]
    assert [r.status_code for r in responses] == [404, 404, 429]
    assert_error(responses[0], 404, "NOT_FOUND")
    assert_error(responses[2], 429, "RATE_LIMITED")
    assert responses[2].headers["retry-after"] == "30"


async def test_guest_service_unavailable(client: httpx.AsyncClient, service: FakeMeetings) -> None:
    service.join_error = ServiceUnavailable(
        "no_media_handler", "no media handler available", retry_after_s=2
    )
    response = await guest(client, {"display_name": "Ada"})
    assert_error(response, 503, "SERVICE_UNAVAILABLE")
    assert response.headers["retry-after"] == "2"


# --- Content-Type -----------------------------------------------------------------------------

ACCEPTED_CONTENT_TYPES = [
    "application/json",
    "Application/JSON",
    "application/json; charset=utf-8",
    "application/json;charset=UTF-8",
    'application/json; charset="utf-8"',
    "application/json;",
]
REFUSED_CONTENT_TYPES = [
    None,
    "",
    "text/plain",
    "text/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    "application/jsonx",
    "application/json-patch+json",
    "application/*",
    "application/json; charset=latin-1",
    "application/json; charset=utf-16",
    "application/json; charset",
    "application/json; boundary=x",
    "application/json; charset=utf-8; q=1",
]


def _content_type(value: str | None) -> dict[str, str]:
    # httpx sends no Content-Type for bytes content unless told.
    return {} if value is None else {"Content-Type": value}


@pytest.mark.parametrize("content_type", ACCEPTED_CONTENT_TYPES)
async def test_json_bodies_are_taken_with_their_media_type(
    client: httpx.AsyncClient, ac_keys: DevKeys, content_type: str
) -> None:
    body = b'{"display_name": "Ada"}'
    created = await create(client, ac_keys, content=body, headers=_content_type(content_type))
    assert created.status_code == 201, created.text
    joined = await guest(client, content=body, headers=_content_type(content_type))
    assert joined.status_code == 200, joined.text


@pytest.mark.parametrize("content_type", REFUSED_CONTENT_TYPES)
async def test_other_media_types_are_400(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings, content_type: str | None
) -> None:
    """SPEC §6.5 has no code for 415: INVALID_REQUEST names the header, and
    never echoes its value."""
    body = b'{"display_name": "Ada"}'
    if content_type is None:
        # No header at all (the helpers add one unless it is overridden).
        request = client.build_request(
            "POST", "/api/v1/meetings", headers=bearer(user_token(ac_keys)), content=body
        )
        assert "content-type" not in request.headers
        responses = [await client.send(request)]
        request = client.build_request(
            "POST", f"/api/v1/meetings/{GUEST_CODE}/guest-token", content=body
        )
        responses.append(await client.send(request))
    else:
        headers = _content_type(content_type)
        responses = [
            await create(client, ac_keys, content=body, headers=headers),
            await guest(client, content=body, headers=headers),
        ]
    for response in responses:
        message = assert_error(response, 400, "INVALID_REQUEST")
        assert message.startswith("Content-Type: must be application/json")
        if content_type:
            assert content_type not in response.text
    assert service.created == []
    assert service.joins == []


async def test_two_content_type_headers_are_refused(
    client: httpx.AsyncClient, ac_keys: DevKeys, service: FakeMeetings
) -> None:
    request = client.build_request(
        "POST",
        "/api/v1/meetings",
        headers=[
            ("Authorization", f"Bearer {user_token(ac_keys)}"),
            ("Content-Type", "application/json"),
            ("Content-Type", "text/plain"),
        ],
        content=b'{"display_name": "Ada"}',
    )
    response = await client.send(request)
    assert assert_error(response, 400, "INVALID_REQUEST").startswith("Content-Type: ")
    assert service.created == []


# --- paths and methods no route serves ------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "code", "allow"),
    [
        pytest.param("GET", "/nope", 404, "NOT_FOUND", None, id="unknown-path"),
        # No trailing-slash redirect (whose Location would echo the Host
        # header): not a route, so a JSON 404.
        pytest.param("GET", "/api/v1/meetings/", 404, "NOT_FOUND", None, id="trailing-slash"),
        pytest.param(
            "DELETE", f"/api/v1/meetings/{CODE}", 405, "METHOD_NOT_ALLOWED", {"GET", "HEAD"},
            id="delete-a-meeting",
        ),
        pytest.param("PUT", "/api/v1/meetings", 405, "METHOD_NOT_ALLOWED", {"POST"},
                     id="put-meetings"),
        pytest.param("POST", "/health/live", 405, "METHOD_NOT_ALLOWED", {"GET", "HEAD"},
                     id="post-health"),
    ],
)  # fmt: skip
async def test_unrouted_requests_get_the_json_error_shape(
    db_pool: asyncpg.Pool,
    ac_keys: DevKeys,
    database_dsn: str,
    method: str,
    path: str,
    status: int,
    code: str,
    allow: set[str] | None,
) -> None:
    """A running GC answers a path or method it does not serve with SPEC
    §6.5's JSON error (the app's 404 and 405 handlers cover the meetings API's
    routes too), never Starlette's plain-text default, a redirect or a 500 -
    with valid credentials too, so the status is not an authentication
    failure. A 405 names the methods the route serves (``Allow``)."""
    async with (
        running_gc(gc_environ(ac_keys, database_dsn)) as gc,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gc.endpoints.http_port}") as http,
    ):
        response = await http.request(method, path, headers=bearer(user_token(ac_keys)))
    assert_error(response, status, code)
    if allow is None:
        assert "allow" not in response.headers
    else:
        assert {m.strip() for m in response.headers["allow"].split(",")} == allow


# --- documents -----------------------------------------------------------------------------


async def test_jwks_publishes_the_signing_key_under_its_thumbprint(
    client: httpx.AsyncClient, gc_key: keys.Ed25519PrivateKey
) -> None:
    response = await client.get("/.well-known/jwks.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    assert document == keys.jwks_document([gc_key.public_key()])
    (jwk,) = document["keys"]
    assert "d" not in jwk  # the public half only
    assert jwk["kid"] == keys.okp_thumbprint(jwk["x"]) == keys.key_id(gc_key.public_key())
    assert jwk["alg"] == "EdDSA"


def _refs(node: object) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


async def test_openapi_document_describes_every_route(
    client: httpx.AsyncClient, app: Starlette
) -> None:
    response = await client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    document = json.loads(response.content)
    assert document == OPENAPI_DOCUMENT
    assert document["openapi"] == "3.1.0"

    async def ping() -> None:
        return None

    routes = [*app.routes, *create_app(database_ping=ping).routes]
    described = {
        (path, method.upper()) for path, item in document["paths"].items() for method in item
    }
    served = {
        (route.path, method)
        for route in routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert served == described

    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation["responses"], (path, method)
            assert "security" in operation, (path, method)
            assert operation["operationId"]
            for parameter in operation.get("parameters", []):
                assert f"{{{parameter['name']}}}" in path

    for ref in _refs(document):
        node: Any = document
        assert ref.startswith("#/")
        for part in ref[2:].split("/"):
            node = node[part]

    codes = set(
        document["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"][
            "enum"
        ]
    )
    assert {
        "UNAUTHORIZED",
        "FORBIDDEN",
        "NOT_FOUND",
        "INVALID_REQUEST",
        "RATE_LIMITED",
        "SERVICE_UNAVAILABLE",
        "INTERNAL",
    } <= codes
    # Both limited operations say so.
    for path, method in (
        ("/api/v1/meetings", "post"),
        ("/api/v1/meetings/{code}/guest-token", "post"),
    ):
        responses = document["paths"][path][method]["responses"]
        assert responses["429"] == {"$ref": "#/components/responses/RateLimited"}
        assert "application/json" in document["paths"][path][method]["requestBody"]["content"]


async def test_openapi_limits_match_the_handlers(
    client: httpx.AsyncClient, ac_keys: DevKeys
) -> None:
    schema = OPENAPI_DOCUMENT["components"]["schemas"]["CreateMeetingRequest"]["properties"]
    name = schema["display_name"]
    ok = await create(client, ac_keys, {"display_name": "a" * name["maxLength"]})
    too_long = await create(client, ac_keys, {"display_name": "a" * (name["maxLength"] + 1)})
    assert ok.status_code == 201
    assert too_long.status_code == 400
    maximum = schema["max_participants"]["maximum"]
    ok = await create(client, ac_keys, {"display_name": "a", "max_participants": maximum})
    assert ok.status_code == 201
    assert ok.json()["max_participants"] == maximum


# --- over a real socket ----------------------------------------------------------------------


async def test_served_by_hypercorn(app: Starlette, ac_keys: DevKeys, limiter: RateLimiter) -> None:
    """The same handlers behind the real server (hypercorn on trio): bodies
    read from a socket, the peer address as the limiter's key, and a body
    refused part way through without breaking the connection's framing."""
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(run_http, app, HostPort("127.0.0.1", 0))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            created = await create(http, ac_keys, {"display_name": "Over the wire"})
            assert created.status_code == 201, created.text
            code = created.json()["meeting_code"]
            joined = await http.get(f"/api/v1/meetings/{code}", headers=bearer(user_token(ac_keys)))
            assert joined.status_code == 200, joined.text
            assert joined.json()["display_name"] == "Over the wire"

            huge = await create(http, ac_keys, content=b"{" + b" " * (64 * 1024) + b"}")
            assert_error(huge, 400, "INVALID_REQUEST")

            statuses = [(await guest(http, {"display_name": "Ada"})).status_code for _ in range(6)]
            assert statuses == [200] * 5 + [429]
            # Keyed by the socket's peer address, the only one there is.
            assert not limiter.acquire_nowait("127.0.0.1").allowed
        nursery.cancel_scope.cancel()
