"""Keys, thumbprints and the JWKS key store, with real files, real HTTP and real crypto."""

from __future__ import annotations

import base64
import http.server
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from darktower.shared.jwks import JwksError, KeyStore, describe_source, parse_sources
from darktower.shared.keys import (
    Ed25519PrivateKey,
    KeyFileError,
    b64url_decode,
    b64url_encode,
    generate_private_key,
    jwks_document,
    key_id,
    load_private_key,
    okp_thumbprint,
    public_jwk,
    save_private_key,
    write_jwks,
)

# RFC 8037 Appendix A.1 (the example key) and A.3 (its thumbprint).
RFC8037_D = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"
RFC8037_X = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
RFC8037_THUMBPRINT = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _jwks_file(path: Path, *private_keys: Ed25519PrivateKey) -> Path:
    write_jwks(path, [public_jwk(k.public_key()) for k in private_keys])
    return path


# --- keys ----------------------------------------------------------------------------------


def test_thumbprint_matches_rfc8037_a3() -> None:
    assert okp_thumbprint(RFC8037_X) == RFC8037_THUMBPRINT


def test_key_id_of_rfc8037_example_key() -> None:
    private = Ed25519PrivateKey.from_private_bytes(b64url_decode(RFC8037_D))
    jwk = public_jwk(private.public_key())
    assert jwk["x"] == RFC8037_X
    assert key_id(private.public_key()) == RFC8037_THUMBPRINT
    assert jwk == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": RFC8037_X,
        "kid": RFC8037_THUMBPRINT,
        "alg": "EdDSA",
        "use": "sig",
    }


def test_b64url_decode_accepts_only_the_canonical_spelling() -> None:
    assert b64url_decode(b64url_encode(b"\x00\xff\xfe")) == b"\x00\xff\xfe"
    for bad in ["AA==", "A!AA", "é", "AB"]:  # padding, foreign char, non-ASCII, stray bits
        with pytest.raises(ValueError, match="base64url"):
            b64url_decode(bad)


