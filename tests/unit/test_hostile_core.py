"""Hostile input against the pure pieces: the rate limiter, the server core's bounds, and garbage.

Integration (real processes, raw sockets): tests/integration/test_hostile.py.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zbus import wire
from zbus.guard import Limits, RateLimiter
from zbus.relay import ServerCore
from zbus.wire import DropReason, WireError

A, B, C = (f"C-00000000-0000-4000-8000-00000000000{c}" for c in "abc")


def token(n: int) -> bytes:
    return bytes([n]) * 16


def hello(client_id: str, name: str = "x", instance: str = "i", data_in: bytes = token(1),
          data_out: bytes = token(2)) -> wire.Hello:
    return wire.Hello(client_id, name, wire.NetState(), instance, data_in, data_out)


def decoded(outputs):
    return [(conn, wire.decode(header)) for conn, header, _ in outputs]


# -- the token bucket ----------------------------------------------------------------------------

def test_a_bucket_allows_its_burst_then_its_rate():
    limiter = RateLimiter(rate=10.0, burst=5)
    assert [limiter.allow(b"c", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert limiter.allow(b"c", 0.1)  # one token back after 1/rate seconds
    assert not limiter.allow(b"c", 0.1)
    assert [limiter.allow(b"c", 10.0) for _ in range(6)] == [True] * 5 + [False]  # refills to burst, no more


def test_buckets_are_per_key_and_bounded_in_number():
    limiter = RateLimiter(rate=1.0, burst=1, max_keys=3)
    assert limiter.allow(b"a", 0.0) and not limiter.allow(b"a", 0.0)
    assert limiter.allow(b"b", 0.0)
    for n in range(1000):
        limiter.allow(b"%d" % n, 0.0)
        assert len(limiter) <= 3


def test_sweep_forgets_only_buckets_that_are_full_again():
    limiter = RateLimiter(rate=2.0, burst=4)
    for _ in range(4):
        limiter.allow(b"busy", 0.0)
    limiter.allow(b"idle", 0.0)
    limiter.sweep(1.0)  # idle: 3 + 2 tokens >= 4 (full); busy: 0 + 2 < 4
    assert len(limiter) == 1
    assert [limiter.allow(b"busy", 1.0) for _ in range(3)] == [True, True, False]


@given(st.lists(st.tuples(st.integers(0, 5), st.floats(0, 2)), max_size=200))
def test_no_key_ever_gets_more_than_burst_plus_rate_times_elapsed(events):
    rate, burst = 5.0, 3
    limiter = RateLimiter(rate, burst)
    now, allowed = 0.0, {}
    for key, step in events:
        now += step
        if limiter.allow(bytes([key]), now):
            allowed[key] = allowed.get(key, 0) + 1
    for count in allowed.values():
        assert count <= burst + rate * now + 1e-9


# -- the server core's bounds --------------------------------------------------------------------

def test_a_full_server_refuses_newcomers_with_server_full_and_counts_them():
    core = ServerCore("S-1", "s1", "tcp://127.0.0.1:1", limits=Limits(max_clients=2))
    core.receive(b"a", hello(A, data_in=token(1), data_out=token(2)), 0.0)
    core.receive(b"b", hello(B, data_in=token(3), data_out=token(4)), 0.0)
    [(conn, error)] = decoded(core.receive(b"c", hello(C, data_in=token(5), data_out=token(6)), 0.0))
    assert conn == b"c" and error.code == "server-full" and "max_clients=2" in error.message
    assert len(core.table) == 2 and core.dropped == {"refused": 1}
    # a registered client may still re-register, and a freed place is taken
    [(_, answer)] = decoded(core.receive(b"a", hello(A, data_in=token(1), data_out=token(2)), 0.1))
    assert isinstance(answer, wire.Welcome)
    core.connection_lost(b"b")
    [(_, answer)] = decoded(core.receive(b"c", hello(C, data_in=token(5), data_out=token(6)), 0.2))
    assert isinstance(answer, wire.Welcome)


def test_a_name_over_max_name_bytes_is_refused():
    core = ServerCore("S-1", "s1", "tcp://127.0.0.1:1", limits=Limits(max_name_bytes=8))
    [(_, error)] = decoded(core.receive(b"a", hello(A, name="é" * 5), 0.0))  # 10 bytes in UTF-8
    assert error.code == "bad-name" and len(core.table) == 0
    assert decoded(core.receive(b"a", hello(A, name="é" * 4), 0.0))[0][1] == wire.Welcome("S-1", "s1", 0, core.rendezvous_keys[A])


def test_control_messages_over_the_rate_are_dropped_and_counted_per_connection():
    core = ServerCore("S-1", "s1", "tcp://127.0.0.1:1", limits=Limits(control_rate=10.0, control_burst=5))
    replies = [core.receive(b"flood", wire.StatusRequest(), 0.0) for _ in range(100)]
    assert sum(1 for r in replies if r) == 5 and core.dropped == {"rate_limited": 95}
    # another connection is not affected, and the flooder gets a token back after 1/rate seconds
    assert decoded(core.receive(b"a", hello(A), 0.0))[0][1] == wire.Welcome("S-1", "s1", 0, core.rendezvous_keys[A])
    assert core.receive(b"flood", wire.StatusRequest(), 0.1)


def test_hello_and_bye_do_not_reset_a_connections_rate_bucket():
    core = ServerCore("S-1", "s1", "tcp://127.0.0.1:1", limits=Limits(control_rate=1.0, control_burst=4))
    for _ in range(10):
        core.receive(b"a", hello(A), 0.0)
        core.receive(b"a", wire.Bye(), 0.0)
    assert core.dropped["rate_limited"] == 16


def test_refused_hellos_and_unregistered_control_leave_no_state_behind():
    core = ServerCore("S-1", "s1", "tcp://127.0.0.1:1", limits=Limits(control_burst=10_000, max_clients=1))
    core.receive(b"a", hello(A), 0.0)
    for n in range(2000):
        conn = b"x%d" % n
        core.receive(conn, hello("not-an-id"), 0.0)
        core.receive(conn, hello(B, data_in=token(7), data_out=token(8)), 0.0)  # server full
        core.receive(conn, wire.Heartbeat(), 0.0)
        core.receive(conn, wire.NetState(), 0.0)
    assert len(core._last_seen) == 1 and len(core._by_control) == 1
    assert core.dropped == {"refused": 4000, "unregistered": 4000}
    core.expire(100.0)  # the sweep forgets the rate buckets too
    assert len(core._control_rate) == 0


def test_replies_may_wait_only_for_registered_clients():
    core = ServerCore("S-1", "s1", "tcp://127.0.0.1:1")
    core.receive(b"a", hello(A, data_in=token(1), data_out=token(2)), 0.0)
    assert core.may_queue(b"a") and core.may_queue(token(1))
    assert not core.may_queue(token(2)) and not core.may_queue(b"stranger")


# -- garbage -------------------------------------------------------------------------------------

valid_frames = [wire.encode(h) for h in (
    hello(A), wire.Heartbeat(), wire.NetState(["10.0.0.1"], ["1.2.3.4:5"], "tcp://10.0.0.1:9"), wire.Resync(),
    wire.Data(B, A, 7), wire.StatusRequest(), wire.Bye(), wire.Welcome("S-1", "s"),
    wire.ClientDelta("S-1", 3, False, [wire.ClientInfo(A, "a")], [B]),
)]


@settings(max_examples=1500)
@given(st.sampled_from(valid_frames), st.data())
def test_truncated_or_bit_flipped_frames_decode_or_raise_only_wire_error(frame, data):
    cut = data.draw(st.integers(0, len(frame)))
    flips = data.draw(st.lists(st.tuples(st.integers(0, max(0, cut - 1)), st.integers(1, 255)), max_size=3))
    mutated = bytearray(frame[:cut])
    for index, mask in flips:
        if index < len(mutated):
            mutated[index] ^= mask
    try:
        wire.decode(bytes(mutated))
    except WireError as exc:
        assert exc.reason in {DropReason.MALFORMED, DropReason.BAD_VERSION, DropReason.UNDECODABLE}


ids = st.one_of(st.sampled_from([A, B, C]), st.text(max_size=50))
tokens = st.one_of(st.sampled_from([token(n) for n in range(1, 7)]), st.binary(max_size=20))
client_headers = st.one_of(
    st.builds(wire.Hello, ids, st.text(max_size=300), st.builds(wire.NetState), st.sampled_from(["i", "j"]),
              tokens, tokens),
    st.builds(wire.Heartbeat), st.builds(wire.Bye), st.builds(wire.Resync), st.builds(wire.StatusRequest),
    st.builds(wire.NetState, st.lists(st.text(max_size=15), max_size=3)),
    st.builds(wire.Data, ids, ids, st.integers(0, 2**63 - 1)),
    st.builds(wire.Welcome, ids, st.text(max_size=10)),
    st.builds(wire.Error, st.text(max_size=10), st.text(max_size=10)),
)
conns = st.sampled_from([b"a", b"b", b"c", token(1), token(2), token(3), token(4), b"\x00\x80\x00\x00\x01"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(conns, client_headers, st.floats(0, 0.5)), max_size=60), st.integers(0, 2**32))
def test_any_sequence_of_messages_leaves_the_core_consistent_and_bounded(events, seed):
    limits = Limits(max_clients=2, max_name_bytes=64, control_rate=20.0, control_burst=4, max_tracked=4)
    core = ServerCore("S-1", "s1", "tcp://127.0.0.1:1", client_timeout=1.0, limits=limits)
    rng = random.Random(seed)
    now = 0.0
    for conn, header, step in events:
        now += step
        before = sum(core.dropped.values())
        if isinstance(header, wire.Data):
            routed = core.relay(conn, header, 10)
            assert routed is not None or sum(core.dropped.values()) == before + 1
        else:
            for out_conn, out_header, payload in core.receive(conn, header, now):
                assert isinstance(out_conn, bytes) and payload is None
                wire.decode(out_header)
        if rng.random() < 0.2:
            core.expire(now)
        if rng.random() < 0.5:
            for out_conn, out_header, _ in core.flush(now):
                assert core.may_queue(out_conn) or out_conn in core._needs_snapshot
                wire.decode(out_header)
        core.take_forgotten()
        # bounded...
        assert len(core.table) == len(core._by_id) <= limits.max_clients
        assert len(core._control_rate) <= limits.max_tracked
        assert all(len(info.name.encode("utf-8", "surrogatepass")) <= 64 for info in core.table.entries())
        # ...and consistent: every registration is reachable from each of its three connections
        for registration in core._by_id.values():
            assert core._by_control[registration.control] is registration
            assert core._by_sender[registration.data_out] is registration
            assert registration.data_in in core._receivers
        assert len(core._by_control) == len(core._by_sender) == len(core._receivers) == len(core._by_id)
        assert set(core._last_seen) == set(core._by_control)


# -- the config keys -----------------------------------------------------------------------------

def test_limits_come_from_the_server_table_of_the_config_file(tmp_path):
    from zbus.config import load_server_config, server_limits

    path = tmp_path / "zbus.toml"
    path.write_text("[server]\nmax_clients = 5\nmax_name_bytes = 32\nmax_header = 1024\n"
                    "control_rate = 2.5\ncontrol_burst = 7\nmax_frame = 4096\n")
    limits = server_limits(load_server_config(path))
    assert limits == Limits(max_clients=5, max_name_bytes=32, max_header=1024, control_rate=2.5,
                            control_burst=7, max_frame=4096)
    assert server_limits(load_server_config(tmp_path / "zbus.toml", max_clients=9)).max_clients == 9


@pytest.mark.parametrize("text, words", [
    ("max_clients = 0", ["server.max_clients", "zbus.toml", "positive integer"]),
    ("max_clients = 'many'", ["server.max_clients", "zbus.toml", "expected `int`"]),
    ("max_name_bytes = -1", ["server.max_name_bytes", "positive integer"]),
    ("max_header = 100", ["server.max_header", ">= 512"]),
    ("control_rate = 0", ["server.control_rate", "number > 0", "per second"]),
    ("control_burst = 0", ["server.control_burst", "positive integer"]),
])
def test_bad_limits_name_file_key_and_expected_form(tmp_path, text, words):
    from zbus import ConfigError
    from zbus.config import load_server_config

    path = tmp_path / "zbus.toml"
    path.write_text(f"[server]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_server_config(path)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
