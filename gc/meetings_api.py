"""The meetings API of the GC (SPEC §6.5): create, join, guest join, and the
two documents clients and MCs read (OpenAPI, JWKS). Trio-flavoured handlers.

Everything a handler needs arrives in :class:`MeetingsApiDeps`, so the app
wiring passes the real services and the HTTP-layer tests pass small fakes;
``create_meeting`` and ``join`` are trio-flavoured (the wiring makes the one
``run_aio`` crossing into the asyncio-flavoured service).

Errors are translated at one boundary (:meth:`_MeetingsApi._guarded`) with an
explicit map to the stable codes of SPEC §6.5, and every request runs under a
deadline. What a client is told is fixed text or a field name with its rule:
never a value it sent, never a stack trace, never another org's data (the join
service reports another org's meeting exactly like a missing one).

Limits. Guest joins are limited per client address, meeting creation per user
(token ``org_id`` and ``sub``): a request takes a token from its bucket before
its body is read - a guest join before anything else, a create as soon as it
is authenticated (its key needs the token) - so a malformed request costs one
too; without one it is refused with 429 ``RATE_LIMITED`` and ``Retry-After``
(:mod:`darktower.gc.rate_limit`; the buckets are per GC process).

Input. Request bodies must be declared ``application/json`` (``charset``, if
given, ``utf-8``); SPEC §6.5 has no code for 415, so a wrong or missing
``Content-Type`` is 400 ``INVALID_REQUEST``. A user token's ``sub`` must be an
id (1-255 characters of letters, digits and ``._@:|+-``) and must not start
with ``guest-``, the prefix of the ``sub`` of guests' meeting tokens: a user
cannot pass as a guest towards an MC.
"""

from __future__ import annotations

import json
import re
import secrets
import time
import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from darktower.gc.http_app import error_response
from darktower.gc.join_errors import GuestsNotAllowed, MeetingNotFound, ServiceUnavailable
from darktower.gc.metrics import JOIN_SECONDS, JOINS, MEETINGS_CREATED
from darktower.gc.openapi import (
    DEFAULT_MAX_PARTICIPANTS,
    DISPLAY_NAME_CHARS,
    GUEST_NAME_CHARS,
    MAX_BODY_BYTES,
    MAX_PARTICIPANTS_RANGE,
    OPENAPI_DOCUMENT,
)
from darktower.gc.rate_limit import RateDecision, RateLimiter, client_key, user_key
from darktower.gc.repositories.meetings import MeetingRow, is_meeting_code
from darktower.shared.db import DatabaseUnavailable
from darktower.shared.keys import jwks_document, key_id
from darktower.shared.logging import get_logger
from darktower.shared.tokens import (
    AUD_GC,
    AUD_MC,
    MEETING_TOKEN_TTL_S,
    SCOPE_MEETING_CREATE,
    SCOPE_MEETING_JOIN,
    SCOPE_MEETING_PARTICIPANT,
    AuthError,
    Claims,
    PermissionDenied,
    TokenValidator,
    bearer_token,
    mint_meeting_token,
    mint_token,
)
from darktower.shared.validation import InvalidArgument

if TYPE_CHECKING:
    # Annotations only: the HTTP layer needs the result's shape, not the join
    # flow's machinery (the MC client, grpclib) at import time.
    from darktower.gc.join_flow import JoinResult

__all__ = [
    "CreateMeeting",
    "JoinMeeting",
    "MeetingsApiDeps",
    "meetings_routes",
]

log = get_logger(__name__)

#: The created_by column (and any sane user id) is at most this long.
MAX_USER_ID_CHARS: Final = 255
#: The ``sub`` of every guest's meeting token starts with this; no user's may.
GUEST_SUB_PREFIX: Final = "guest-"

#: A user id (token ``sub``): printable ASCII of the kinds identity providers
#: use (``auth0|5f1c``, ``ada@example.com``, UUIDs), nothing that could be
#: invisible, confusable or mean something to a log or a shell.
_USER_ID_RE: Final = re.compile(rf"[A-Za-z0-9._@:|+-]{{1,{MAX_USER_ID_CHARS}}}")
#: Characters refused in names shown to people: control (Cc), format (Cf:
#: bidi overrides, zero-width characters), private use (Co), unassigned (Cn,
#: noncharacters included), lone surrogates (Cs: JSON's \\ud800 escapes; they
#: cannot be stored or encoded) and line/paragraph separators (Zl, Zp).
_FORBIDDEN_CATEGORIES: Final = frozenset({"Cc", "Cf", "Co", "Cn", "Cs", "Zl", "Zp"})
#: The one media type a request body may be declared as.
_JSON_MEDIA_TYPE: Final = "application/json"
_CREATE_FIELDS: Final = frozenset({"display_name", "allow_guests", "max_participants"})
_GUEST_FIELDS: Final = frozenset({"display_name"})
_NO_STORE: Final = {"Cache-Control": "no-store"}
_PUBLIC_DOCUMENT: Final = {"Cache-Control": "public, max-age=300"}


