"""``dt keys init``: a dev Ed25519 key pair and the JWKS that publishes it.

This stands in for the Auth Controller in development (SPEC §4): point
``AUTH_JWKS`` at the written ``jwks.json`` and mint tokens with ``dt token``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from darktower.shared.keys import (
    generate_private_key,
    key_id,
    public_jwk,
    save_private_key,
    write_jwks,
)

DEFAULT_KEYS_DIR = Path(".dt/keys")
SIGNING_KEY_FILE = "signing_key.pem"
JWKS_FILE = "jwks.json"


def _run_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    key_path = directory / SIGNING_KEY_FILE
    jwks_path = directory / JWKS_FILE
    if not args.force and (key_path.exists() or jwks_path.exists()):
        # Replacing a key silently breaks every token and config minted with it.
        print(
            f"error: keys already exist in {directory} (--force replaces them and "
            "invalidates every token signed with the old key)",
            file=sys.stderr,
        )
        return 1
    key = generate_private_key()
    try:
        # The directory holds a private key: owner-only, like ~/.ssh.
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        save_private_key(key, key_path, overwrite=args.force)
        write_jwks(jwks_path, [public_jwk(key.public_key())])
    except FileExistsError:
        print(f"error: {key_path} appeared while writing; not replaced", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot write keys to {directory}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"signing key: {key_path}")
    print(f"jwks:        {jwks_path}")
    print(f"kid:         {key_id(key.public_key())}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dt keys`` and its ``init`` subcommand."""
    keys = subparsers.add_parser("keys", help="dev signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser(
        "init",
        help="create an Ed25519 signing key and its JWKS",
        description=f"Write {SIGNING_KEY_FILE} (mode 0600) and {JWKS_FILE} into DIR.",
    )
    init.add_argument(
        "--dir",
        default=str(DEFAULT_KEYS_DIR),
        help=f"directory for the key files (default: {DEFAULT_KEYS_DIR})",
    )
    init.add_argument("--force", action="store_true", help="replace existing keys")
    init.set_defaults(func=_run_init)
