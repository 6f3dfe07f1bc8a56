"""The Meeting Controller's configuration (SPEC §8), read once at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from darktower.shared.config import (
    AUTH_JWKS,
    REGION,
    ConfigError,
    HostPort,
    Secret,
    Var,
    default_node_id,
    parse_endpoint,
    parse_float_range,
    parse_host_port,
    parse_int_range,
    parse_log_level,
    parse_node_id,
    parse_optional_node_id,
    parse_service_token,
    token_subject,
)


def _parse_optional_endpoint(raw: str) -> str:
    return raw and parse_endpoint(raw)


def _parse_redis_url(raw: str) -> Secret:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    return Secret(raw)


REDIS_URL = Var("REDIS_URL", "Redis URL", _parse_redis_url, secret=True)
GC_GRPC_URL = Var("GC_GRPC_URL", "where the GC's gRPC is", parse_endpoint, "http://127.0.0.1:50051")
MC_ID = Var("MC_ID", "this MC's id (unset: mc-<hostname>-<random>)", parse_optional_node_id, "")
GRPC_ADDR = Var("MC_GRPC_ADDR", "gRPC bind address", parse_host_port, "127.0.0.1:50052")
GRPC_ENDPOINT = Var(
    "MC_GRPC_ENDPOINT", "advertised gRPC endpoint (unset: derived from the bind)",
    _parse_optional_endpoint, "",
)  # fmt: skip
WEBTRANSPORT_ENDPOINT = Var(
    "MC_WEBTRANSPORT_ENDPOINT", "advertised client endpoint", parse_endpoint,
    "https://127.0.0.1:4433",
)  # fmt: skip
HTTP_ADDR = Var("MC_HTTP_ADDR", "health + metrics bind address", parse_host_port, "127.0.0.1:8081")
MAX_MEETINGS = Var("MC_MAX_MEETINGS", "meetings capacity", parse_int_range(1, 2**31 - 1), "1000")
MAX_PARTICIPANTS = Var(
    "MC_MAX_PARTICIPANTS", "participants capacity", parse_int_range(1, 2**31 - 1), "10000"
)
EMPTY_MEETING_TIMEOUT_S = Var(
    "MC_EMPTY_MEETING_TIMEOUT_S", "a hosted meeting with no participant this long is ended",
    parse_float_range(0.1, 86_400), "300",
)  # fmt: skip
DRAIN_TIMEOUT_S = Var(
    "MC_DRAIN_TIMEOUT_S", "bound on the drain at SIGTERM", parse_float_range(0, 3600), "30"
)
FENCE_CHECK_INTERVAL_S = Var(
    "MC_FENCE_CHECK_INTERVAL_S", "how often hosted meetings are checked against Redis's fence",
    parse_float_range(0.05, 3600), "5",
)  # fmt: skip
SERVICE_TOKEN = Var(
    "MC_SERVICE_TOKEN", "token the MC presents to the GC", parse_service_token, secret=True
)
LOG_LEVEL = Var("MC_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", parse_log_level, "INFO")

VARIABLES: tuple[Var[Any], ...] = (
    REDIS_URL, GC_GRPC_URL, MC_ID, REGION, GRPC_ADDR, GRPC_ENDPOINT, WEBTRANSPORT_ENDPOINT,
    HTTP_ADDR, MAX_MEETINGS, MAX_PARTICIPANTS, EMPTY_MEETING_TIMEOUT_S, DRAIN_TIMEOUT_S,
    FENCE_CHECK_INTERVAL_S, SERVICE_TOKEN, AUTH_JWKS, LOG_LEVEL,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class McConfig:
    redis_url: Secret
    gc_grpc_url: str
    mc_id: str
    region: str
    grpc_addr: HostPort
    grpc_endpoint: str
    webtransport_endpoint: str
    http_addr: HostPort
    max_meetings: int
    max_participants: int
    empty_meeting_timeout_s: float
    drain_timeout_s: float
    fence_check_interval_s: float
    service_token: Secret
    # URLs may carry credentials (user-info, query): kept out of repr.
    auth_jwks: tuple[str, ...] = field(repr=False)
    log_level: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> McConfig:
        """Read and validate every variable; raises :class:`ConfigError`
        naming the first bad one."""
        grpc_addr = GRPC_ADDR.read(environ)
        advertised = GRPC_ENDPOINT.read(environ)
        if not advertised:
            if grpc_addr.port == 0 or grpc_addr.host in ("0.0.0.0", "::"):  # noqa: S104 - compared, not bound
                raise ConfigError(
                    "MC_GRPC_ENDPOINT is required when MC_GRPC_ADDR is a wildcard host or port 0"
                )
            advertised = f"http://{grpc_addr}"
        service_token = SERVICE_TOKEN.read(environ)
        subject = token_subject(service_token)
        mc_id = MC_ID.read(environ)
        if not mc_id:
            # The token says who this MC is; without one, a generated id.
            mc_id = subject if subject else default_node_id("mc")
        if subject != mc_id:
            raise ConfigError("MC_SERVICE_TOKEN is not for this MC (its sub is not MC_ID)")
        try:
            parse_node_id(mc_id)
        except ValueError:
            raise ConfigError("MC_SERVICE_TOKEN: its sub is not a valid MC id") from None
        return cls(
            redis_url=REDIS_URL.read(environ),
            gc_grpc_url=GC_GRPC_URL.read(environ),
            mc_id=mc_id,
            region=REGION.read(environ),
            grpc_addr=grpc_addr,
            grpc_endpoint=advertised,
            webtransport_endpoint=WEBTRANSPORT_ENDPOINT.read(environ),
            http_addr=HTTP_ADDR.read(environ),
            max_meetings=MAX_MEETINGS.read(environ),
            max_participants=MAX_PARTICIPANTS.read(environ),
            empty_meeting_timeout_s=EMPTY_MEETING_TIMEOUT_S.read(environ),
            drain_timeout_s=DRAIN_TIMEOUT_S.read(environ),
            fence_check_interval_s=FENCE_CHECK_INTERVAL_S.read(environ),
            service_token=service_token,
            auth_jwks=AUTH_JWKS.read(environ),
            log_level=LOG_LEVEL.read(environ),
        )
