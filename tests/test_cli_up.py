"""``dt up`` driven as a user runs it (issue 5): started in a subprocess, a
meeting created and joined through it with the exact command it prints,
stopped with SIGINT - and then nothing it started is running and its
temporary directory is gone. Also: SIGTERM in the middle of the start, a
component dying, and ``dt up`` itself killed with SIGKILL (its guard,
:mod:`darktower.cli.up_guard`, stops and removes what it had started; the
guard's own rules are tested on small processes at the end).

Servers: with ``DT_TEST_DATABASE_URL`` / ``DT_TEST_REDIS_URL`` set, ``dt up``
gets ``DATABASE_URL`` = a database of its own (created and dropped here) and
``REDIS_URL`` = the shared server (its MCs write only ``meeting:{id}:*``
keys, for meetings of random ids; the test deletes those of its meetings);
otherwise ``dt up`` starts its embedded servers, as on a fresh clone.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import coredis
import psutil
import pytest
import trio
from printed_output import PrintingRun, first_group, run_printed

from darktower.cli import up_guard
from darktower.shared.devstack import create_database, drop_database

pytestmark = pytest.mark.slow

#: The issue's bar on this machine.
READY_WITHIN_S = 15.0
#: Bound of the waits for a process to exit: far above what a healthy run
#: takes (the wait for a line is printed_output's).
STOP_BOUND_S = 30.0
MC_IDS = {"mc-local-1", "mc-local-2"}
MH_IDS = {"mh-local-1", "mh-local-2"}
_MARKER_VARIABLE = "DT_TEST_UP_RUN"


class Up(PrintingRun):
    """A running ``dt up``: its output so far, line by line."""

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def marked_processes(self) -> list[str]:
        names = []
        for proc in self.marked():
            with contextlib.suppress(psutil.Error):
                names.append(" ".join(proc.cmdline()))
        return names


@pytest.fixture
def servers() -> Iterator[dict[str, str]]:
    """The environment ``dt up`` gets for its servers (see the module docstring)."""
    env: dict[str, str] = {}
    server_dsn = os.environ.get("DT_TEST_DATABASE_URL")
    name = f"dt_test_up_{secrets.token_hex(6)}"
    if server_dsn:
        env["DATABASE_URL"] = create_database(server_dsn, name)
    if os.environ.get("DT_TEST_REDIS_URL"):
        env["REDIS_URL"] = os.environ["DT_TEST_REDIS_URL"]
    try:
        yield env
    finally:
        if server_dsn:
            drop_database(server_dsn, name)


@pytest.fixture
def start_up(servers: dict[str, str]) -> Iterator[Any]:
    """Start ``dt up`` (SIGINT at its default disposition, as in a terminal);
    killed, with everything it started, if the test leaves it running."""
    started: list[Up] = []

    def start() -> Up:
        drop = ("DATABASE_URL", "REDIS_URL", "DT_MH_TOKENS", "DT_GC_URL", "DT_TOKEN")
        env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("GC_")}
        env = {k: v for k, v in env.items() if not k.startswith("MC_")} | servers
        up = Up.spawn(
            [sys.executable, "-m", "darktower.cli", "up"], env, _MARKER_VARIABLE, name="dt up"
        )
        started.append(up)
        return up

    yield start
    for up in started:
        if up.proc.poll() is None:
            up.proc.kill()
        up.proc.wait(timeout=STOP_BOUND_S)
        # A failed test must not leave what dt up started running either.
        for proc in up.marked():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        for reader in up.readers:
            reader.join(timeout=STOP_BOUND_S)


def _ended_leaving_nothing(
    up: Up, pids: list[psutil.Process], *, within_s: float = 5
) -> tuple[int, str]:
    """Wait for ``dt up`` to exit, and its output to end (the guard, which
    shares its stderr, included); assert nothing it started runs within
    ``within_s``. Its status and output."""
    status = up.proc.wait(timeout=STOP_BOUND_S)
    text = up.rest()
    _gone, alive = psutil.wait_procs(pids, timeout=within_s)
    assert alive == [], f"left running: {alive}\n{text}"
    assert up.marked_processes() == [], text
    return status, text


def _stop_and_check(up: Up, sig: signal.Signals, pids: list[psutil.Process]) -> tuple[int, str]:
    """Signal ``dt up``, wait for it; assert nothing it started runs."""
    up.proc.send_signal(sig)
    return _ended_leaving_nothing(up, pids)


def _assert_removed(text: str) -> None:
    """The work directory and any embedded server's directory are gone."""
    workdir = re.search(r"stopped; removed (\S+)", text)
    assert workdir, text
    assert not Path(workdir.group(1)).exists()
    for directory in re.findall(r"host=(/\S+dt-pg-\w+)", text):
        assert not Path(directory).exists()


async def _forget_meetings(redis_url: str, meeting_ids: list[str]) -> None:
    """Delete the MCs' keys of the test's meetings (shared Redis only)."""
    client: coredis.Redis[Any] = coredis.Redis.from_url(redis_url)
    async with client:
        for meeting_id in meeting_ids:
            keys = [key async for key in client.scan_iter(match=f"meeting:{{{meeting_id}}}:*")]
            if keys:
                await client.delete(keys)


