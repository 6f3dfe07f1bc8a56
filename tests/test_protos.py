"""Tests for the internal gRPC protocol and its committed generated code.

The ``.proto`` is a wire contract shared with components that may be built
from other revisions, so field numbers, names and types are pinned here
independently of the ``.proto`` text: renumbering a field, or retyping it,
must fail a test rather than silently break interop. The generated Python is
committed, so we also prove it still matches the ``.proto``.
"""

from __future__ import annotations

from pathlib import Path

import grpclib.const
import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from darktower.protos import generate, internal_grpc
from darktower.protos import internal_pb2 as pb

PACKAGE = "dark_tower.internal"

# Field type and label constants, shortened so the contract tables read well.
STRING = FieldDescriptor.TYPE_STRING
UINT32 = FieldDescriptor.TYPE_UINT32
UINT64 = FieldDescriptor.TYPE_UINT64
BOOL = FieldDescriptor.TYPE_BOOL
FLOAT = FieldDescriptor.TYPE_FLOAT
ENUM = FieldDescriptor.TYPE_ENUM
MESSAGE = FieldDescriptor.TYPE_MESSAGE

#: Field spec: (name, number, type, full name of the message/enum type or
#: None for scalars, repeated?).
Field = tuple[str, int, int, str | None, bool]


def _f(name: str, number: int, type_: int, type_name: str | None = None) -> Field:
    """A singular field spec; ``type_name`` is unqualified within PACKAGE."""
    return (name, number, type_, f"{PACKAGE}.{type_name}" if type_name else None, False)


def _repeated(name: str, number: int, type_: int, type_name: str) -> Field:
    """A repeated field spec."""
    return (name, number, type_, f"{PACKAGE}.{type_name}", True)


#: The wire contract for every message: exactly these fields, no others.
MESSAGES: dict[str, list[Field]] = {
    "ControllerCapacity": [
        _f("max_meetings", 1, UINT32),
        _f("current_meetings", 2, UINT32),
        _f("max_participants", 3, UINT32),
        _f("current_participants", 4, UINT32),
    ],
    "RegisterMCRequest": [
        _f("id", 1, STRING),
        _f("region", 2, STRING),
        _f("grpc_endpoint", 3, STRING),
        _f("webtransport_endpoint", 4, STRING),
        _f("max_meetings", 5, UINT32),
        _f("max_participants", 6, UINT32),
    ],
    "RegisterMCResponse": [
        _f("accepted", 1, BOOL),
        _f("message", 2, STRING),
        _f("fast_heartbeat_interval_ms", 3, UINT64),
        _f("comprehensive_heartbeat_interval_ms", 4, UINT64),
    ],
    "FastHeartbeatRequest": [
        _f("controller_id", 1, STRING),
        _f("capacity", 2, MESSAGE, "ControllerCapacity"),
        _f("health", 3, ENUM, "HealthStatus"),
    ],
    "ComprehensiveHeartbeatRequest": [
        _f("controller_id", 1, STRING),
        _f("capacity", 2, MESSAGE, "ControllerCapacity"),
        _f("health", 3, ENUM, "HealthStatus"),
        _f("cpu_usage_percent", 4, FLOAT),
        _f("memory_usage_percent", 5, FLOAT),
    ],
    "HeartbeatResponse": [
        _f("acknowledged", 1, BOOL),
        _f("timestamp", 2, UINT64),
    ],
    "NotifyMeetingEndedRequest": [
        _f("meeting_id", 1, STRING),
        _f("region", 2, STRING),
        _f("generation", 3, UINT64),
    ],
    "NotifyMeetingEndedResponse": [
        _f("acknowledged", 1, BOOL),
    ],
    "RegisterMHRequest": [
        _f("handler_id", 1, STRING),
        _f("region", 2, STRING),
        _f("webtransport_endpoint", 3, STRING),
        _f("grpc_endpoint", 4, STRING),
        _f("max_streams", 5, UINT32),
        _f("zone", 6, STRING),
    ],
    "RegisterMHResponse": [
        _f("accepted", 1, BOOL),
        _f("message", 2, STRING),
        _f("load_report_interval_ms", 3, UINT64),
    ],
    "MHLoadReportRequest": [
        _f("handler_id", 1, STRING),
        _f("current_streams", 2, UINT32),
        _f("health", 3, ENUM, "HealthStatus"),
        _f("cpu_usage_percent", 4, FLOAT),
        _f("memory_usage_percent", 5, FLOAT),
        _f("bandwidth_usage_percent", 6, FLOAT),
    ],
    "MHLoadReportResponse": [
        _f("acknowledged", 1, BOOL),
        _f("timestamp", 2, UINT64),
    ],
    "MhAssignment": [
        _f("mh_id", 1, STRING),
        _f("webtransport_endpoint", 2, STRING),
        _f("role", 3, ENUM, "MhRole"),
    ],
    "AssignMeetingWithMhRequest": [
        _f("meeting_id", 1, STRING),
        _repeated("mh_assignments", 2, MESSAGE, "MhAssignment"),
        _f("requesting_gc_id", 3, STRING),
        _f("generation", 4, UINT64),
    ],
    "AssignMeetingWithMhResponse": [
        _f("accepted", 1, BOOL),
        _f("rejection_reason", 2, ENUM, "RejectionReason"),
    ],
}

