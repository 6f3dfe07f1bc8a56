"""Regression tests for the findings of the security review (commit
"Harden the GC edge"): each test here fails when the fix it names is
reverted.

1. ``shared/seam.py``: an exception inside an asyncio protocol callback (one
   raw HTTP/2 HEADERS frame with a non-ASCII header value) is logged, not
   re-raised into trio where it would stop the whole GC.
2. ``shared/grpc_server.py`` ``recv_request``: request messages are bounded
   (``MAX_REQUEST_BYTES``, refused from the 5-byte prefix) and malformed ones
   are INVALID_ARGUMENT without a traceback.
3. ``shared/jwks.py``: the fetch deadline holds against a trickling server,
   and redirects (which would carry URL credentials elsewhere) are refused.
4. ``gc/config.py``: the signing key and service token are checked at start;
   ``repr`` of the config holds no credentials.
5. ``shared/config.py`` / ``shared/db.py``: a malformed DSN and a refused
   connection are configuration errors - one line, no password, no retries.
6. ``shared/logging.py``: protocol libraries log one line, never a traceback.

Everything runs for real: PostgreSQL, a GC in-process or as a process, gRPC
and raw HTTP/2 over loopback, HTTP servers on loopback threads.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
import h2.config
import h2.connection
import h2.events
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from gc_harness import (
    DevKeys,
    GcClients,
    RunningGc,
    gc_environ,
    mc_registration,
    metadata,
)
from grpclib.client import Channel, UnaryUnaryMethod
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError

from darktower.gc.config import VARIABLES, GcConfig
from darktower.gc.repositories import meeting_controllers
from darktower.protos import internal_pb2 as pb
from darktower.shared import db, grpc_server
from darktower.shared.config import ConfigError
from darktower.shared.devstack import dsn_for_database
from darktower.shared.jwks import JwksError, KeyStore
from darktower.shared.keys import generate_private_key, jwks_document
from darktower.shared.logging import configure_logging, get_logger
from darktower.shared.seam import run_aio

REGISTER_MC = "/dark_tower.internal.GlobalControllerService/RegisterMC"
#: The largest request message a GC accepts (``MAX_REQUEST_BYTES``).
LIMIT = 64 * 1024
#: Bound on one raw HTTP/2 exchange with the GC (a hang is a failure).
RAW_CALL_WITHIN_S = 10.0

pytest_plugins = ("gc_fixtures",)


# --- fixtures and helpers ------------------------------------------------------------------


def traceback_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records that carry a traceback, as ``logger: event``."""
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]


class PassThroughCodec(ProtoCodec):
    """Sends ``bytes`` requests as they are, so a test can put any message
    body on the wire with grpclib's own framing."""

    def encode(self, message: Any, message_type: type[Any]) -> bytes:
        if message_type is bytes:
            assert isinstance(message, bytes)
            return message
        return super().encode(message, message_type)


@asynccontextmanager
async def raw_register_mc(port: int) -> AsyncIterator[UnaryUnaryMethod[bytes, Any]]:
    """RegisterMC taking the request body as raw bytes (use via ``run_aio``)."""

    async def open_channel() -> Channel:
        return Channel("127.0.0.1", port, codec=PassThroughCodec())

    channel = await run_aio(open_channel)
    try:
        yield UnaryUnaryMethod(channel, REGISTER_MC, bytes, pb.RegisterMCResponse)
    finally:

        async def close() -> None:
            channel.close()

        with trio.move_on_after(2, shield=True):
            await run_aio(close)


def registration_of_size(size: int) -> pb.RegisterMCRequest:
    """A well-formed registration whose encoding is exactly ``size`` bytes
    (the ``id`` is padded, so the GC refuses it by content, never by size)."""
    probe = mc_registration("x" * 20_000)
    overhead = probe.ByteSize() - 20_000
    request = mc_registration("x" * (size - overhead))
    assert request.ByteSize() == size
    return request


@dataclass
class RawResponse:
    """What came back for stream 1 of a raw HTTP/2 exchange."""

    headers: dict[bytes, bytes] = field(default_factory=dict)  # headers and trailers
    data: bytes = b""
    stream_ended: bool = False
    reset: bool = False
    connection_closed: bool = False

    @property
    def grpc_status(self) -> Status | None:
        value = self.headers.get(b"grpc-status")
        return None if value is None else Status(int(value))

    @property
    def grpc_message(self) -> str:
        return unquote(self.headers.get(b"grpc-message", b"").decode())


