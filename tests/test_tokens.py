"""Token validation and minting (SPEC §4) with real keys, real JWKS files and real crypto.

Every refusal is asserted with its exact class, because the class is the
contract with the servers: Unauthenticated → UNAUTHENTICATED / 401,
PermissionDenied → PERMISSION_DENIED / 403.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from darktower.shared.jwks import KeyStore
from darktower.shared.keys import (
    Ed25519PrivateKey,
    b64url_encode,
    generate_private_key,
    key_id,
    public_jwk,
    write_jwks,
)
from darktower.shared.seam import asyncio_loop, run_aio
from darktower.shared.tokens import (
    AUD_GC,
    AUD_MC,
    MAX_TOKEN_BYTES,
    SCOPE_MC_ASSIGN,
    SCOPE_MC_REGISTER,
    SCOPE_MEETING_CREATE,
    SCOPE_MEETING_JOIN,
    SCOPE_MEETING_PARTICIPANT,
    SCOPE_MH_REGISTER,
    AuthError,
    Claims,
    KeyRefreshNeeded,
    PermissionDenied,
    TokenValidator,
    Unauthenticated,
    bearer_token,
    mint_gc_token,
    mint_mc_token,
    mint_meeting_token,
    mint_mh_token,
    mint_token,
    mint_user_token,
)

T0 = 1_800_000_000.0  # wall-clock epoch seconds every test starts at


class FakeClock:
    """A clock the test moves by hand (used for both wall and monotonic time)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    key: Ed25519PrivateKey
    kid: str
    jwks_path: Path
    store: KeyStore
    validator: TokenValidator
    wall: FakeClock
    mono: FakeClock

    def mint(self, **overrides: Any) -> str:
        fields: dict[str, Any] = {
            "kid": self.kid,
            "sub": "mc-1",
            "audience": AUD_GC,
            "scopes": [SCOPE_MC_REGISTER],
            "ttl_s": 600,
            "now": self.wall.now,
        }
        fields.update(overrides)
        key = fields.pop("key", self.key)
        return mint_token(key, **fields)

    def validate(self, token: str, **overrides: Any) -> Claims:
        kwargs: dict[str, Any] = {"audience": AUD_GC, "scope": SCOPE_MC_REGISTER}
        kwargs.update(overrides)
        return self.validator.validate(token, **kwargs)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    key = generate_private_key()
    path = tmp_path / "jwks.json"
    write_jwks(path, [public_jwk(key.public_key())])
    wall, mono = FakeClock(T0), FakeClock(500.0)
    store = KeyStore([str(path)], clock=mono)
    return Env(
        key=key,
        kid=key_id(key.public_key()),
        jwks_path=path,
        store=store,
        validator=TokenValidator(store, wall_clock=wall),
        wall=wall,
        mono=mono,
    )


def refused(cls: type[AuthError], fn: Callable[[], object]) -> AuthError:
    """Run ``fn``; it must raise exactly ``cls`` (not a subclass, not a parent)."""
    with pytest.raises(AuthError) as excinfo:
        fn()
    assert type(excinfo.value) is cls, f"{type(excinfo.value).__name__}: {excinfo.value}"
    return excinfo.value


def encode_segments(header: dict[str, Any], payload: dict[str, Any]) -> str:
    def seg(obj: dict[str, Any]) -> str:
        return b64url_encode(json.dumps(obj, separators=(",", ":")).encode())

    return f"{seg(header)}.{seg(payload)}"


def claims_for(env: Env, **extra: Any) -> dict[str, Any]:
    now = int(env.wall.now)
    payload: dict[str, Any] = {
        "sub": "mc-1",
        "aud": AUD_GC,
        "scope": SCOPE_MC_REGISTER,
        "iat": now,
        "exp": now + 600,
    }
    payload.update(extra)
    return payload


# --- the happy path ------------------------------------------------------------------------


def test_valid_token_yields_claims(env: Env) -> None:
    token = env.mint(extra={"org_id": "org-1"})
    claims = env.validate(token, subject="mc-1")
    assert claims.sub == "mc-1"
    assert claims.audiences == (AUD_GC,)
    assert claims.scopes == frozenset({SCOPE_MC_REGISTER})
    assert claims.exp == T0 + 600
    assert claims.iat == T0
    assert claims.org_id == "org-1"
    assert claims.meeting_id is None
    assert claims.jti is not None
    assert claims.raw["org_id"] == "org-1"


