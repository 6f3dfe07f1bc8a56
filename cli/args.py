"""Argument parsing shared by the ``dt`` subcommands: one definition of each
rule, so every command refuses the same bad input with the same words."""

from __future__ import annotations

import argparse
import os
import sys


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
