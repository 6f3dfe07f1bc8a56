"""``dt``: the Dark Tower command-line tool.

Subcommands are imported only when they run. Their modules pull in trio,
grpclib, asyncpg, coredis, cryptography and the services' own modules -
most of a second of start-up if all of them were imported for every command,
and ``dt up``, ``dt join`` or ``dt --help`` need at most one. So ``dt``
knows each subcommand by name, module and one-line summary (for ``dt
--help``) and imports only the module of the subcommand named on the command
line; a summary must equal the ``help`` its module registers
(tests/test_cli_main.py compares the two ``dt --help`` texts).

A subcommand's function gets the parsed arguments plus ``started``: the
:func:`time.monotonic` time ``dt`` began, before the subcommand's imports,
for figures timed from the command's start (``dt up``'s ``ready in``). Not
the process's start time: a shell that runs ``... && dt up`` may *exec*
``dt`` in its own process, which started long before.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Collection
from typing import NamedTuple


class Command(NamedTuple):
    module: str
    summary: str


#: In ``dt --help`` order.
COMMANDS: dict[str, Command] = {
    "up": Command(
        "up_cmd",
        "run the local system (PostgreSQL, Redis, GC, 2 MCs, 2 simulated MHs) until Ctrl-C",
    ),
    "keys": Command("keys_cmd", "dev signing keys"),
    "token": Command("token_cmd", "mint a token (prints only the token)"),
    "db": Command("db_cmd", "database tasks"),
    "status": Command("status_cmd", "fleet table: MCs, MHs, health, load, active assignments"),
    "join": Command("join_cmd", "join a meeting through a GC and print the assignment"),
    "mh-sim": Command("mh_sim_cmd", "run simulated media handlers against a GC"),
    "bench": Command("bench_cmd", "benchmarks (SPEC §10)"),
}


def build_parser(complete: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``dt`` parser: the subcommands named in ``complete`` (keys of
    :data:`COMMANDS`; default: all) defined by their modules, every other
    one only by its name and summary."""
    parser = argparse.ArgumentParser(prog="dt", description="Dark Tower control plane tool")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, spec in COMMANDS.items():
        if complete is None or name in complete:
            module = importlib.import_module(f"darktower.cli.{spec.module}")
            module.add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=spec.summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    argv = sys.argv[1:] if argv is None else argv
    # ``dt`` has no options of its own but -h, so a subcommand, when there
    # is one, is the first argument.
    command = argv[:1] if argv and argv[0] in COMMANDS else []
    args = build_parser(command).parse_args(argv)
    args.started = started
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