class CreateMeeting(Protocol):
    """Trio-flavoured: store a new meeting (``meetings.create`` behind one
    ``run_aio``); raises :class:`DatabaseUnavailable`."""

    def __call__(
        self,
        *,
        org_id: uuid.UUID,
        created_by: str,
        display_name: str,
        allow_guests: bool,
        max_participants: int,
    ) -> Awaitable[MeetingRow]: ...


class JoinMeeting(Protocol):
    """Trio-flavoured: the join flow of SPEC §6.3 for ``(code, org_id)``;
    ``org_id`` ``None`` is a guest. Raises the errors of
    :mod:`darktower.gc.join_errors` (bare, not in an ExceptionGroup) or
    :class:`DatabaseUnavailable`."""

    def __call__(self, code: str, org_id: uuid.UUID | None, /) -> Awaitable[JoinResult]: ...


@dataclass(frozen=True, slots=True)
class MeetingsApiDeps:
    """What the meetings API needs from the rest of the GC.

    ``signing_key`` signs meeting tokens (``GC_SIGNING_KEY``); its ``kid`` is
    derived from it (RFC 7638), so the published JWKS and the tokens cannot
    disagree. ``request_timeout_s`` bounds each request from its first byte
    of handling to its response (the join flow alone may take three MC
    attempts of up to 10 s). ``guest_limiter`` is keyed by client address
    (:func:`client_key`), ``create_limiter`` by user (:func:`user_key`).
    """

    validator: TokenValidator
    create_meeting: CreateMeeting
    join: JoinMeeting
    signing_key: Ed25519PrivateKey
    guest_limiter: RateLimiter
    create_limiter: RateLimiter
    request_timeout_s: float


def meetings_routes(deps: MeetingsApiDeps) -> list[BaseRoute]:
    """The routes of the meetings API, to add to the GC's Starlette app
    (whose 404/405/500 handlers give unmatched requests the same JSON shape)."""
    api = _MeetingsApi(deps)
    return [
        Route("/api/v1/meetings", api.create, methods=["POST"]),
        Route("/api/v1/meetings/{code}", api.join, methods=["GET"]),
        Route("/api/v1/meetings/{code}/guest-token", api.guest_token, methods=["POST"]),
        Route("/api/v1/openapi.json", api.openapi, methods=["GET"]),
        Route("/.well-known/jwks.json", api.jwks, methods=["GET"]),
    ]


@dataclass(frozen=True, slots=True)
class _Outcome:
    """A response and the ``result`` label it is counted under."""

    response: Response
    result: str


class _Refused(Exception):
    """Internal: a request refused with a ready-made outcome (e.g. 429)."""

    def __init__(self, outcome: _Outcome) -> None:
        super().__init__(outcome.result)
        self.outcome = outcome


