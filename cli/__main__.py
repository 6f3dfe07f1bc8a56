"""``dt``: the Dark Tower command-line tool."""

from __future__ import annotations

import argparse
import sys

from darktower.cli import (
    bench_cmd,
    db_cmd,
    join_cmd,
    keys_cmd,
    mh_sim_cmd,
    status_cmd,
    token_cmd,
    up_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dt", description="Dark Tower control plane tool")
    subparsers = parser.add_subparsers(dest="command", required=True)
    up_cmd.add_parser(subparsers)
    keys_cmd.add_parser(subparsers)
    token_cmd.add_parser(subparsers)
    db_cmd.add_parser(subparsers)
    status_cmd.add_parser(subparsers)
    join_cmd.add_parser(subparsers)
    mh_sim_cmd.add_parser(subparsers)
    bench_cmd.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
