"""An ASGI app served by hypercorn on trio, as a trio-flavoured component."""

from __future__ import annotations

import logging

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIFramework

from darktower.shared.config import HostPort, ListenError, first_error


async def run_http(
    app: ASGIFramework,
    bind: HostPort,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` until cancelled; ``started`` with the bound port once the
    socket listens (hypercorn reports its binds only then)."""
    config = Config()
    config.bind = [f"{bind.host}:{bind.port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 2.0
    config.keep_alive_timeout = 30.0
    # Request heads are small: h11 refuses (431) one still incomplete after
    # 16 KiB. A head that arrives whole in one read (hypercorn reads up to
    # 64 KiB at a time) is parsed anyway, so the effective bound is about
    # 80 KiB; bodies are bounded by the app (16 KiB, gc/meetings_api.py).
    config.h11_max_incomplete_size = 16 * 1024
    config.include_server_header = False

    async def start(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await serve(app, config, task_status=task_status, mode="asgi")

    async with trio.open_nursery() as nursery:
        try:
            binds: list[str] = await nursery.start(start)
        except* OSError as group:
            exc = first_error(group)
            reason = exc.strerror if isinstance(exc, OSError) else None
            raise ListenError(f"cannot listen on {bind} ({reason or exc})") from None
        task_status.started(int(binds[0].rsplit(":", 1)[1]))
