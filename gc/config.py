"""The Global Controller's configuration (SPEC §8), read once at start."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from darktower.gc.join_errors import MAX_ATTEMPTS
from darktower.shared.config import (
    AUTH_JWKS,
    REGION,
    ConfigError,
    HostPort,
    Secret,
    Var,
    default_node_id,
    parse_dsn,
    parse_float_range,
    parse_host_port,
    parse_int_range,
    parse_log_level,
    parse_optional_node_id,
    parse_service_token,
    token_subject,
)
from darktower.shared.keys import KeyFileError, load_private_key


def _parse_key_path(raw: str) -> Path:
    """The path, once the key in it has been loaded: a GC must not start and
    only fail at its first join because the key file is wrong."""
    try:
        load_private_key(raw)
    except KeyFileError:
        raise ValueError("not a readable Ed25519 private key (PEM)") from None
    return Path(raw)


_MS = parse_int_range(100, 3_600_000)

DATABASE_URL = Var("DATABASE_URL", "PostgreSQL DSN", parse_dsn, secret=True)
HTTP_ADDR = Var("GC_HTTP_ADDR", "HTTP bind address", parse_host_port, "127.0.0.1:8080")
GRPC_ADDR = Var("GC_GRPC_ADDR", "gRPC bind address", parse_host_port, "127.0.0.1:50051")
GC_ID = Var(
    "GC_ID", "this instance's id (unset: gc-<hostname>-<random>)", parse_optional_node_id, ""
)
SIGNING_KEY = Var(
    "GC_SIGNING_KEY", "Ed25519 private key (PEM path) for meeting tokens", _parse_key_path
)
SERVICE_TOKEN = Var(
    "GC_SERVICE_TOKEN", "token the GC presents to MCs", parse_service_token, secret=True
)
STALE_AFTER_S = Var(
    "GC_STALE_AFTER_S",
    "heartbeat age (s) after which a node is unhealthy",
    parse_float_range(1, 3600),
    "30",
)
HEALTH_CHECK_INTERVAL_S = Var(
    "GC_HEALTH_CHECK_INTERVAL_S",
    "how often (s) the health checkers run",
    parse_float_range(0.1, 600),
    "5",
)
FAST_HEARTBEAT_MS = Var(
    "GC_FAST_HEARTBEAT_MS", "fast heartbeat interval handed to MCs", _MS, "10000"
)
COMPREHENSIVE_HEARTBEAT_MS = Var(
    "GC_COMPREHENSIVE_HEARTBEAT_MS", "comprehensive heartbeat interval handed to MCs", _MS, "30000"
)
LOAD_REPORT_MS = Var("GC_LOAD_REPORT_MS", "load report interval handed to MHs", _MS, "10000")
DB_POOL_SIZE = Var(
    "GC_DB_POOL_SIZE", "PostgreSQL connections per GC process", parse_int_range(1, 200), "10"
)
MC_RPC_TIMEOUT_S = Var(
    "GC_MC_RPC_TIMEOUT_S",
    "deadline (s) of one AssignMeetingWithMh call to an MC",
    parse_float_range(0.1, 60),
    "10",
)
MC_CONNECT_TIMEOUT_S = Var(
    "GC_MC_CONNECT_TIMEOUT_S",
    "bound (s) on connecting to an MC",
    parse_float_range(0.1, 60),
    "5",
)
JOIN_TIMEOUT_S = Var(
    "GC_JOIN_TIMEOUT_S",
    "deadline (s) of one HTTP request, a join's MC attempts included",
    parse_float_range(1, 300),
    "40",
)
GUEST_TOKENS_PER_MINUTE = Var(
    "GC_GUEST_TOKENS_PER_MINUTE",
    "guest joins allowed per client address per minute",
    parse_int_range(1, 10_000),
    "10",
)
CREATES_PER_MINUTE = Var(
    "GC_CREATES_PER_MINUTE",
    "meetings one user (token org_id and sub) may create per minute, per GC process",
    parse_int_range(1, 1_000_000),
    "30",
)
RETENTION_DAYS = Var(
    "GC_ASSIGNMENT_RETENTION_DAYS",
    "days an ended assignment is kept before it is deleted",
    parse_float_range(0.001, 3650),
    "7",
)
INACTIVE_AFTER_S = Var(
    "GC_INACTIVE_MEETING_S",
    "seconds without a join after which a dead MC's assignment is ended",
    parse_float_range(1, 30 * 86400),
    "3600",
)
CLEANUP_INTERVAL_S = Var(
    "GC_CLEANUP_INTERVAL_S",
    "how often (s) the cleanup task runs",
    parse_float_range(0.1, 86400),
    "60",
)
LOG_LEVEL = Var("GC_LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", parse_log_level, "INFO")

VARIABLES: tuple[Var[Any], ...] = (
    DATABASE_URL, HTTP_ADDR, GRPC_ADDR, GC_ID, REGION, AUTH_JWKS, SIGNING_KEY, SERVICE_TOKEN,
    STALE_AFTER_S, HEALTH_CHECK_INTERVAL_S, FAST_HEARTBEAT_MS, COMPREHENSIVE_HEARTBEAT_MS,
    LOAD_REPORT_MS, DB_POOL_SIZE, MC_RPC_TIMEOUT_S, MC_CONNECT_TIMEOUT_S, JOIN_TIMEOUT_S,
    GUEST_TOKENS_PER_MINUTE, CREATES_PER_MINUTE, RETENTION_DAYS, INACTIVE_AFTER_S,
    CLEANUP_INTERVAL_S, LOG_LEVEL,
)  # fmt: skip


def _gc_id(environ: Mapping[str, str]) -> str:
    """``GC_ID``, or the ``sub`` of the GC's service token when unset: an MC
    accepts an assignment only from the GC its token names (SPEC §4), so a GC
    whose id differs from its token's would have every assignment refused."""
    subject = token_subject(SERVICE_TOKEN.read(environ))
    gc_id = GC_ID.read(environ) or subject or default_node_id("gc")
    if subject != gc_id:
        raise ConfigError("GC_SERVICE_TOKEN is not for this GC (its sub is not GC_ID)")
    try:
        parse_optional_node_id(gc_id)
    except ValueError:
        raise ConfigError("GC_SERVICE_TOKEN: its sub is not a valid GC id") from None
    return gc_id