class _MeetingsApi:
    def __init__(self, deps: MeetingsApiDeps) -> None:
        self._deps = deps
        self._kid = key_id(deps.signing_key.public_key())
        # Both documents are fixed for the life of the process: render once.
        self._jwks = _render(jwks_document([deps.signing_key.public_key()]))
        self._openapi = _render(OPENAPI_DOCUMENT)

    # -- routes -------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        outcome = await self._guarded("create", lambda: self._create(request))
        if outcome.result == "created":
            MEETINGS_CREATED.inc()
        return outcome.response

    async def join(self, request: Request) -> Response:
        return await self._timed_join("user", lambda: self._join_user(request))

    async def guest_token(self, request: Request) -> Response:
        return await self._timed_join("guest", lambda: self._join_guest(request))

    async def openapi(self, request: Request) -> Response:
        return Response(self._openapi, media_type="application/json", headers=_PUBLIC_DOCUMENT)

    async def jwks(self, request: Request) -> Response:
        return Response(self._jwks, media_type="application/json", headers=_PUBLIC_DOCUMENT)

    # -- handlers (raise; _guarded maps) ------------------------------------------------

    async def _create(self, request: Request) -> _Outcome:
        claims = await self._authenticate(request, SCOPE_MEETING_CREATE)
        org_id = _org_id(claims)
        created_by = _user_id(claims)
        # Limit before the body: malformed requests cost tokens too.
        decision = self._deps.create_limiter.acquire_nowait(user_key(org_id, created_by))
        if not decision.allowed:
            raise _Refused(_rate_limited("too many meetings created; retry later", decision))
        _require_json(request)
        body = _json_object(await _read_body(request), allowed=_CREATE_FIELDS)
        display_name = _display_name(body.get("display_name"), "display_name", DISPLAY_NAME_CHARS)
        allow_guests = _boolean(body.get("allow_guests", False), "allow_guests")
        max_participants = _integer(
            body.get("max_participants", DEFAULT_MAX_PARTICIPANTS),
            "max_participants",
            MAX_PARTICIPANTS_RANGE,
        )
        meeting = await self._deps.create_meeting(
            org_id=org_id,
            created_by=created_by,
            display_name=display_name,
            allow_guests=allow_guests,
            max_participants=max_participants,
        )
        log.info("meeting_created", meeting_id=str(meeting.meeting_id), org_id=str(org_id))
        response = JSONResponse(
            {
                "meeting_id": str(meeting.meeting_id),
                "meeting_code": meeting.meeting_code,
                "display_name": meeting.display_name,
                "allow_guests": meeting.allow_guests,
                "max_participants": meeting.max_participants,
            },
            201,
            headers={"Location": f"/api/v1/meetings/{meeting.meeting_code}"},
        )
        return _Outcome(response, "created")

    async def _join_user(self, request: Request) -> _Outcome:
        claims = await self._authenticate(request, SCOPE_MEETING_JOIN)
        org_id = _org_id(claims)
        participant_id = _user_id(claims)
        code = _meeting_code(request)
        result = await self._deps.join(code, org_id)
        token = mint_meeting_token(
            self._deps.signing_key,
            kid=self._kid,
            participant_id=participant_id,
            meeting_id=str(result.meeting.meeting_id),
        )
        return _Outcome(_join_response(result, token), _join_result(result))

    async def _join_guest(self, request: Request) -> _Outcome:
        # Limit first: malformed and unknown-code requests cost tokens too,
        # or probing codes with bad bodies would be free.
        decision = self._deps.guest_limiter.acquire_nowait(
            client_key(request.client.host if request.client else None)
        )
        if not decision.allowed:
            raise _Refused(_rate_limited("too many requests from this address", decision))
        code = _meeting_code(request)
        _require_json(request)
        body = _json_object(await _read_body(request), allowed=_GUEST_FIELDS)
        display_name = _display_name(body.get("display_name"), "display_name", GUEST_NAME_CHARS)
        result = await self._deps.join(code, None)
        token = mint_token(
            self._deps.signing_key,
            kid=self._kid,
            sub=f"{GUEST_SUB_PREFIX}{secrets.token_hex(16)}",
            audience=AUD_MC,
            scopes=[SCOPE_MEETING_PARTICIPANT],
            ttl_s=MEETING_TOKEN_TTL_S,
            extra={
                "meeting_id": str(result.meeting.meeting_id),
                "guest": True,
                "display_name": display_name,
            },
        )
        return _Outcome(_join_response(result, token), _join_result(result))

    async def _authenticate(self, request: Request, scope: str) -> Claims:
        """The user token's claims (aud ``gc``, ``scope``). Like the gRPC
        server: :meth:`TokenValidator.validate_trio` handles an unknown
        ``kid`` (one JWKS re-fetch in a thread, then fail closed)."""
        token = bearer_token(request.headers.get("authorization"))
        return await self._deps.validator.validate_trio(token, audience=AUD_GC, scope=scope)

    # -- the one error boundary -----------------------------------------------------------

    async def _timed_join(self, kind: str, handler: Callable[[], Awaitable[_Outcome]]) -> Response:
        started = time.perf_counter()
        outcome = await self._guarded(f"join_{kind}", handler)
        JOIN_SECONDS.labels(outcome.result).observe(time.perf_counter() - started)
        JOINS.labels(kind, outcome.result).inc()
        return outcome.response

    async def _guarded(
        self, operation: str, handler: Callable[[], Awaitable[_Outcome]]
    ) -> _Outcome:
        """Run ``handler`` under the request deadline and map every failure
        to its response. ``trio.Cancelled`` (a BaseException) is not caught:
        shutdown cancels requests rather than answering them."""
        with trio.move_on_after(self._deps.request_timeout_s):
            try:
                return await handler()
            except _Refused as exc:
                return exc.outcome
            except InvalidArgument as exc:
                return _Outcome(error_response(400, "INVALID_REQUEST", str(exc)), "invalid")
            except PermissionDenied as exc:
                return _Outcome(error_response(403, "FORBIDDEN", exc.public_message), "forbidden")
            except AuthError as exc:
                response = error_response(
                    401, "UNAUTHORIZED", exc.public_message, headers={"WWW-Authenticate": "Bearer"}
                )
                return _Outcome(response, "unauthorized")
            except MeetingNotFound:
                return _Outcome(error_response(404, "NOT_FOUND", "meeting not found"), "not_found")
            except GuestsNotAllowed:
                # Unreachable (the lookup shows a guest no members-only
                # meeting); answered like a missing meeting all the same, so a
                # members-only code never tells itself apart from a wrong one.
                return _Outcome(error_response(404, "NOT_FOUND", "meeting not found"), "not_found")
            except ServiceUnavailable as exc:
                # Expected under load (capacity): counted by reason, logged quietly.
                log.info("join_unavailable", operation=operation, reason=exc.reason)
                return _Outcome(_unavailable(str(exc), exc.retry_after_s), exc.reason)
            except DatabaseUnavailable:
                log.warning("request_database_unavailable", operation=operation)
                return _Outcome(_unavailable("database unavailable", 1), "database_unavailable")
            except Exception:
                # A bug: the traceback goes to the log (never a token: none is
                # in any message we build), the client learns nothing.
                log.exception("http_request_failed", operation=operation)
                return _Outcome(error_response(500, "INTERNAL", "internal error"), "internal")
        log.warning(
            "http_request_timeout", operation=operation, timeout_s=self._deps.request_timeout_s
        )
        return _Outcome(_unavailable("request timed out", 1), "timeout")


