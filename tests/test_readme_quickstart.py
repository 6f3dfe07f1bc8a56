"""The README's Quick start, run as a newcomer runs it (issue 5).

Its first command - a new virtual environment, ``pip install .``, ``dt up``
- runs exactly as written, in a shell, from a fresh copy of the repository
with ``DATABASE_URL`` / ``REDIS_URL`` unset (so on embedded servers); the
meeting is created and joined with the very commands ``dt up`` prints; then
Ctrl-C (SIGINT to the shell's process group, as a terminal sends it) and
nothing the command started is left running, nor its temporary directories.
Its second command (the tests) cannot run inside the tests; it must be
exactly what CI runs.

The commands are read from README.md, and must equal the ones below: a
README change fails here until this file agrees with it.

The fresh copy is what ``git clone`` would give of the working tree as it
would be committed: every file ``git ls-files`` lists (tracked, plus
untracked ones not ignored), copied from the working tree, and nothing else
- no ``.venv``, ``*.egg-info``, ``.nox`` or caches. A plain ``git clone``
would test the last commit instead of the code the rest of the suite tests;
in CI, itself a fresh clone of the submitted commit, the two are the same.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from printed_output import PrintingRun, first_group, run_printed, still_running

from darktower.cli.up_guard import is_running

REPO = Path(__file__).resolve().parents[1]
RUN_SYSTEM = "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/dt up"
RUN_TESTS = "python3 -m pip install nox && python3 -m nox -s tests"
#: How .ci/run gets to the repository's root.
CD_TO_ROOT = 'cd "$(dirname "$0")/.."'
#: The issue's bar on this machine, for ``dt up`` alone.
READY_WITHIN_S = 15.0
#: Bounds of the waits, far above a healthy run: a new venv and ``pip
#: install .`` from the machine's package index (about 20 s here), then
#: ``dt up`` to ready (a few seconds), then the stop (about a second).
INSTALL_BOUND_S = 150.0
READY_BOUND_S = 60.0
STOP_BOUND_S = 30.0
MC_IDS = {"mc-local-1", "mc-local-2"}
MH_IDS = {"mh-local-1", "mh-local-2"}
_MARKER_VARIABLE = "DT_TEST_README_RUN"


def quick_start_commands() -> list[str]:
    """The commands of the README's Quick start code block, in order."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Quick start$(.*?)(?=^## )", readme, re.M | re.S)
    assert section, "README.md has no '## Quick start' section"
    block = re.search(r"^```sh$(.*?)^```$", section.group(1), re.M | re.S)
    assert block, "the Quick start has no sh code block"
    lines = [line.strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def test_the_quick_start_is_the_two_commands_tested_here() -> None:
    assert quick_start_commands() == [RUN_SYSTEM, RUN_TESTS]


def test_the_quick_start_test_command_is_what_ci_runs() -> None:
    """CI runs the README's test command verbatim, from the repository's
    root, in a script that stops at the first failure."""
    lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")]
    assert "set -euo pipefail" in commands
    assert RUN_TESTS in commands
    before = commands[: commands.index(RUN_TESTS)]
    assert CD_TO_ROOT in before
    # Nothing between the root and the command changes where it runs.
    assert not [c for c in before[before.index(CD_TO_ROOT) + 1 :] if "cd " in c]


# --------------------------------------------------------------------------
# The first command, for real


@pytest.fixture
def fresh_clone() -> Iterator[Path]:
    """The repository as a fresh clone has it (see the module docstring), in
    a new directory that is removed afterwards.

    The directory is world-traversable: as root, the embedded PostgreSQL
    runs as an unprivileged account, which must reach the binaries in the
    new virtual environment (pytest's own temporary directory is private).
    """
    root = Path(tempfile.mkdtemp(prefix="dt-readme-"))
    try:
        root.chmod(0o755)
        clone = root / "darktower"
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        for name in filter(None, listed.split(b"\0")):
            source = REPO / os.fsdecode(name)
            # A file deleted from the working tree (not yet committed) is skipped.
            if source.is_file() or source.is_symlink():
                target = clone / os.fsdecode(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target, follow_symlinks=False)
        assert (clone / "README.md").is_file()
        assert not (clone / ".venv").exists()
        yield clone
    finally:
        shutil.rmtree(root, ignore_errors=True)


def newcomer_environment(marker: str) -> dict[str, str]:
    """The machine's environment without what the test run adds: no server
    URLs (so ``dt up`` starts embedded servers), no test, GC or MC settings,
    no active virtual environment (nox runs the tests in one; a newcomer's
    ``python3`` is the system's) - plus a marker that everything started
    inherits."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "REDIS_URL", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
        and not k.startswith(("DT_", "GC_", "MC_"))
    }
    active_venv = os.environ.get("VIRTUAL_ENV")
    if active_venv:
        venv_bin = str(Path(active_venv, "bin"))
        env["PATH"] = os.pathsep.join(
            part for part in env.get("PATH", "").split(os.pathsep) if part != venv_bin
        )
    env[_MARKER_VARIABLE] = marker
    return env


@dataclass
class Shell(PrintingRun):
    """A command run by ``bash -c`` as a terminal's foreground job: its own
    process group, which gets the Ctrl-C."""

    #: Every process of the run seen so far, for the checks and the teardown.
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    @classmethod
    def start(cls, command: str, cwd: Path, env: dict[str, str]) -> Shell:
        proc = subprocess.Popen(
            ["bash", "-c", command],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        shell = cls(proc, _MARKER_VARIABLE, env[_MARKER_VARIABLE])
        shell.start_readers()
        return shell

    def collect(self) -> list[psutil.Process]:
        """The shell and everything under it now, added to :attr:`seen`."""
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(self.proc.pid)
            for proc in [root, *root.children(recursive=True)]:
                self.seen.setdefault(proc.pid, proc)
        return list(self.seen.values())


@pytest.fixture
def run_shell() -> Iterator[Callable[[str, Path, dict[str, str]], Shell]]:
    """Start commands as :class:`Shell`; whatever of them a failed test left
    running is killed."""
    shells: list[Shell] = []

    def start(command: str, cwd: Path, env: dict[str, str]) -> Shell:
        shell = Shell.start(command, cwd, env)
        shells.append(shell)
        return shell

    yield start
    for shell in shells:
        if shell.proc.poll() is None:
            shell.collect()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(shell.proc.pid, signal.SIGKILL)
            shell.proc.wait(timeout=STOP_BOUND_S)
        # dt up's guard stops what a killed dt up started; whatever is left
        # after its grace is killed here.
        leftovers = [proc for proc in [*shell.seen.values(), *shell.marked()] if is_running(proc)]
        _gone, alive = psutil.wait_procs(leftovers, timeout=15)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        for reader in shell.readers:
            reader.join(timeout=STOP_BOUND_S)


def _wait_for_dt_up(shell: Shell, timeout: float) -> tuple[float, float]:
    """Wait (bounded) for the end of ``pip install .`` - its last line - then
    for the first line of ``dt up``, which must be ``.venv/bin/dt up`` run
    by the shell (its child, or the shell itself, which may execute the last
    command of its list in its own process); when each line was read
    (monotonic: the test waits on the pipe, so as it came)."""
    shell.read_until(r"^Successfully installed .*\bdarktower-", timeout)
    installed = time.monotonic()
    shell.read_until(r"^dt up: PostgreSQL, Redis, ", READY_BOUND_S)
    dt_up_printed = time.monotonic()
    commands = []
    for proc in shell.collect():
        with contextlib.suppress(psutil.Error):
            commands.append(proc.cmdline())
    assert [".venv/bin/dt", "up"] in [c[-2:] for c in commands], (commands, shell.text())
    return installed, dt_up_printed


@pytest.mark.slow
@pytest.mark.dt_timeout(240)
def test_the_quick_start_runs_the_system_from_a_fresh_clone(
    fresh_clone: Path,
    run_shell: Callable[[str, Path, dict[str, str]], Shell],
    drill_figures: Callable[[str, str], None],
) -> None:
    command = quick_start_commands()[0]
    assert command == RUN_SYSTEM
    env = newcomer_environment(secrets.token_hex(8))
    started = time.monotonic()
    shell = run_shell(command, fresh_clone, env)

    # The venv and the install, then dt up.
    installed, dt_up_printed = _wait_for_dt_up(shell, INSTALL_BOUND_S)
    install_s = installed - started
    ready_s = float(shell.read_until(r"^ready in (\d+\.\d) s$", READY_BOUND_S).group(1))
    ready_wall_s = time.monotonic() - installed
    pg_dir = Path(
        shell.read_until(r"^\s+PostgreSQL\s.*\?host=(\S+) \(embedded\)$", READY_BOUND_S)[1]
    )
    shell.read_until(r"^\s+Redis\s.*\(embedded\)$", READY_BOUND_S)
    workdir = Path(shell.read_until(r"^\s+work dir\s+(\S+) ", READY_BOUND_S).group(1))
    exported = shell.read_until(r"^\s+(export DT_GC_URL=\S+ DT_TOKEN=\S+)$", READY_BOUND_S)
    create = shell.read_until(r'^\s+(\S+ join --create "demo meeting")$', READY_BOUND_S)
    rejoin = shell.read_until(r"^\s+(\S+ join CODE)\s+#", READY_BOUND_S)
    shell.read_until(r"^Press Ctrl-C to stop\.$", READY_BOUND_S)
    drill_figures("venv + pip install . (fresh clone, to pip's last line)", f"{install_s:.1f} s")
    drill_figures("dt up ready (its own figure)", f"{ready_s:.1f} s")
    drill_figures("dt up ready (seen by the test, from pip's last line)", f"{ready_wall_s:.1f} s")
    drill_figures(
        "dt up's first line (seen by the test, from pip's last line)",
        f"{dt_up_printed - installed:.1f} s",
    )
    assert ready_s <= READY_WITHIN_S, shell.text()
    assert workdir.is_dir()
    # The commands it prints name the dt it was started as, runnable from
    # where it was started.
    assert create.group(1).split()[0] == ".venv/bin/dt"

    # Everything it started, and the embedded servers' directories
    # (PostgreSQL's socket is in its own; Redis runs in its own).
    names = {proc.pid: proc.name() for proc in shell.collect() if is_running(proc)}
    assert {"postgres", "redis-server"} <= set(names.values()), names
    redis = psutil.Process(next(pid for pid, name in names.items() if name == "redis-server"))
    server_dirs = [pg_dir, Path(redis.cwd())]
    assert all(d.is_dir() and d.name.startswith(("dt-pg-", "dt-redis-")) for d in server_dirs)

    # Join through it with the commands it printed.
    created = run_printed([exported.group(1), create.group(1)], env, fresh_clone)
    code = first_group(r"^created meeting demo meeting with code (\S+)$", created)
    mc_id = first_group(r"^controller\s+(\S+)$", created)
    assert mc_id in MC_IDS, created
    assert set(re.findall(r"^\s+(?:primary|backup)\s+(\S+)", created, re.M)) == MH_IDS
    again = run_printed(
        [exported.group(1), rejoin.group(1).replace("CODE", code, 1)], env, fresh_clone
    )
    assert first_group(r"^controller\s+(\S+)$", again) == mc_id

    # Ctrl-C.
    procs = shell.collect()
    stop_started = time.monotonic()
    os.killpg(shell.proc.pid, signal.SIGINT)
    status = shell.proc.wait(timeout=STOP_BOUND_S)
    stop_s = time.monotonic() - stop_started
    text = shell.rest()
    drill_figures("Ctrl-C to exit", f"{stop_s:.1f} s")
    assert status == 0, text
    assert "SIGINT: stopping" in text
    assert f"stopped; removed {workdir}" in text
    assert still_running(procs, timeout=5) == [], text
    assert shell.marked() == [], text
    for directory in (workdir, *server_dirs):
        assert not directory.exists(), (directory, text)
    # The guard had nothing to do.
    assert "ended without stopping" not in text
