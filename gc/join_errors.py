"""What a join can end in besides an assignment (SPEC §6.3, §6.5).

Kept apart from the join flow so the HTTP layer maps outcomes to responses
without importing the flow's machinery.
"""

from __future__ import annotations

#: SPEC §6.3 step 6: at most three MCs are asked per join.
MAX_ATTEMPTS = 3


class JoinError(Exception):
    """A join that cannot be served; ``str()`` is safe to show a client."""


class MeetingNotFound(JoinError):
    """No meeting with that code the caller may see (another org's meeting is
    reported exactly like a missing one: 404, no hint that it exists)."""


class GuestsNotAllowed(JoinError):
    """A guest asked to join a meeting that admits only its org's users."""


class ServiceUnavailable(JoinError):
    """No assignment could be made now; the client should retry after
    ``retry_after_s``. ``reason`` is a stable metric label
    (``no_media_handler``, ``no_controller``, ``assignment_failed``)."""

    def __init__(self, reason: str, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s
