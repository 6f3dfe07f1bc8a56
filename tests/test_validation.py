"""Every boundary of the wire-field rules (SPEC §6.1) and of the registry's
request conversions, without I/O: ``shared/validation.py`` and
``gc/registry_requests.py``."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from darktower.gc import registry_requests as req
from darktower.protos import internal_pb2 as pb
from darktower.shared import validation as v
from darktower.shared.validation import INT4_MAX, InvalidArgument

UINT32_MAX = 2**32 - 1

# --- field rules ---------------------------------------------------------------------------

VALID_IDS = [
    pytest.param("a", id="1-char"),
    pytest.param("a" * 255, id="255-chars"),
    pytest.param("mc-1_A-Z_0-9", id="all-classes"),
    pytest.param("-", id="dash-only"),
    pytest.param("_", id="underscore-only"),
    pytest.param("0", id="digit-only"),
]

INVALID_IDS = [
    pytest.param("", id="empty"),
    pytest.param("a" * 256, id="256-chars"),
    pytest.param("mc.1", id="dot"),
    pytest.param("mc 1", id="space"),
    pytest.param("mc/1", id="slash"),
    pytest.param("../etc", id="path"),
    pytest.param("mc-1\n", id="trailing-newline"),
    pytest.param("\nmc-1", id="leading-newline"),
    pytest.param("mc\x00", id="nul"),
    pytest.param("mç", id="non-ascii-letter"),
    pytest.param("mc-\u0661", id="non-ascii-digit"),
    pytest.param("mc;drop", id="semicolon"),
    pytest.param("mc'1", id="quote"),
]


@pytest.mark.parametrize("value", VALID_IDS)
def test_node_id_accepts(value: str) -> None:
    assert v.node_id("id", value) == value


@pytest.mark.parametrize("value", INVALID_IDS)
def test_node_id_refuses(value: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        v.node_id("controller_id", value)
    assert info.value.field == "controller_id"
    assert str(info.value).startswith("controller_id: ")


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("r", id="1-char"),
        pytest.param("r" * 50, id="50-chars"),
        pytest.param("eu-west-1", id="dashes"),
        pytest.param("eu.west_1", id="dot-underscore"),
    ],
)
def test_region_accepts(value: str) -> None:
    assert v.region("region", value) == value


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("r" * 51, id="51-chars"),
        pytest.param("eu west", id="space"),
        pytest.param("eu/west", id="slash"),
        pytest.param("eu-west\n", id="trailing-newline"),
        pytest.param("région", id="non-ascii"),
    ],
)
def test_region_refuses(value: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        v.region("region", value)
    assert info.value.field == "region"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        pytest.param("", True, id="empty-unknown"),
        pytest.param("z", True, id="1-char"),
        pytest.param("z" * 50, True, id="50-chars"),
        pytest.param("z" * 51, False, id="51-chars"),
        pytest.param("zone a", False, id="space"),
    ],
)
def test_zone_bounds(value: str, ok: bool) -> None:
    """The MH zone is optional (empty = unknown) and at most 50 characters."""
    registration = pb.RegisterMHRequest(
        handler_id="mh-1",
        region="local",
        webtransport_endpoint="https://127.0.0.1:4434",
        grpc_endpoint="http://127.0.0.1:50060",
        max_streams=10,
        zone=value,
    )
    if ok:
        assert req.mh_registration(registration).zone == value
    else:
        with pytest.raises(InvalidArgument) as info:
            req.mh_registration(registration)
        assert info.value.field == "zone"


def _endpoint_of_length(scheme: str, length: int) -> str:
    return scheme + "a" * (length - len(scheme))


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("http://h", id="http-shortest"),
        pytest.param("https://h", id="https"),
        pytest.param("http://127.0.0.1:50052", id="host-port"),
        pytest.param("https://[::1]:4433/path?q=1", id="ipv6-path-query"),
        pytest.param(_endpoint_of_length("http://", 255), id="255-chars"),
        pytest.param(_endpoint_of_length("https://", 255), id="255-chars-https"),
    ],
)
def test_endpoint_accepts(value: str) -> None:
    assert v.endpoint("grpc_endpoint", value) == value


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("http://", id="scheme-only"),
        pytest.param("127.0.0.1:50052", id="no-scheme"),
        pytest.param("ftp://host", id="ftp"),
        pytest.param("grpc://host", id="grpc"),
        pytest.param("//host", id="scheme-relative"),
        pytest.param("httpx://host", id="httpx"),
        pytest.param(_endpoint_of_length("http://", 256), id="256-chars"),
        pytest.param(_endpoint_of_length("https://", 256), id="256-chars-https"),
        pytest.param("http://a b", id="inner-space"),
        pytest.param(" http://a", id="leading-space"),
        pytest.param("http://a ", id="trailing-space"),
        pytest.param("http://a\n", id="trailing-newline"),
        pytest.param("http://a\tb", id="tab"),
        pytest.param("http://a\r\nHost: evil", id="crlf-injection"),
        pytest.param("http://a\x00", id="nul"),
        pytest.param("http://hôte", id="non-ascii"),
    ],
)
def test_endpoint_refuses(value: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        v.endpoint("webtransport_endpoint", value)
    assert info.value.field == "webtransport_endpoint"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        pytest.param(0, False, id="zero"),
        pytest.param(1, True, id="one"),
        pytest.param(INT4_MAX, True, id="int4-max"),
        pytest.param(INT4_MAX + 1, False, id="int4-max+1"),
        pytest.param(UINT32_MAX, False, id="uint32-max"),
        pytest.param(-1, False, id="negative"),
    ],
)
def test_capacity_bounds(value: int, ok: bool) -> None:
    if ok:
        assert v.capacity("max_meetings", value) == value
    else:
        with pytest.raises(InvalidArgument) as info:
            v.capacity("max_meetings", value)
        assert info.value.field == "max_meetings"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        pytest.param(0, True, id="zero"),
        pytest.param(INT4_MAX, True, id="int4-max"),
        pytest.param(INT4_MAX + 1, False, id="int4-max+1"),
        pytest.param(UINT32_MAX, False, id="uint32-max"),
        pytest.param(-1, False, id="negative"),
    ],
)
def test_count_bounds(value: int, ok: bool) -> None:
    if ok:
        assert v.count("current_streams", value) == value
    else:
        with pytest.raises(InvalidArgument) as info:
            v.count("current_streams", value)
        assert info.value.field == "current_streams"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        pytest.param(0.0, True, id="zero"),
        pytest.param(-0.0, True, id="negative-zero"),
        pytest.param(42.5, True, id="middle"),
        pytest.param(100.0, True, id="hundred"),
        pytest.param(-0.001, False, id="negative"),
        pytest.param(100.001, False, id="over-hundred"),
        pytest.param(math.nan, False, id="nan"),
        pytest.param(math.inf, False, id="inf"),
        pytest.param(-math.inf, False, id="minus-inf"),
    ],
)
def test_percent_bounds(value: float, ok: bool) -> None:
    if ok:
        assert v.percent("cpu_usage_percent", value) == value
    else:
        with pytest.raises(InvalidArgument) as info:
            v.percent("cpu_usage_percent", value)
        assert info.value.field == "cpu_usage_percent"


@pytest.mark.parametrize(
    ("wire", "stored"),
    [
        (pb.PENDING, "pending"),
        (pb.HEALTHY, "healthy"),
        (pb.DEGRADED, "degraded"),
        (pb.UNHEALTHY, "unhealthy"),
        (pb.DRAINING, "draining"),
    ],
)
def test_health_maps_every_wire_value(wire: int, stored: str) -> None:
    assert req.health("health", wire) == stored


@pytest.mark.parametrize("wire", [5, 99, -1, 2**31 - 1])
def test_health_refuses_unknown_values(wire: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        req.health("health", wire)
    assert info.value.field == "health"


def test_messages_never_echo_the_value() -> None:
    """A hostile value (huge, or with markup) must not be reflected to the client."""
    hostile = "<script>" + "x" * 300
    checks: list[Callable[[], object]] = [
        lambda: v.node_id("id", hostile),
        lambda: v.region("region", hostile),
        lambda: v.endpoint("grpc_endpoint", "http://" + hostile),
    ]
    for check in checks:
        with pytest.raises(InvalidArgument) as info:
            check()
        assert "script" not in str(info.value)
        assert "xxx" not in str(info.value)


# --- request conversions -------------------------------------------------------------------


def _mc_registration(**overrides: object) -> pb.RegisterMCRequest:
    fields: dict[str, object] = {
        "id": "mc-1",
        "region": "local",
        "grpc_endpoint": "http://127.0.0.1:50052",
        "webtransport_endpoint": "https://127.0.0.1:4433",
        "max_meetings": 100,
        "max_participants": 1000,
    }
    fields.update(overrides)
    return pb.RegisterMCRequest(**fields)  # type: ignore[arg-type]


def _mh_registration(**overrides: object) -> pb.RegisterMHRequest:
    fields: dict[str, object] = {
        "handler_id": "mh-1",
        "region": "local",
        "webtransport_endpoint": "https://127.0.0.1:4434",
        "grpc_endpoint": "http://127.0.0.1:50060",
        "max_streams": 500,
        "zone": "zone-a",
    }
    fields.update(overrides)
    return pb.RegisterMHRequest(**fields)  # type: ignore[arg-type]


def _capacity(meetings: int = 3, participants: int = 30) -> pb.ControllerCapacity:
    return pb.ControllerCapacity(
        max_meetings=100,
        current_meetings=meetings,
        max_participants=1000,
        current_participants=participants,
    )


def _fast(**overrides: object) -> pb.FastHeartbeatRequest:
    fields: dict[str, object] = {
        "controller_id": "mc-1",
        "capacity": _capacity(),
        "health": pb.HEALTHY,
    }
    fields.update(overrides)
    return pb.FastHeartbeatRequest(**fields)  # type: ignore[arg-type]


def _comprehensive(**overrides: object) -> pb.ComprehensiveHeartbeatRequest:
    fields: dict[str, object] = {
        "controller_id": "mc-1",
        "capacity": _capacity(),
        "health": pb.HEALTHY,
        "cpu_usage_percent": 12.5,
        "memory_usage_percent": 50.0,
    }
    fields.update(overrides)
    return pb.ComprehensiveHeartbeatRequest(**fields)  # type: ignore[arg-type]


def _load_report(**overrides: object) -> pb.MHLoadReportRequest:
    fields: dict[str, object] = {
        "handler_id": "mh-1",
        "current_streams": 7,
        "health": pb.HEALTHY,
        "cpu_usage_percent": 10.0,
        "memory_usage_percent": 20.0,
        "bandwidth_usage_percent": 30.0,
    }
    fields.update(overrides)
    return pb.MHLoadReportRequest(**fields)  # type: ignore[arg-type]


def test_mc_registration_converts_every_field() -> None:
    assert req.mc_registration(_mc_registration()) == req.McRegistration(
        controller_id="mc-1",
        region="local",
        grpc_endpoint="http://127.0.0.1:50052",
        webtransport_endpoint="https://127.0.0.1:4433",
        max_meetings=100,
        max_participants=1000,
    )


def test_mc_registration_accepts_int4_max_capacities() -> None:
    reg = req.mc_registration(_mc_registration(max_meetings=INT4_MAX, max_participants=INT4_MAX))
    assert (reg.max_meetings, reg.max_participants) == (INT4_MAX, INT4_MAX)


def test_fast_heartbeat_converts_every_field() -> None:
    assert req.fast_heartbeat(_fast(health=pb.DEGRADED)) == req.McHeartbeat(
        controller_id="mc-1",
        current_meetings=3,
        current_participants=30,
        health="degraded",
        cpu_usage_percent=None,
        memory_usage_percent=None,
    )


def test_comprehensive_heartbeat_converts_every_field() -> None:
    assert req.comprehensive_heartbeat(_comprehensive(health=pb.DRAINING)) == req.McHeartbeat(
        controller_id="mc-1",
        current_meetings=3,
        current_participants=30,
        health="draining",
        cpu_usage_percent=12.5,
        memory_usage_percent=50.0,
    )


def test_mh_registration_converts_every_field() -> None:
    assert req.mh_registration(_mh_registration()) == req.MhRegistration(
        handler_id="mh-1",
        region="local",
        zone="zone-a",
        webtransport_endpoint="https://127.0.0.1:4434",
        grpc_endpoint="http://127.0.0.1:50060",
        max_streams=500,
    )


def test_mh_load_report_converts_every_field() -> None:
    assert req.mh_load_report(_load_report(health=pb.UNHEALTHY)) == req.MhLoadReport(
        handler_id="mh-1",
        current_streams=7,
        health="unhealthy",
        cpu_usage_percent=10.0,
        memory_usage_percent=20.0,
        bandwidth_usage_percent=30.0,
    )


def test_zero_load_is_valid() -> None:
    """Zero is a load (an idle node), not a missing value."""
    hb = req.fast_heartbeat(_fast(capacity=_capacity(0, 0)))
    assert (hb.current_meetings, hb.current_participants) == (0, 0)
    report = req.mh_load_report(
        _load_report(
            current_streams=0,
            cpu_usage_percent=0.0,
            memory_usage_percent=0.0,
            bandwidth_usage_percent=0.0,
        )
    )
    assert report.current_streams == 0


Convert = Callable[[], object]

INVALID_REQUESTS: list[object] = [
    # RegisterMC
    pytest.param(lambda: req.mc_registration(_mc_registration(id="")), "id", id="mc-id-empty"),
    pytest.param(lambda: req.mc_registration(_mc_registration(id="a" * 256)), "id", id="mc-id-256"),
    pytest.param(lambda: req.mc_registration(_mc_registration(id="mc.1")), "id", id="mc-id-dot"),
    pytest.param(
        lambda: req.mc_registration(_mc_registration(region="")), "region", id="mc-region-empty"
    ),
    pytest.param(
        lambda: req.mc_registration(_mc_registration(region="r" * 51)), "region", id="mc-region-51"
    ),
    pytest.param(
        lambda: req.mc_registration(_mc_registration(grpc_endpoint="ftp://h")),
        "grpc_endpoint",
        id="mc-grpc-ftp",
    ),
    pytest.param(
        lambda: req.mc_registration(_mc_registration(grpc_endpoint="")),
        "grpc_endpoint",
        id="mc-grpc-empty",
    ),
    pytest.param(
        lambda: req.mc_registration(_mc_registration(webtransport_endpoint="127.0.0.1:4433")),
        "webtransport_endpoint",
        id="mc-wt-no-scheme",
    ),
    pytest.param(
        lambda: req.mc_registration(
            _mc_registration(webtransport_endpoint=_endpoint_of_length("https://", 256))
        ),
        "webtransport_endpoint",
        id="mc-wt-256",
    ),
    pytest.param(
        lambda: req.mc_registration(_mc_registration(max_meetings=0)),
        "max_meetings",
        id="mc-max-meetings-0",
    ),
    pytest.param(
        lambda: req.mc_registration(_mc_registration(max_meetings=INT4_MAX + 1)),
        "max_meetings",
        id="mc-max-meetings-2^31",
    ),
    pytest.param(
        lambda: req.mc_registration(_mc_registration(max_participants=0)),
        "max_participants",
        id="mc-max-participants-0",
    ),
    pytest.param(
        lambda: req.mc_registration(_mc_registration(max_participants=UINT32_MAX)),
        "max_participants",
        id="mc-max-participants-uint32-max",
    ),
    # FastHeartbeat
    pytest.param(
        lambda: req.fast_heartbeat(_fast(controller_id="")), "controller_id", id="fast-id-empty"
    ),
    pytest.param(
        lambda: req.fast_heartbeat(pb.FastHeartbeatRequest(controller_id="mc-1")),
        "capacity",
        id="fast-capacity-missing",
    ),
    pytest.param(
        lambda: req.fast_heartbeat(_fast(capacity=_capacity(meetings=INT4_MAX + 1))),
        "capacity.current_meetings",
        id="fast-meetings-2^31",
    ),
    pytest.param(
        lambda: req.fast_heartbeat(_fast(capacity=_capacity(participants=UINT32_MAX))),
        "capacity.current_participants",
        id="fast-participants-uint32-max",
    ),
    pytest.param(lambda: req.fast_heartbeat(_fast(health=99)), "health", id="fast-health-99"),
    # ComprehensiveHeartbeat
    pytest.param(
        lambda: req.comprehensive_heartbeat(
            pb.ComprehensiveHeartbeatRequest(controller_id="mc-1", cpu_usage_percent=1.0)
        ),
        "capacity",
        id="comprehensive-capacity-missing",
    ),
    pytest.param(
        lambda: req.comprehensive_heartbeat(_comprehensive(health=99)),
        "health",
        id="comprehensive-health-99",
    ),
    pytest.param(
        lambda: req.comprehensive_heartbeat(_comprehensive(cpu_usage_percent=math.nan)),
        "cpu_usage_percent",
        id="comprehensive-cpu-nan",
    ),
    pytest.param(
        lambda: req.comprehensive_heartbeat(_comprehensive(cpu_usage_percent=math.inf)),
        "cpu_usage_percent",
        id="comprehensive-cpu-inf",
    ),
    pytest.param(
        lambda: req.comprehensive_heartbeat(_comprehensive(cpu_usage_percent=-1.0)),
        "cpu_usage_percent",
        id="comprehensive-cpu-negative",
    ),
    pytest.param(
        lambda: req.comprehensive_heartbeat(_comprehensive(memory_usage_percent=100.5)),
        "memory_usage_percent",
        id="comprehensive-memory-over-100",
    ),
    pytest.param(
        lambda: req.comprehensive_heartbeat(_comprehensive(memory_usage_percent=-math.inf)),
        "memory_usage_percent",
        id="comprehensive-memory-minus-inf",
    ),
    # RegisterMH
    pytest.param(
        lambda: req.mh_registration(_mh_registration(handler_id="a" * 256)),
        "handler_id",
        id="mh-id-256",
    ),
    pytest.param(
        lambda: req.mh_registration(_mh_registration(handler_id="mh 1")),
        "handler_id",
        id="mh-id-space",
    ),
    pytest.param(
        lambda: req.mh_registration(_mh_registration(region="")), "region", id="mh-region-empty"
    ),
    pytest.param(
        lambda: req.mh_registration(_mh_registration(zone="z" * 51)), "zone", id="mh-zone-51"
    ),
    pytest.param(
        lambda: req.mh_registration(_mh_registration(webtransport_endpoint="ftp://h")),
        "webtransport_endpoint",
        id="mh-wt-ftp",
    ),
    pytest.param(
        lambda: req.mh_registration(_mh_registration(grpc_endpoint="http://a b")),
        "grpc_endpoint",
        id="mh-grpc-space",
    ),
    pytest.param(
        lambda: req.mh_registration(_mh_registration(max_streams=0)),
        "max_streams",
        id="mh-max-streams-0",
    ),
    pytest.param(
        lambda: req.mh_registration(_mh_registration(max_streams=INT4_MAX + 1)),
        "max_streams",
        id="mh-max-streams-2^31",
    ),
    # SendLoadReport
    pytest.param(
        lambda: req.mh_load_report(_load_report(handler_id="")), "handler_id", id="load-id-empty"
    ),
    pytest.param(
        lambda: req.mh_load_report(_load_report(current_streams=INT4_MAX + 1)),
        "current_streams",
        id="load-streams-2^31",
    ),
    pytest.param(
        lambda: req.mh_load_report(_load_report(health=99)), "health", id="load-health-99"
    ),
    pytest.param(
        lambda: req.mh_load_report(_load_report(cpu_usage_percent=math.nan)),
        "cpu_usage_percent",
        id="load-cpu-nan",
    ),
    pytest.param(
        lambda: req.mh_load_report(_load_report(memory_usage_percent=-0.5)),
        "memory_usage_percent",
        id="load-memory-negative",
    ),
    pytest.param(
        lambda: req.mh_load_report(_load_report(bandwidth_usage_percent=101.0)),
        "bandwidth_usage_percent",
        id="load-bandwidth-over-100",
    ),
    pytest.param(
        lambda: req.mh_load_report(_load_report(bandwidth_usage_percent=math.inf)),
        "bandwidth_usage_percent",
        id="load-bandwidth-inf",
    ),
]


@pytest.mark.parametrize(("convert", "field"), INVALID_REQUESTS)
def test_request_conversion_names_the_bad_field(convert: Convert, field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        convert()
    assert info.value.field == field
    assert str(info.value).split(": ", 1)[0] == field


def test_percent_fields_arrive_as_float32() -> None:
    """The wire carries ``float``: a value just over 100 can round to 100.0 on
    the way and is then (correctly) accepted - the rule is checked on what
    arrives, so tests of "over 100" must use values float32 can tell apart."""
    wire = pb.ComprehensiveHeartbeatRequest(
        controller_id="mc-1", capacity=_capacity(), cpu_usage_percent=100.000001
    )
    assert wire.cpu_usage_percent == 100.0
    assert req.comprehensive_heartbeat(wire).cpu_usage_percent == 100.0