def test_private_key_round_trips_with_mode_0600(tmp_path: Path) -> None:
    key = generate_private_key()
    path = tmp_path / "k.pem"
    save_private_key(key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_id(load_private_key(path).public_key()) == key_id(key.public_key())


def test_save_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    first, second = generate_private_key(), generate_private_key()
    save_private_key(first, path)
    with pytest.raises(FileExistsError):
        save_private_key(second, path)
    assert key_id(load_private_key(path).public_key()) == key_id(first.public_key())
    path.chmod(0o644)
    save_private_key(second, path, overwrite=True)
    assert key_id(load_private_key(path).public_key()) == key_id(second.public_key())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_private_key_errors_name_the_file_not_its_contents(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not found"):
        load_private_key(tmp_path / "missing.pem")

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXN0dWZm\n-----END PRIVATE KEY-----\n")
    with pytest.raises(KeyFileError) as excinfo:
        load_private_key(garbage)
    assert str(garbage) in str(excinfo.value)
    assert "c2VjcmV0" not in str(excinfo.value)

    ec_pem = tmp_path / "ec.pem"
    ec_pem.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyFileError, match="not an Ed25519 private key"):
        load_private_key(ec_pem)


def test_write_jwks_writes_a_jwks(tmp_path: Path) -> None:
    key = generate_private_key()
    path = tmp_path / "jwks.json"
    write_jwks(path, [public_jwk(key.public_key())])
    assert json.loads(path.read_text()) == jwks_document([key.public_key()])


# --- KeyStore: files -----------------------------------------------------------------------


def test_parse_sources_splits_and_drops_blanks() -> None:
    assert parse_sources(" a.json, https://x/jwks ,,") == ["a.json", "https://x/jwks"]


def test_keystore_merges_sources(tmp_path: Path) -> None:
    a, b, c = generate_private_key(), generate_private_key(), generate_private_key()
    one = _jwks_file(tmp_path / "one.json", a)
    two = _jwks_file(tmp_path / "two.json", b, c)
    store = KeyStore.from_setting(f"{one},{two}")
    assert store.kids == {key_id(k.public_key()) for k in (a, b, c)}
    got = store.get(key_id(b.public_key()))
    assert got is not None
    assert key_id(got) == key_id(b.public_key())
    assert store.get("nope") is None


def test_keystore_ignores_non_ed25519_keys_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = generate_private_key()
    good_jwk = public_jwk(good.public_key())
    other_x = public_jwk(generate_private_key().public_key())["x"]
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    n = rsa_pub.public_numbers().n
    path = tmp_path / "mixed.json"
    doc = {
        "keys": [
            {
                "kty": "RSA",
                "kid": "rsa",
                "alg": "RS256",
                "n": b64url_encode(n.to_bytes(256)),
                "e": "AQAB",
            },
            {"kty": "EC", "crv": "P-256", "kid": "ec", "x": "AAAA", "y": "AAAA"},
            {"kty": "OKP", "crv": "X25519", "kid": "x25519", "x": other_x},
            {"kty": "OKP", "crv": "Ed448", "kid": "ed448", "x": other_x},
            {"kty": "OKP", "crv": "Ed25519", "kid": "wrong-alg", "alg": "RS256", "x": other_x},
            {"kty": "OKP", "crv": "Ed25519", "kid": "enc", "use": "enc", "x": other_x},
            {"kty": "OKP", "crv": "Ed25519", "kid": "short", "x": "AAAA"},
            {"kty": "OKP", "crv": "Ed25519", "kid": "private", "x": other_x, "d": other_x},
            "not an object",
            good_jwk,
            {"kty": "OKP", "crv": "Ed25519", "x": other_x},  # no alg, no kid: accepted
        ]
    }
    path.write_text(json.dumps(doc))
    with caplog.at_level(logging.WARNING, logger="darktower.shared.jwks"):
        store = KeyStore([str(path)])
    assert store.kids == {good_jwk["kid"], okp_thumbprint(other_x)}
    ignored = [r for r in caplog.records if r.getMessage() == "jwks_key_ignored"]
    assert len(ignored) == 9
    assert all(other_x not in r.getMessage() + str(getattr(r, "fields", "")) for r in ignored)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "No such file"),
        ("{not json", "not valid JSON"),
        ('{"nokeys": []}', "not a JWKS"),
        ('{"keys": {}}', "not a JWKS"),
    ],
)
def test_keystore_refuses_a_source_that_fails_at_startup(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    good = _jwks_file(tmp_path / "good.json", generate_private_key())
    bad = tmp_path / "bad.json"
    if content is not None:
        bad.write_text(content)
    with pytest.raises(JwksError, match=problem) as excinfo:
        KeyStore([str(good), str(bad)])
    assert str(bad) in str(excinfo.value)


def test_keystore_with_no_usable_key_is_an_error_without_key_material(tmp_path: Path) -> None:
    x = public_jwk(generate_private_key().public_key())["x"]
    path = tmp_path / "rs.json"
    path.write_text(json.dumps({"keys": [{"kty": "OKP", "crv": "Ed448", "x": x}]}))
    with pytest.raises(JwksError, match="no usable") as excinfo:
        KeyStore([str(path)])
    assert x not in str(excinfo.value)


def test_keystore_rejects_bad_configuration() -> None:
    with pytest.raises(JwksError, match="no JWKS source"):
        KeyStore([])
    with pytest.raises(JwksError, match="not http"):
        KeyStore(["ftp://example.com/jwks.json"])
    with pytest.raises(TypeError):
        KeyStore("jwks.json")


def test_refresh_is_rate_limited_and_picks_up_new_keys(tmp_path: Path) -> None:
    clock = FakeClock()
    a, b = generate_private_key(), generate_private_key()
    path = _jwks_file(tmp_path / "jwks.json", a)
    store = KeyStore([str(path)], clock=clock)
    # The first refetch after startup is allowed at once (a rotation is fresh news).
    assert store.may_refresh()
    assert store.refresh()
    assert store.statistics().refreshes == 1
    _jwks_file(path, a, b)
    clock.now += 29.9
    assert not store.may_refresh()
    assert not store.refresh()
    assert store.get(key_id(b.public_key())) is None
    clock.now += 0.1
    assert store.refresh()
    assert store.get(key_id(b.public_key())) is not None
    assert store.statistics().refreshes == 2


def test_failed_refresh_keeps_previous_keys(tmp_path: Path) -> None:
    clock = FakeClock()
    a = generate_private_key()
    path = _jwks_file(tmp_path / "jwks.json", a)
    store = KeyStore([str(path)], clock=clock)
    path.write_text("{broken")
    assert store.refresh()
    assert store.get(key_id(a.public_key())) is not None
    assert store.statistics().failed_fetches == 1
    # A failed fetch still counts against the rate limit.
    assert not store.may_refresh()


# --- KeyStore: HTTP ------------------------------------------------------------------------


@dataclass
class JwksServer:
    base: str
    body: bytes = b""
    status: int = 200
    requests: int = 0
    authorization: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    state = JwksServer(base="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state.lock:
                state.requests += 1
                state.authorization = self.headers.get("Authorization")
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_keystore_loads_from_url_and_merges_with_file(
    jwks_server: JwksServer, tmp_path: Path
) -> None:
    a, b = generate_private_key(), generate_private_key()
    jwks_server.body = json.dumps(jwks_document([a.public_key()])).encode()
    path = _jwks_file(tmp_path / "jwks.json", b)
    store = KeyStore([f"{jwks_server.base}/.well-known/jwks.json", str(path)])
    assert store.kids == {key_id(a.public_key()), key_id(b.public_key())}


def test_url_errors_name_the_source_without_credentials(jwks_server: JwksServer) -> None:
    jwks_server.status = 404
    url = jwks_server.base.replace("http://", "http://user:hunter2@") + "/jwks.json?token=abc"
    with pytest.raises(JwksError) as excinfo:
        KeyStore([url])
    message = str(excinfo.value)
    assert f"{jwks_server.base}/jwks.json" in message
    assert "HTTP 404" in message
    assert "hunter2" not in message
    assert "abc" not in message
    assert describe_source(url) == f"{jwks_server.base}/jwks.json"
    # The credentials were sent the way a JWKS endpoint expects them.
    assert jwks_server.authorization == "Basic " + base64.b64encode(b"user:hunter2").decode()


def test_source_over_64_kib_is_refused(jwks_server: JwksServer, tmp_path: Path) -> None:
    doc = jwks_document([generate_private_key().public_key()])
    body = json.dumps(doc).encode()
    jwks_server.body = body + b" " * (64 * 1024 - len(body))
    assert len(jwks_server.body) == 64 * 1024
    KeyStore([jwks_server.base])
    jwks_server.body += b" "
    with pytest.raises(JwksError, match="larger than 65536 bytes"):
        KeyStore([jwks_server.base])
    path = tmp_path / "big.json"
    path.write_bytes(jwks_server.body)
    with pytest.raises(JwksError, match="larger than 65536 bytes"):
        KeyStore([str(path)])


def test_unreachable_url_is_a_startup_error() -> None:
    # A port that was just free: nothing listens there.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(JwksError, match="connection failed"):
        KeyStore([f"http://127.0.0.1:{port}/jwks.json"])


def test_concurrent_refreshes_fetch_once(jwks_server: JwksServer) -> None:
    clock = FakeClock()
    jwks_server.body = json.dumps(jwks_document([generate_private_key().public_key()])).encode()
    store = KeyStore([jwks_server.base], clock=clock)
    assert jwks_server.requests == 1
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def refresh() -> None:
        barrier.wait()
        results.append(store.refresh())

    threads = [threading.Thread(target=refresh) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 15 + [True]
    assert jwks_server.requests == 2


def test_private_key_file_never_world_readable_even_with_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "k.pem"
        save_private_key(generate_private_key(), path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
