"""``MeetingControllerService`` (GC → MC), asyncio-flavoured grpclib handler.

The handler validates, checks that the caller is the GC it names, and crosses
into trio once for the whole assignment (ledger, fenced Redis claim, actor),
because coredis and the actors live on the trio side.
"""

from __future__ import annotations

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from darktower.mc.assignment import Assigner, parse_assignment
from darktower.mc.repositories.meeting_state import RedisUnavailable
from darktower.protos import internal_grpc
from darktower.protos import internal_pb2 as pb
from darktower.shared.grpc_server import Requirement, recv_request, require_subject
from darktower.shared.seam import run_trio

#: Only a GC may assign meetings (SPEC §4: aud mc, scope mc.assign).
POLICY: dict[str, Requirement] = {
    "/dark_tower.internal.MeetingControllerService/AssignMeetingWithMh": Requirement(
        "mc", "mc.assign"
    ),
}


class MeetingControllerService(internal_grpc.MeetingControllerServiceBase):
    def __init__(self, assigner: Assigner) -> None:
        self._assigner = assigner

    async def AssignMeetingWithMh(
        self, stream: Stream[pb.AssignMeetingWithMhRequest, pb.AssignMeetingWithMhResponse]
    ) -> None:
        assignment = parse_assignment(await recv_request(stream))
        require_subject(assignment.requesting_gc_id)
        try:
            outcome = await run_trio(self._assigner.assign, assignment)
        except RedisUnavailable:
            raise GRPCError(Status.UNAVAILABLE, "meeting state store unavailable") from None
        await stream.send_message(
            pb.AssignMeetingWithMhResponse(
                accepted=outcome.accepted, rejection_reason=outcome.rejection_reason
            )
        )