@dataclass(frozen=True, slots=True)
class GcConfig:
    database_url: Secret
    http_addr: HostPort
    grpc_addr: HostPort
    gc_id: str
    region: str
    # URLs may carry credentials (user-info, query): kept out of repr.
    auth_jwks: tuple[str, ...] = field(repr=False)
    signing_key: Path
    service_token: Secret
    stale_after_s: float
    health_check_interval_s: float
    fast_heartbeat_ms: int
    comprehensive_heartbeat_ms: int
    load_report_ms: int
    db_pool_size: int
    mc_rpc_timeout_s: float
    mc_connect_timeout_s: float
    join_timeout_s: float
    guest_tokens_per_minute: int
    creates_per_minute: int
    retention_days: float
    inactive_after_s: float
    cleanup_interval_s: float
    log_level: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> GcConfig:
        """Read and validate every variable; raises :class:`ConfigError`
        naming the first bad one."""
        config = cls(
            database_url=DATABASE_URL.read(environ),
            http_addr=HTTP_ADDR.read(environ),
            grpc_addr=GRPC_ADDR.read(environ),
            gc_id=_gc_id(environ),
            region=REGION.read(environ),
            auth_jwks=AUTH_JWKS.read(environ),
            signing_key=SIGNING_KEY.read(environ),
            service_token=SERVICE_TOKEN.read(environ),
            stale_after_s=STALE_AFTER_S.read(environ),
            health_check_interval_s=HEALTH_CHECK_INTERVAL_S.read(environ),
            fast_heartbeat_ms=FAST_HEARTBEAT_MS.read(environ),
            comprehensive_heartbeat_ms=COMPREHENSIVE_HEARTBEAT_MS.read(environ),
            load_report_ms=LOAD_REPORT_MS.read(environ),
            db_pool_size=DB_POOL_SIZE.read(environ),
            mc_rpc_timeout_s=MC_RPC_TIMEOUT_S.read(environ),
            mc_connect_timeout_s=MC_CONNECT_TIMEOUT_S.read(environ),
            join_timeout_s=JOIN_TIMEOUT_S.read(environ),
            guest_tokens_per_minute=GUEST_TOKENS_PER_MINUTE.read(environ),
            creates_per_minute=CREATES_PER_MINUTE.read(environ),
            retention_days=RETENTION_DAYS.read(environ),
            inactive_after_s=INACTIVE_AFTER_S.read(environ),
            cleanup_interval_s=CLEANUP_INTERVAL_S.read(environ),
            log_level=LOG_LEVEL.read(environ),
        )
        # The health checker's safety argument (gc/health_checker.py): a live
        # node is never older than one report interval, and the checker's own
        # blind spot (1.5 ticks) must leave that interval inside the threshold.
        for name, interval_ms in (
            ("GC_FAST_HEARTBEAT_MS", config.fast_heartbeat_ms),
            ("GC_LOAD_REPORT_MS", config.load_report_ms),
        ):
            if interval_ms / 1000 >= config.stale_after_s:
                raise ConfigError(f"{name} must be shorter than GC_STALE_AFTER_S")
            if 1.5 * config.health_check_interval_s > config.stale_after_s - interval_ms / 1000:
                raise ConfigError(
                    "GC_HEALTH_CHECK_INTERVAL_S is too long: 1.5 x it plus "
                    f"{name} must not exceed GC_STALE_AFTER_S"
                )
        # A deadline that cuts a join's last MC call short answers 503 while
        # that MC may be accepting: an orphan on every slow MC.
        if config.join_timeout_s <= MAX_ATTEMPTS * config.mc_rpc_timeout_s:
            raise ConfigError(
                f"GC_JOIN_TIMEOUT_S must be longer than {MAX_ATTEMPTS} x GC_MC_RPC_TIMEOUT_S"
            )
        return config
