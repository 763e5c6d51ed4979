"""The server core without sockets: registration, Id ownership, stamping, expiry, lists."""

from __future__ import annotations

from zbus import wire
from zbus.relay import ServerCore

A, B = "C-00000000-0000-4000-8000-00000000000a", "C-00000000-0000-4000-8000-00000000000b"
A_IN, A_OUT, B_IN, B_OUT = (bytes([n]) * 16 for n in (1, 2, 3, 4))


def decoded(outputs):
    return [(conn, wire.decode(header)) for conn, header, _ in outputs]


def hello(client_id: str, name: str, instance: str, data_in: bytes, data_out: bytes) -> wire.Hello:
    return wire.Hello(client_id, name, wire.NetState(), instance, data_in, data_out)


def registered_core() -> ServerCore:
    core = ServerCore("S-1", "s1", "tcp://127.0.0.1:1", client_timeout=3.0)
    assert decoded(core.receive(b"a", hello(A, "alice", "i-a", A_IN, A_OUT), 0.0)) == [
        (b"a", wire.Welcome("S-1", "s1", 0, core.rendezvous_keys[A]))]
    core.receive(b"b", hello(B, "bob", "i-b", B_IN, B_OUT), 0.0)
    core.flush(0.0)
    return core


def test_relay_goes_to_the_data_connection_and_stamps_the_source_from_the_connection():
    core = registered_core()
    dst_conn, header = core.relay(A_OUT, wire.Data(B, src=B), 10)
    assert dst_conn == B_IN
    assert wire.decode(header) == wire.Data(B, src=A)
    assert (core.relayed_msgs, core.relayed_bytes) == (1, 10)
    assert core.is_receiver(B_IN) and not core.is_receiver(B_OUT)


def test_data_from_an_unknown_connection_or_to_an_unknown_id_is_dropped_and_counted():
    core = registered_core()
    assert core.relay(b"zz", wire.Data(B), 1) is None
    assert core.relay(b"a", wire.Data(B), 1) is None  # the control connection carries no data
    assert core.relay(A_OUT, wire.Data("C-nobody"), 1) is None
    assert core.dropped == {"unregistered": 2, "unroutable": 1}


def test_another_process_claiming_a_connected_id_is_refused():
    core = registered_core()
    other_in, other_out = bytes([9]) * 16, bytes([10]) * 16
    [(conn, error)] = decoded(core.receive(b"x", hello(A, "impostor", "i-x", other_in, other_out), 0.0))
    assert conn == b"x" and error.code == "id-in-use"
    assert core.relay(B_OUT, wire.Data(A), 1)[0] == A_IN


def test_the_same_process_reconnecting_takes_its_id_over():
    core = registered_core()
    [(_, welcome)] = decoded(core.receive(b"a2", hello(A, "alice", "i-a", A_IN, A_OUT), 0.0))
    assert welcome == wire.Welcome("S-1", "s1", 0, core.rendezvous_keys[A])
    assert core.relay(B_OUT, wire.Data(A), 1)[0] == A_IN
    assert b"a" in core.take_forgotten()


def test_hello_needs_two_distinct_valid_data_ids():
    core = ServerCore("S-1", "s1", "tcp://127.0.0.1:1")
    for data_in, data_out in [(b"", b""), (A_IN, A_IN), (b"\x00" * 16, A_OUT), (b"short", A_OUT)]:
        [(_, error)] = decoded(core.receive(b"a", hello(A, "alice", "i", data_in, data_out), 0.0))
        assert error.code == "bad-hello"


def test_newcomers_get_a_snapshot_and_listeners_get_one_delta():
    core = registered_core()
    carol = "C-00000000-0000-4000-8000-00000000000c"
    core.receive(b"c", hello(carol, "carol", "i-c", bytes([5]) * 16, bytes([6]) * 16), 0.0)
    out = dict(decoded(core.flush(1.0)))
    assert out[b"c"].full and len(out[b"c"].upsert) == 3
    assert not out[b"a"].full and [i.name for i in out[b"a"].upsert] == ["carol"]
    assert out[b"a"].version == out[b"c"].version


def test_silent_clients_expire_and_an_in_band_bye_removes_at_once():
    core = registered_core()
    core.receive(b"b", wire.Heartbeat(), 2.5)
    core.expire(3.5)
    assert set(core.take_forgotten()) == {b"a", A_IN, A_OUT}
    core.receive(B_OUT, wire.Bye(), 3.6)
    assert len(core.table) == 0
    [(conn, error)] = decoded(core.receive(b"b", wire.Heartbeat(), 3.7))
    assert error.code == "not-registered"


def test_hello_with_a_server_id_is_refused():
    core = ServerCore("S-1", "s1", "tcp://127.0.0.1:1")
    [(_, error)] = decoded(core.receive(b"a", hello("S-00000000-0000-4000-8000-000000000000", "x", "i", A_IN, A_OUT), 0.0))
    assert error.code == "bad-id"


