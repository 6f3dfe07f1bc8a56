"""The assignment floor: ``python -m darktower.cli.bench.assign_floor --key-prefix P``.

The least any implementation of ``AssignMeetingWithMh`` on our stack can
cost: a bare grpclib server (plain ``asyncio.run``) whose handler makes the
MC's fenced claim - one coredis ``EVALSHA`` of the MC's own script
(``mc/fencing.lua``), with the MC's keys and arguments - and answers. No
authentication, no validation, no capacity ledger, no actor, no metrics, no
logging, no trio. The load generator sends it exactly what it sends the MC.

The script bytes, its SHA-1 and the key layout come from
:mod:`darktower.mc.repositories.meeting_state`, which imports coredis, trio
(for the MC's batching task: imported here, never run, and it changes nothing
in asyncio) and two small :mod:`darktower.shared` modules - no
``trio_asyncio``, which would patch asyncio process-wide; the
payload is encoded by the MC's own encoder (:func:`encode_mh_assignments`,
so Redis stores the same bytes).
coredis is anyio-based and runs here on anyio's asyncio backend. The server
reports ``{"port": N, "trio_asyncio_loaded": false}`` on stdout once it
listens, so the parent can refuse a "plain asyncio" floor that is not;
SIGTERM or SIGINT stop it. Keys are under ``--key-prefix`` (the bench's
unique prefix, deleted by the bench at the end); ``REDIS_URL`` comes from
the environment (it may hold a password).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any

import coredis
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from darktower.mc.repositories.meeting_state import (
    FENCING_SCRIPT,
    FENCING_SHA,
    MeetingStateStore,
    encode_mh_assignments,
)
from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb

#: The fencing script's outcomes that mean "claimed" (see ``fencing.lua``).
_CLAIMED = frozenset({b"CLAIMED", b"TOOK_OVER", b"ALREADY_OWNED"})


def claim_payload(request: pb.AssignMeetingWithMhRequest) -> bytes:
    """What the MC stores for the request's media handlers (compact JSON,
    sorted keys), without the MC's validation."""
    return encode_mh_assignments(
        [
            {"mh_id": mh.mh_id, "role": mh.role, "webtransport_endpoint": mh.webtransport_endpoint}
            for mh in request.mh_assignments
        ]
    )


class FloorService(internal_grpc.MeetingControllerServiceBase):
    """One EVALSHA per assignment, the answer derived from its outcome."""

    def __init__(self, client: coredis.Redis[Any], key_prefix: str, mc_id: str) -> None:
        self._client = client
        # Only for the key layout (no I/O): the floor's keys are the MC's
        # keys, under the bench's prefix.
        self._keys = MeetingStateStore(client, key_prefix=key_prefix).keys
        self._mc_id = mc_id

    async def AssignMeetingWithMh(
        self, stream: Stream[pb.AssignMeetingWithMhRequest, pb.AssignMeetingWithMhResponse]
    ) -> None:
        request = await stream.recv_message()
        assert request is not None
        reply = await self._client.evalsha(
            FENCING_SHA,
            self._keys(request.meeting_id),
            ["claim", str(request.generation), self._mc_id, claim_payload(request)],
        )
        if not isinstance(reply, list | tuple) or not reply:
            raise GRPCError(Status.INTERNAL, "unexpected fencing reply")
        await stream.send_message(pb.AssignMeetingWithMhResponse(accepted=reply[0] in _CLAIMED))


async def _serve(redis_url: str, key_prefix: str, mc_id: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    client: coredis.Redis[Any] = coredis.Redis.from_url(redis_url)
    async with client:
        # Loaded once, as the MC does at start-up (EVALSHA thereafter).
        await client.script_load(FENCING_SCRIPT)
        server = Server([FloorService(client, key_prefix, mc_id)])
        await server.start("127.0.0.1", 0)
        listener: asyncio.Server | None = getattr(server, "_server", None)
        assert listener is not None
        port: int = listener.sockets[0].getsockname()[1]
        ready = {"port": port, "trio_asyncio_loaded": "trio_asyncio" in sys.modules}
        print(json.dumps(ready), flush=True)
        await stop.wait()
        server.close()
        await asyncio.wait_for(server.wait_closed(), timeout=10.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m darktower.cli.bench.assign_floor")
    parser.add_argument("--key-prefix", required=True, help="prefix of every key written")
    parser.add_argument("--mc-id", default="mc-bench", help="owner recorded by the claims")
    args = parser.parse_args(argv)
    redis_url = os.environ.get("REDIS_URL", "")
    if not redis_url:
        print("error: REDIS_URL is not set", file=sys.stderr)
        return 2
    asyncio.run(_serve(redis_url, args.key_prefix, args.mc_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
