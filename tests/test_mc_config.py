"""The MC's configuration: every variable validated at start, one clear
error naming the variable, secrets never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from gc_harness import DevKeys

from darktower.mc.config import McConfig
from darktower.shared.config import ConfigError


@pytest.fixture
def keys(tmp_path: Path) -> DevKeys:
    return DevKeys.create(tmp_path / "keys")


def environ(keys: DevKeys, **overrides: str) -> dict[str, str]:
    env = {
        "REDIS_URL": "redis://:s3cret-pw@127.0.0.1:6379/0",
        "MC_SERVICE_TOKEN": keys.mc_token("mc-7"),
        "AUTH_JWKS": str(keys.jwks_path),
    }
    env.update(overrides)
    return {k: v for k, v in env.items() if v != "<unset>"}


def test_defaults_follow_the_spec(keys: DevKeys) -> None:
    config = McConfig.from_env(environ(keys))
    assert config.mc_id == "mc-7"  # taken from the token's sub
    assert config.gc_grpc_url == "http://127.0.0.1:50051"
    assert str(config.grpc_addr) == "127.0.0.1:50052"
    assert config.grpc_endpoint == "http://127.0.0.1:50052"  # derived from the bind
    assert config.webtransport_endpoint == "https://127.0.0.1:4433"
    assert str(config.http_addr) == "127.0.0.1:8081"
    assert (config.max_meetings, config.max_participants) == (1000, 10000)
    assert (config.empty_meeting_timeout_s, config.drain_timeout_s) == (300.0, 30.0)
    assert config.region == "local"


@pytest.mark.parametrize("name", ["REDIS_URL", "MC_SERVICE_TOKEN", "AUTH_JWKS"])
def test_a_missing_required_variable_is_named(keys: DevKeys, name: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name} is required"):
        McConfig.from_env(environ(keys, **{name: "<unset>"}))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDIS_URL", "http://127.0.0.1:6379"),
        ("GC_GRPC_URL", "127.0.0.1:50051"),
        ("MC_ID", "bad id"),
        ("MC_GRPC_ADDR", "nowhere"),
        ("MC_MAX_MEETINGS", "0"),
        ("MC_MAX_PARTICIPANTS", "2147483648"),
        ("MC_EMPTY_MEETING_TIMEOUT_S", "-1"),
        ("MC_SERVICE_TOKEN", "not-a-jwt"),
        ("MC_WEBTRANSPORT_ENDPOINT", "ftp://x"),
    ],
)
def test_an_invalid_variable_is_named(keys: DevKeys, name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"^{name}"):
        McConfig.from_env(environ(keys, **{name: value}))


def test_a_token_for_another_mc_is_refused_at_start(keys: DevKeys) -> None:
    with pytest.raises(ConfigError, match="MC_SERVICE_TOKEN is not for this MC"):
        McConfig.from_env(environ(keys, MC_ID="mc-8"))


def test_a_wildcard_bind_needs_an_advertised_endpoint(keys: DevKeys) -> None:
    with pytest.raises(ConfigError, match="MC_GRPC_ENDPOINT"):
        McConfig.from_env(environ(keys, MC_GRPC_ADDR="0.0.0.0:50052"))
    config = McConfig.from_env(
        environ(keys, MC_GRPC_ADDR="0.0.0.0:50052", MC_GRPC_ENDPOINT="http://mc-7.internal:50052")
    )
    assert config.grpc_endpoint == "http://mc-7.internal:50052"


def test_secrets_stay_out_of_repr_and_errors(keys: DevKeys) -> None:
    env = environ(keys)
    shown = repr(McConfig.from_env(env))
    assert "s3cret-pw" not in shown
    assert env["MC_SERVICE_TOKEN"] not in shown
    with pytest.raises(ConfigError) as refused:
        McConfig.from_env(environ(keys, REDIS_URL="http://:s3cret-pw@host"))
    assert "s3cret-pw" not in str(refused.value)
