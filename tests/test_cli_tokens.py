"""``dt keys init`` and ``dt token …`` run in-process; what they mint must validate."""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

import jwt
import pytest

from darktower.cli import keys_cmd, token_cmd
from darktower.shared.jwks import KeyStore
from darktower.shared.keys import key_id, load_private_key
from darktower.shared.tokens import (
    AUD_GC,
    AUD_MC,
    SCOPE_MC_ASSIGN,
    SCOPE_MC_REGISTER,
    SCOPE_MEETING_CREATE,
    SCOPE_MEETING_JOIN,
    SCOPE_MEETING_PARTICIPANT,
    SCOPE_MH_REGISTER,
    TokenValidator,
)


def dt(*argv: str) -> int:
    """The ``dt`` entry point, reduced to the two subcommands under test."""
    parser = argparse.ArgumentParser(prog="dt")
    subparsers = parser.add_subparsers(dest="command", required=True)
    keys_cmd.add_parser(subparsers)
    token_cmd.add_parser(subparsers)
    args = parser.parse_args(list(argv))
    code: int = args.func(args)
    return code


@pytest.fixture
def keys_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "keys"
    assert dt("keys", "init", "--dir", str(directory)) == 0
    capsys.readouterr()
    return directory


def mint(capsys: pytest.CaptureFixture[str], keys_dir: Path, *argv: str) -> str:
    assert dt("token", *argv, "--key", str(keys_dir / "signing_key.pem")) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.endswith("\n")
    assert out.count("\n") == 1  # only the token, so $(dt token …) captures it
    return out.strip()


def test_keys_init_writes_key_and_jwks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "a" / "keys"
    assert dt("keys", "init", "--dir", str(directory)) == 0
    key_path, jwks_path = directory / "signing_key.pem", directory / "jwks.json"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    kid = key_id(load_private_key(key_path).public_key())
    jwks = json.loads(jwks_path.read_text())
    assert [k["kid"] for k in jwks["keys"]] == [kid]
    out = capsys.readouterr().out
    assert str(key_path) in out
    assert str(jwks_path) in out
    assert kid in out
    assert "PRIVATE" not in out


def test_keys_init_refuses_to_overwrite_without_force(
    keys_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_path = keys_dir / "signing_key.pem"
    before = key_path.read_bytes()
    assert dt("keys", "init", "--dir", str(keys_dir)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "--force" in err
    assert err.count("\n") == 1
    assert key_path.read_bytes() == before

    assert dt("keys", "init", "--dir", str(keys_dir), "--force") == 0
    assert key_path.read_bytes() != before
    new_kid = key_id(load_private_key(key_path).public_key())
    assert json.loads((keys_dir / "jwks.json").read_text())["keys"][0]["kid"] == new_kid


def test_keys_init_refuses_when_only_the_jwks_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    assert dt("keys", "init", "--dir", str(tmp_path)) == 1
    assert not (tmp_path / "signing_key.pem").exists()


def test_keys_init_into_an_unusable_directory_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    assert dt("keys", "init", "--dir", str(tmp_path / "file" / "keys")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write keys")
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "audience", "scope", "subject"),
    [
        (["mc", "--id", "mc-1"], AUD_GC, SCOPE_MC_REGISTER, "mc-1"),
        (["mh", "--id", "mh-1"], AUD_GC, SCOPE_MH_REGISTER, "mh-1"),
        (["gc", "--id", "gc-1"], AUD_MC, SCOPE_MC_ASSIGN, "gc-1"),
        (["user", "--sub", "u-1", "--org-id", "o-1"], AUD_GC, SCOPE_MEETING_JOIN, "u-1"),
        (
            ["meeting", "--sub", "u-1", "--meeting-id", "m-1"],
            AUD_MC,
            SCOPE_MEETING_PARTICIPANT,
            "u-1",
        ),
    ],
)
def test_minted_tokens_validate_against_the_jwks(
    keys_dir: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    audience: str,
    scope: str,
    subject: str,
) -> None:
    token = mint(capsys, keys_dir, *argv)
    validator = TokenValidator(KeyStore([str(keys_dir / "jwks.json")]))
    claims = validator.validate(token, audience=audience, scope=scope, subject=subject)
    assert claims.jti


def test_user_and_meeting_claims(keys_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    validator = TokenValidator(KeyStore([str(keys_dir / "jwks.json")]))
    user = validator.validate(
        mint(capsys, keys_dir, "user", "--sub", "u-1", "--org-id", "o-1"),
        audience=AUD_GC,
        scope=SCOPE_MEETING_CREATE,
    )
    assert user.org_id == "o-1"
    assert user.scopes == {SCOPE_MEETING_JOIN, SCOPE_MEETING_CREATE}

    only_join = validator.validate(
        mint(capsys, keys_dir, "user", "--sub", "u", "--org-id", "o", "--scope", "meeting.join"),
        audience=AUD_GC,
        scope=SCOPE_MEETING_JOIN,
    )
    assert only_join.scopes == {SCOPE_MEETING_JOIN}
    both = mint(
        capsys, keys_dir, "user", "--sub", "u", "--org-id", "o", "--scope", "a b", "--scope", "c"
    )
    assert jwt.decode(both, options={"verify_signature": False})["scope"] == "a b c"

    meeting = validator.validate(
        mint(capsys, keys_dir, "meeting", "--sub", "u-1", "--meeting-id", "m-1"),
        audience=AUD_MC,
        scope=SCOPE_MEETING_PARTICIPANT,
    )
    assert meeting.meeting_id == "m-1"
    assert meeting.iat is not None
    assert meeting.exp - meeting.iat == 600


def test_ttl_option(keys_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    token = mint(capsys, keys_dir, "mc", "--id", "mc-1", "--ttl", "90")
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["exp"] - payload["iat"] == 90


@pytest.mark.parametrize("ttl", ["0", "-5", "soon"])
def test_bad_ttl_is_a_usage_error(
    keys_dir: Path, capsys: pytest.CaptureFixture[str], ttl: str
) -> None:
    with pytest.raises(SystemExit) as excinfo:
        dt("token", "mc", "--id", "x", "--ttl", ttl, "--key", str(keys_dir / "signing_key.pem"))
    assert excinfo.value.code == 2
    assert capsys.readouterr().out == ""


def test_missing_key_is_one_clear_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.pem"
    assert dt("token", "mc", "--id", "mc-1", "--key", str(missing)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert str(missing) in err
    assert "dt keys init" in err


def test_invalid_key_file_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key at all")
    assert dt("token", "gc", "--id", "gc-1", "--key", str(bad)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert "not a key at all" not in err


def test_default_paths_work_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert dt("keys", "init") == 0
    capsys.readouterr()
    assert dt("token", "mc", "--id", "mc-1") == 0
    token = capsys.readouterr().out.strip()
    validator = TokenValidator(KeyStore([".dt/keys/jwks.json"]))
    assert validator.validate(token, audience=AUD_GC, scope=SCOPE_MC_REGISTER).sub == "mc-1"


def test_subcommand_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["keys"], ["token"]):
        with pytest.raises(SystemExit) as excinfo:
            dt(*argv)
        assert excinfo.value.code == 2
    capsys.readouterr()
