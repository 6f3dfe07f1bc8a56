"""``dt token {mc,mh,gc,user,meeting}``: mint any token of SPEC §4 with a dev key.

Only the token is written to stdout, so it can be captured:
``export MC_SERVICE_TOKEN=$(dt token mc --id mc-1)``. Errors go to stderr as
one line with exit status 2 (a usage problem, like argparse's own errors).
The ``kid`` is derived from the key, so it always matches ``dt keys init``'s
``jwks.json``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from darktower.cli.args import positive_int
from darktower.cli.keys_cmd import DEFAULT_KEYS_DIR, SIGNING_KEY_FILE
from darktower.shared.keys import Ed25519PrivateKey, KeyFileError, key_id, load_private_key
from darktower.shared.tokens import (
    MEETING_TOKEN_TTL_S,
    SCOPE_MEETING_CREATE,
    SCOPE_MEETING_JOIN,
    SERVICE_TOKEN_TTL_S,
    USER_TOKEN_TTL_S,
    mint_gc_token,
    mint_mc_token,
    mint_meeting_token,
    mint_mh_token,
    mint_user_token,
)

DEFAULT_KEY_PATH = DEFAULT_KEYS_DIR / SIGNING_KEY_FILE

#: Mints from (private key, kid, parsed args).
Minter = Callable[[Ed25519PrivateKey, str, argparse.Namespace], str]


def _scopes(values: list[str] | None) -> list[str]:
    # Accept both `--scope a --scope b` and `--scope "a b"`.
    if not values:
        return [SCOPE_MEETING_JOIN, SCOPE_MEETING_CREATE]
    return [scope for value in values for scope in value.split()]


def _handler(mint: Minter) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            key = load_private_key(args.key)
        except KeyFileError as exc:
            hint = " (create one with `dt keys init`)" if not Path(args.key).exists() else ""
            print(f"error: {exc}{hint}", file=sys.stderr)
            return 2
        try:
            token = mint(key, key_id(key.public_key()), args)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(token)
        return 0

    return run


def _mint_mc(key: Ed25519PrivateKey, kid: str, args: argparse.Namespace) -> str:
    return mint_mc_token(key, kid=kid, mc_id=args.id, ttl_s=args.ttl)


def _mint_mh(key: Ed25519PrivateKey, kid: str, args: argparse.Namespace) -> str:
    return mint_mh_token(key, kid=kid, mh_id=args.id, ttl_s=args.ttl)


def _mint_gc(key: Ed25519PrivateKey, kid: str, args: argparse.Namespace) -> str:
    return mint_gc_token(key, kid=kid, gc_id=args.id, ttl_s=args.ttl)


def _mint_user(key: Ed25519PrivateKey, kid: str, args: argparse.Namespace) -> str:
    return mint_user_token(
        key,
        kid=kid,
        user_id=args.sub,
        org_id=args.org_id,
        scopes=_scopes(args.scope),
        ttl_s=args.ttl,
    )


def _mint_meeting(key: Ed25519PrivateKey, kid: str, args: argparse.Namespace) -> str:
    return mint_meeting_token(
        key, kid=kid, participant_id=args.sub, meeting_id=args.meeting_id, ttl_s=args.ttl
    )


def _kind(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help_text: str,
    mint: Minter,
    default_ttl: int,
) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.add_argument(
        "--key",
        default=str(DEFAULT_KEY_PATH),
        help=f"Ed25519 private key, PEM (default: {DEFAULT_KEY_PATH})",
    )
    parser.add_argument(
        "--ttl",
        type=positive_int,
        default=default_ttl,
        metavar="SECONDS",
        help=f"lifetime in seconds (default: {default_ttl})",
    )
    parser.set_defaults(func=_handler(mint))
    return parser


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dt token`` and one subcommand per token kind of SPEC §4."""
    token = subparsers.add_parser("token", help="mint a token (prints only the token)")
    sub = token.add_subparsers(dest="token_kind", required=True)

    mc = _kind(
        sub, "mc", "MC service token (aud gc, scope mc.register)", _mint_mc, SERVICE_TOKEN_TTL_S
    )
    mc.add_argument("--id", required=True, help="the MC id (becomes sub)")
    mh = _kind(
        sub, "mh", "MH service token (aud gc, scope mh.register)", _mint_mh, SERVICE_TOKEN_TTL_S
    )
    mh.add_argument("--id", required=True, help="the MH id (becomes sub)")
    gc = _kind(
        sub, "gc", "GC service token (aud mc, scope mc.assign)", _mint_gc, SERVICE_TOKEN_TTL_S
    )
    gc.add_argument("--id", required=True, help="the GC id (becomes sub)")

    user = _kind(sub, "user", "user token (aud gc)", _mint_user, USER_TOKEN_TTL_S)
    user.add_argument("--sub", required=True, help="the user id")
    user.add_argument("--org-id", required=True, help="the user's organisation id")
    user.add_argument(
        "--scope",
        action="append",
        help=f"scope to grant, repeatable (default: {SCOPE_MEETING_JOIN} {SCOPE_MEETING_CREATE})",
    )

    meeting = _kind(
        sub,
        "meeting",
        "meeting token (aud mc, scope meeting.participant)",
        _mint_meeting,
        MEETING_TOKEN_TTL_S,
    )
    meeting.add_argument("--sub", required=True, help="the participant id")
    meeting.add_argument("--meeting-id", required=True, help="the meeting id")