def _rate_limited(message: str, decision: RateDecision) -> _Outcome:
    response = error_response(
        429, "RATE_LIMITED", message, headers={"Retry-After": decision.retry_after_header}
    )
    return _Outcome(response, "rate_limited")


def _unavailable(message: str, retry_after_s: int) -> JSONResponse:
    return error_response(
        503,
        "SERVICE_UNAVAILABLE",
        message,
        headers={"Retry-After": str(max(1, int(retry_after_s)))},
    )


def _join_result(result: JoinResult) -> str:
    """The metric label of a successful join (the names of ``gc_joins``)."""
    return "assigned" if result.assigned else "reused"


def _render(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _join_response(result: JoinResult, token: str) -> JSONResponse:
    """The join response of SPEC §6.5 (both variants), primary MH first."""
    assignment = result.assignment
    handlers = sorted(assignment.media_handlers, key=lambda mh: mh.role != "primary")
    body = {
        "meeting_id": str(result.meeting.meeting_id),
        "display_name": result.meeting.display_name,
        "token": token,
        "expires_in": MEETING_TOKEN_TTL_S,
        "mc": {
            "id": assignment.controller_id,
            "grpc_endpoint": assignment.mc_grpc_endpoint,
            "webtransport_endpoint": assignment.mc_webtransport_endpoint,
        },
        "media_handlers": [
            {
                "id": mh.handler_id,
                "webtransport_endpoint": mh.webtransport_endpoint,
                "role": mh.role,
            }
            for mh in handlers
        ],
    }
    # A bearer credential: no cache, shared or private, may keep it.
    return JSONResponse(body, headers=_NO_STORE)


# -- input rules (pure) ---------------------------------------------------------------------


def _org_id(claims: Claims) -> uuid.UUID:
    """The caller's org; a user token without a usable one grants nothing."""
    if claims.org_id is None:
        raise PermissionDenied("missing org_id")
    try:
        return uuid.UUID(claims.org_id)
    except ValueError:
        raise PermissionDenied("malformed org_id") from None


def _user_id(claims: Claims) -> str:
    """``sub`` as ``created_by`` and as the participant id of the meeting
    token: an id of :data:`_USER_ID_RE` (it fits the column, and PostgreSQL
    text cannot even store NUL), never in the guests' namespace (in any case:
    an MC, or a person reading ids, need not compare case-sensitively)."""
    sub = claims.sub
    if not _USER_ID_RE.fullmatch(sub):
        raise PermissionDenied("unusable sub")
    if sub[: len(GUEST_SUB_PREFIX)].lower() == GUEST_SUB_PREFIX:
        raise PermissionDenied("reserved sub")
    return sub


def _meeting_code(request: Request) -> str:
    """The ``{code}`` path parameter. Codes are typed by people: ASCII
    letters are taken in either case."""
    code = str(request.path_params["code"])
    if code.isascii():
        code = code.lower()
    if not is_meeting_code(code):
        raise InvalidArgument("code", "must be 3-32 characters of letters, digits and '-'")
    return code


def _require_json(request: Request) -> None:
    """The body is declared ``application/json`` (any case), with no
    parameter but ``charset=utf-8`` (JSON is UTF-8, RFC 8259, and is decoded
    as nothing else), in exactly one ``Content-Type`` header."""
    rule = "must be application/json (charset, if given, utf-8)"
    declared = request.headers.getlist("content-type")
    if len(declared) != 1:
        raise InvalidArgument("Content-Type", rule)
    media_type, *parameters = declared[0].split(";")
    if media_type.strip().lower() != _JSON_MEDIA_TYPE:
        raise InvalidArgument("Content-Type", rule)
    for parameter in parameters:
        if not parameter.strip():
            continue  # "application/json;": an empty parameter (RFC 9110 allows it)
        name, _, value = parameter.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if name.strip().lower() != "charset" or value.lower() != "utf-8":
            raise InvalidArgument("Content-Type", rule)


async def _read_body(request: Request) -> bytes:
    """The request body, refused past :data:`MAX_BODY_BYTES` without reading
    the rest (a declared length is checked before anything is read)."""
    rule = f"must be at most {MAX_BODY_BYTES} bytes"
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            too_long = int(declared) > MAX_BODY_BYTES
        except ValueError:
            too_long = False  # the server's HTTP parser vouches for framing
        if too_long:
            raise InvalidArgument("body", rule)
    chunks: list[bytes] = []
    size = 0
    try:
        # aclosing: leaving the loop early must finalise the generator here,
        # not whenever the garbage collector gets to it.
        async with aclosing(request.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise InvalidArgument("body", rule)
                chunks.append(chunk)
    except ClientDisconnect:
        raise InvalidArgument("body", "incomplete") from None
    return b"".join(chunks)


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Two values for one field would mean whichever a parser keeps: refuse.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise InvalidArgument("body", "must not repeat a field")
    return result


def _refuse_constant(name: str) -> object:
    raise ValueError("NaN and Infinity are not JSON")


def _json_object(body: bytes, *, allowed: frozenset[str]) -> dict[str, object]:
    """``body`` as a JSON object with no fields outside ``allowed`` (unknown
    fields are refused, not ignored: a misspelt ``allow_guest`` must not
    silently create a meeting without guests)."""
    try:
        value = json.loads(
            body.decode("utf-8"),
            object_pairs_hook=_refuse_duplicates,
            parse_constant=_refuse_constant,
        )
    except InvalidArgument:
        raise
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise InvalidArgument("body", "must be a JSON object") from None
    if not isinstance(value, dict):
        raise InvalidArgument("body", "must be a JSON object")
    if not value.keys() <= allowed:
        # The unknown names are client input: list the allowed ones instead.
        raise InvalidArgument("body", "unknown field; allowed: " + ", ".join(sorted(allowed)))
    return value


#: Zero-width non-joiner and joiner: format characters that real names need
#: (Persian and Indic spellings, emoji sequences such as a technologist).
_JOINERS: Final = frozenset({"\u200c", "\u200d"})


def _has_forbidden_characters(text: str) -> bool:
    """Any character of :data:`_FORBIDDEN_CATEGORIES`, except a joiner
    between two visible characters (never at an end, never doubled, so it
    cannot pad or disguise a name)."""
    for i, c in enumerate(text):
        if unicodedata.category(c) not in _FORBIDDEN_CATEGORIES:
            continue
        if c not in _JOINERS or i == 0 or i == len(text) - 1:
            return True
        before, after = text[i - 1], text[i + 1]
        if any(
            n in _JOINERS or n.isspace() or unicodedata.category(n) in _FORBIDDEN_CATEGORIES
            for n in (before, after)
        ):
            return True
    return False


def _display_name(value: object, field: str, length: tuple[int, int]) -> str:
    """A name shown to people: leading and trailing whitespace removed (so a
    name of whitespace alone is empty), then ``length`` characters, none of
    them in :data:`_FORBIDDEN_CATEGORIES`."""
    low, high = length
    rule = (
        f"must be a string of {low}-{high} characters, not only whitespace, without"
        " control, format, private-use or unassigned characters"
    )
    if not isinstance(value, str):
        raise InvalidArgument(field, rule)
    name = value.strip()
    if not low <= len(name) <= high or _has_forbidden_characters(name):
        raise InvalidArgument(field, rule)
    return name


def _boolean(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(field, "must be true or false")
    return value


def _integer(value: object, field: str, bounds: tuple[int, int]) -> int:
    low, high = bounds
    # bool is an int in Python, and 5.0 is a float: neither is accepted.
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(field, f"must be an integer between {low} and {high}")
    return value
