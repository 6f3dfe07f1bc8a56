"""The GC's published OpenAPI 3.1 document (SPEC §6.5), served at
``GET /api/v1/openapi.json``.

Hand-written rather than generated from the handlers: the document is a
contract with clients, so a change to it should be a visible edit reviewed
as such, not a side effect of refactoring a handler. The tests check that
every route of the app is described and every ``$ref`` resolves. The input
limits are defined here, in the contract, and the handlers import them, so
the document and the checks cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Final

from darktower.shared.tokens import MEETING_TOKEN_TTL_S

__all__ = [
    "DEFAULT_MAX_PARTICIPANTS",
    "DISPLAY_NAME_CHARS",
    "GUEST_NAME_CHARS",
    "MAX_BODY_BYTES",
    "MAX_PARTICIPANTS_RANGE",
    "OPENAPI_DOCUMENT",
    "OPENAPI_VERSION",
]

OPENAPI_VERSION: Final = "3.1.0"

#: Largest request body accepted; ours are a few dozen bytes.
MAX_BODY_BYTES: Final = 16 * 1024
#: Inclusive character counts after leading/trailing whitespace is removed.
DISPLAY_NAME_CHARS: Final = (1, 200)
GUEST_NAME_CHARS: Final = (2, 100)
MAX_PARTICIPANTS_RANGE: Final = (1, 1000)
DEFAULT_MAX_PARTICIPANTS: Final = 100


def _ref(kind: str, name: str) -> dict[str, str]:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _json_body(schema_name: str) -> dict[str, Any]:
    return {
        "required": True,
        "description": _BODY_RULES,
        "content": {"application/json": {"schema": _ref("schemas", schema_name)}},
    }


_BODY_RULES: Final = (
    f"A JSON object of at most {MAX_BODY_BYTES} bytes, sent with `Content-Type: "
    "application/json` (a `charset` parameter, if any, must be `utf-8`); any other "
    "or no `Content-Type` is 400 INVALID_REQUEST. Unknown and repeated fields are refused."
)

_NAME_RULES: Final = (
    "Leading and trailing whitespace is removed before the length is checked (a name "
    "of whitespace alone is refused); control, format (e.g. bidirectional overrides, "
    "zero-width characters), private-use, unassigned and surrogate code points and "
    "line/paragraph separators are refused."
)


_ERROR_CODES: Final = [
    "UNAUTHORIZED",
    "FORBIDDEN",
    "NOT_FOUND",
    "INVALID_REQUEST",
    "RATE_LIMITED",
    "SERVICE_UNAVAILABLE",
    "METHOD_NOT_ALLOWED",
    "INTERNAL",
]

_CODE_PARAMETER: Final = {
    "name": "code",
    "in": "path",
    "required": True,
    "description": "The meeting code (letters are accepted in either case).",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9-]{3,32}$"},
}

_MEETING_CODE_SCHEMA: Final = {
    "type": "string",
    "pattern": "^[a-z0-9-]{3,32}$",
    "examples": ["abc-defg-hij"],
}

OPENAPI_DOCUMENT: Final[dict[str, Any]] = {
    "openapi": OPENAPI_VERSION,
    "info": {
        "title": "Dark Tower Global Controller",
        "version": "1",
        "description": (
            "Create and join meetings. A join returns the meeting controller and media "
            "handlers serving the meeting and a meeting token to present to them. Every "
            'error is a JSON object `{"error": {"code", "message"}}` with a stable '
            "`code`; every request runs under a server-side deadline."
        ),
    },
    "paths": {
        "/api/v1/meetings": {
            "post": {
                "operationId": "createMeeting",
                "summary": "Create a meeting in the caller's organisation",
                "description": (
                    "Rate-limited per user (the token's `org_id` and `sub`), per GC "
                    "process: a burst, then `GC_CREATES_PER_MINUTE` a minute."
                ),
                "security": [{"userToken": ["meeting.create"]}],
                "requestBody": _json_body("CreateMeetingRequest"),
                "responses": {
                    "201": {
                        **_json(_ref("schemas", "Meeting"), "The meeting was created."),
                        "headers": {
                            "Location": {
                                "description": "Path of the join endpoint for the meeting.",
                                "schema": {"type": "string"},
                            }
                        },
                    },
                    "400": _ref("responses", "InvalidRequest"),
                    "401": _ref("responses", "Unauthorized"),
                    "403": _ref("responses", "Forbidden"),
                    "429": _ref("responses", "RateLimited"),
                    "500": _ref("responses", "Internal"),
                    "503": _ref("responses", "ServiceUnavailable"),
                },
            }
        },
        "/api/v1/meetings/{code}": {
            "get": {
                "operationId": "joinMeeting",
                "summary": "Join a meeting of the caller's organisation",
                "description": (
                    "Returns the meeting's assignment in this region, making one if "
                    "needed. A meeting of another organisation is reported as not found."
                ),
                "security": [{"userToken": ["meeting.join"]}],
                "parameters": [_CODE_PARAMETER],
                "responses": {
                    "200": _ref("responses", "Joined"),
                    "400": _ref("responses", "InvalidRequest"),
                    "401": _ref("responses", "Unauthorized"),
                    "403": _ref("responses", "Forbidden"),
                    "404": _ref("responses", "NotFound"),
                    "500": _ref("responses", "Internal"),
                    "503": _ref("responses", "ServiceUnavailable"),
                },
            }
        },
        "/api/v1/meetings/{code}/guest-token": {
            "post": {
                "operationId": "joinMeetingAsGuest",
                "summary": "Join a meeting that admits guests, without an account",
                "description": "Rate-limited per client address, per GC process.",
                "security": [],
                "parameters": [_CODE_PARAMETER],
                "requestBody": _json_body("GuestTokenRequest"),
                "responses": {
                    "200": _ref("responses", "Joined"),
                    "400": _ref("responses", "InvalidRequest"),
                    "404": _ref("responses", "NotFound"),
                    "429": _ref("responses", "RateLimited"),
                    "500": _ref("responses", "Internal"),
                    "503": _ref("responses", "ServiceUnavailable"),
                },
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "operationId": "getOpenApiDocument",
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")},
            }
        },
        "/.well-known/jwks.json": {
            "get": {
                "operationId": "getJwks",
                "summary": "The public key that verifies meeting tokens",
                "description": "`kid` is the key's RFC 7638 thumbprint.",
                "security": [],
                "responses": {"200": _json(_ref("schemas", "Jwks"), "A JWK Set (RFC 7517).")},
            }
        },
        "/health/live": {
            "get": {
                "operationId": "live",
                "summary": "The process is up",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "Alive.")},
            }
        },
        "/health/ready": {
            "get": {
                "operationId": "ready",
                "summary": "The database is reachable and the servers are listening",
                "security": [],
                "responses": {
                    "200": _json({"type": "object"}, "Ready."),
                    "503": _ref("responses", "ServiceUnavailable"),
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "userToken": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": (
                    "A user token: EdDSA JWT with aud `gc`, `sub` the user id (1-255 "
                    "characters of letters, digits and `._@:|+-`, not starting with "
                    "`guest-` in any case: that prefix is the guests'), `org_id` a UUID, "
                    "and the scope named by each operation. A token breaking these rules "
                    "is 403 FORBIDDEN."
                ),
            }
        },
        "schemas": {
            "CreateMeetingRequest": {
                "type": "object",
                "additionalProperties": False,
                "required": ["display_name"],
                "properties": {
                    "display_name": {
                        "type": "string",
                        "minLength": DISPLAY_NAME_CHARS[0],
                        "maxLength": DISPLAY_NAME_CHARS[1],
                        "description": _NAME_RULES,
                    },
                    "allow_guests": {"type": "boolean", "default": False},
                    "max_participants": {
                        "type": "integer",
                        "minimum": MAX_PARTICIPANTS_RANGE[0],
                        "maximum": MAX_PARTICIPANTS_RANGE[1],
                        "default": DEFAULT_MAX_PARTICIPANTS,
                    },
                },
                "description": _BODY_RULES,
            },
            "Meeting": {
                "type": "object",
                "additionalProperties": False,
                "required": [
                    "meeting_id",
                    "meeting_code",
                    "display_name",
                    "allow_guests",
                    "max_participants",
                ],
                "properties": {
                    "meeting_id": {"type": "string", "format": "uuid"},
                    "meeting_code": _MEETING_CODE_SCHEMA,
                    "display_name": {"type": "string"},
                    "allow_guests": {"type": "boolean"},
                    "max_participants": {"type": "integer"},
                },
            },
            "GuestTokenRequest": {
                "type": "object",
                "additionalProperties": False,
                "required": ["display_name"],
                "properties": {
                    "display_name": {
                        "type": "string",
                        "minLength": GUEST_NAME_CHARS[0],
                        "maxLength": GUEST_NAME_CHARS[1],
                        "description": "The guest's name, carried in the meeting token. "
                        + _NAME_RULES,
                    }
                },
                "description": _BODY_RULES,
            },
            "JoinResponse": {
                "type": "object",
                "additionalProperties": False,
                "required": [
                    "meeting_id",
                    "display_name",
                    "token",
                    "expires_in",
                    "mc",
                    "media_handlers",
                ],
                "properties": {
                    "meeting_id": {"type": "string", "format": "uuid"},
                    "display_name": {"type": "string", "description": "The meeting's name."},
                    "token": {
                        "type": "string",
                        "description": (
                            "Meeting token (EdDSA JWT, aud `mc`, scope `meeting.participant`, "
                            "`meeting_id`, `jti`); verify with /.well-known/jwks.json."
                        ),
                    },
                    "expires_in": {
                        "type": "integer",
                        "const": MEETING_TOKEN_TTL_S,
                        "description": "Seconds until the token expires.",
                    },
                    "mc": _ref("schemas", "MeetingController"),
                    "media_handlers": {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": 2,
                        "items": _ref("schemas", "MediaHandler"),
                        "description": "The primary first, then the backup if there is one.",
                    },
                },
            },
            "MeetingController": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "grpc_endpoint", "webtransport_endpoint"],
                "properties": {
                    "id": {"type": "string"},
                    "grpc_endpoint": {"type": "string"},
                    "webtransport_endpoint": {"type": "string"},
                },
            },
            "MediaHandler": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "webtransport_endpoint", "role"],
                "properties": {
                    "id": {"type": "string"},
                    "webtransport_endpoint": {"type": "string"},
                    "role": {"type": "string", "enum": ["primary", "backup"]},
                },
            },
            "Jwks": {
                "type": "object",
                "required": ["keys"],
                "properties": {
                    "keys": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["kty", "crv", "x", "kid"],
                            "properties": {
                                "kty": {"const": "OKP"},
                                "crv": {"const": "Ed25519"},
                                "x": {"type": "string"},
                                "kid": {"type": "string"},
                                "alg": {"const": "EdDSA"},
                                "use": {"const": "sig"},
                            },
                        },
                    }
                },
            },
            "Error": {
                "type": "object",
                "additionalProperties": False,
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"type": "string", "enum": _ERROR_CODES},
                            "message": {
                                "type": "string",
                                "description": (
                                    "For people; for INVALID_REQUEST it names the field and "
                                    "its rule, never the value sent."
                                ),
                            },
                        },
                    }
                },
            },
        },
        "headers": {
            "RetryAfter": {
                "description": "Whole seconds to wait before retrying (at least 1).",
                "required": True,
                "schema": {"type": "integer", "minimum": 1},
            },
            "WwwAuthenticate": {
                "description": "`Bearer` (RFC 6750).",
                "required": True,
                "schema": {"type": "string"},
            },
        },
        "responses": {
            "Joined": _json(
                _ref("schemas", "JoinResponse"),
                "The assignment and a meeting token. Sent with `Cache-Control: no-store`.",
            ),
            "InvalidRequest": _json(
                _ref("schemas", "Error"),
                "INVALID_REQUEST: a field, the path's code or the body breaks its rule.",
            ),
            "Unauthorized": {
                **_json(
                    _ref("schemas", "Error"),
                    "UNAUTHORIZED: the bearer token is missing, malformed, expired or not "
                    "signed by a trusted key.",
                ),
                "headers": {"WWW-Authenticate": _ref("headers", "WwwAuthenticate")},
            },
            "Forbidden": _json(
                _ref("schemas", "Error"),
                "FORBIDDEN: the token does not grant this call (audience, scope, org_id, "
                "an unusable or reserved sub).",
            ),
            "NotFound": _json(
                _ref("schemas", "Error"),
                "NOT_FOUND: no such meeting visible to the caller (for a guest: none "
                "that admits guests - a members-only code looks like a missing one).",
            ),
            "RateLimited": {
                **_json(
                    _ref("schemas", "Error"),
                    "RATE_LIMITED: too many requests from this client (guest joins: its "
                    "address; creates: its user); retry after `Retry-After`.",
                ),
                "headers": {"Retry-After": _ref("headers", "RetryAfter")},
            },
            "ServiceUnavailable": {
                **_json(
                    _ref("schemas", "Error"),
                    "SERVICE_UNAVAILABLE: no capacity, the database is unreachable or the "
                    "request deadline passed; retry later.",
                ),
                "headers": {"Retry-After": _ref("headers", "RetryAfter")},
            },
            "Internal": _json(_ref("schemas", "Error"), "INTERNAL: an unexpected error."),
        },
    },
}
