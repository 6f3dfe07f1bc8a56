"""``dt join CODE``: join a meeting through a GC's HTTP API and show the assignment.

The same request a client makes (SPEC §6.3, §6.5), so an operator can check a
region end to end: which MC a meeting landed on, which MHs, and when the
meeting token expires. The meeting token itself is a credential and is shown
only on request (``--show-token``, or ``--json`` for scripts).

Exit status: 0 joined; 1 the GC answered with an error or could not be
reached (the JSON error code and message, and ``Retry-After`` when given, are
printed); 2 a usage problem (bad arguments, no token, unusable key file).

HTTP is the standard library's ``urllib`` (the installed package has no HTTP
client dependency). Redirects are refused, not followed: urllib would resend
the ``Authorization`` header to wherever one points.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message
from pathlib import Path
from typing import IO, Any, TypeVar

from darktower.cli.args import positive_float
from darktower.cli.keys_cmd import DEFAULT_KEYS_DIR, SIGNING_KEY_FILE
from darktower.shared.keys import KeyFileError, key_id, load_private_key
from darktower.shared.tokens import mint_user_token

DEFAULT_GC_URL = "http://127.0.0.1:8080"
#: Just over the GC's own request deadline (``GC_JOIN_TIMEOUT_S``, default
#: 40 s, which covers up to three MC attempts of 10 s, SPEC §6.3 step 6): the
#: GC's 503 arrives first; past this bound the GC is hung, not busy.
JOIN_TIMEOUT_S = 45.0
#: Creating a meeting is one INSERT.
CREATE_TIMEOUT_S = 10.0
#: A token minted from ``--keys`` serves this one command only.
MINTED_TOKEN_TTL_S = 300
#: Responses are small; anything bigger is not a GC answer.
_MAX_BODY_BYTES = 1 << 20
_MAX_MESSAGE_CHARS = 300

T = TypeVar("T")


class UsageError(Exception):
    """Bad arguments or local inputs: exit status 2."""


class ServiceError(Exception):
    """The GC answered with an error, or could not be reached: exit status 1.
    ``str()`` is the full line to print (never holding a token)."""


@dataclass(frozen=True, slots=True)
class HttpAnswer:
    status: int
    headers: Message
    body: bytes


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Turn every redirect into an error response: following one would send
    the user token to another URL (urllib keeps ``Authorization``)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


def printable(text: object, limit: int = _MAX_MESSAGE_CHARS) -> str:
    """Server-supplied text made safe for a terminal: control characters (an
    escape sequence in a display name) are shown escaped, and it is bounded."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _request(
    method: str, url: str, *, token: str, body: Mapping[str, Any] | None, timeout_s: float
) -> HttpAnswer:
    """One HTTP exchange, bounded as a whole by ``timeout_s``; any HTTP
    status is an answer, no answer is a :class:`ServiceError`.

    urllib's own timeout bounds each socket operation only (a server that
    trickles bytes could hold it indefinitely), so the exchange runs in a
    daemon thread that is abandoned at the deadline; its socket operations
    are bounded too, so it ends soon after, and never outlives the process.
    """
    box: queue.SimpleQueue[HttpAnswer | BaseException] = queue.SimpleQueue()

    def exchange() -> None:
        try:
            box.put(_exchange(method, url, token=token, body=body, timeout_s=timeout_s))
        except BaseException as exc:  # handed over and raised in the caller
            box.put(exc)

    threading.Thread(target=exchange, name="dt-http", daemon=True).start()
    try:
        outcome = box.get(timeout=timeout_s)
    except queue.Empty:
        raise ServiceError(_unreachable(url, f"no answer within {timeout_s:g} s")) from None
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _unreachable(url: str, problem: str) -> str:
    return f"error: cannot reach the GC at {url}: {problem}"


def _exchange(
    method: str, url: str, *, token: str, body: Mapping[str, Any] | None, timeout_s: float
) -> HttpAnswer:
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    # The scheme is checked in _gc_base_url: only http(s) reaches here.
    request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310
    try:
        try:
            response = _OPENER.open(request, timeout=timeout_s)
            status: int = response.status
        except urllib.error.HTTPError as exc:  # an error status is an answer too
            response, status = exc, exc.code
        with response:
            return HttpAnswer(status, response.headers, response.read(_MAX_BODY_BYTES))
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):
            problem = f"no answer within {timeout_s:g} s"
        else:
            problem = printable(reason) or type(reason).__name__
        raise ServiceError(_unreachable(url, problem)) from None


def _error_line(answer: HttpAnswer, what: str) -> str:
    """``error: CODE (HTTP n): message[; retry after s]`` from the SPEC §6.5
    error document, or a plain description when the body is not one."""
    try:
        error = json.loads(answer.body)["error"]
        code, message = printable(error["code"], 64), printable(error["message"])
    except (ValueError, TypeError, KeyError):
        code, message = f"HTTP_{answer.status}", "the answer is not a GC error document"
    line = f"error: {what} failed: {code} (HTTP {answer.status}): {message}"
    retry_after = answer.headers.get("Retry-After", "").strip()
    if retry_after:
        # Seconds (what the GC sends) or an HTTP date.
        unit = " s" if retry_after.isdigit() else ""
        line += f"; retry after {printable(retry_after, 40)}{unit}"
    return line


