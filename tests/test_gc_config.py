"""The GC's configuration (SPEC §8) beyond what the process tests cover: the
join and cleanup variables, their defaults and the checks between them."""

from __future__ import annotations

from pathlib import Path

import pytest
from gc_harness import DevKeys, gc_environ

from darktower.gc.config import GcConfig
from darktower.shared.config import ConfigError

DSN = "postgresql://u@127.0.0.1/db"


@pytest.fixture
def dev_keys(tmp_path: Path) -> DevKeys:
    return DevKeys.create(tmp_path / "keys")


def test_join_and_cleanup_defaults(dev_keys: DevKeys) -> None:
    config = GcConfig.from_env(gc_environ(dev_keys, DSN))
    assert (config.mc_rpc_timeout_s, config.mc_connect_timeout_s) == (10, 5)
    assert config.join_timeout_s == 40
    assert config.guest_tokens_per_minute == 10
    assert config.creates_per_minute == 30
    assert (config.retention_days, config.inactive_after_s) == (7, 3600)
    assert config.cleanup_interval_s == 60


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GC_MC_RPC_TIMEOUT_S", "0"),
        ("GC_MC_RPC_TIMEOUT_S", "61"),
        ("GC_MC_CONNECT_TIMEOUT_S", "-1"),
        ("GC_JOIN_TIMEOUT_S", "0.5"),
        ("GC_GUEST_TOKENS_PER_MINUTE", "0"),
        ("GC_GUEST_TOKENS_PER_MINUTE", "1.5"),
        ("GC_CREATES_PER_MINUTE", "0"),
        ("GC_CREATES_PER_MINUTE", "-5"),
        ("GC_CREATES_PER_MINUTE", "1.5"),
        ("GC_CREATES_PER_MINUTE", "1000001"),
        ("GC_CREATES_PER_MINUTE", "many"),
        ("GC_ASSIGNMENT_RETENTION_DAYS", "0"),
        ("GC_INACTIVE_MEETING_S", "nan"),
        ("GC_CLEANUP_INTERVAL_S", "abc"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(
    dev_keys: DevKeys, name: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=f"^{name}"):
        GcConfig.from_env(gc_environ(dev_keys, DSN, **{name: value}))


def test_a_join_deadline_shorter_than_one_mc_call_is_refused(dev_keys: DevKeys) -> None:
    """A request deadline that can cut the third MC call short would answer
    503 while that MC may still be accepting: an orphan on every slow MC."""
    with pytest.raises(ConfigError, match="GC_JOIN_TIMEOUT_S must be longer"):
        GcConfig.from_env(
            gc_environ(dev_keys, DSN, GC_JOIN_TIMEOUT_S="30", GC_MC_RPC_TIMEOUT_S="10")
        )
    config = GcConfig.from_env(
        gc_environ(dev_keys, DSN, GC_JOIN_TIMEOUT_S="31", GC_MC_RPC_TIMEOUT_S="10")
    )
    assert config.join_timeout_s == 31


def test_the_id_defaults_to_the_service_tokens_subject(dev_keys: DevKeys) -> None:
    environ = gc_environ(dev_keys, DSN, GC_SERVICE_TOKEN=dev_keys.gc_token("gc-7"))
    del environ["GC_ID"]
    assert GcConfig.from_env(environ).gc_id == "gc-7"


def test_a_token_for_another_gc_is_refused_at_start(dev_keys: DevKeys) -> None:
    """Every MC would refuse this GC's assignments (the request's GC id must be
    its token's subject): caught at start, not as 503s on every join."""
    environ = gc_environ(dev_keys, DSN, GC_ID="gc-1", GC_SERVICE_TOKEN=dev_keys.gc_token("gc-2"))
    with pytest.raises(ConfigError, match="GC_SERVICE_TOKEN is not for this GC"):
        GcConfig.from_env(environ)


@pytest.mark.parametrize("value", ["1", "30", "1000000", " 45 "])
def test_creates_per_minute_is_taken(dev_keys: DevKeys, value: str) -> None:
    config = GcConfig.from_env(gc_environ(dev_keys, DSN, GC_CREATES_PER_MINUTE=value))
    assert config.creates_per_minute == int(value)


def test_a_bad_creates_per_minute_says_what_it_must_be(dev_keys: DevKeys) -> None:
    with pytest.raises(ConfigError) as info:
        GcConfig.from_env(gc_environ(dev_keys, DSN, GC_CREATES_PER_MINUTE="0"))
    assert str(info.value) == "GC_CREATES_PER_MINUTE is invalid '0': must be between 1 and 1000000"
