"""Typed configuration from environment variables.

A service reads every variable once at start through an :class:`EnvSpec`; any
bad or missing value stops it with one line naming the variable (SPEC §8) -
never a half-configured start. Secrets are wrapped in :class:`Secret` so that
``repr``/``str`` of a config object (and therefore any log line) cannot leak
them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import socket
import sys
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

from darktower.shared import validation

T = TypeVar("T")


class ConfigError(Exception):
    """One configuration variable is missing or invalid; the message names it
    and never contains the offending value when that value may be secret."""


class ListenError(ConfigError):
    """A server could not bind its configured address (in use, not local,
    no permission): a configuration problem the operator must see as one
    line naming the address, not a traceback."""


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first leaf exception of a (possibly nested) exception group: what a
    ``main`` reports when start-up fails inside a nursery."""
    first = group.exceptions[0]
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


class Secret:
    """A string that never shows itself in ``repr``/``str``/f-strings."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: call only where it is handed to a library."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class HostPort:
    """A bind address; port 0 means "any free port" (tests)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Var(Generic[T]):
    """One documented environment variable (also used to print ``--help``)."""

    name: str
    meaning: str
    parse: Callable[[str], T]
    default: str | None = None
    secret: bool = False

    def read(self, environ: Mapping[str, str]) -> T:
        raw = environ.get(self.name)
        if raw is None or raw.strip() == "":
            if self.default is None:
                raise ConfigError(f"{self.name} is required ({self.meaning})")
            raw = self.default
        try:
            return self.parse(raw.strip())
        except (ValueError, TypeError) as exc:
            shown = "" if self.secret else f" {raw!r}"
            raise ConfigError(f"{self.name} is invalid{shown}: {exc}") from None


def parse_host_port(raw: str) -> HostPort:
    host, sep, port_text = raw.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT")
    host = host.strip("[]")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError("port must be 0..65535")
    return HostPort(host, port)


def parse_int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return parse


def parse_float_range(lo: float, hi: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        value = float(raw)
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return parse


def parse_node_id(raw: str) -> str:
    return validation.node_id("id", raw)


def parse_region(raw: str) -> str:
    """The same rule as a region on the wire: a GC serving a region no node
    can register in would be a silent misconfiguration."""
    return validation.region("region", raw)


def parse_optional_node_id(raw: str) -> str:
    """A node id, or '' when unset (the service then makes one up)."""
    return raw and parse_node_id(raw)


def parse_endpoint(raw: str) -> str:
    """The same rule as an endpoint on the wire (1-255, http:// or https://)."""
    return validation.endpoint("endpoint", raw)


def parse_service_token(raw: str) -> Secret:
    """A compact JWS (three base64url parts): catches a path or a truncated
    paste at start. Its claims are for the service receiving it to judge."""
    parts = raw.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        raise ValueError("not a JWT")
    return Secret(raw)


def token_subject(token: Secret) -> str | None:
    """The ``sub`` of a JWT, read without verifying it (its receiver
    verifies): a service whose token names another id would be refused by
    every peer, for ever, so that mismatch is caught at start instead."""
    payload = token.reveal().split(".")[1]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, TypeError):
        return None
    sub = claims.get("sub") if isinstance(claims, dict) else None
    return sub if isinstance(sub, str) else None


def parse_list(raw: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not items:
        raise ValueError("expected a comma-separated list")
    return items


def parse_secret(raw: str) -> Secret:
    return Secret(raw)


def parse_dsn(raw: str) -> Secret:
    """A ``postgresql://`` URL whose parts parse (the password is never shown
    in the error: the caller marks the variable secret)."""
    if not raw.startswith(("postgres://", "postgresql://")):
        raise ValueError("expected a postgresql:// URL")
    try:
        _ = urllib.parse.urlsplit(raw).port
    except ValueError:
        raise ValueError("malformed host or port") from None
    return Secret(raw)


def default_node_id(prefix: str) -> str:
    """``<prefix>-<hostname>-<random>``, trimmed to the id alphabet."""
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:200] or "host"
    return f"{prefix}-{host}-{secrets.token_hex(3)}"


def help_text(service: str, variables: Sequence[Var[Any]]) -> str:
    """The ``--help`` text: every variable, its default and its meaning."""
    lines = [f"usage: {service} (configured by environment variables)", ""]
    for var in variables:
        if var.default is None:
            default = "required"
        else:
            default = f"default {var.default}" if var.default else "optional"
        lines.append(f"  {var.name:32} {var.meaning} ({default})")
    return "\n".join(lines)


def fail(message: str) -> NoReturn:
    """Exit at start with one clear line on stderr, status 2 (like argparse)."""
    print(f"configuration error: {message}", file=sys.stderr)
    raise SystemExit(2)


def environ() -> Mapping[str, str]:
    return os.environ


def parse_log_level(raw: str) -> str:
    level = raw.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("one of DEBUG, INFO, WARNING, ERROR")
    return level


#: Variables both services read, with one meaning.
REGION = Var("GC_REGION", "region served", parse_region, "local")
AUTH_JWKS = Var("AUTH_JWKS", "JWKS paths or URLs, comma-separated, merged", parse_list, secret=True)