def test_a_remembered_route_stamps_like_the_slow_path_and_is_forgotten_when_registrations_change():
    core = registered_core()
    raw = wire.data_header(wire.data_header_prefix(B), 7)  # what a client sends
    dst_conn, header = core.relay(A_OUT, wire.decode(raw), 10, raw)
    hit = core.fast_routes[A_OUT][raw[:-9]]
    assert hit[0] == dst_conn == B_IN
    fast = hit[1] + wire.data_header(wire.data_header_prefix(B), 8)[-9:]
    assert wire.decode(fast) == wire.Data(B, src=A, seq=8) and wire.decode(header) == wire.Data(B, src=A, seq=7)
    # A header in another form (here: a claimed source) is routed but never remembered.
    odd = wire.encode(wire.Data(B, src=B, seq=2**40))
    core.fast_routes.clear()
    assert core.relay(A_OUT, wire.decode(odd), 1, odd)[0] == B_IN and core.fast_routes == {}
    core.relay(A_OUT, wire.decode(raw), 10, raw)
    assert core.fast_routes
    new_in, new_out = bytes([7]) * 16, bytes([8]) * 16
    core.receive(b"b2", hello(B, "bob", "i-b", new_in, new_out), 0.0)  # bob reconnects: new data_in
    assert core.fast_routes == {}
    assert core.relay(A_OUT, wire.decode(raw), 10, raw)[0] == new_in
    core.connection_lost(b"a")
    assert core.fast_routes == {} and core.relay(A_OUT, wire.decode(raw), 10, raw) is None


def test_a_join_storm_is_coalesced_into_few_deltas_while_newcomers_get_snapshots_at_once():
    from zbus.relay import DELTA_MAX_DELAY_S, DELTA_SPACING_S
    from zbus.tables import Applied, PeerList

    core = ServerCore("S-1", "s1", "tcp://127.0.0.1:1")

    def join(n: int, now: float) -> bytes:
        conn = b"c%04d" % n
        core.receive(conn, hello(f"C-00000000-0000-4000-8000-{n:012d}", f"n{n}", f"i{n}",
                                 bytes([1]) + n.to_bytes(2, "big") * 7 + b"x", bytes([2]) + n.to_bytes(2, "big") * 7 + b"y"), now)
        return conn

    for n in range(200):
        join(n, 0.0)
    received: dict[bytes, list] = {}
    for to, header in decoded(core.flush(0.0)):
        if isinstance(header, wire.ClientDelta):
            received.setdefault(to, []).append(header)
    assert core.next_flush() is None
    now = 1.0
    for n in range(200, 240):  # 40 joins, 1 ms apart, with 200..239 listeners
        now += 0.001
        join(n, now)
        for to, header in decoded(core.flush(now)):
            if isinstance(header, wire.ClientDelta):
                received.setdefault(to, []).append(header)
    newcomers = [b"c%04d" % n for n in range(200, 240)]
    assert all(received[c][0].full for c in newcomers)  # each newcomer got its snapshot at once
    storm = received[b"c0000"][1:]  # after its own snapshot
    spacing = 200 * DELTA_SPACING_S  # 20 ms here
    assert 1 <= len(storm) <= 0.040 / spacing + 1  # 40 joins: at most 3 deltas, not 40
    due = core.next_flush()
    assert due is not None and due <= now + DELTA_MAX_DELAY_S
    for to, header in decoded(core.flush(due)):
        received.setdefault(to, []).append(header)
    assert core.next_flush() is None
    for conn in [b"c0000", *newcomers]:  # every list now holds all 240: its snapshot + the deltas
        peers = PeerList()
        assert received[conn][0].full
        for header in received[conn]:
            assert peers.apply(header) is Applied.APPLIED
        assert len(peers.entries) == 240


def test_a_repeated_hello_on_the_same_connection_changes_nothing_but_is_answered():
    core = registered_core()
    version = core.table.version
    [(conn, welcome)] = decoded(core.receive(b"a", hello(A, "alice", "i-a", A_IN, A_OUT), 1.0))
    assert (conn, welcome) == (b"a", wire.Welcome("S-1", "s1", 0, core.rendezvous_keys[A]))
    assert core.flush(1.0) == [] and core.table.version == version  # no delta, no second full list
    assert core.take_forgotten() == []  # the client's queues are kept
    assert core.relay(B_OUT, wire.Data(A), 1)[0] == A_IN
    core.receive(b"a", hello(A, "alice-2", "i-a", A_IN, A_OUT), 1.0)  # a changed name is published
    [delta] = [wire.decode(h) for _, h, _ in core.flush(2.0)][:1]
    assert [info.name for info in delta.upsert] == ["alice-2"]


def test_relay_acks_go_to_each_senders_control_connection_stamped_with_the_receiver():
    core = registered_core()
    out = decoded(core.receive(b"b", wire.RelayAcks([(A, 41), ("C-nobody", 7), (A, 42)]), 0.1))
    assert out == [(b"a", wire.RelayAcks([(B, 41)])), (b"a", wire.RelayAcks([(B, 42)]))]  # B, from b's connection
    assert decoded(core.receive(b"zz", wire.RelayAcks([(A, 1)]), 0.1)) == []  # unregistered: dropped
    assert core.dropped["unregistered"] == 1
