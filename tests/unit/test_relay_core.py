"""The server core without sockets: registration, Id ownership, stamping, expiry, lists."""

from __future__ import annotations

from zbus import wire
from zbus.relay import ServerCore

A, B = "C-00000000-0000-4000-8000-00000000000a", "C-00000000-0000-4000-8000-00000000000b"


def decoded(outputs):
    return [(conn, wire.decode(header)) for conn, header, _ in outputs]


def registered_core() -> ServerCore:
    core = ServerCore("S-1", "s1", "tcp://127.0.0.1:1", client_timeout=3.0)
    assert decoded(core.receive(b"a", wire.Hello(A, "alice", instance="i-a"), 0.0)) == [
        (b"a", wire.Welcome("S-1", "s1"))]
    core.receive(b"b", wire.Hello(B, "bob", instance="i-b"), 0.0)
    core.flush()
    return core


def test_relay_stamps_the_source_from_the_connection_not_the_header():
    core = registered_core()
    dst_conn, header = core.relay(b"a", wire.Data(B, src=B), 10, 0.0)
    assert dst_conn == b"b"
    assert wire.decode(header) == wire.Data(B, src=A)
    assert (core.relayed_msgs, core.relayed_bytes) == (1, 10)


def test_data_from_an_unregistered_connection_or_to_an_unknown_id_is_dropped_and_counted():
    core = registered_core()
    assert core.relay(b"zz", wire.Data(B), 1, 0.0) is None
    assert core.relay(b"a", wire.Data("C-nobody"), 1, 0.0) is None
    assert core.dropped == {"unregistered": 1, "unroutable": 1}


def test_another_process_claiming_a_connected_id_is_refused():
    core = registered_core()
    [(conn, error)] = decoded(core.receive(b"x", wire.Hello(A, "impostor", instance="i-x"), 0.0))
    assert conn == b"x" and error.code == "id-in-use"
    assert core.relay(b"b", wire.Data(A), 1, 0.0)[0] == b"a"


def test_the_same_process_reconnecting_takes_its_id_over():
    core = registered_core()
    assert decoded(core.receive(b"a2", wire.Hello(A, "alice", instance="i-a"), 0.0))[0][1] == wire.Welcome("S-1", "s1")
    assert core.relay(b"b", wire.Data(A), 1, 0.0)[0] == b"a2"


def test_newcomers_get_a_snapshot_and_listeners_get_one_delta():
    core = registered_core()
    core.receive(b"c", wire.Hello("C-00000000-0000-4000-8000-00000000000c", "carol", instance="i-c"), 0.0)
    out = dict(decoded(core.flush()))
    assert out[b"c"].full and len(out[b"c"].upsert) == 3
    assert not out[b"a"].full and [i.name for i in out[b"a"].upsert] == ["carol"]
    assert out[b"a"].version == out[b"c"].version


def test_silent_clients_expire_and_bye_removes_at_once():
    core = registered_core()
    core.receive(b"b", wire.Heartbeat(), 2.5)
    assert core.expire(3.5) == [b"a"]
    core.receive(b"b", wire.Bye(), 3.6)
    assert len(core.table) == 0
    [(conn, error)] = decoded(core.receive(b"b", wire.Heartbeat(), 3.7))
    assert error.code == "not-registered"


def test_hello_with_a_server_id_is_refused():
    core = ServerCore("S-1", "s1", "tcp://127.0.0.1:1")
    [(_, error)] = decoded(core.receive(b"a", wire.Hello("S-00000000-0000-4000-8000-000000000000", "x"), 0.0))
    assert error.code == "bad-id"
