"""The argument rules shared by the ``dt`` subcommands."""

from __future__ import annotations

import pytest

from darktower.cli.args import redacted_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:secret@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("redis://:secret@r/15", "redis://:***@r/15"),
        ("postgresql://u@[::1]:5432/x", "postgresql://u@[::1]:5432/x"),
        ("postgresql://u:secret@[::1]:5432/x", "postgresql://u:***@[::1]:5432/x"),
        ("postgresql://h/db?password=secret&sslmode=require",
         "postgresql://h/db?password=***&sslmode=require"),
        ("postgresql://h/db?sslpassword=secret", "postgresql://h/db?sslpassword=***"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)  # fmt: skip
def test_a_printed_url_never_carries_a_password(url: str, shown: str) -> None:
    assert redacted_url(url) == shown
    assert "secret" not in redacted_url(url)
