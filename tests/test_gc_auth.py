"""Authentication of the GC's gRPC registry (SPEC §3, §4) over real gRPC.

Every refusal must be exactly UNAUTHENTICATED (the token cannot be trusted)
or PERMISSION_DENIED (genuine, but does not grant this call), never UNKNOWN
or INTERNAL, with a message that carries no token text, traceback or SQL -
and nothing may be written to the database.

The cases of a table run against one GC (a GC start and a database reset cost
~0.3 s; there are dozens of cases); a failure lists every case that
misbehaved.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from gc_harness import (
    DevKeys,
    GcClients,
    gc_clients,
    gc_environ,
    mc_registration,
    mh_registration,
    running_gc,
)
from grpclib.client import UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from darktower.protos import internal_pb2 as pb
from darktower.shared import tokens
from darktower.shared.jwks import KeyStore
from darktower.shared.logging import KeyValueFormatter, configure_logging
from darktower.shared.seam import run_aio

pytest_plugins = ("gc_fixtures",)  # keys, gc, clients

# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def other_keys(tmp_path: Path) -> DevKeys:
    """A second key pair the GC does not know."""
    return DevKeys.create(tmp_path / "other-keys")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], payload: dict[str, Any], signature: str = "") -> str:
    return ".".join(
        (b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()), signature)
    )


def service_payload(sub: str = "mc-1", scope: str = "mc.register", **claims: Any) -> dict[str, Any]:
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": sub,
        "aud": "gc",
        "scope": scope,
        "iat": now,
        "exp": now + 600,
        "jti": "test",
    }
    payload.update(claims)
    return payload


def signed(keys: DevKeys, payload: dict[str, Any]) -> str:
    return jwt.encode(payload, keys.private_key, algorithm="EdDSA", headers={"kid": keys.kid})


def token_of_length(keys: DevKeys, length: int) -> str:
    """A genuine MC token for ``mc-1`` of exactly ``length`` characters
    (padded with an extra claim), so only its size can refuse it."""
    base = len(signed(keys, service_payload(pad="", pad2="")))
    for first in range(max(0, (length - base) * 3 // 4 - 8), length):
        for second in range(4):
            token = signed(keys, service_payload(pad="x" * first, pad2="y" * second))
            if len(token) == length:
                return token
    raise AssertionError(f"no padding gives a token of {length} characters")


def hs256_token(header: dict[str, Any], secret: bytes) -> str:
    """An HS256 token over a valid MC payload, built by hand (pyjwt refuses
    to key HMAC with a PEM, which is exactly the attack)."""
    signing_input = unsigned_token(header, service_payload()).rstrip(".")
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def public_key_pem(keys: DevKeys) -> bytes:
    return keys.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def rpc(method: UnaryUnaryMethod[Any, Any], request: Any, authorization: str | None) -> Any:
    """One unary RPC with the given ``authorization`` value (None: no header)."""
    md = None if authorization is None else {"authorization": authorization}
    return await run_aio(method, request, metadata=md)


async def count_rows(pool: asyncpg.Pool, table: str) -> int:
    assert table in ("meeting_controllers", "media_handlers")
    value: int = await run_aio(pool.fetchval, f"SELECT count(*) FROM {table}")  # noqa: S608
    return value


FORBIDDEN_IN_MESSAGES = ("Traceback", "SELECT", "INSERT", "UPDATE", "asyncpg", 'File "', "eyJ")


def leak_in_message(message: str, authorization: str | None) -> str | None:
    """What a status message reveals that it must not, or None."""
    for forbidden in FORBIDDEN_IN_MESSAGES:
        if forbidden in message:
            return f"contains {forbidden!r}"
    if authorization:
        for part in authorization.replace(" ", ".").split("."):
            if len(part) >= 8 and part in message:
                return "contains token text"
    return None


@dataclass(frozen=True)
class Refusal:
    """One credential presented to RegisterMC (as ``mc-1``) and the status it earns."""

    name: str
    authorization: Callable[[DevKeys, DevKeys], str | None]
    status: Status


UNAUTHENTICATED = Status.UNAUTHENTICATED


def bearer(token: str) -> str:
    return f"Bearer {token}"


REGISTER_MC_REFUSALS = [
    # --- cannot be trusted: UNAUTHENTICATED
    Refusal("no-header", lambda k, o: None, Status.UNAUTHENTICATED),
    Refusal("bearer-without-token", lambda k, o: "Bearer ", Status.UNAUTHENTICATED),
    Refusal("bearer-only", lambda k, o: "Bearer", Status.UNAUTHENTICATED),
    Refusal("garbage", lambda k, o: bearer("garbage"), Status.UNAUTHENTICATED),
    Refusal("three-dots", lambda k, o: bearer("a.b.c"), Status.UNAUTHENTICATED),
    Refusal("no-prefix", lambda k, o: k.mc_token("mc-1"), Status.UNAUTHENTICATED),
    Refusal(
        "lowercase-bearer", lambda k, o: "bearer " + k.mc_token("mc-1"), Status.UNAUTHENTICATED
    ),
    Refusal(
        "uppercase-bearer", lambda k, o: "BEARER " + k.mc_token("mc-1"), Status.UNAUTHENTICATED
    ),
    Refusal("basic-scheme", lambda k, o: "Basic dXNlcjpwYXNz", Status.UNAUTHENTICATED),
    Refusal(
        "expired",
        lambda k, o: bearer(k.mc_token("mc-1", ttl_s=60, now=time.time() - 3600)),
        Status.UNAUTHENTICATED,
    ),
    Refusal(
        "iat-10-min-ahead",
        lambda k, o: bearer(k.mc_token("mc-1", now=time.time() + 600)),
        Status.UNAUTHENTICATED,
    ),
    Refusal(
        "no-exp",
        lambda k, o: bearer(
            signed(k, {key: v for key, v in service_payload().items() if key != "exp"})
        ),
        Status.UNAUTHENTICATED,
    ),
    Refusal(
        "exp-not-a-number",
        lambda k, o: bearer(signed(k, service_payload(exp="tomorrow"))),
        Status.UNAUTHENTICATED,
    ),
    Refusal(
        "hs256-with-kid",
        lambda k, o: bearer(
            jwt.encode(service_payload(), "secret-" * 5, algorithm="HS256", headers={"kid": k.kid})
        ),
        Status.UNAUTHENTICATED,
    ),
    Refusal(
        # The classic confusion: HMAC keyed with the (public) verification key.
        "hs256-keyed-with-public-key",
        lambda k, o: bearer(hs256_token({"alg": "HS256", "kid": k.kid}, public_key_pem(k))),
        Status.UNAUTHENTICATED,
    ),
    Refusal(
        "alg-none",
        lambda k, o: bearer(
            unsigned_token({"alg": "none", "typ": "JWT", "kid": k.kid}, service_payload())
        ),
        Status.UNAUTHENTICATED,
    ),
    Refusal(
        "alg-none-with-valid-signature",
        lambda k, o: bearer(
            unsigned_token(
                {"alg": "none", "kid": k.kid},
                service_payload(),
                k.mc_token("mc-1").rsplit(".", 1)[1],
            )
        ),
        Status.UNAUTHENTICATED,
    ),
    Refusal("unknown-key", lambda k, o: bearer(o.mc_token("mc-1")), Status.UNAUTHENTICATED),
    Refusal(
        "known-kid-other-key",
        lambda k, o: bearer(
            jwt.encode(service_payload(), o.private_key, algorithm="EdDSA", headers={"kid": k.kid})
        ),
        Status.UNAUTHENTICATED,
    ),
    Refusal(
        "no-kid",
        lambda k, o: bearer(jwt.encode(service_payload(), k.private_key, algorithm="EdDSA")),
        Status.UNAUTHENTICATED,
    ),
    Refusal(
        "tampered-payload",
        lambda k, o: bearer(_tampered(k.mc_token("mc-2"), sub="mc-1")),
        Status.UNAUTHENTICATED,
    ),
    Refusal(
        "truncated-signature",
        lambda k, o: bearer(k.mc_token("mc-1")[:-4]),
        Status.UNAUTHENTICATED,
    ),
    Refusal("8193-chars", lambda k, o: bearer(token_of_length(k, 8193)), Status.UNAUTHENTICATED),
    Refusal("15-KiB", lambda k, o: bearer(token_of_length(k, 15 * 1024)), Status.UNAUTHENTICATED),
    Refusal("32-KiB", lambda k, o: bearer(token_of_length(k, 32 * 1024)), Status.UNAUTHENTICATED),
    # --- genuine but not granted: PERMISSION_DENIED
    Refusal("gc-service-token", lambda k, o: bearer(k.gc_token()), Status.PERMISSION_DENIED),
    Refusal(
        "audience-mc",
        lambda k, o: bearer(signed(k, service_payload(aud="mc"))),
        Status.PERMISSION_DENIED,
    ),
    Refusal(
        "no-audience",
        lambda k, o: bearer(
            signed(k, {key: v for key, v in service_payload().items() if key != "aud"})
        ),
        Status.PERMISSION_DENIED,
    ),
    Refusal("mh-token", lambda k, o: bearer(k.mh_token("mc-1")), Status.PERMISSION_DENIED),
    Refusal(
        "user-token",
        lambda k, o: bearer(
            tokens.mint_user_token(k.private_key, kid=k.kid, user_id="mc-1", org_id="org")
        ),
        Status.PERMISSION_DENIED,
    ),
    Refusal(
        "scope-prefix-only",
        lambda k, o: bearer(signed(k, service_payload(scope="mc.reg mc"))),
        Status.PERMISSION_DENIED,
    ),
    Refusal("other-mc", lambda k, o: bearer(k.mc_token("mc-2")), Status.PERMISSION_DENIED),
    Refusal(
        "subject-differs-in-case",
        lambda k, o: bearer(k.mc_token("MC-1")),
        Status.PERMISSION_DENIED,
    ),
]


def _tampered(token: str, **claims: Any) -> str:
    """``token`` with claims changed and the original signature kept."""
    header, payload, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(claims)
    return f"{header}.{b64url(json.dumps(data).encode())}.{signature}"


async def _check_refusal(
    method: UnaryUnaryMethod[Any, Any],
    request: Any,
    name: str,
    authorization: str | None,
    expected: Status,
) -> str | None:
    """None if the RPC was refused exactly as it must be, else what went wrong."""
    try:
        await rpc(method, request, authorization)
    except GRPCError as exc:
        if exc.status is not expected:
            return f"{name}: {exc.status.name} ({exc.message!r}), expected {expected.name}"
        leak = leak_in_message(exc.message or "", authorization)
        if leak is not None:
            return f"{name}: message {leak}"
        if exc.details is not None:
            return f"{name}: details attached"
        return None
    return f"{name}: accepted"


# --- tests ---------------------------------------------------------------------------------


async def test_register_mc_refusals(
    clients: GcClients, keys: DevKeys, other_keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    failures = []
    for refusal in REGISTER_MC_REFUSALS:
        authorization = refusal.authorization(keys, other_keys)
        failure = await _check_refusal(
            clients.mc.RegisterMC,
            mc_registration("mc-1"),
            refusal.name,
            authorization,
            refusal.status,
        )
        if failure is None and await count_rows(db_pool, "meeting_controllers") != 0:
            failure = f"{refusal.name}: a row was written"
        if failure is not None:
            failures.append(failure)
    assert failures == []
    # The same GC still serves a good token (no refusal broke the channel).
    response = await rpc(
        clients.mc.RegisterMC, mc_registration("mc-1"), bearer(keys.mc_token("mc-1"))
    )
    assert response.accepted


def test_refusal_table_covers_both_statuses() -> None:
    statuses = {refusal.status for refusal in REGISTER_MC_REFUSALS}
    assert statuses == {Status.UNAUTHENTICATED, Status.PERMISSION_DENIED}
    assert len({refusal.name for refusal in REGISTER_MC_REFUSALS}) == len(REGISTER_MC_REFUSALS)


def test_padded_tokens_differ_only_in_size(keys: DevKeys) -> None:
    """The oversized tokens of the table are genuine: the validator refuses
    them for their size alone."""
    validator = tokens.TokenValidator(KeyStore([str(keys.jwks_path)]))
    accepted = token_of_length(keys, 8192)
    assert len(accepted) == 8192
    assert validator.validate(accepted, audience="gc", scope="mc.register").sub == "mc-1"
    for length in (8193, 15 * 1024):
        token = token_of_length(keys, length)
        assert len(token) == length
        with pytest.raises(tokens.Unauthenticated) as info:
            validator.validate(token, audience="gc", scope="mc.register")
        assert info.value.reason == "token too large"


async def test_token_of_exactly_8_kib_is_accepted(
    clients: GcClients, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """8 KiB is the limit, not one byte less."""
    response = await rpc(
        clients.mc.RegisterMC, mc_registration("mc-1"), bearer(token_of_length(keys, 8192))
    )
    assert response.accepted
    assert await count_rows(db_pool, "meeting_controllers") == 1


async def test_iat_within_five_minutes_ahead_is_accepted(clients: GcClients, keys: DevKeys) -> None:
    """Clock skew between the token issuer and the GC is tolerated up to 5 min."""
    token = keys.mc_token("mc-1", now=time.time() + 120)
    response = await rpc(clients.mc.RegisterMC, mc_registration("mc-1"), bearer(token))
    assert response.accepted


MC_METHODS = ["RegisterMC", "FastHeartbeat", "ComprehensiveHeartbeat", "NotifyMeetingEnded"]
MH_METHODS = ["RegisterMH", "SendLoadReport"]


def _mc_request(method: str, mc_id: str) -> Any:
    return {
        "RegisterMC": mc_registration(mc_id),
        "FastHeartbeat": pb.FastHeartbeatRequest(
            controller_id=mc_id,
            capacity=pb.ControllerCapacity(current_meetings=1),
            health=pb.HEALTHY,
        ),
        "ComprehensiveHeartbeat": pb.ComprehensiveHeartbeatRequest(
            controller_id=mc_id,
            capacity=pb.ControllerCapacity(current_meetings=1),
            health=pb.HEALTHY,
            cpu_usage_percent=1.0,
        ),
        "NotifyMeetingEnded": pb.NotifyMeetingEndedRequest(
            meeting_id="00000000-0000-4000-8000-000000000001", region="local"
        ),
    }[method]


def _mh_request(method: str, mh_id: str) -> Any:
    return {
        "RegisterMH": mh_registration(mh_id),
        "SendLoadReport": pb.MHLoadReportRequest(
            handler_id=mh_id, current_streams=1, health=pb.HEALTHY
        ),
    }[method]


async def test_every_method_requires_its_own_credentials(
    clients: GcClients, keys: DevKeys, other_keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """Default deny on every registry method: no token, a stranger's key, the
    other node kind's token, the GC's own token and another node's token
    are all refused - and a heartbeat refused leaves the row as it was."""
    await rpc(clients.mc.RegisterMC, mc_registration("mc-1"), bearer(keys.mc_token("mc-1")))
    await rpc(clients.mh.RegisterMH, mh_registration("mh-1"), bearer(keys.mh_token("mh-1")))
    mc_before = await run_aio(db_pool.fetchrow, "SELECT * FROM meeting_controllers")
    mh_before = await run_aio(db_pool.fetchrow, "SELECT * FROM media_handlers")

    failures = []
    for method_name in MC_METHODS + MH_METHODS:
        is_mc = method_name in MC_METHODS
        stub: Any = clients.mc if is_mc else clients.mh
        method = getattr(stub, method_name)
        request = _mc_request(method_name, "mc-1") if is_mc else _mh_request(method_name, "mh-1")
        own_id = "mc-1" if is_mc else "mh-1"
        cases: list[tuple[str, str | None, Status]] = [
            ("no-token", None, Status.UNAUTHENTICATED),
            ("garbage", bearer("x.y.z"), Status.UNAUTHENTICATED),
            ("lowercase-bearer", "bearer " + keys.mc_token(own_id), Status.UNAUTHENTICATED),
            ("unknown-key", bearer(other_keys.mc_token(own_id)), Status.UNAUTHENTICATED),
            (
                "expired",
                bearer(keys.mc_token(own_id, ttl_s=1, now=time.time() - 60)),
                Status.UNAUTHENTICATED,
            ),
            ("gc-service-token", bearer(keys.gc_token(own_id)), Status.PERMISSION_DENIED),
            (
                "other-kind",
                bearer(keys.mh_token(own_id) if is_mc else keys.mc_token(own_id)),
                Status.PERMISSION_DENIED,
            ),
        ]
        if method_name != "NotifyMeetingEnded":  # its request names no node
            other = keys.mc_token("mc-2") if is_mc else keys.mh_token("mh-2")
            cases.append(("other-node", bearer(other), Status.PERMISSION_DENIED))
        for case, authorization, status in cases:
            failure = await _check_refusal(
                method, request, f"{method_name}/{case}", authorization, status
            )
            if failure is not None:
                failures.append(failure)
    assert failures == []
    assert await run_aio(db_pool.fetchrow, "SELECT * FROM meeting_controllers") == mc_before
    assert await run_aio(db_pool.fetchrow, "SELECT * FROM media_handlers") == mh_before
    assert await count_rows(db_pool, "meeting_controllers") == 1
    assert await count_rows(db_pool, "media_handlers") == 1


async def test_own_token_reaches_every_method(clients: GcClients, keys: DevKeys) -> None:
    """The counterpart of the refusals: each node's own token passes auth on
    each of its methods (NotifyMeetingEnded of a meeting it does not own is
    acknowledged as False)."""
    mc = bearer(keys.mc_token("mc-1"))
    mh = bearer(keys.mh_token("mh-1"))
    for method_name in MC_METHODS:
        method = getattr(clients.mc, method_name)
        await rpc(method, _mc_request(method_name, "mc-1"), mc)
    for method_name in MH_METHODS:
        await rpc(getattr(clients.mh, method_name), _mh_request(method_name, "mh-1"), mh)


# --- secrets in logs -----------------------------------------------------------------------


def _with_password(dsn: str, password: str) -> str:
    """``dsn`` with a password added; the test servers trust local
    connections, so it is sent nowhere but must still never be logged."""
    parts = urlsplit(dsn)
    user, _, host = parts.netloc.rpartition("@")
    assert user, "the test DSN names a user"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}"))


def test_with_password_inserts_a_password() -> None:
    assert _with_password("postgresql://postgres@127.0.0.1:5432/db", "pw") == (
        "postgresql://postgres:pw@127.0.0.1:5432/db"
    )
    assert _with_password("postgresql://postgres@/db?host=/tmp/x", "pw") == (
        "postgresql://postgres:pw@/db?host=/tmp/x"
    )


async def test_logs_never_contain_tokens_keys_or_database_password(
    db_pool: asyncpg.Pool,
    keys: DevKeys,
    other_keys: DevKeys,
    database_dsn: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At the most verbose level the GC can be configured with (its own
    ``configure_logging("DEBUG")``), every record - ours and the libraries' -
    is free of bearer tokens, key material and the database password."""
    password = "pw-Zq8Kx3vN7m"
    presented: list[str] = []
    with product_logging("DEBUG"):
        await _exercise_gc(keys, other_keys, _with_password(database_dsn, password), presented)

    formatter = KeyValueFormatter()
    rendered = [formatter.format(record) for record in caplog.records]
    assert any("mc_registered" in line for line in rendered), "the GC logged nothing we know"
    assert any(record.levelno == logging.DEBUG for record in caplog.records)
    text = "\n".join(rendered)

    assert password not in text
    private_pem = keys.key_path.read_text()
    pem_lines = [line for line in private_pem.splitlines() if line and "-----" not in line]
    assert pem_lines
    for line in pem_lines:
        assert line not in text
    for authorization in presented:
        for part in authorization.replace(" ", ".").split("."):
            if len(part) >= 16:
                assert part not in text, "a token fragment was logged"
    assert "eyJ" not in text  # the start of any base64url-encoded JSON header
    assert "Traceback" not in text


