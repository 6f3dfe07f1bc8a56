"""Structured logging: one event per line, ``key=value`` fields, no secrets.

Call sites name an event and pass ids as fields::

    log = get_logger(__name__)
    log.info("mc_registered", controller_id=cid, region=region)

Fields whose names look secret (token, password, key, authorization, dsn,
secret) are redacted here, once, so a careless call site cannot leak them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_SECRET_MARKERS = ("token", "password", "secret", "authorization", "dsn", "key", "jwt")


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(marker in lowered for marker in _SECRET_MARKERS)


_PROTOCOL_LIBRARIES = ("asyncpg", "grpclib", "h2", "hpack", "hypercorn")


def _is_protocol_library(logger_name: str) -> bool:
    root = logger_name.partition(".")[0]
    return root in _PROTOCOL_LIBRARIES


def _render_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' ="\n'):
        return json.dumps(text)
    return text


class KeyValueFormatter(logging.Formatter):
    """``ts=… level=… logger=… event=… k=v …`` with secret-looking fields
    redacted and exception text kept to the exception type unless the record
    asks for a traceback (``exc_info``)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"logger={record.name}",
            f"event={_render_value(record.getMessage())}",
        ]
        fields: dict[str, Any] = getattr(record, "fields", {})
        for name, value in fields.items():
            shown = "***" if _is_secret(name) else _render_value(value)
            parts.append(f"{name}={shown}")
        if record.exc_info and _is_protocol_library(record.name):
            # grpclib logs a full traceback for malformed requests it rejects
            # before our code runs (e.g. bad ``-bin`` metadata): anyone who
            # can open a connection could flood the log with stack traces.
            # asyncpg's pool logs one for every failed reconnect while
            # PostgreSQL is down. Our own code's tracebacks (bugs) stay.
            parts.append(f"error={type(record.exc_info[1]).__name__}")
            return " ".join(parts)
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class StructuredLogger:
    """A thin typed facade over :mod:`logging` taking fields as keywords."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    def _log(self, level: int, event: str, exc_info: bool, fields: dict[str, object]) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level, event, exc_info=exc_info, extra={"fields": fields}, stacklevel=3
            )

    def debug(self, event: str, **fields: object) -> None:
        self._log(logging.DEBUG, event, False, fields)

    def info(self, event: str, **fields: object) -> None:
        self._log(logging.INFO, event, False, fields)

    def warning(self, event: str, **fields: object) -> None:
        self._log(logging.WARNING, event, False, fields)

    def error(self, event: str, *, exc_info: bool = False, **fields: object) -> None:
        self._log(logging.ERROR, event, exc_info, fields)

    def exception(self, event: str, **fields: object) -> None:
        """Error with traceback: for bugs only, never for expected failures."""
        self._log(logging.ERROR, event, True, fields)


def get_logger(name: str) -> StructuredLogger:
    return StructuredLogger(logging.getLogger(name))


def configure_logging(level: str = "INFO") -> None:
    """Install the key=value formatter on the root logger (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpclib logs every client disconnect at INFO with a traceback.
    logging.getLogger("grpclib").setLevel(logging.WARNING)
    # hpack (under grpclib's h2) logs every header it encodes or decodes at
    # DEBUG - `authorization: Bearer <jwt>` included - so it stays quiet
    # whatever the service's level.
    logging.getLogger("hpack").setLevel(logging.WARNING)


__all__ = ["KeyValueFormatter", "StructuredLogger", "configure_logging", "get_logger"]
