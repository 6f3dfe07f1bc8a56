"""The guard of a ``dt up`` run: stops what the run started, and removes its
directories, when ``dt up`` ends without doing so itself.

``dt up`` stops everything in order on Ctrl-C, SIGTERM or a failed
component. Nothing runs in a process killed with SIGKILL (or by the OOM
killer, or a crashed interpreter), though, and its children would run on,
holding their ports - each in its own session, so that a terminal's Ctrl-C
reaches only ``dt up`` - with the embedded servers' files left in the
temporary directory. So ``dt up`` first starts this small process (in its
own session too), with a pipe as its standard input, and writes one line
into the pipe for every process it starts and every directory it creates.
Only ``dt up`` holds the pipe's write end (close-on-exec: no child inherits
it), so end of file on the guard's input means ``dt up`` has exited,
however it ended. The guard then stops whatever of the run still runs - the
services first, then the servers, as ``dt up`` itself would: SIGTERM, a
bounded wait, SIGKILL; the processes' own children (PostgreSQL's backends)
too - removes the directories that are still there and says so on stderr.
After a normal stop nothing is left and it exits at once; ``dt up`` waits
for it, so nothing of the run outlives ``dt up``.

Why not ``PR_SET_PDEATHSIG``: it is Linux-only, must be set in each child
between fork and exec (``preexec_fn``, unsafe with threads), ends processes
without their stop order, and removes no files.

A process is known by its pid *and* start time, so a pid the system reused
for another process is never signalled. What is not yet registered cannot
be stopped: SIGKILL in the fraction of a second between an embedded
server's launch and its ready state (at the start of ``dt up``) can still
leave that server running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

#: How long a process may take to stop after SIGTERM before SIGKILL; the
#: same grace ``dt up`` gives its children.
STOP_GRACE_S = 10.0
_POLL_S = 0.05
#: psutil's start times have clock-tick resolution (10 ms).
_START_TIME_TOLERANCE_S = 0.005


# --------------------------------------------------------------------------
# dt up's side


class Guard:
    """A running guard, as ``dt up`` sees it: tell it what to stop and
    remove; :meth:`close` when everything is stopped."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._proc = proc

    @classmethod
    def start(cls) -> Guard:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "darktower.cli.up_guard", "--parent", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc.poll() is None

    def process(self, pid: int, name: str, *, last: bool = False) -> None:
        """Stop this process (a child of ours, not yet waited for, so ``pid``
        is still its own) if we end without stopping it; ``last``: after the
        others (a server they use)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            created = psutil.Process(pid).create_time()
            self._send({"pid": pid, "created": created, "name": name, "last": last})

    def directory(self, path: Path) -> None:
        """Remove this directory if we end without removing it."""
        self._send({"directory": str(path)})

    def _send(self, message: dict[str, object]) -> None:
        assert self._proc.stdin is not None
        # A guard that died is seen by dt up's watch (alive()); writing to it
        # must not fail the stop it would guard.
        with contextlib.suppress(OSError, ValueError):
            self._proc.stdin.write(json.dumps(message).encode() + b"\n")
            self._proc.stdin.flush()

    def close(self) -> None:
        """Everything is stopped and removed: end the guard (bounded)."""
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout=2 * STOP_GRACE_S + 5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# --------------------------------------------------------------------------
# The guard process


@dataclass(frozen=True, slots=True)
class _Tracked:
    proc: psutil.Process
    name: str
    last: bool


def is_running(proc: psutil.Process) -> bool:
    """Running and not a zombie (an orphan's zombie waits for whoever
    adopted it to reap it, and can be neither signalled nor waited for).
    Also what the tests of ``dt up`` mean by "left running"."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _read_registrations(stream: IO[bytes]) -> tuple[list[_Tracked], list[Path]]:
    """Everything ``dt up`` registered, until end of file (its exit)."""
    processes: list[_Tracked] = []
    directories: list[Path] = []
    for line in stream:
        try:
            message = json.loads(line)
            if "directory" in message:
                directories.append(Path(message["directory"]))
                continue
            # Looked up as the line arrives, while dt up has not reaped it:
            # the pid and start time are the registered process's.
            proc = psutil.Process(int(message["pid"]))
            if math.isclose(
                proc.create_time(), float(message["created"]), abs_tol=_START_TIME_TOLERANCE_S
            ):
                processes.append(_Tracked(proc, str(message["name"]), bool(message["last"])))
        except (ValueError, KeyError, TypeError, psutil.Error):
            continue  # not ours to judge: a process already gone, a torn line
    return processes, directories


def _signal_all(procs: Iterable[psutil.Process], kill: bool) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if kill:
                proc.kill()
            else:
                proc.terminate()


def wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Poll (bounded) until none runs; those still running."""
    deadline = time.monotonic() + timeout
    while True:
        left = [proc for proc in procs if is_running(proc)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(_POLL_S)


def _stop(group: Sequence[_Tracked]) -> list[str]:
    """SIGTERM to every running one at once, SIGKILL after the grace, then
    the same for what they had started; the names of those that ran."""
    running = [tracked for tracked in group if is_running(tracked.proc)]
    if not running:
        return []
    descendants: list[psutil.Process] = []
    for tracked in running:
        with contextlib.suppress(psutil.Error):
            descendants += tracked.proc.children(recursive=True)
    for procs in ([tracked.proc for tracked in running], descendants):
        _signal_all(procs, kill=False)
        left = wait_gone(procs, STOP_GRACE_S)
        _signal_all(left, kill=True)
        wait_gone(left, STOP_GRACE_S)
    return [tracked.name for tracked in running]


def guard(stream: IO[bytes]) -> tuple[list[str], list[Path]]:
    """Read registrations until end of file, then stop and remove what is
    left; the names stopped and the directories removed."""
    processes, directories = _read_registrations(stream)
    stopped = _stop([t for t in processes if not t.last])
    stopped += _stop([t for t in processes if t.last])
    removed = [directory for directory in directories if directory.exists()]
    for directory in removed:
        shutil.rmtree(directory, ignore_errors=True)
    return stopped, removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m darktower.cli.up_guard",
        description="dt up's guard (started by dt up; reads its registrations on stdin)",
    )
    parser.add_argument("--parent", type=int, required=True, help="dt up's pid, for messages")
    args = parser.parse_args(argv)
    stopped, removed = guard(sys.stdin.buffer)
    if stopped or removed:
        done = [f"stopped {', '.join(stopped)}"] if stopped else []
        done += [f"removed {', '.join(map(str, removed))}"] if removed else []
        # The terminal may be gone by now; the cleanup is done either way.
        with contextlib.suppress(OSError):
            print(
                f"dt up (pid {args.parent}) ended without stopping what it started: "
                + "; ".join(done),
                file=sys.stderr,
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
