"""Test support for commands driven as a user drives them (``dt up``, the
README's shell line, ``dt mh-sim``): their output read line by line as it
comes, the commands they print run exactly as printed, and what they
started found by a marker in its environment.

Two threads drain stdout and stderr so that neither pipe fills up; waiting
for a line is a bounded wait on their queue (stdout) or on a condition
signalled with every line (stderr), never a sleep.
"""

from __future__ import annotations

import contextlib
import queue
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

import psutil
import pytest

from darktower.cli.up_guard import is_running, wait_gone

#: Longest wait for one expected line, far above a healthy run.
READ_BOUND_S = 60.0
#: Longest wait for the output to end once the process has exited.
END_BOUND_S = 30.0


def _pump(stream: IO[str], sink: Callable[[str | None], None]) -> None:
    with stream:
        for line in stream:
            sink(line)
    sink(None)


@dataclass
class PrintingRun:
    """A running command whose output the test reads (see the module
    docstring); ``marker`` is the value of ``marker_variable`` in its
    environment, and so in that of everything it starts."""

    proc: subprocess.Popen[str]
    marker_variable: str
    marker: str
    #: How failure messages name the command.
    name: str = "the command"
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    output: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)
    #: Notified on every stderr line and at its end (:meth:`wait_for_stderr`).
    stderr_changed: threading.Condition = field(default_factory=threading.Condition)
    stderr_ended: bool = False

    @classmethod
    def spawn(
        cls,
        argv: list[str],
        env: dict[str, str],
        marker_variable: str,
        *,
        name: str = "the command",
        **popen: Any,
    ) -> Self:
        """Start ``argv`` with its output piped to the readers, ``env`` plus a
        fresh marker in ``marker_variable`` (``popen``: more Popen options,
        e.g. ``cwd``)."""
        marker = secrets.token_hex(8)
        proc = subprocess.Popen(
            argv,
            env={**env, marker_variable: marker},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )
        run = cls(proc, marker_variable, marker, name=name)
        run.start_readers()
        return run

    def start_readers(self) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        for stream, sink in ((self.proc.stdout, self.lines.put), (self.proc.stderr, self._err)):
            reader = threading.Thread(target=_pump, args=(stream, sink), daemon=True)
            reader.start()
            self.readers.append(reader)

    def _err(self, line: str | None) -> None:
        with self.stderr_changed:
            if line is None:
                self.stderr_ended = True
            else:
                self.stderr.append(line)
            self.stderr_changed.notify_all()

    def wait_for_stderr(
        self, predicate: Callable[[str], bool], what: str, timeout: float = READ_BOUND_S
    ) -> str:
        """The first stderr line, from its first on (read or not yet), for
        which ``predicate`` holds: waits on :attr:`stderr_changed` until it
        comes; fails at once if stderr ends first (every writer closed it),
        and after ``timeout`` seconds in all - a bound, not a poll."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self.stderr_changed:
            while True:
                for line in self.stderr[checked:]:
                    if predicate(line):
                        return line
                checked = len(self.stderr)
                if self.stderr_ended:
                    pytest.fail(f"{self.name} ended before {what}:\n{self.text()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"{self.name} logged no {what} within {timeout} s:\n{self.text()}")
                self.stderr_changed.wait(left)

    def read_until(self, pattern: str, timeout: float = READ_BOUND_S) -> re.Match[str]:
        """Lines until one matches ``pattern`` (bounded); that match."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(
                    f"{self.name} printed no {pattern!r} within {timeout} s:\n{self.text()}"
                )
            if line is None:
                pytest.fail(f"{self.name} ended before {pattern!r}:\n{self.text()}")
            self.output.append(line)
            found = re.search(pattern, line)
            if found:
                return found

    def rest(self) -> str:
        """All the output, once the process has exited: the readers end when
        every writer of the pipes has closed them (a guard sharing its
        stderr included), bounded."""
        for reader in self.readers:
            reader.join(timeout=END_BOUND_S)
        while not self.lines.empty():
            line = self.lines.get_nowait()
            if line is not None:
                self.output.append(line)
        return self.text()

    def text(self) -> str:
        return "".join(self.output) + "--- stderr ---\n" + "".join(self.stderr)

    def marked(self) -> list[psutil.Process]:
        """Running processes that inherited the marker: anything the command
        started, even once reparented. (PostgreSQL rewrites its environment
        block for its process titles: find it through the process tree.)"""
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(self.marker_variable) == self.marker and is_running(proc):
                    found.append(proc)
        return found


def run_printed(lines: list[str], env: dict[str, str], cwd: Path | None = None) -> str:
    """Run lines exactly as a command printed them, in one shell that stops
    at the first failure; their output (they must succeed)."""
    completed = subprocess.run(
        ["bash", "-c", "set -e\n" + "\n".join(lines)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, (lines, completed.stdout, completed.stderr)
    return completed.stdout


def first_group(pattern: str, text: str) -> str:
    """Group 1 of ``pattern``'s first match in ``text`` (multi-line); it must match."""
    found = re.search(pattern, text, re.M)
    assert found, (pattern, text)
    return found.group(1)


def still_running(procs: list[psutil.Process], timeout: float) -> list[str]:
    """Those of ``procs`` still running after a bounded wait, described."""
    described = []
    for proc in wait_gone(procs, timeout):
        with contextlib.suppress(psutil.Error):
            described.append(f"{proc.pid}: {' '.join(proc.cmdline())}")
    return described