@contextmanager
def product_logging(level: str) -> Iterator[None]:
    """The services' logging configuration for the block, with pytest's
    capture handlers kept in place of the stderr handler; every logger level
    is restored afterwards."""
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    levels = {
        name: logger.level
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    configure_logging(level)
    root.handlers[:] = handlers
    try:
        yield
    finally:
        root.setLevel(root_level)
        for name, logger in logging.root.manager.loggerDict.items():
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))


async def _exercise_gc(
    keys: DevKeys, other_keys: DevKeys, database_dsn: str, presented: list[str]
) -> None:
    """Refusals of every kind, invalid requests, an unknown node and a good
    run against a GC on ``database_dsn``; every credential sent is appended
    to ``presented``."""
    async with (
        running_gc(gc_environ(keys, database_dsn)) as gc,
        gc_clients(gc.endpoints.grpc_port) as clients,
    ):
        # Refusals of every kind ...
        for refusal in REGISTER_MC_REFUSALS:
            authorization = refusal.authorization(keys, other_keys)
            if authorization:
                presented.append(authorization)
            with pytest.raises(GRPCError):
                await rpc(clients.mc.RegisterMC, mc_registration("mc-1"), authorization)
        # ... invalid requests, an unknown node ...
        good = bearer(keys.mc_token("mc-1"))
        presented.append(good)
        with pytest.raises(GRPCError):
            await rpc(clients.mc.RegisterMC, mc_registration("mc-1", max_meetings=0), good)
        with pytest.raises(GRPCError):
            await rpc(clients.mc.FastHeartbeat, _mc_request("FastHeartbeat", "mc-1"), good)
        # ... and a good run.
        await rpc(clients.mc.RegisterMC, mc_registration("mc-1"), good)
        await rpc(clients.mc.FastHeartbeat, _mc_request("FastHeartbeat", "mc-1"), good)
        mh = bearer(keys.mh_token("mh-1"))
        presented.append(mh)
        await rpc(clients.mh.RegisterMH, mh_registration("mh-1"), mh)
