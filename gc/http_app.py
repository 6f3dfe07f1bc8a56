"""The GC's HTTP API (SPEC §6.5); so far the operational endpoints."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from darktower.gc.metrics import REGISTRY
from darktower.shared.db import DatabaseUnavailable
from darktower.shared.metrics import CONTENT_TYPE, exposition


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """The JSON error shape of SPEC §6.5, with ``Retry-After`` on 503."""
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


def create_app(*, database_ping: Callable[[], Awaitable[None]]) -> Starlette:
    """Trio-flavoured ASGI app. ``database_ping`` raises
    :class:`DatabaseUnavailable` when PostgreSQL cannot be reached."""

    async def live(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        try:
            await database_ping()
        except DatabaseUnavailable:
            return error_response(503, "SERVICE_UNAVAILABLE", "database unreachable")
        return JSONResponse({"status": "ready"})

    async def metrics(request: Request) -> Response:
        return Response(exposition(REGISTRY), media_type=CONTENT_TYPE)

    async def not_found(request: Request, exc: Exception) -> Response:
        return error_response(404, "NOT_FOUND", "no such resource")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return error_response(405, "METHOD_NOT_ALLOWED", "method not allowed")

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_response(500, "INTERNAL", "internal error")

    return Starlette(
        routes=[
            Route("/health/live", live, methods=["GET"]),
            Route("/health/ready", ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={404: not_found, 405: method_not_allowed, 500: internal_error},
    )