def _json_object(answer: HttpAnswer, what: str) -> dict[str, Any]:
    try:
        document = json.loads(answer.body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise ServiceError(f"error: {what}: the GC's answer is not a JSON object")
    return document


@dataclass(frozen=True, slots=True)
class MhView:
    handler_id: str
    webtransport_endpoint: str
    role: str


@dataclass(frozen=True, slots=True)
class JoinView:
    """The fields of a join response (SPEC §6.5) that ``dt join`` shows."""

    meeting_id: str
    display_name: str
    token: str
    expires_in: int
    mc_id: str
    mc_grpc_endpoint: str
    mc_webtransport_endpoint: str
    media_handlers: tuple[MhView, ...]

    @classmethod
    def parse(cls, document: Mapping[str, object]) -> JoinView:
        """Raises :class:`ServiceError` naming the first missing or mistyped field."""
        mc = _get(document, "mc", dict, "mc")
        mhs = _get(document, "media_handlers", list, "media_handlers")
        return cls(
            meeting_id=_get(document, "meeting_id", str, "meeting_id"),
            display_name=_get(document, "display_name", str, "display_name"),
            token=_get(document, "token", str, "token"),
            expires_in=_get(document, "expires_in", int, "expires_in"),
            mc_id=_get(mc, "id", str, "mc.id"),
            mc_grpc_endpoint=_get(mc, "grpc_endpoint", str, "mc.grpc_endpoint"),
            mc_webtransport_endpoint=_get(
                mc, "webtransport_endpoint", str, "mc.webtransport_endpoint"
            ),
            media_handlers=tuple(
                MhView(
                    handler_id=_get(mh, "id", str, f"media_handlers[{i}].id"),
                    webtransport_endpoint=_get(
                        mh,
                        "webtransport_endpoint",
                        str,
                        f"media_handlers[{i}].webtransport_endpoint",
                    ),
                    role=_get(mh, "role", str, f"media_handlers[{i}].role"),
                )
                for i, mh in enumerate(mhs)
            ),
        )


def _get(obj: object, name: str, kind: type[T], path: str) -> T:
    """``obj[name]`` if ``obj`` is a JSON object and the value a ``kind``."""
    value = obj.get(name) if isinstance(obj, dict) else None
    # bool is an int subclass, but an expiry of ``true`` is no number.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ServiceError(f"error: unexpected join response from the GC ({path})")
    return value


def render(view: JoinView, *, code: str, show_token: bool, now: datetime) -> str:
    """The assignment as aligned text. Every server-supplied string passes
    through :func:`printable`; the token appears only with ``show_token``."""
    p = printable
    expires_at = (now + timedelta(seconds=view.expires_in)).strftime("%Y-%m-%d %H:%M:%S UTC")
    lines = [
        f"meeting         {p(view.display_name)}",
        f"  code          {p(code)}",
        f"  id            {p(view.meeting_id)}",
        f"controller      {p(view.mc_id)}",
        f"  grpc          {p(view.mc_grpc_endpoint)}",
        f"  webtransport  {p(view.mc_webtransport_endpoint)}",
        "media handlers" + ("" if view.media_handlers else "  (none)"),
    ]
    role_width = max((len(p(mh.role)) for mh in view.media_handlers), default=0)
    id_width = max((len(p(mh.handler_id)) for mh in view.media_handlers), default=0)
    lines.extend(
        f"  {p(mh.role):<{role_width}}  {p(mh.handler_id):<{id_width}}  "
        f"{p(mh.webtransport_endpoint)}"
        for mh in view.media_handlers
    )
    lines.append(f"meeting token   expires in {view.expires_in} s ({expires_at})")
    if show_token:
        lines.append(f"  token         {view.token}")
    else:
        lines.append("  (not shown; --show-token or --json prints it)")
    return "\n".join(lines)


def _gc_base_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--gc-url must be an http:// or https:// URL, not {text!r}")
    if parts.query or parts.fragment:
        raise UsageError("--gc-url takes no query or fragment")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _user_token(args: argparse.Namespace) -> str:
    """``--token``, else a token minted from ``--keys``, else ``$DT_TOKEN``."""
    if args.keys is None and (args.org is not None or args.user is not None):
        raise UsageError("--org and --user go with --keys DIR")
    if args.token is not None:
        if not args.token.strip():
            raise UsageError("--token is empty")
        return str(args.token).strip()
    if args.keys is not None:
        if args.org is None or args.user is None:
            raise UsageError("--keys needs --org ORG_UUID and --user USER_ID")
        try:
            org_id = uuid.UUID(args.org)
        except ValueError:
            raise UsageError(f"--org must be a UUID, not {args.org!r}") from None
        key_path = Path(args.keys) / SIGNING_KEY_FILE
        try:
            key = load_private_key(key_path)
        except KeyFileError as exc:
            raise UsageError(f"{exc} (create one with `dt keys init`)") from None
        try:
            return mint_user_token(
                key,
                kid=key_id(key.public_key()),
                user_id=args.user,
                org_id=str(org_id),
                ttl_s=MINTED_TOKEN_TTL_S,
            )
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    token = os.environ.get("DT_TOKEN", "").strip()
    if not token:
        raise UsageError(
            "no user token: set $DT_TOKEN, pass --token, or mint one with"
            " --keys DIR --org ORG_UUID --user USER_ID"
        )
    return token


def _create(base: str, token: str, display_name: str) -> dict[str, Any]:
    answer = _request(
        "POST",
        f"{base}/api/v1/meetings",
        token=token,
        body={"display_name": display_name},
        timeout_s=CREATE_TIMEOUT_S,
    )
    if answer.status != 201:
        raise ServiceError(_error_line(answer, "creating the meeting"))
    created = _json_object(answer, "creating the meeting")
    if not isinstance(created.get("meeting_code"), str) or not created["meeting_code"]:
        raise ServiceError("error: creating the meeting: the GC's answer has no meeting_code")
    return created


def _join(base: str, token: str, code: str, *, timeout_s: float) -> dict[str, Any]:
    answer = _request(
        "GET",
        f"{base}/api/v1/meetings/{urllib.parse.quote(code, safe='')}",
        token=token,
        body=None,
        timeout_s=timeout_s,
    )
    if answer.status != 200:
        raise ServiceError(_error_line(answer, "join"))
    return _json_object(answer, "join")


def _run(args: argparse.Namespace) -> int:
    try:
        if (args.code is None) == (args.create is None):
            raise UsageError("give a meeting CODE or --create NAME (one of the two)")
        if args.code is not None and not args.code.strip():
            raise UsageError("the meeting code is empty")
        if args.create is not None and not args.create.strip():
            raise UsageError("--create needs a non-empty meeting name")
        base = _gc_base_url(args.gc_url or os.environ.get("DT_GC_URL") or DEFAULT_GC_URL)
        token = _user_token(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        code = args.code.strip() if args.code is not None else None
        if code is None:
            created = _create(base, token, args.create)
            code = str(created["meeting_code"])
            # With --json, stdout holds only the one document; the code must
            # still be seen if the join then fails.
            print(
                f"created meeting {printable(args.create)} with code {printable(code)}",
                file=sys.stderr if args.json else sys.stdout,
            )
        document = _join(base, token, code, timeout_s=args.timeout or JOIN_TIMEOUT_S)
        view = JoinView.parse(document)
    except ServiceError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.json:
        # The GC's document as received, plus the code that was joined.
        print(json.dumps({**document, "meeting_code": code}, indent=2))
    else:
        print(render(view, code=code, show_token=args.show_token, now=datetime.now(UTC)))
    return 0


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dt join``."""
    join = subparsers.add_parser(
        "join",
        help="join a meeting through a GC and print the assignment",
        description=(
            "Join a meeting through the GC's HTTP API (GET /api/v1/meetings/CODE) and print"
            " the assignment: MC, media handlers, token expiry. Exit status: 0 joined,"
            " 1 the GC refused or was unreachable, 2 usage error."
        ),
    )
    join.add_argument("code", nargs="?", metavar="CODE", help="the meeting code")
    join.add_argument(
        "--create",
        metavar="NAME",
        help="create a meeting with this display name first (POST /api/v1/meetings), then join it",
    )
    join.add_argument(
        "--gc-url",
        help=f"the GC's HTTP base URL (default: $DT_GC_URL or {DEFAULT_GC_URL})",
    )
    auth = join.add_mutually_exclusive_group()
    auth.add_argument(
        "--token",
        help="user token (default: $DT_TOKEN, preferable: command lines are visible to other"
        " local users)",
    )
    auth.add_argument(
        "--keys",
        metavar="DIR",
        help=f"mint a short-lived user token with the key in DIR (a `dt keys init` directory,"
        f" e.g. {DEFAULT_KEYS_DIR}); needs --org and --user",
    )
    join.add_argument("--org", metavar="ORG_UUID", help="org id for the minted user token")
    join.add_argument("--user", metavar="USER_ID", help="user id (sub) for the minted user token")
    join.add_argument(
        "--timeout",
        type=positive_float,
        metavar="S",
        help=f"give up on the join after S seconds (default: {JOIN_TIMEOUT_S:g}; raise it for a"
        " GC with a longer GC_JOIN_TIMEOUT_S)",
    )
    join.add_argument(
        "--json",
        action="store_true",
        help="print the GC's join response (including the meeting token) plus meeting_code",
    )
    join.add_argument(
        "--show-token", action="store_true", help="also print the meeting token in the text output"
    )
    join.set_defaults(func=_run)
