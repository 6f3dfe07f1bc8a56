"""``dt`` itself (``darktower.cli.__main__``): a subcommand's module is
imported only when that subcommand runs, and ``dt --help`` lists every
subcommand exactly as its module registers it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from darktower.cli.__main__ import COMMANDS, build_parser, main

#: What the subcommands' modules pull in; ``dt --help`` needs none of it.
HEAVY_MODULES = {"trio", "asyncpg", "coredis", "grpclib", "cryptography", "psutil", "asyncio"}


def test_the_help_lists_each_subcommand_as_its_module_registers_it() -> None:
    """The listing from the summaries equals the one from the modules
    themselves: a summary that drifts from its module's help fails here."""
    assert build_parser([]).format_help() == build_parser().format_help()


def _modules_imported_by(argv: list[str]) -> set[str]:
    """The modules a fresh interpreter has imported after ``dt ARGV``."""
    code = (
        "import sys\n"
        "from darktower.cli.__main__ import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('\\n'.join(sys.modules), file=sys.stderr)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert completed.stdout.startswith("usage: dt"), completed.stdout
    return set(completed.stderr.split())


@pytest.mark.slow
@pytest.mark.dt_timeout(60)
def test_dt_help_imports_no_subcommand() -> None:
    modules = _modules_imported_by(["--help"])
    assert not {f"darktower.cli.{spec.module}" for spec in COMMANDS.values()} & modules
    assert not HEAVY_MODULES & modules


@pytest.mark.slow
@pytest.mark.dt_timeout(60)
def test_a_subcommand_imports_its_own_module_only() -> None:
    modules = _modules_imported_by(["keys", "init", "--help"])
    assert "darktower.cli.keys_cmd" in modules
    others = {f"darktower.cli.{spec.module}" for name, spec in COMMANDS.items() if name != "keys"}
    assert not others & modules
    assert "trio" not in modules


def test_an_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["no-such-command"])
    assert exited.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err