def grpc_headers(port: int, *extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    """Request headers of a unary gRPC call to RegisterMC."""
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", REGISTER_MC.encode()),
        (b":authority", f"127.0.0.1:{port}".encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *extra,
    ]


def grpc_frame(body: bytes, *, compressed: bool = False, length: int | None = None) -> bytes:
    """gRPC's length-prefixed message; ``length`` overrides the announced length."""
    announced = len(body) if length is None else length
    return bytes([compressed]) + announced.to_bytes(4, "big") + body


async def raw_h2_call(
    port: int, headers: list[tuple[bytes, bytes]], data: bytes = b"", *, end_stream: bool = True
) -> RawResponse:
    """One stream over a fresh connection, spoken with ``h2`` directly: no
    header validation or normalisation, so anything can be sent. Returns when
    the stream ends or is reset or the connection closes (bounded)."""
    conn = h2.connection.H2Connection(
        config=h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    conn.initiate_connection()
    conn.send_headers(1, headers, end_stream=end_stream and not data)
    if data:
        conn.send_data(1, data, end_stream=end_stream)
    response = RawResponse()
    with trio.fail_after(RAW_CALL_WITHIN_S):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            try:
                await stream.send_all(conn.data_to_send())
                while not (response.stream_ended or response.reset):
                    received = await stream.receive_some(65536)
                    if not received:
                        response.connection_closed = True
                        break
                    for event in conn.receive_data(received):
                        _record(conn, event, response)
                    pending = conn.data_to_send()
                    if pending:
                        await stream.send_all(pending)
            except trio.BrokenResourceError:
                response.connection_closed = True
    return response


def _record(conn: h2.connection.H2Connection, event: h2.events.Event, into: RawResponse) -> None:
    if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
        into.headers.update((bytes(k), bytes(v)) for k, v in event.headers)
    elif isinstance(event, h2.events.DataReceived):
        into.data += event.data
        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    elif isinstance(event, h2.events.StreamEnded):
        into.stream_ended = True
    elif isinstance(event, h2.events.StreamReset):
        into.reset = True
    elif isinstance(event, h2.events.ConnectionTerminated):
        into.connection_closed = True


# --- 1. one malformed HTTP/2 frame cannot stop the GC (shared/seam.py) -------------------------


async def test_a_non_ascii_header_value_does_not_stop_the_gc(
    gc: RunningGc,
    clients: GcClients,
    keys: DevKeys,
    db_pool: asyncpg.Pool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``user-agent: \\xff`` makes h2 raise UnicodeDecodeError inside
    grpclib's ``data_received``; before the fix trio-asyncio re-raised it into
    the GC's nursery and the GC (in a process: the process) stopped. No token
    is needed: this is reachable by anyone who can connect."""
    port = gc.endpoints.grpc_port
    for _ in range(3):
        response = await raw_h2_call(
            port, grpc_headers(port, (b"user-agent", b"\xff")), end_stream=False
        )
        assert response.grpc_status is not Status.OK

    # The frame did reach h2's decoder (else this test proves nothing) ...
    loop_errors = [r for r in caplog.records if r.getMessage() == "asyncio_loop_error"]
    assert loop_errors, "the malformed frame did not fail inside the server"
    assert getattr(loop_errors[0], "fields", {}).get("error") == "UnicodeDecodeError"
    assert traceback_records(caplog) == []

    # ... and the GC still serves: a genuine registration goes through.
    auth = metadata(keys.mc_token("mc-after-attack"))
    reply = await run_aio(clients.mc.RegisterMC, mc_registration("mc-after-attack"), metadata=auth)
    assert reply is not None
    assert reply.accepted
    assert await run_aio(meeting_controllers.get, db_pool, "mc-after-attack") is not None
    assert not gc.cancel_scope.cancel_called


# --- 2. bounded, validated request decoding (shared/grpc_server.py) ---------------------------


async def test_a_request_of_exactly_64_kib_is_read_and_one_byte_more_is_refused(
    clients: GcClients, keys: DevKeys
) -> None:
    """At the limit the message is decoded (the GC then refuses its huge id
    by content: INVALID_ARGUMENT naming ``id``); one byte over, it is refused
    by size (RESOURCE_EXHAUSTED) - before the fix both were read and decoded."""
    auth = metadata(keys.mc_token("mc-1"))
    with pytest.raises(GRPCError) as at_limit:
        await run_aio(clients.mc.RegisterMC, registration_of_size(LIMIT), metadata=auth)
    assert at_limit.value.status is Status.INVALID_ARGUMENT
    assert (at_limit.value.message or "").startswith("id:")

    with pytest.raises(GRPCError) as over_limit:
        await run_aio(clients.mc.RegisterMC, registration_of_size(LIMIT + 1), metadata=auth)
    assert over_limit.value.status is Status.RESOURCE_EXHAUSTED
    assert "id" not in (over_limit.value.message or "")


@pytest.mark.parametrize("announced", [LIMIT + 1, 2**32 - 1])
async def test_an_oversized_message_is_refused_from_its_prefix_before_its_body(
    gc: RunningGc, keys: DevKeys, announced: int
) -> None:
    """Only the 5-byte prefix is sent and the stream stays open: the GC must
    answer without waiting for the body it was promised (before the fix
    grpclib waited to buffer all ``announced`` bytes - up to 4 GiB)."""
    port = gc.endpoints.grpc_port
    auth = (b"authorization", f"Bearer {keys.mc_token('mc-1')}".encode())
    response = await raw_h2_call(
        port, grpc_headers(port, auth), grpc_frame(b"", length=announced), end_stream=False
    )
    assert response.grpc_status is Status.RESOURCE_EXHAUSTED, response
    assert response.grpc_message == f"request: larger than {LIMIT} bytes"


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(grpc_frame(b"12345", length=100), id="body-shorter-than-announced"),
        pytest.param(b"\x00\x00\x01", id="prefix-cut-short"),
    ],
)
async def test_a_stream_that_ends_mid_message_is_invalid_argument(
    gc: RunningGc, keys: DevKeys, data: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    port = gc.endpoints.grpc_port
    auth = (b"authorization", f"Bearer {keys.mc_token('mc-1')}".encode())
    response = await raw_h2_call(port, grpc_headers(port, auth), data, end_stream=True)
    assert response.grpc_status is Status.INVALID_ARGUMENT, response
    assert response.grpc_message == "request: message is truncated"
    assert not [record for record in caplog.records if record.exc_info]


async def test_a_body_announced_but_never_sent_times_out(
    gc: RunningGc, keys: DevKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that announces 100 bytes and sends none must not hold a
    handler (and the drain) for ever: the read is bounded."""
    monkeypatch.setattr(grpc_server, "REQUEST_READ_TIMEOUT_S", 0.2)
    port = gc.endpoints.grpc_port
    auth = (b"authorization", f"Bearer {keys.mc_token('mc-1')}".encode())
    response = await raw_h2_call(
        port, grpc_headers(port, auth), grpc_frame(b"", length=100), end_stream=False
    )
    assert response.grpc_status is Status.DEADLINE_EXCEEDED, response
    assert response.grpc_message == "request: not received in time"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xff\xff\xff\xff", id="garbage"),
        pytest.param(b"\x0a\x01\xff", id="id-not-utf8"),
        pytest.param(b"\x0a\x05ab", id="id-truncated"),
    ],
)
async def test_a_malformed_body_is_invalid_argument_without_a_traceback(
    gc: RunningGc, keys: DevKeys, body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Before the fix an undecodable body was INTERNAL and logged a traceback
    (``grpc_handler_failed``) - a log flood anyone with a token could cause."""
    async with raw_register_mc(gc.endpoints.grpc_port) as register:
        with pytest.raises(GRPCError) as info:
            await run_aio(register, body, metadata=metadata(keys.mc_token("mc-1")))
    assert info.value.status is Status.INVALID_ARGUMENT
    assert info.value.message == "request: not a valid RegisterMCRequest"
    assert traceback_records(caplog) == []


async def test_a_compressed_message_is_invalid_argument_without_a_traceback(
    gc: RunningGc, keys: DevKeys, caplog: pytest.LogCaptureFixture
) -> None:
    port = gc.endpoints.grpc_port
    auth = (b"authorization", f"Bearer {keys.mc_token('mc-1')}".encode())
    body = mc_registration("mc-1").SerializeToString()
    response = await raw_h2_call(port, grpc_headers(port, auth), grpc_frame(body, compressed=True))
    assert response.grpc_status is Status.INVALID_ARGUMENT, response
    assert response.grpc_message == "request: compression is not supported"
    assert traceback_records(caplog) == []


async def test_the_raw_clients_reach_the_registry(
    gc: RunningGc, keys: DevKeys, db_pool: asyncpg.Pool
) -> None:
    """The raw tools above speak correct gRPC: the same paths with a valid
    message register the MC (so the refusals are about the message alone)."""
    port = gc.endpoints.grpc_port
    auth = (b"authorization", f"Bearer {keys.mc_token('mc-raw')}".encode())
    body = mc_registration("mc-raw").SerializeToString()
    response = await raw_h2_call(port, grpc_headers(port, auth), grpc_frame(body))
    assert response.grpc_status is Status.OK, response
    async with raw_register_mc(port) as register:
        reply = await run_aio(
            register,
            mc_registration("mc-bytes").SerializeToString(),
            metadata=metadata(keys.mc_token("mc-bytes")),
        )
    assert reply.accepted
    for mc_id in ("mc-raw", "mc-bytes"):
        assert await run_aio(meeting_controllers.get, db_pool, mc_id) is not None


# --- 3. JWKS fetches: deadline and no redirects (shared/jwks.py) ------------------------------

#: The trickling server sends one byte per step, for at most this many steps
#: (10 s in all: well past every bound below, yet finite).
TRICKLE_STEP_S = 0.05
TRICKLE_BYTES = 200
FETCH_TIMEOUT_S = 0.5
#: Timeout plus one socket timeout, generously rounded up.
TRICKLE_FAILS_WITHIN_S = 3.0

Respond = Callable[[http.server.BaseHTTPRequestHandler, threading.Event], None]


class _JoiningHTTPServer(http.server.ThreadingHTTPServer):
    # server_close() joins the handler threads: none outlives its test.
    daemon_threads = False
    block_on_close = True


@dataclass
class LocalHttpServer:
    url: str
    #: Headers of every request received, in order.
    requests: list[dict[str, str]]


@contextmanager
def local_http_server(respond: Respond) -> Iterator[LocalHttpServer]:
    """An HTTP server on loopback (its own threads) answering every GET with
    ``respond(handler, stopping)``; ``stopping`` is set at teardown, and
    long responses must end when it is."""
    stopping = threading.Event()
    requests: list[dict[str, str]] = []
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with lock:
                requests.append(dict(self.headers.items()))
            respond(self, stopping)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = _JoiningHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        yield LocalHttpServer(f"http://127.0.0.1:{server.server_address[1]}", requests)
    finally:
        stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()


def _trickle(handler: http.server.BaseHTTPRequestHandler, stopping: threading.Event) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(TRICKLE_BYTES))
    handler.end_headers()
    for _ in range(TRICKLE_BYTES):
        if stopping.wait(TRICKLE_STEP_S):
            return
        try:
            handler.wfile.write(b" ")
        except OSError:  # the client gave up
            return


def test_a_trickling_jwks_server_cannot_outlast_the_fetch_timeout() -> None:
    """Each byte arrives well within the socket timeout, so only the overall
    deadline can stop the fetch. Before the fix ``read(n)`` waited for the
    whole body (10 s here) before the deadline was looked at. Wall-clock,
    because the thing under test is a wall-clock timeout."""
    with local_http_server(_trickle) as server:
        started = time.monotonic()
        with pytest.raises(JwksError, match="timed out"):
            KeyStore([f"{server.url}/jwks.json"], fetch_timeout_s=FETCH_TIMEOUT_S)
        elapsed = time.monotonic() - started
        assert len(server.requests) == 1
    assert elapsed < TRICKLE_FAILS_WITHIN_S


def test_a_redirect_is_refused_and_url_credentials_never_leave_for_its_target() -> None:
    """urllib follows a 302 and copies the request headers - the Basic
    credentials built from the URL included - to whatever host it names."""
    password = "SECRETPW-" + secrets.token_hex(4)
    document = jwks_document([generate_private_key().public_key()])
    body = json.dumps(document).encode()

    def serve_jwks(handler: http.server.BaseHTTPRequestHandler, _: threading.Event) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    with local_http_server(serve_jwks) as target:

        def redirect(handler: http.server.BaseHTTPRequestHandler, _: threading.Event) -> None:
            handler.send_response(302)
            handler.send_header("Location", f"{target.url}/stolen/jwks.json")
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with local_http_server(redirect) as origin:
            url = origin.url.replace("http://", f"http://dt-user:{password}@") + "/jwks.json"
            with pytest.raises(JwksError, match="HTTP 302") as info:
                KeyStore([url])
        assert password not in str(info.value)
        # The credentials went where they were configured for, and nowhere else.
        assert len(origin.requests) == 1
        assert "Authorization" in origin.requests[0]
        assert target.requests == []


# --- 4. GC configuration is checked, and its repr holds no secrets (gc/config.py) ---------------


def _ec_private_key_pem() -> str:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(lambda keys: "this is not a key\n", id="text"),
        pytest.param(lambda keys: keys.jwks_path.read_text(), id="the-jwks"),
        pytest.param(lambda keys: _ec_private_key_pem(), id="ec-p256-key"),
    ],
)
def test_a_signing_key_that_is_not_an_ed25519_pem_is_a_config_error(
    keys: DevKeys, tmp_path: Path, content: Callable[[DevKeys], str]
) -> None:
    """Before the fix any existing file passed, and the GC only failed at its
    first meeting token."""
    path = tmp_path / "not-a-signing-key"
    path.write_text(content(keys))
    with pytest.raises(ConfigError, match="GC_SIGNING_KEY"):
        GcConfig.from_env(gc_environ(keys, "postgresql://u@127.0.0.1/db", GC_SIGNING_KEY=str(path)))


@pytest.mark.parametrize("token", ["not-a-jwt", "/run/secrets/gc-token", "header.payload"])
def test_a_service_token_that_is_not_a_jwt_is_a_config_error_that_hides_it(
    keys: DevKeys, token: str
) -> None:
    with pytest.raises(ConfigError) as info:
        GcConfig.from_env(gc_environ(keys, "postgresql://u@127.0.0.1/db", GC_SERVICE_TOKEN=token))
    message = str(info.value)
    assert "GC_SERVICE_TOKEN" in message
    assert token not in message


def test_the_config_repr_holds_no_credentials(keys: DevKeys) -> None:
    """Parsing does not fetch the JWKS URL, so it need not exist."""
    token = keys.gc_token()
    config = GcConfig.from_env(
        gc_environ(
            keys,
            "postgresql://dt:DSNPASSWORD-x1@127.0.0.1:5432/db",
            AUTH_JWKS=f"http://u:SECRETPW@127.0.0.1/jwks,{keys.jwks_path}",
            GC_SERVICE_TOKEN=token,
        )
    )
    assert config.auth_jwks == ("http://u:SECRETPW@127.0.0.1/jwks", str(keys.jwks_path))
    text = repr(config)
    assert "SECRETPW" not in text
    assert "DSNPASSWORD-x1" not in text
    for part in token.split("."):
        assert part not in text


# --- 5. malformed DSN, refused connection (shared/config.py, shared/db.py, gc/__main__.py) ------


def with_password(dsn: str, password: str) -> str:
    """``dsn`` with ``password`` for its user (TCP and unix-socket forms)."""
    parts = urlsplit(dsn)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0] if at else "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{hostport}"))


def test_with_password() -> None:
    assert with_password("postgresql://postgres@127.0.0.1:5432/db", "pw") == (
        "postgresql://postgres:pw@127.0.0.1:5432/db"
    )
    assert with_password("postgresql://postgres:x@/db?host=/tmp/x", "pw") == (
        "postgresql://postgres:pw@/db?host=/tmp/x"
    )


@pytest.mark.parametrize("hostport", ["db.example:notaport", "db.example:99999"])
def test_a_dsn_with_a_malformed_port_is_a_config_error_without_the_password(
    keys: DevKeys, hostport: str
) -> None:
    """Before the fix it was accepted, and failed later in asyncpg with a
    message quoting the URL."""
    password = "pw-" + secrets.token_hex(6)
    dsn = f"postgresql://u:{password}@{hostport}/db"
    with pytest.raises(ConfigError) as info:
        GcConfig.from_env(gc_environ(keys, dsn))
    assert "DATABASE_URL" in str(info.value)
    assert password not in str(info.value)


@pytest.fixture
def missing_database_dsn(pg_server_dsn: str) -> str:
    """A DSN on the session's server for a database that does not exist,
    with a password that the server's trust authentication ignores."""
    name = f"dt_does_not_exist_{secrets.token_hex(6)}"
    return with_password(dsn_for_database(pg_server_dsn, name), "pw-" + secrets.token_hex(6))


async def test_a_missing_database_is_refused_at_once_not_retried(
    aio_loop: None, missing_database_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server answered "no such database": configuration, not an outage.
    Retrying would burn ``(attempts - 1) * retry_delay_s`` to no purpose."""
    attempts, retry_delay_s = 3, 5.0
    started = time.monotonic()
    with pytest.raises(db.DatabaseRefused) as info:
        async with db.open_pool(
            missing_database_dsn, attempts=attempts, retry_delay_s=retry_delay_s
        ):
            pytest.fail("a pool opened on a database that does not exist")
    elapsed = time.monotonic() - started
    assert [r for r in caplog.records if r.getMessage() == "database_connect_retry"] == []
    assert elapsed < retry_delay_s
    password = urlsplit(missing_database_dsn).password
    assert password
    assert password not in str(info.value)


def child_environ(environ: dict[str, str]) -> dict[str, str]:
    """The test's environment without any GC configuration, plus ``environ``."""
    names = {var.name for var in VARIABLES}
    return {k: v for k, v in os.environ.items() if k not in names} | environ


@pytest.mark.slow
async def test_the_gc_on_a_missing_database_exits_2_with_one_line(
    keys: DevKeys, missing_database_dsn: str
) -> None:
    """Before the fix asyncpg's InvalidCatalogNameError escaped ``trio.run``:
    exit status 1 and a traceback."""
    with trio.fail_after(RAW_CALL_WITHIN_S):
        result = await trio.run_process(
            [sys.executable, "-m", "darktower.gc"],
            env=child_environ(gc_environ(keys, missing_database_dsn)),
            stdin=subprocess.DEVNULL,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("configuration error: DATABASE_URL: ")
    assert "Traceback" not in stderr
    password = urlsplit(missing_database_dsn).password
    assert password
    assert password not in stderr


# --- 6. protocol libraries log one line, our code keeps its tracebacks (shared/logging.py) -----


@contextmanager
def product_logging() -> Iterator[None]:
    """The services' ``configure_logging()`` for the block (its handler on
    the stderr of that moment - pytest's capture); the root handlers and
    every logger's level are restored afterwards."""
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    levels = {
        name: logger.level
        for name, logger in logging.root.manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    configure_logging("INFO")
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        for name, logger in logging.root.manager.loggerDict.items():
            if isinstance(logger, logging.Logger):
                logger.setLevel(levels.get(name, logging.NOTSET))


@pytest.mark.parametrize(
    "name",
    [
        "asyncpg.pool",
        "grpclib",
        "grpclib.server",
        "h2.connection",
        "hpack.hpack",
        "hypercorn.error",
    ],
)
def test_a_protocol_library_logs_an_exception_as_one_line(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with product_logging():
        try:
            raise ValueError("malformed header from a client")
        except ValueError:
            logging.getLogger(name).exception("Application error in %s", "RegisterMC")
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err
    assert f"logger={name} " in err
    assert 'event="Application error in RegisterMC" error=ValueError' in err
    assert "malformed header" not in err  # the message may carry client data


def test_a_logger_merely_named_like_a_library_keeps_its_traceback(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with product_logging():
        try:
            raise ValueError("a bug")
        except ValueError:
            logging.getLogger("h2o.app").exception("failed")
    assert "Traceback (most recent call last):" in capsys.readouterr().err


def test_our_own_loggers_keep_their_tracebacks(capsys: pytest.CaptureFixture[str]) -> None:
    with product_logging():
        try:
            raise ValueError("a bug")
        except ValueError:
            get_logger("darktower.shared.grpc_server").exception("grpc_handler_failed", method="m")
            logging.getLogger("darktower.gc").error("plain", exc_info=True)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[0].endswith(
        "logger=darktower.shared.grpc_server event=grpc_handler_failed method=m"
    )
    assert err.count("Traceback (most recent call last):") == 2
    assert err.count("ValueError: a bug") == 2