def test_header_pins_eddsa_and_names_the_kid(env: Env) -> None:
    header = jwt.get_unverified_header(env.mint())
    assert header["alg"] == "EdDSA"
    assert header["kid"] == env.kid


@pytest.mark.parametrize(
    "extra",
    [None, {"org_id": "org-1"}, {"meeting_id": "m-1", "guest": True, "display_name": "Zoë ✓"}],
)
def test_minted_tokens_are_byte_for_byte_pyjwts(env: Env, extra: dict[str, Any] | None) -> None:
    """The minting shortcut (``_sign_compact``) must stay what pyjwt would
    produce for the same claims: Ed25519 signatures are deterministic, so
    the whole token is comparable."""
    token = env.mint(extra=extra)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert token == jwt.encode(payload, env.key, algorithm="EdDSA", headers={"kid": env.kid})
    assert env.validate(token).raw == payload


@pytest.mark.parametrize("scope", ["", " ", "a b", "a\tb", "a\u2003b", "\x1c", " a", "a\n"])
def test_a_scope_must_be_one_word(env: Env, scope: str) -> None:
    with pytest.raises(ValueError, match="whitespace"):
        env.mint(scopes=[SCOPE_MC_REGISTER, scope])


# --- Unauthenticated -----------------------------------------------------------------------


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "...", "é.é.é", "eyJ.eyJ.sig"])
def test_missing_or_garbage_token(env: Env, token: str) -> None:
    refused(Unauthenticated, lambda: env.validate(token))


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    for value in [None, "", "Bearer ", "bearer abc", "BEARER abc", "Basic abc", "abc"]:
        refused(Unauthenticated, functools.partial(bearer_token, value))


def test_expired_token_is_refused_but_leeway_applies(env: Env) -> None:
    token = env.mint(ttl_s=60)
    env.wall.now = T0 + 60 + 4  # 4 s past exp, inside the 5 s leeway
    env.validate(token)
    env.wall.now = T0 + 60 + 5
    assert refused(Unauthenticated, lambda: env.validate(token)).reason == "token expired"


def test_expired_token_is_refused_on_a_fresh_validator(env: Env) -> None:
    token = env.mint(ttl_s=60, now=T0 - 120)
    assert refused(Unauthenticated, lambda: env.validate(token)).reason == "token expired"
    env.validate(env.mint(ttl_s=60, now=T0 - 63))  # 3 s past exp: leeway


def test_iat_more_than_five_minutes_ahead_is_refused(env: Env) -> None:
    env.validate(env.mint(now=T0 + 30))  # small clock skew between issuer and us
    env.validate(env.mint(now=T0 + 300))
    token = env.mint(now=T0 + 301)
    assert refused(Unauthenticated, lambda: env.validate(token)).reason == "iat in the future"


def test_nbf_in_the_future_is_refused(env: Env) -> None:
    token = env.mint(extra={"nbf": int(T0) + 60})
    refused(Unauthenticated, lambda: env.validate(token))
    env.wall.now = T0 + 56  # nbf within leeway
    env.validate(token)


def test_exp_is_required(env: Env) -> None:
    payload = claims_for(env)
    del payload["exp"]
    token = jwt.encode(payload, env.key, algorithm="EdDSA", headers={"kid": env.kid})
    assert refused(Unauthenticated, lambda: env.validate(token)).reason == "missing exp"


@pytest.mark.parametrize("exp", ["soon", True, float("inf"), float("nan"), [1]])
def test_malformed_exp_is_refused(env: Env, exp: object) -> None:
    token = jwt.encode(
        claims_for(env, exp=exp), env.key, algorithm="EdDSA", headers={"kid": env.kid}
    )
    refused(Unauthenticated, lambda: env.validate(token))


@pytest.mark.parametrize(
    ("claim", "value"), [("sub", ""), ("sub", 7), ("aud", 3), ("scope", ["x"])]
)
def test_malformed_claims_are_refused(env: Env, claim: str, value: object) -> None:
    token = jwt.encode(
        claims_for(env, **{claim: value}), env.key, algorithm="EdDSA", headers={"kid": env.kid}
    )
    refused(Unauthenticated, lambda: env.validate(token))


