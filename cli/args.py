"""Argument parsing shared by the ``dt`` subcommands: one definition of each
rule, so every command refuses the same bad input with the same words."""

from __future__ import annotations

import argparse
import os
import sys
from urllib.parse import parse_qsl, urlencode, urlsplit

#: Query parameters of a server URL that carry a secret (libpq's names).
_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def database_url(args: argparse.Namespace) -> str | None:
    """``--database-url`` or ``$DATABASE_URL``; ``None`` (after saying why on
    stderr) when neither is a postgresql:// URL."""
    dsn: str = args.database_url or os.environ.get("DATABASE_URL", "")
    if not dsn.startswith(("postgres://", "postgresql://")):
        print(
            "error: DATABASE_URL (or --database-url) must be a postgresql:// URL", file=sys.stderr
        )
        return None
    return dsn


def redacted_url(url: str) -> str:
    """A server URL fit to print: the password of its user part and of its
    query (``?password=``, ``?sslpassword=``) replaced by ``***``; the host is
    kept as written (IPv6 brackets included)."""
    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    netloc = f"{userinfo}{at}{host}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key in _SECRET_QUERY_KEYS for key, _ in pairs):
        shown = [(key, "***" if key in _SECRET_QUERY_KEYS else value) for key, value in pairs]
        query = urlencode(shown, safe="*")
    return parts._replace(netloc=netloc, query=query).geturl()
