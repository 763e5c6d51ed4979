"""The wire codec: every header round-trips; garbage never raises anything but WireError."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zbus import wire
from zbus.wire import DropReason, WireError

ids = st.text(min_size=1, max_size=40)
net_states = st.builds(wire.NetState, st.lists(st.text(max_size=15), max_size=4),
                       st.lists(st.text(max_size=21), max_size=4), st.text(max_size=30))
client_infos = st.builds(wire.ClientInfo, ids, st.text(max_size=20), net_states)
headers = st.one_of(
    st.builds(wire.Hello, ids, st.text(max_size=20), net_states, st.text(max_size=32)),
    st.builds(wire.Heartbeat), st.builds(wire.Bye), st.builds(wire.Resync), st.builds(wire.StatusRequest),
    st.builds(wire.Welcome, ids, st.text(max_size=20)),
    net_states,
    st.builds(wire.ClientDelta, ids, st.integers(0, 2**62), st.booleans(),
              st.lists(client_infos, max_size=5), st.lists(ids, max_size=5)),
    st.builds(wire.Data, ids, ids, st.integers(0, 2**63 - 1)),
    st.builds(wire.Error, st.text(max_size=20), st.text(max_size=100)),
)


@given(headers)
def test_every_header_round_trips(header):
    frame = wire.encode(header)
    assert frame[0] == wire.WIRE_VERSION
    assert wire.decode(frame) == header
    assert wire.decode(memoryview(frame)) == header


@settings(max_examples=2000)
@given(st.binary(max_size=300))
def test_garbage_raises_only_wire_error(garbage):
    try:
        wire.decode(garbage)
    except WireError as exc:
        assert exc.reason in {DropReason.MALFORMED, DropReason.BAD_VERSION, DropReason.UNDECODABLE}


@given(st.binary(max_size=200))
def test_garbage_after_a_good_version_byte_is_undecodable_or_a_header(garbage):
    try:
        assert isinstance(wire.decode(b"\x01" + garbage), msgspec.Struct)
    except WireError as exc:
        assert exc.reason is DropReason.UNDECODABLE


def test_unknown_version_is_refused_by_reason():
    frame = bytearray(wire.encode(wire.Heartbeat()))
    frame[0] = 2
    with pytest.raises(WireError) as info:
        wire.decode(bytes(frame))
    assert info.value.reason is DropReason.BAD_VERSION


def test_empty_header_is_malformed():
    with pytest.raises(WireError) as info:
        wire.decode(b"")
    assert info.value.reason is DropReason.MALFORMED


def test_a_truncated_header_is_undecodable():
    frame = wire.encode(wire.Hello("C-x", "name", wire.NetState(["10.0.0.1"]), "abc"))
    for cut in range(1, len(frame)):
        with pytest.raises(WireError):
            wire.decode(frame[:cut])


def test_oversized_checks_every_frame():
    assert not wire.oversized([b"a" * 10, b"b" * 10], 10)
    assert wire.oversized([b"a", b"b" * 11], 10)


def test_status_json_has_the_documented_shape():
    reply = wire.StatusReply(
        "S-1", "S-1", [wire.ServerStatus("S-1", "a", "tcp://127.0.0.1:1", "master", True, 1)],
        [wire.ClientStatus("C-1", "w", "S-1")], wire.ServerStats(1, 2, 3, {"oversized": 1}))
    doc = wire.status_to_json(reply)
    assert doc["self"] == "S-1" and doc["master"] == "S-1"
    assert doc["servers"][0] == {"id": "S-1", "name": "a", "endpoint": "tcp://127.0.0.1:1",
                                 "role": "master", "alive": True, "clients": 1}
    assert doc["clients"] == [{"id": "C-1", "name": "w", "server": "S-1"}]