def test_bad_signature_is_refused(env: Env) -> None:
    other = generate_private_key()
    forged = env.mint(key=other)  # right kid, wrong key
    assert refused(Unauthenticated, lambda: env.validate(forged)).reason == "bad signature"

    header, _, signature = env.mint().split(".")
    tampered_payload = b64url_encode(json.dumps(claims_for(env, sub="mc-2")).encode())
    tampered = f"{header}.{tampered_payload}.{signature}"
    assert refused(Unauthenticated, lambda: env.validate(tampered)).reason == "bad signature"


def test_hs256_forged_with_the_public_key_is_refused(env: Env) -> None:
    # The classic algorithm-confusion attack: HMAC keyed with the public key.
    public = env.key.public_key()
    for secret in [
        public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        public_jwk(public)["x"].encode(),
    ]:
        signing_input = encode_segments(
            {"alg": "HS256", "typ": "JWT", "kid": env.kid}, claims_for(env)
        )
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        token = f"{signing_input}.{b64url_encode(mac)}"
        err = refused(Unauthenticated, functools.partial(env.validate, token))
        assert err.reason == "algorithm not allowed"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", ""])
def test_alg_none_is_refused(env: Env, alg: str) -> None:
    unsigned = encode_segments({"alg": alg, "kid": env.kid}, claims_for(env)) + "."
    assert refused(Unauthenticated, lambda: env.validate(unsigned)).reason in {
        "algorithm not allowed",
        "malformed token",
    }


def test_rs256_is_refused(env: Env) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims_for(env), rsa_key, algorithm="RS256", headers={"kid": env.kid})
    assert refused(Unauthenticated, lambda: env.validate(token)).reason == "algorithm not allowed"


def test_missing_kid_is_refused(env: Env) -> None:
    token = jwt.encode(claims_for(env), env.key, algorithm="EdDSA")
    assert refused(Unauthenticated, lambda: env.validate(token)).reason == "missing kid"
    empty = jwt.encode(claims_for(env), env.key, algorithm="EdDSA", headers={"kid": ""})
    assert refused(Unauthenticated, lambda: env.validate(empty)).reason == "missing kid"


