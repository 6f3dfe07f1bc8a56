"""Test support for ``dt bench``: running a bench as a user runs it, checking
that it left nothing behind, and reading ``BENCHMARKS.md`` back.

A run is marked: the bench gets a random value in :data:`MARKER_VARIABLE`,
which every process it starts inherits, so "nothing left running" is
checked against this run's processes only, whatever else the machine runs.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

MARKER_VARIABLE = "DT_TEST_BENCH_RUN"

#: The headings of ``BENCHMARKS.md``, in order.
HEADINGS = [
    "# Benchmarks",
    "## Machine",
    "## Targets",
    "## Heartbeats (issue 2): `dt bench heartbeats`",
    "## Join (issue 3): `dt bench join`",
    "## Assign (issue 4): `dt bench assign`",
    "## Mixed scenario (issue 5): `dt bench mixed`",
]


# --------------------------------------------------------------------------
# Running a bench


def server_options(database_dsn: str, redis_url: str) -> list[str]:
    """``--database-url`` and ``--redis-url`` for a bench. It gets logical
    database 15 of a TCP Redis (the MCs write their keys without a prefix);
    other Redis URLs are used as given."""
    parts = urlsplit(redis_url)
    if parts.scheme in ("redis", "rediss"):
        redis_url = urlunsplit(parts._replace(path="/15"))
    return ["--database-url", database_dsn, "--redis-url", redis_url]


@dataclass(frozen=True)
class BenchRun:
    """A finished ``dt bench`` run: its marker and its output."""

    marker: str
    completed: subprocess.CompletedProcess[str]

    @property
    def stdout(self) -> str:
        return self.completed.stdout

    def marked_processes(self) -> list[str]:
        """This run's processes still running (the bench and everything it
        started carry the marker), described by their command lines."""
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if proc.environ().get(MARKER_VARIABLE) == self.marker:
                    found.append(" ".join(proc.info["cmdline"] or []))
            except psutil.Error:
                continue
        return found


def run_bench(args: list[str], *, timeout_s: float) -> BenchRun:
    """``python -m darktower.cli bench ARGS`` with neither ``DATABASE_URL``
    nor ``REDIS_URL`` from the test's environment (the servers are the
    arguments'), bounded; it must exit 0."""
    marker = secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env[MARKER_VARIABLE] = marker
    completed = subprocess.run(
        [sys.executable, "-m", "darktower.cli", "bench", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return BenchRun(marker, completed)


def existing_databases(server_dsn: str, names: list[str]) -> list[str]:
    """Those of the databases ``names`` that exist on the server."""

    async def existing() -> list[str]:
        conn = await asyncpg.connect(server_dsn, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname = ANY($1::text[])", names
            )
        finally:
            await conn.close()
        return [row[0] for row in rows]

    return asyncio.run(existing())


# --------------------------------------------------------------------------
# Reading BENCHMARKS.md


def cells(line: str) -> list[str]:
    """A markdown table row's cells, stripped."""
    return [cell.strip() for cell in line.strip().strip("|").split(" | ")]


def section(markdown: str, heading: str) -> str:
    """The text under the heading that starts with ``heading``, up to the
    next section; the heading must be there."""
    assert f"\n{heading}" in markdown, heading
    return markdown.split(f"\n{heading}", 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> list[list[str]]:
    """Every data row (header and rule skipped) of the first table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [cells(line) for line in lines[2:]]
