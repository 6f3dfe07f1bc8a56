"""Every developer task is a nox session: ``nox -s tests``, ``nox -s lint``,
``nox -s protos``. Sessions install the project themselves, so they work
from a fresh clone with nothing but Python."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nox

nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_venv = "yes"

ROOT = Path(__file__).resolve().parent
PACKAGES = ("gc", "mc", "shared", "protos", "cli")


@nox.session
def tests(session: nox.Session) -> None:
    """The full test suite against real PostgreSQL and Redis: the machine's
    when ``DT_TEST_DATABASE_URL`` / ``DT_TEST_REDIS_URL`` are set, embedded
    servers otherwise. The package is installed the way users get it (not
    editable), so a module missing from the wheel fails here."""
    session.install(".[dev]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint + format) and mypy --strict on every package."""
    session.install("-e", ".[dev]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    # The folders become ``darktower.<name>`` only when installed; give mypy
    # the same view through a tree of symlinks. mypy runs from that tree, not
    # from the repository: there the repository's ``gc/`` folder would shadow
    # the standard library's ``gc`` module.
    config = f"--config-file={ROOT / 'setup.cfg'}"
    with tempfile.TemporaryDirectory() as tmp:
        namespace = Path(tmp, "darktower")
        namespace.mkdir()
        for package in PACKAGES:
            (namespace / package).symlink_to(ROOT / package)
        args = [arg for package in PACKAGES for arg in ("-p", f"darktower.{package}")]
        with session.chdir(tmp):
            session.run("mypy", config, *args, env={"MYPYPATH": tmp})
            # Tests import their helpers (gc_harness) as top-level modules, the
            # way pytest's rootdir-relative sys.path makes them importable.
            tests_path = {"MYPYPATH": f"{tmp}:{ROOT / 'tests'}"}
            session.run("mypy", config, str(ROOT / "tests"), env=tests_path)
            session.run("mypy", config, str(ROOT / "noxfile.py"))


@nox.session
def protos(session: nox.Session) -> None:
    """Regenerate the grpclib code from ``protos/internal.proto``."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "darktower.protos.generate")


@nox.session
def bench(session: nox.Session) -> None:
    """Run a benchmark: ``nox -s bench -- heartbeats``."""
    session.install("-e", ".")
    session.run("dt", "bench", *(session.posargs or ["heartbeats"]))