def _token_of_length(env: Env, length: int) -> str:
    """A genuinely valid token exactly ``length`` bytes long.

    Base64 cannot produce every length from the payload alone, so a filler
    header field takes up the remainder.
    """
    base = len(
        jwt.encode(claims_for(env, pad=""), env.key, algorithm="EdDSA", headers={"kid": env.kid})
    )
    start = max(0, (length - base) * 3 // 4 - 8)
    for head_pad in range(4):
        for body_pad in range(start, length):
            token = jwt.encode(
                claims_for(env, pad="p" * body_pad),
                env.key,
                algorithm="EdDSA",
                headers={"kid": env.kid, "x": "h" * head_pad},
            )
            if len(token) == length:
                return token
            if len(token) > length:
                break
    raise AssertionError(f"no token of length {length}")


def test_8192_byte_token_accepted_8193_refused_before_parsing(env: Env) -> None:
    at_limit = _token_of_length(env, MAX_TOKEN_BYTES)
    assert len(at_limit.encode()) == 8192
    env.validate(at_limit)
    over = _token_of_length(env, MAX_TOKEN_BYTES + 1)
    assert len(over.encode()) == 8193
    assert refused(Unauthenticated, lambda: env.validate(over)).reason == "token too large"
    # Refused before parsing: no verification happened, nothing was cached.
    assert env.validator.statistics().cache_entries == 1


def test_non_ascii_token_within_char_limit_but_over_byte_limit(env: Env) -> None:
    token = "é" * 4097  # 4097 characters, 8194 bytes
    refused(Unauthenticated, lambda: env.validate(token))


# --- unknown kid and JWKS refetch -----------------------------------------------------------


async def test_unknown_kid_refetches_at_most_once_per_30_s(env: Env) -> None:
    rotated = generate_private_key()
    token = env.mint(key=rotated, kid=key_id(rotated.public_key()))

    # Sync validate never blocks on a fetch: it asks for one.
    refused(KeyRefreshNeeded, lambda: env.validate(token))

    # The async wrapper fetches (the key is not published yet) and gives up.
    with pytest.raises(AuthError) as excinfo:
        await env.validator.validate_trio(token, audience=AUD_GC, scope=SCOPE_MC_REGISTER)
    assert type(excinfo.value) is Unauthenticated
    assert env.store.statistics().refreshes == 1

    # The key is published, but within 30 s of the last fetch nothing is fetched.
    write_jwks(env.jwks_path, [public_jwk(env.key.public_key()), public_jwk(rotated.public_key())])
    env.mono.now += 29
    refused(Unauthenticated, lambda: env.validate(token))
    with pytest.raises(AuthError) as excinfo:
        await env.validator.validate_trio(token, audience=AUD_GC, scope=SCOPE_MC_REGISTER)
    assert type(excinfo.value) is Unauthenticated
    assert env.store.statistics().refreshes == 1

    env.mono.now += 1
    claims = await env.validator.validate_trio(token, audience=AUD_GC, scope=SCOPE_MC_REGISTER)
    assert claims.sub == "mc-1"
    assert env.store.statistics().refreshes == 2


async def test_concurrent_validations_share_one_refetch(env: Env) -> None:
    rotated = generate_private_key()
    write_jwks(env.jwks_path, [public_jwk(env.key.public_key()), public_jwk(rotated.public_key())])
    tokens = [
        env.mint(key=rotated, kid=key_id(rotated.public_key()), sub=f"mc-{i}") for i in range(20)
    ]
    results: list[str] = []

    async def one(token: str) -> None:
        claims = await env.validator.validate_trio(token, audience=AUD_GC, scope=SCOPE_MC_REGISTER)
        results.append(claims.sub)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for token in tokens:
                nursery.start_soon(one, token)
    assert sorted(results) == sorted(f"mc-{i}" for i in range(20))
    assert env.store.statistics().refreshes == 1


async def test_validate_asyncio_refreshes_inside_trio_asyncio(env: Env) -> None:
    rotated = generate_private_key()
    token = env.mint(key=rotated, kid=key_id(rotated.public_key()))
    write_jwks(env.jwks_path, [public_jwk(rotated.public_key())])
    with trio.fail_after(10):
        async with asyncio_loop():
            claims = await run_aio(
                env.validator.validate_asyncio, token, audience=AUD_GC, scope=SCOPE_MC_REGISTER
            )
            assert claims.sub == "mc-1"
            # Rate-limited now: an unknown kid is a plain refusal, no fetch.
            stranger = generate_private_key()
            bad = env.mint(key=stranger, kid=key_id(stranger.public_key()))
            with pytest.raises(AuthError) as excinfo:
                await run_aio(
                    env.validator.validate_asyncio, bad, audience=AUD_GC, scope=SCOPE_MC_REGISTER
                )
    assert type(excinfo.value) is Unauthenticated
    assert env.store.statistics().refreshes == 1


async def test_validate_trio_passes_through_other_failures(env: Env) -> None:
    with pytest.raises(AuthError) as excinfo:
        await env.validator.validate_trio(env.mint(), audience=AUD_MC, scope=SCOPE_MC_REGISTER)
    assert type(excinfo.value) is PermissionDenied
    assert env.store.statistics().refreshes == 0


# --- PermissionDenied ----------------------------------------------------------------------


def test_wrong_audience_is_permission_denied(env: Env) -> None:
    token = env.mint(audience=AUD_MC)
    assert refused(PermissionDenied, lambda: env.validate(token)).reason == "wrong audience"
    token = jwt.encode(
        {k: v for k, v in claims_for(env).items() if k != "aud"},
        env.key,
        algorithm="EdDSA",
        headers={"kid": env.kid},
    )
    refused(PermissionDenied, lambda: env.validate(token))


def test_audience_list_must_contain_ours(env: Env) -> None:
    token = jwt.encode(
        claims_for(env, aud=["mc", "gc"]), env.key, algorithm="EdDSA", headers={"kid": env.kid}
    )
    assert env.validate(token).audiences == ("mc", "gc")


def test_missing_scope_is_permission_denied(env: Env) -> None:
    token = env.mint(scopes=[SCOPE_MH_REGISTER])
    assert refused(PermissionDenied, lambda: env.validate(token)).reason == "missing scope"
    # Scope matching is whole words, not substrings.
    token = env.mint(scopes=["mc.registerx", "xmc.register"])
    refused(PermissionDenied, lambda: env.validate(token))


def test_subject_mismatch_is_permission_denied(env: Env) -> None:
    token = env.mint(sub="mc-1")
    env.validate(token, subject="mc-1")
    assert refused(PermissionDenied, lambda: env.validate(token, subject="mc-2")).reason == (
        "subject mismatch"
    )


def test_expired_beats_permission(env: Env) -> None:
    token = env.mint(ttl_s=60, audience=AUD_MC)
    env.wall.now = T0 + 3600
    refused(Unauthenticated, lambda: env.validate(token))


# --- the signature cache -------------------------------------------------------------------


def test_cache_hit_skips_signature_but_rechecks_claims(env: Env) -> None:
    token = env.mint(ttl_s=120)
    env.validate(token)
    assert env.validator.statistics().cache_misses == 1
    env.validate(token)
    stats = env.validator.statistics()
    assert (stats.cache_hits, stats.cache_entries) == (1, 1)

    # Hits still enforce audience, scope and subject.
    refused(PermissionDenied, lambda: env.validate(token, audience=AUD_MC))
    refused(PermissionDenied, lambda: env.validate(token, scope=SCOPE_MC_ASSIGN))
    refused(PermissionDenied, lambda: env.validate(token, subject="mc-9"))
    assert env.validator.statistics().cache_hits == 4

    # Withdraw the key: only a cache hit (no signature check) can still accept it.
    write_jwks(env.jwks_path, [public_jwk(generate_private_key().public_key())])
    assert env.store.refresh()
    env.wall.now = T0 + 100
    env.validate(token)
    assert env.validator.statistics().cache_hits == 5


def test_cache_never_keeps_an_expired_token_alive(env: Env) -> None:
    token = env.mint(ttl_s=120)
    env.validate(token)
    env.wall.now = T0 + 119
    env.validate(token)
    assert env.validator.statistics().cache_hits == 1
    env.wall.now = T0 + 124  # past exp, inside leeway: still accepted
    env.validate(token)
    env.wall.now = T0 + 125
    assert refused(Unauthenticated, lambda: env.validate(token)).reason == "token expired"


def test_cache_entry_lives_at_most_five_minutes(env: Env) -> None:
    token = env.mint(ttl_s=3600)
    env.validate(token)
    write_jwks(env.jwks_path, [public_jwk(generate_private_key().public_key())])
    assert env.store.refresh()
    env.wall.now = T0 + 299
    env.validate(token)  # cached signature
    env.wall.now = T0 + 300
    # The entry has lapsed; the key is gone and the store is rate-limited.
    assert refused(Unauthenticated, lambda: env.validate(token)).reason == "unknown kid"


def test_cache_is_a_bounded_lru(env: Env) -> None:
    validator = TokenValidator(env.store, wall_clock=env.wall, cache_size=2)
    a, b, c = (env.mint(sub=s) for s in ("a", "b", "c"))
    for token in (a, b, a, c):  # c evicts b, the least recently used
        validator.validate(token, audience=AUD_GC, scope=SCOPE_MC_REGISTER)
    assert validator.statistics().cache_entries == 2
    validator.validate(a, audience=AUD_GC, scope=SCOPE_MC_REGISTER)
    validator.validate(b, audience=AUD_GC, scope=SCOPE_MC_REGISTER)
    stats = validator.statistics()
    assert (stats.cache_hits, stats.cache_misses) == (2, 4)


def test_failures_are_not_cached(env: Env) -> None:
    forged = env.mint(key=generate_private_key())
    for _ in range(3):
        refused(Unauthenticated, lambda: env.validate(forged))
    assert env.validator.statistics().cache_entries == 0


# --- nothing leaks -------------------------------------------------------------------------


def test_reprs_and_messages_never_contain_the_token(env: Env) -> None:
    token = env.mint(extra={"org_id": "org-7f3a"})
    claims = env.validate(token)
    signature = token.rsplit(".", 1)[1]
    for text in [repr(claims), str(claims), repr(env.validator), repr(env.store)]:
        assert token not in text
        assert signature not in text
    assert "raw" not in repr(claims)
    assert "org-7f3a" not in repr(env.validator)

    failures: list[AuthError] = []
    for bad in [token[:-3] + "AAA", token + "x", token.replace(".", "!", 1)]:
        with pytest.raises(AuthError) as excinfo:
            env.validate(bad)
        failures.append(excinfo.value)
    failures.append(refused(PermissionDenied, lambda: env.validate(token, audience=AUD_MC)))
    for err in failures:
        for text in [str(err), repr(err), err.public_message]:
            assert signature not in text
            assert token.split(".")[1] not in text
        # pyjwt's own messages can quote token fragments: they are not chained.
        assert err.__cause__ is None
    assert Unauthenticated.public_message == "missing or invalid credentials"
    assert PermissionDenied.public_message == "permission denied"


# --- minting -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mint", "audience", "scope", "sub", "extra"),
    [
        (
            lambda k, kid: mint_mc_token(k, kid=kid, mc_id="mc-7"),
            AUD_GC,
            SCOPE_MC_REGISTER,
            "mc-7",
            {},
        ),
        (
            lambda k, kid: mint_mh_token(k, kid=kid, mh_id="mh-7"),
            AUD_GC,
            SCOPE_MH_REGISTER,
            "mh-7",
            {},
        ),
        (
            lambda k, kid: mint_gc_token(k, kid=kid, gc_id="gc-7"),
            AUD_MC,
            SCOPE_MC_ASSIGN,
            "gc-7",
            {},
        ),
        (
            lambda k, kid: mint_user_token(k, kid=kid, user_id="u-7", org_id="o-7"),
            AUD_GC,
            SCOPE_MEETING_JOIN,
            "u-7",
            {"org_id": "o-7"},
        ),
        (
            lambda k, kid: mint_meeting_token(k, kid=kid, participant_id="p-7", meeting_id="m-7"),
            AUD_MC,
            SCOPE_MEETING_PARTICIPANT,
            "p-7",
            {"meeting_id": "m-7"},
        ),
    ],
)
def test_each_token_kind_validates_for_its_use(
    tmp_path: Path,
    mint: Callable[[Ed25519PrivateKey, str], str],
    audience: str,
    scope: str,
    sub: str,
    extra: dict[str, str],
) -> None:
    key = generate_private_key()
    write_jwks(tmp_path / "jwks.json", [public_jwk(key.public_key())])
    validator = TokenValidator(KeyStore([str(tmp_path / "jwks.json")]))
    claims = validator.validate(
        mint(key, key_id(key.public_key())), audience=audience, scope=scope, subject=sub
    )
    assert claims.jti
    for name, value in extra.items():
        assert getattr(claims, name) == value


def test_user_token_default_scopes_and_meeting_token_ttl(env: Env) -> None:
    user = env.validate(
        mint_user_token(env.key, kid=env.kid, user_id="u", org_id="o", now=T0),
        scope=SCOPE_MEETING_CREATE,
    )
    assert user.scopes == {SCOPE_MEETING_JOIN, SCOPE_MEETING_CREATE}
    meeting = env.validate(
        mint_meeting_token(env.key, kid=env.kid, participant_id="p", meeting_id="m", now=T0),
        audience=AUD_MC,
        scope=SCOPE_MEETING_PARTICIPANT,
    )
    assert meeting.iat is not None
    assert meeting.exp - meeting.iat == 600


def test_every_token_gets_a_unique_jti(env: Env) -> None:
    first, second = env.validate(env.mint()), env.validate(env.mint())
    assert first.jti != second.jti


@pytest.mark.parametrize(
    "bad",
    [
        {"ttl_s": 0},
        {"sub": ""},
        {"kid": ""},
        {"scopes": ["two words"]},
        {"scopes": [""]},
        {"extra": {"exp": 1}},
        {"extra": {"aud": "mc"}},
    ],
)
def test_mint_token_refuses_bad_input(env: Env, bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        env.mint(**bad)