#: The wire contract for every enum: exactly these values.
ENUMS: dict[str, dict[str, int]] = {
    "HealthStatus": {
        "PENDING": 0,
        "HEALTHY": 1,
        "DEGRADED": 2,
        "UNHEALTHY": 3,
        "DRAINING": 4,
    },
    "MhRole": {
        "MH_ROLE_UNSPECIFIED": 0,
        "MH_ROLE_PRIMARY": 1,
        "MH_ROLE_BACKUP": 2,
    },
    "RejectionReason": {
        "REJECTION_REASON_UNSPECIFIED": 0,
        "REJECTION_REASON_AT_CAPACITY": 1,
        "REJECTION_REASON_DRAINING": 2,
        "REJECTION_REASON_UNHEALTHY": 3,
    },
}

#: The wire contract for every service: method -> (request, response).
SERVICES: dict[str, dict[str, tuple[str, str]]] = {
    "GlobalControllerService": {
        "RegisterMC": ("RegisterMCRequest", "RegisterMCResponse"),
        "FastHeartbeat": ("FastHeartbeatRequest", "HeartbeatResponse"),
        "ComprehensiveHeartbeat": ("ComprehensiveHeartbeatRequest", "HeartbeatResponse"),
        "NotifyMeetingEnded": ("NotifyMeetingEndedRequest", "NotifyMeetingEndedResponse"),
    },
    "MediaHandlerRegistryService": {
        "RegisterMH": ("RegisterMHRequest", "RegisterMHResponse"),
        "SendLoadReport": ("MHLoadReportRequest", "MHLoadReportResponse"),
    },
    "MeetingControllerService": {
        "AssignMeetingWithMh": ("AssignMeetingWithMhRequest", "AssignMeetingWithMhResponse"),
    },
}


# --- (a) the committed generated code matches the .proto -------------------


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """Regenerating from internal.proto reproduces the committed files byte for byte.

    Runs the real toolchain (protoc plus plugins), so it also proves the
    generator works in this environment.
    """
    fresh = generate.generate(tmp_path)

    assert sorted(fresh) == generate.generated_names()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(fresh)
    stale = generate.stale_files(generate.PROTO_DIR, fresh)
    assert not stale, (
        f"generated protobuf code is stale: {', '.join(stale)}; "
        "run `nox -s protos` (python -m darktower.protos.generate) and commit the result"
    )


def test_generation_is_deterministic(tmp_path: Path) -> None:
    """Two runs produce identical bytes, so freshness checks cannot flap."""
    first = generate.generate(tmp_path / "first")
    second = generate.generate(tmp_path / "second")

    assert first == second


