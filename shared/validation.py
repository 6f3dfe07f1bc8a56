"""Field checks for everything that arrives over the wire (no I/O).

Each check raises :class:`InvalidArgument` naming the field and the rule -
never echoing the offending value, which may be huge or hostile. The gRPC
layer turns it into ``INVALID_ARGUMENT`` (SPEC §3), HTTP into 400.
"""

from __future__ import annotations

import math
import re
import uuid

#: PostgreSQL ``integer`` (int4): wire ``uint32`` values beyond it are refused,
#: never clamped (SPEC §6.1).
INT4_MAX = 2**31 - 1

_NODE_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,255}")
_LABEL_RE = re.compile(r"[A-Za-z0-9._-]*")
_ENDPOINT_RE = re.compile(r"https?://[\x21-\x7e]+")


class InvalidArgument(ValueError):
    """A request field breaks its rule; ``str()`` is safe to return to clients."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field


def node_id(field: str, value: str) -> str:
    """Controller/handler ids: 1-255 letters, digits, '-' or '_'."""
    if not _NODE_ID_RE.fullmatch(value):
        raise InvalidArgument(field, "must be 1-255 characters of letters, digits, '-' and '_'")
    return value


def label(field: str, value: str, *, min_len: int, max_len: int) -> str:
    """Regions and zones: letters, digits, '.', '-', '_' within a length."""
    if not min_len <= len(value) <= max_len or not _LABEL_RE.fullmatch(value):
        raise InvalidArgument(
            field, f"must be {min_len}-{max_len} characters of letters, digits, '.', '-' and '_'"
        )
    return value


def region(field: str, value: str) -> str:
    return label(field, value, min_len=1, max_len=50)


def endpoint(field: str, value: str) -> str:
    """1-255 printable characters starting with http:// or https://."""
    if len(value) > 255 or not _ENDPOINT_RE.fullmatch(value):
        raise InvalidArgument(field, "must be 1-255 characters starting with http:// or https://")
    return value


def capacity(field: str, value: int) -> int:
    """A maximum: at least 1 and within the database column."""
    if not 1 <= value <= INT4_MAX:
        raise InvalidArgument(field, f"must be between 1 and {INT4_MAX}")
    return value


def count(field: str, value: int) -> int:
    """A current load: 0 or more, within the database column."""
    if not 0 <= value <= INT4_MAX:
        raise InvalidArgument(field, f"must be between 0 and {INT4_MAX}")
    return value


def percent(field: str, value: float) -> float:
    """A usage percentage: finite, 0-100."""
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise InvalidArgument(field, "must be a number between 0 and 100")
    return value


def uuid_value(field: str, value: str) -> uuid.UUID:
    """A UUID in its canonical 36-character text form (any case)."""
    if len(value) != 36:
        raise InvalidArgument(field, "must be a UUID")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(field, "must be a UUID") from None
