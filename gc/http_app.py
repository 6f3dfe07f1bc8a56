"""The GC's HTTP app (SPEC §6.5): the operational endpoints, the JSON error
shape, and the routes of the meetings API (:mod:`darktower.gc.meetings_api`)
handed in by the service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from darktower.gc.metrics import REGISTRY
from darktower.shared.db import DatabaseUnavailable
from darktower.shared.metrics import CONTENT_TYPE, exposition


def error_response(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The JSON error shape of SPEC §6.5; a 503 always carries ``Retry-After``
    (1 s unless ``headers`` says otherwise)."""
    all_headers = {"Retry-After": "1"} if status == 503 else {}
    all_headers.update(headers or {})
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status, headers=all_headers or None
    )


def create_app(
    *, database_ping: Callable[[], Awaitable[None]], routes: Sequence[BaseRoute] = ()
) -> Starlette:
    """Trio-flavoured ASGI app. ``database_ping`` raises
    :class:`DatabaseUnavailable` when PostgreSQL cannot be reached; ``routes``
    are served beside the operational endpoints."""

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
        # Starlette's exception carries the route's methods as ``Allow``,
        # which a 405 must send (RFC 9110 §15.5.6).
        headers = getattr(exc, "headers", None)
        allow = headers.get("Allow") if headers else None
        return error_response(
            405, "METHOD_NOT_ALLOWED", "method not allowed",
            headers={"Allow": allow} if allow else None,
        )  # fmt: skip

    async def internal_error(request: Request, exc: Exception) -> Response:
        return error_response(500, "INTERNAL", "internal error")

    app = Starlette(
        routes=[
            Route("/health/live", live, methods=["GET"]),
            Route("/health/ready", ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *routes,
        ],
        exception_handlers={404: not_found, 405: method_not_allowed, 500: internal_error},
    )
    # No trailing-slash redirects: a path that is not a route is a JSON 404,
    # not a redirect whose Location echoes the client's Host header.
    app.router.redirect_slashes = False
    return app