@pytest.mark.dt_timeout(180)
def test_dt_up_runs_the_system_joins_and_ctrl_c_removes_everything(
    start_up: Any, servers: dict[str, str]
) -> None:
    up: Up = start_up()
    ready_s = float(up.read_until(r"^ready in (\d+\.\d) s$").group(1))
    exported = up.read_until(r"^\s+(export DT_GC_URL=\S+ DT_TOKEN=\S+)$").group(1)
    create = up.read_until(r'^\s+(.+ join --create "demo meeting")$').group(1)
    rejoin = up.read_until(r"^\s+(.+ join CODE\b.*)$").group(1)
    up.read_until(r"Press Ctrl-C to stop")
    text = up.text()
    assert ready_s <= READY_WITHIN_S, text
    for name in [*MC_IDS, *MH_IDS, "gc-local-1"]:
        assert re.search(rf"^\s+\[\s*\d+\.\d s\] .*\b{name}\b", text, re.M), (name, text)
    assert re.search(r"^\s+MH\s+mh-local-1\s+zone-a", text, re.M), text
    assert ("($DATABASE_URL)" if "DATABASE_URL" in servers else "(embedded)") in text
    # One child per component (GC, 2 MCs, the MH simulator), embedded
    # servers besides.
    pids = up.descendants()
    commands = [" ".join(p.cmdline()) for p in pids]
    assert sum("-m darktower.gc" in c for c in commands) == 1
    assert sum("-m darktower.mc" in c for c in commands) == 2
    assert sum("mh_sim_cmd" in c for c in commands) == 1

    # The printed commands, exactly: the variables it exports, then dt join
    # (which exits 0 only on a 200).
    env = {k: v for k, v in os.environ.items() if k not in ("DT_GC_URL", "DT_TOKEN")}
    created = run_printed([exported, create], env)
    code = first_group(r"^created meeting demo meeting with code (\S+)$", created)
    mc_id = first_group(r"^controller\s+(\S+)$", created)
    assert mc_id in MC_IDS
    assert set(re.findall(r"^\s+(?:primary|backup)\s+(\S+)", created, re.M)) == MH_IDS
    meeting_id = first_group(r"^\s+id\s+(\S+)$", created)
    again = run_printed([exported, rejoin.replace("CODE", code, 1)], env)
    assert first_group(r"^controller\s+(\S+)$", again) == mc_id

    status, text = _stop_and_check(up, signal.SIGINT, pids)
    assert status == 0, text
    assert "SIGINT: stopping" in text
    _assert_removed(text)
    assert up.stderr == [], text
    if "REDIS_URL" in servers:
        trio.run(_forget_meetings, servers["REDIS_URL"], [meeting_id])


@pytest.mark.dt_timeout(120)
def test_sigterm_while_starting_stops_what_was_started(start_up: Any) -> None:
    up: Up = start_up()
    up.read_until(r"\bGC\s+gc-local-1 ready")
    pids = up.descendants()
    status, text = _stop_and_check(up, signal.SIGTERM, pids)
    assert status == 0, text
    assert "SIGTERM: stopping" in text
    assert "ready in" not in text
    _assert_removed(text)


@pytest.mark.dt_timeout(120)
def test_a_component_that_dies_stops_everything_with_one_clear_line(start_up: Any) -> None:
    up: Up = start_up()
    up.read_until(r"Press Ctrl-C to stop")
    pids = up.descendants()
    mc = next(p for p in pids if "-m darktower.mc" in " ".join(p.cmdline()))
    mc_id = mc.environ()["MC_ID"]
    mc.kill()
    status, text = _ended_leaving_nothing(up, pids)
    assert status == 1, text
    assert up.stderr[0] == f"error: {mc_id} was killed by SIGKILL; the end of its log:\n", text
    _assert_removed(text)


@pytest.mark.dt_timeout(120)
def test_sigkill_of_dt_up_leaves_nothing_running_nor_its_files(start_up: Any) -> None:
    up: Up = start_up()
    up.read_until(r"Press Ctrl-C to stop")
    text = up.text()
    workdir = Path(first_group(r"^\s+work dir\s+(\S+) ", text))
    server_dirs = [Path(d) for d in re.findall(r"host=(/\S+dt-pg-\w+)", text)]
    pids = up.descendants()
    commands = [" ".join(p.cmdline()) for p in pids]
    assert sum("-m darktower.cli.up_guard" in c for c in commands) == 1, commands
    for proc in pids:
        with contextlib.suppress(psutil.Error):
            if proc.name() == "redis-server":
                server_dirs.append(Path(proc.cwd()))

    killed = time.monotonic()
    up.proc.kill()
    status, text = _ended_leaving_nothing(up, pids, within_s=STOP_BOUND_S)
    cleaned_s = time.monotonic() - killed
    assert status == -signal.SIGKILL, text
    assert cleaned_s < STOP_BOUND_S
    assert not workdir.exists(), text
    for directory in server_dirs:
        assert not directory.exists(), (directory, text)
    notice = [line for line in up.stderr if "ended without stopping what it started" in line]
    assert len(notice) == 1, text
    for name in ["gc-local-1", "mh-sim", *MC_IDS]:
        assert name in notice[0]
    assert str(workdir) in notice[0]