def test_check_reports_stale_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--check`` names each stale or missing file and exits 1."""
    fresh = generate.generate(tmp_path)
    (tmp_path / "internal_pb2.py").write_bytes(b"# tampered\n")
    (tmp_path / "internal_grpc.py").unlink()
    monkeypatch.setattr(generate, "PROTO_DIR", tmp_path)
    monkeypatch.setattr(generate, "generate", lambda *a, **k: fresh)

    assert generate.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "internal_pb2.py" in err
    assert "internal_grpc.py" in err
    assert "internal_pb2.pyi" not in err
    assert "nox -s protos" in err


def test_generated_imports_are_package_absolute() -> None:
    """The grpclib module imports the messages through the installed package."""
    source = (generate.PROTO_DIR / "internal_grpc.py").read_text()

    assert "import darktower.protos.internal_pb2" in source
    assert pb.DESCRIPTOR.package == PACKAGE


# --- (b) wire contract ---------------------------------------------------------


def _message(name: str) -> Descriptor:
    descriptor: Descriptor = pb.DESCRIPTOR.message_types_by_name[name]
    return descriptor


def test_file_defines_exactly_the_contracted_types() -> None:
    """No message, enum or service is missing, and none was added unpinned."""
    assert set(pb.DESCRIPTOR.message_types_by_name) == set(MESSAGES)
    assert set(pb.DESCRIPTOR.enum_types_by_name) == set(ENUMS)
    assert set(pb.DESCRIPTOR.services_by_name) == set(SERVICES)


@pytest.mark.parametrize("message_name", sorted(MESSAGES))
def test_message_fields(message_name: str) -> None:
    """Every field has its contracted number, type and cardinality."""
    descriptor = _message(message_name)
    assert descriptor.full_name == f"{PACKAGE}.{message_name}"

    actual = [
        (
            field.name,
            field.number,
            field.type,
            field.message_type.full_name
            if field.message_type
            else field.enum_type.full_name
            if field.enum_type
            else None,
            field.is_repeated,
        )
        for field in descriptor.fields
    ]
    assert actual == MESSAGES[message_name]
    # No oneofs: proto3 `optional` would add synthetic ones and change the
    # presence semantics callers rely on.
    assert not descriptor.oneofs


def test_spot_check_field_numbers() -> None:
    """A few fields looked up the way callers do, as a readable sanity check."""
    assert pb.RegisterMCRequest.DESCRIPTOR.fields_by_name["max_participants"].number == 6
    assert pb.RegisterMHRequest.DESCRIPTOR.fields_by_name["zone"].number == 6
    assert pb.AssignMeetingWithMhRequest.DESCRIPTOR.fields_by_name["generation"].number == 4
    assert pb.RegisterMCRequest.MAX_PARTICIPANTS_FIELD_NUMBER == 6


@pytest.mark.parametrize("enum_name", sorted(ENUMS))
def test_enum_values(enum_name: str) -> None:
    """Every enum has exactly its contracted names and numbers."""
    descriptor: EnumDescriptor = pb.DESCRIPTOR.enum_types_by_name[enum_name]

    assert descriptor.full_name == f"{PACKAGE}.{enum_name}"
    assert {v.name: v.number for v in descriptor.values} == ENUMS[enum_name]


def test_enum_module_constants() -> None:
    """Enum values are reachable as module constants, as callers use them."""
    assert pb.HealthStatus.Value("DRAINING") == pb.DRAINING == 4
    assert pb.MH_ROLE_BACKUP == 2
    assert pb.REJECTION_REASON_AT_CAPACITY == 1


@pytest.mark.parametrize("service_name", sorted(SERVICES))
def test_service_methods(service_name: str) -> None:
    """Every service has exactly its contracted unary methods."""
    service = pb.DESCRIPTOR.services_by_name[service_name]

    assert service.full_name == f"{PACKAGE}.{service_name}"
    actual = {
        m.name: (m.input_type.name, m.output_type.name)
        for m in service.methods
        if not m.client_streaming and not m.server_streaming
    }
    assert actual == SERVICES[service_name]
    assert len(service.methods) == len(actual), "no streaming methods are contracted"


def test_round_trip_preserves_every_field() -> None:
    """Serialising and parsing keeps values, including nested and repeated ones."""
    request = pb.AssignMeetingWithMhRequest(
        meeting_id="m-1",
        mh_assignments=[
            pb.MhAssignment(
                mh_id="mh-a", webtransport_endpoint="https://a:4433", role=pb.MH_ROLE_PRIMARY
            ),
            pb.MhAssignment(
                mh_id="mh-b", webtransport_endpoint="https://b:4433", role=pb.MH_ROLE_BACKUP
            ),
        ],
        requesting_gc_id="gc-1",
        generation=2**40,
    )

    parsed = pb.AssignMeetingWithMhRequest.FromString(request.SerializeToString())

    assert parsed == request
    assert [a.role for a in parsed.mh_assignments] == [pb.MH_ROLE_PRIMARY, pb.MH_ROLE_BACKUP]
    assert parsed.generation == 2**40


# --- (c) grpclib bindings -------------------------------------------------------


@pytest.mark.parametrize("service_name", sorted(SERVICES))
def test_grpclib_base_and_stub(service_name: str) -> None:
    """The base class declares every method abstract and maps the right paths;
    the stub exposes a unary-unary callable per method."""
    methods = SERVICES[service_name]
    base = getattr(internal_grpc, f"{service_name}Base")
    stub_cls = getattr(internal_grpc, f"{service_name}Stub")

    assert base.__abstractmethods__ == frozenset(methods)

    # A concrete subclass, so __mapping__ can be called on an instance.
    impl = type("Impl", (base,), {name: _unimplemented for name in methods})()
    mapping = impl.__mapping__()
    assert set(mapping) == {f"/{PACKAGE}.{service_name}/{name}" for name in methods}
    for name, (request, response) in methods.items():
        handler = mapping[f"/{PACKAGE}.{service_name}/{name}"]
        assert handler.cardinality is grpclib.const.Cardinality.UNARY_UNARY
        assert handler.request_type is getattr(pb, request)
        assert handler.reply_type is getattr(pb, response)

    # Stub construction only records the channel; it does no I/O.
    stub = stub_cls(channel=object())
    for name, (request, response) in methods.items():
        method = getattr(stub, name)
        assert method.name == f"/{PACKAGE}.{service_name}/{name}"
        assert method.request_type is getattr(pb, request)
        assert method.reply_type is getattr(pb, response)


async def _unimplemented(self: object, stream: object) -> None:
    """Stand-in handler body; never awaited by these tests."""
    raise NotImplementedError


def test_grpclib_paths_literal() -> None:
    """One path spelled out in full, as it appears on the wire."""
    impl = type(
        "Impl",
        (internal_grpc.GlobalControllerServiceBase,),
        {name: _unimplemented for name in SERVICES["GlobalControllerService"]},
    )()

    assert "/dark_tower.internal.GlobalControllerService/RegisterMC" in impl.__mapping__()
