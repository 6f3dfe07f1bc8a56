"""The MC's operational HTTP endpoints (SPEC §7, §9)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from darktower.mc.metrics import REGISTRY
from darktower.shared.metrics import CONTENT_TYPE, exposition


def create_app(
    *,
    redis_ping: Callable[[], Awaitable[bool]],
    registered: Callable[[], bool],
    draining: Callable[[], bool],
) -> Starlette:
    """Trio-flavoured ASGI app. Ready means: Redis answers, the GC knows this
    MC, and it is not draining - i.e. it can take an assignment now."""

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        problems = []
        if not await redis_ping():
            problems.append("redis unreachable")
        if not registered():
            problems.append("not registered with the GC")
        if draining():
            problems.append("draining")
        if problems:
            return JSONResponse(
                {"error": {"code": "SERVICE_UNAVAILABLE", "message": ", ".join(problems)}},
                503,
                headers={"Retry-After": "1"},
            )
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        return Response(exposition(REGISTRY), media_type=CONTENT_TYPE)

    return Starlette(
        routes=[
            Route("/health/live", live, methods=["GET"]),
            Route("/health/ready", ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )
