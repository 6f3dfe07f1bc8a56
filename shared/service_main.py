"""What ``python -m darktower.gc`` and ``python -m darktower.mc`` share: the
``--help`` text, configuration from the environment (one clear line and exit
2 on a bad variable), logging, the trio run, and turning the start-up
failures an operator can act on into one line and an exit status instead of
a traceback (SPEC §8)."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from darktower.shared.config import ConfigError, Var, environ, fail, help_text
from darktower.shared.jwks import JwksError
from darktower.shared.logging import configure_logging

ConfigT = TypeVar("ConfigT")


@dataclass(frozen=True, slots=True)
class Problem:
    """A start-up failure explained: the line printed and the exit status."""

    line: str
    status: int

    @classmethod
    def config(cls, text: str) -> Problem:
        return cls(f"configuration error: {text}", 2)

    @classmethod
    def runtime(cls, text: str) -> Problem:
        return cls(f"error: {text}", 1)


Explain = Callable[[BaseException], Problem | None]


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def _explain_common(exc: BaseException) -> Problem | None:
    if isinstance(exc, JwksError):
        return Problem.config(f"AUTH_JWKS: {exc}")
    if isinstance(exc, ConfigError):
        return Problem.config(str(exc))
    return None


def service_main(
    name: str,
    variables: Sequence[Var[Any]],
    load: Callable[[Mapping[str, str]], ConfigT],
    log_level: Callable[[ConfigT], str],
    serve: Callable[[ConfigT], Awaitable[None]],
    explain: Explain,
    argv: list[str] | None = None,
) -> int:
    """Run one service process; its exit status."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(help_text(name, variables))
        return 0
    if args:
        fail(f"unexpected argument {args[0]!r} (configuration is by environment; see --help)")
    try:
        config = load(environ())
    except ConfigError as exc:
        fail(str(exc))
    configure_logging(log_level(config))
    try:
        trio.run(serve, config)
    except (Exception, BaseExceptionGroup) as exc:
        for leaf in _leaves(exc):
            problem = _explain_common(leaf) or explain(leaf)
            if problem is not None:
                print(problem.line, file=sys.stderr)
                return problem.status
        raise
    return 0