# --------------------------------------------------------------------------
# The guard's rules, on small processes (the test process plays dt up)


def _sleeper(*, ignore_sigterm: bool = False) -> subprocess.Popen[str]:
    """A Python process that waits for a signal until stopped (SIGALRM ends it
    after 120 s if nothing does); started when it says so
    (its SIGTERM disposition is then in place)."""
    code = (
        "import signal, sys, time\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_sigterm else "")
        + "print('ready', flush=True)\n"
        "signal.alarm(120)\nsignal.pause()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n"
    return proc


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; killed if it leaves them running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=STOP_BOUND_S)
        if proc.stdout is not None:
            proc.stdout.close()


def _registration(pid: int, name: str, *, last: bool = False, created: float | None = None) -> str:
    if created is None:
        created = psutil.Process(pid).create_time()
    return json.dumps({"pid": pid, "created": created, "name": name, "last": last})


def _guard(*lines: str) -> tuple[list[str], list[Path]]:
    """The guard's work for these registrations, dt up having ended after them."""
    return up_guard.guard(io.BytesIO("".join(line + "\n" for line in lines).encode()))


@pytest.mark.dt_timeout(60)
def test_the_guard_stops_what_is_left_and_removes_the_directories(
    processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    service = _sleeper()
    processes.append(service)
    already_stopped = _sleeper()
    processes.append(already_stopped)
    lines = [_registration(service.pid, "service"), _registration(already_stopped.pid, "done")]
    already_stopped.terminate()
    already_stopped.wait(timeout=STOP_BOUND_S)
    left = tmp_path / "workdir"
    (left / "logs").mkdir(parents=True)
    gone = tmp_path / "removed-by-dt-up"
    lines += [json.dumps({"directory": str(left)}), json.dumps({"directory": str(gone)})]

    stopped, removed = _guard(*lines, "not json")

    assert stopped == ["service"]
    assert service.wait(timeout=STOP_BOUND_S) == -signal.SIGTERM
    assert removed == [left]
    assert not left.exists()


@pytest.mark.dt_timeout(60)
def test_the_guard_never_signals_a_pid_that_is_not_the_registered_process(
    processes: list[subprocess.Popen[str]],
) -> None:
    """A pid the system reused has another start time."""
    other = _sleeper()
    processes.append(other)
    created = psutil.Process(other.pid).create_time()
    assert _guard(_registration(other.pid, "reused", created=created - 60)) == ([], [])
    assert other.poll() is None


@pytest.mark.dt_timeout(60)
def test_the_guard_kills_what_ignores_sigterm_after_the_grace(
    processes: list[subprocess.Popen[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(up_guard, "STOP_GRACE_S", 0.5)
    stubborn = _sleeper(ignore_sigterm=True)
    processes.append(stubborn)
    assert _guard(_registration(stubborn.pid, "stubborn")) == (["stubborn"], [])
    assert stubborn.wait(timeout=STOP_BOUND_S) == -signal.SIGKILL


@pytest.mark.dt_timeout(60)
def test_the_guard_stops_the_servers_last_and_the_children_of_what_it_stops(
    processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    """Services before the servers they use (``last``); a stopped process's
    own children (PostgreSQL's backends) too."""
    server = _sleeper()
    processes.append(server)
    seen = tmp_path / "seen"
    # At SIGTERM, the service writes down whether the server still runs.
    service_code = (
        "import os, signal, sys, time\n"
        "def stop(signum, frame):\n"
        "    try:\n"
        f"        os.kill({server.pid}, 0)\n"
        "        state = 'server running'\n"
        "    except ProcessLookupError:\n"
        "        state = 'server gone'\n"
        f"    open({str(seen)!r}, 'w').write(state)\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "print('ready', flush=True)\n"
        "signal.alarm(120)\nsignal.pause()\n"
    )
    service = subprocess.Popen(
        [sys.executable, "-c", service_code],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    processes.append(service)
    assert service.stdout is not None
    assert service.stdout.readline() == "ready\n"
    # A process with a child of its own, which outlives it unless stopped.
    parent = subprocess.Popen(
        ["sh", "-c", "sleep 120 & echo $!; wait"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    processes.append(parent)
    assert parent.stdout is not None
    grandchild = psutil.Process(int(parent.stdout.readline()))

    stopped, _removed = _guard(
        _registration(server.pid, "server", last=True),
        _registration(service.pid, "service"),
        _registration(parent.pid, "parent"),
    )

    assert stopped == ["service", "parent", "server"]
    assert seen.read_text() == "server running"
    assert service.wait(timeout=STOP_BOUND_S) == 0
    assert server.wait(timeout=STOP_BOUND_S) == -signal.SIGTERM
    parent.wait(timeout=STOP_BOUND_S)
    _gone, alive = psutil.wait_procs([grandchild], timeout=STOP_BOUND_S)
    assert alive == []
