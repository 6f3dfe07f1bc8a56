"""Test support for the Global Controller: keys, tokens, config, a running
GC in-process, and gRPC clients (real grpclib over loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpclib.client import Channel

from darktower.gc.app import GcEndpoints, run_gc
from darktower.gc.config import GcConfig
from darktower.gc.health_checker import SweepResult
from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb
from darktower.shared import keys, tokens
from darktower.shared.seam import run_aio


@dataclass
class DevKeys:
    """A signing key, its JWKS file and helpers to mint tokens with it."""

    directory: Path
    private_key: Ed25519PrivateKey
    kid: str

    @property
    def jwks_path(self) -> Path:
        return self.directory / "jwks.json"

    @property
    def key_path(self) -> Path:
        return self.directory / "signing_key.pem"

    @classmethod
    def create(cls, directory: Path) -> DevKeys:
        directory.mkdir(parents=True, exist_ok=True)
        private_key = keys.generate_private_key()
        keys.save_private_key(private_key, directory / "signing_key.pem")
        keys.write_jwks(directory / "jwks.json", [keys.public_jwk(private_key.public_key())])
        return cls(directory, private_key, keys.key_id(private_key.public_key()))

    def mc_token(self, mc_id: str, *, ttl_s: int = 3600, now: float | None = None) -> str:
        return tokens.mint_mc_token(
            self.private_key, kid=self.kid, mc_id=mc_id, ttl_s=ttl_s, now=now
        )

    def mh_token(self, mh_id: str) -> str:
        return tokens.mint_mh_token(self.private_key, kid=self.kid, mh_id=mh_id)

    def gc_token(self, gc_id: str = "gc-test") -> str:
        return tokens.mint_gc_token(self.private_key, kid=self.kid, gc_id=gc_id)


def gc_environ(dev_keys: DevKeys, database_dsn: str, **overrides: str) -> dict[str, str]:
    """A complete GC environment binding free ports on loopback."""
    gc_id = overrides.get("GC_ID", "gc-test")
    environ = {
        "DATABASE_URL": database_dsn,
        "AUTH_JWKS": str(dev_keys.jwks_path),
        "GC_SIGNING_KEY": str(dev_keys.key_path),
        # Its subject must be the GC's id (MCs check it; so does the GC's config).
        "GC_SERVICE_TOKEN": dev_keys.gc_token(gc_id),
        "GC_GRPC_ADDR": "127.0.0.1:0",
        "GC_HTTP_ADDR": "127.0.0.1:0",
        "GC_ID": gc_id,
    }
    environ.update(overrides)
    return environ


def metadata(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def mc_registration(mc_id: str, **overrides: object) -> pb.RegisterMCRequest:
    fields: dict[str, object] = {
        "id": mc_id,
        "region": "local",
        "grpc_endpoint": "http://127.0.0.1:50052",
        "webtransport_endpoint": "https://127.0.0.1:4433",
        "max_meetings": 100,
        "max_participants": 1000,
    }
    fields.update(overrides)
    return pb.RegisterMCRequest(**fields)  # type: ignore[arg-type]


def mh_registration(mh_id: str, **overrides: object) -> pb.RegisterMHRequest:
    fields: dict[str, object] = {
        "handler_id": mh_id,
        "region": "local",
        "webtransport_endpoint": "https://127.0.0.1:4434",
        "grpc_endpoint": "http://127.0.0.1:50060",
        "max_streams": 500,
        "zone": "zone-a",
    }
    fields.update(overrides)
    return pb.RegisterMHRequest(**fields)  # type: ignore[arg-type]


@dataclass
class GcClients:
    """Asyncio-flavoured stubs on one channel to a GC (use via ``run_aio``)."""

    channel: Channel
    mc: internal_grpc.GlobalControllerServiceStub = field(init=False)
    mh: internal_grpc.MediaHandlerRegistryServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.mc = internal_grpc.GlobalControllerServiceStub(self.channel)
        self.mh = internal_grpc.MediaHandlerRegistryServiceStub(self.channel)


@dataclass
class RunningGc:
    config: GcConfig
    endpoints: GcEndpoints
    sweeps: trio.MemoryReceiveChannel[SweepResult]
    cancel_scope: trio.CancelScope


@asynccontextmanager
async def running_gc(environ: dict[str, str]) -> AsyncIterator[RunningGc]:
    """A GC in this trio run (call inside the ``aio_loop`` fixture). Sweep
    results of its health checkers arrive on ``sweeps`` (buffered)."""
    config = GcConfig.from_env(environ)
    send, receive = trio.open_memory_channel[SweepResult](1000)

    def on_sweep(result: SweepResult) -> None:
        send.send_nowait(result)

    async with trio.open_nursery() as nursery:
        endpoints: GcEndpoints = await nursery.start(_run, config, on_sweep)
        yield RunningGc(config, endpoints, receive, nursery.cancel_scope)
        nursery.cancel_scope.cancel()


async def _run(
    config: GcConfig,
    on_sweep: Callable[[SweepResult], None],
    *,
    task_status: trio.TaskStatus[GcEndpoints] = trio.TASK_STATUS_IGNORED,
) -> None:
    await run_gc(config, on_sweep=on_sweep, task_status=task_status)


@asynccontextmanager
async def grpc_channel(port: int) -> AsyncIterator[Channel]:
    """A grpclib channel to ``127.0.0.1:port``; created and closed on the
    asyncio side (call inside ``aio_loop``). It connects on its first RPC."""

    async def open_channel() -> Channel:
        return Channel("127.0.0.1", port)

    channel = await run_aio(open_channel)
    try:
        yield channel
    finally:

        async def close() -> None:
            channel.close()

        with trio.move_on_after(2, shield=True):
            await run_aio(close)


@asynccontextmanager
async def gc_clients(port: int) -> AsyncIterator[GcClients]:
    """GC stubs on one :func:`grpc_channel` to ``127.0.0.1:port``."""
    async with grpc_channel(port) as channel:
        yield GcClients(channel)
