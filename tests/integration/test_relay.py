"""One real server process, clients in this process, real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import zmq

import zbus
from tests.helpers import wait_until
from zbus import wire
from zbus.delivery import GAP_TIMEOUT
from zbus.status import query_status

pytestmark = pytest.mark.timeout(60)


def connect(clients: list, server, name: str, **kw) -> zbus.Client:
    client = zbus.Client(servers=[server.endpoint], name=name, **kw)
    clients.append(client)
    assert client.wait_connected(5.0), f"{name} did not register with {server.endpoint}"
    return client


def test_two_clients_exchange_10000_messages_in_order_with_nothing_lost(start_server, clients):
    server = start_server("relay")
    alice, bob = connect(clients, server, "alice", max_links=0), connect(clients, server, "bob", max_links=0)
    bob_id = alice.wait_peer("bob", 5.0)
    total = 10_000
    for i in range(total):
        alice.send(bob_id, i.to_bytes(4, "big") + b"x" * 60)
    for i in range(total):
        msg = bob.recv(timeout=10.0)
        assert (msg.src, msg.via) == (alice.id, "relay")
        assert int.from_bytes(msg.data[:4], "big") == i, "out of order or lost"
    with pytest.raises(TimeoutError):
        bob.recv(timeout=0.2)
    # and back the other way
    for i in range(100):
        bob.send(alice.id, b"%d" % i)
    assert [alice.recv(timeout=5.0).data for _ in range(100)] == [b"%d" % i for i in range(100)]


def test_recv_keeps_its_timeout_while_another_thread_is_receiving(start_server, clients):
    """Threads in ``recv`` at once take turns; a short timeout is kept even while another thread
    waits long for its turn's message (it used to wait for the other thread's whole wait)."""
    server = start_server()
    alice, bob = connect(clients, server, "alice", max_links=0), connect(clients, server, "bob", max_links=0)
    results: list = []

    def long_wait() -> None:
        try:
            results.append(bob.recv(timeout=10.0).data)
        except Exception as exc:  # reported below
            results.append(exc)

    waiter = threading.Thread(target=long_wait)
    waiter.start()
    try:
        wait_until(bob._rx_lock.locked, 5.0, "the first thread to be in recv")
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="another thread"):
            bob.recv(timeout=0.3)
        assert time.monotonic() - started < 0.3 + 0.5
        alice.send(alice.wait_peer("bob", 5.0), b"for the first")
    finally:
        waiter.join(15.0)
    assert results == [b"for the first"]


def test_send_to_an_unknown_id_raises_unreachable_at_once(start_server, clients):
    server = start_server()
    alice = connect(clients, server, "alice")
    started = time.monotonic()
    with pytest.raises(zbus.Unreachable):
        alice.send("C-00000000-0000-4000-8000-000000000000", b"hello?")
    assert time.monotonic() - started < 0.1


def test_name_resolution_finds_the_id_and_forgets_a_client_that_left(start_server, clients):
    server = start_server()
    alice = connect(clients, server, "alice")
    bob = connect(clients, server, "bob")
    assert alice.wait_peer("bob", 5.0) == bob.id
    assert alice.resolve("bob") == bob.id
    assert alice.resolve(bob.id) == bob.id
    assert alice.peers()[bob.id].name == "bob"
    with pytest.raises(zbus.Unreachable):
        alice.resolve("nobody")
    bob.close()
    wait_until(lambda: bob.id not in alice.peers(), 5.0, "bob to leave alice's lists")
    with pytest.raises(zbus.Unreachable):
        alice.resolve("bob")


def test_server_killed_makes_send_raise_disconnected_within_2s(start_server, clients):
    server = start_server()
    alice, _bob = connect(clients, server, "alice"), connect(clients, server, "bob")
    bob_id = alice.wait_peer("bob", 5.0)
    server.kill()
    killed = time.monotonic()

    def send_fails() -> bool:
        try:
            alice.send(bob_id, b"anyone?")
        except zbus.Disconnected:
            return True
        return False

    wait_until(send_fails, 2.0, "send to raise Disconnected after the server was killed")
    print(f"Disconnected after {time.monotonic() - killed:.3f}s")


def test_restarted_server_gets_traffic_flowing_again_without_user_action(start_server, clients):
    server = start_server()
    alice, bob = connect(clients, server, "alice"), connect(clients, server, "bob")
    bob_id = alice.wait_peer("bob", 5.0)
    server.kill()
    assert alice.wait_disconnected(5.0)
    start_server("relay-again", port=server.port)
    assert alice.wait_peer(bob_id, 10.0) == bob_id
    assert bob.wait_peer(alice.id, 10.0) == alice.id
    alice.send(bob_id, b"after restart")
    assert bob.recv(timeout=5.0).data == b"after restart"


def garbage_frames() -> list[list[bytes]]:
    good_header = wire.encode(wire.Data("C-00000000-0000-4000-8000-000000000000"))
    return [
        [b""],  # empty header
        [b"\x99" + good_header[1:], b"payload"],  # unknown protocol version
        [b"\x01\xff\xfe\xfd"],  # undecodable msgpack
        [b"\x01" + b"\x92\xa4Nope\x01"],  # unknown tag
        [good_header],  # Data without payload
        [good_header, b"a", b"b"],  # Data with two payloads
        [wire.encode(wire.Resync()), b"extra"],  # control with payload
        [good_header, b"from a connection that never said Hello"],
        [b"\x01" + b"x" * 2000],
    ]


def test_garbage_from_a_raw_socket_is_dropped_and_counted_while_others_keep_talking(start_server, clients):
    server = start_server(extra=[])
    alice, bob = connect(clients, server, "alice"), connect(clients, server, "bob")
    bob_id = alice.wait_peer("bob", 5.0)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    try:
        raw.connect(server.endpoint)
        rounds = 50
        for i in range(rounds):
            for frames in garbage_frames():
                raw.send_multipart(frames)
            alice.send(bob_id, b"still here %d" % i)
        for i in range(rounds):
            assert bob.recv(timeout=5.0).data == b"still here %d" % i
        expected = rounds * len(garbage_frames())
        dropped = wait_until(
            lambda: (d := query_status(server.endpoint).stats.dropped) and sum(d.values()) >= expected and d,
            5.0, "the drops to be counted")
        assert sum(dropped.values()) == expected, dropped
        assert {"bad_version", "undecodable", "malformed", "unregistered"} <= set(dropped)
        assert server.proc.poll() is None, "server died"
    finally:
        raw.close()


def test_a_message_over_a_max_frame_is_refused_at_send_and_the_stream_goes_on(start_server, clients, tmp_path):
    config = tmp_path / "zbus.toml"
    config.write_text('[server]\nmax_frame = 100000\n')
    server = start_server(extra=["--config", str(config)])
    # Relay only: the limit that matters is the server's, which its Welcome told the client.
    alice, bob = connect(clients, server, "alice", max_links=0), connect(clients, server, "bob", max_links=0)
    bob_id = alice.wait_peer("bob", 5.0)
    alice.send(bob_id, b"before")
    with pytest.raises(ValueError, match=r"over the max_frame of the server .*100000.*nothing was sent"):
        alice.send(bob_id, b"x" * 150_000)
    alice.send(bob_id, b"after")  # no hole in the stream: it arrives at once, not after the gap timeout
    assert [bob.recv(timeout=GAP_TIMEOUT / 2).data for _ in range(2)] == [b"before", b"after"]
    assert bob.status().delivery["gap_skipped"] == 0
    # The client's own limit holds on every path, before anything is numbered or sent.
    carol = connect(clients, server, "carol", max_frame=1000)
    with pytest.raises(ValueError, match=r"over max_frame \(1000\)"):
        carol.send(bob_id, b"y" * 1001)
    carol.send(bob_id, b"y" * 1000)
    assert bob.recv(timeout=5.0).data == b"y" * 1000
    assert query_status(server.endpoint).stats.dropped.get("oversized", 0) == 0  # nothing reached the server


def test_a_second_process_claiming_a_connected_id_is_refused_with_a_clear_error(start_server, clients):
    server = start_server()
    alice = connect(clients, server, "alice")
    with pytest.raises(zbus.IdInUse, match="already connected"):
        zbus.Client(servers=[server.endpoint], name="impostor", id=alice.id)
    bob = connect(clients, server, "bob")
    assert bob.wait_peer("alice", 5.0) == alice.id
    assert bob.peers()[alice.id].name == "alice"


def test_status_reports_this_server_as_master_with_its_clients(start_server, clients):
    server = start_server("status-srv")
    alice = connect(clients, server, "alice")
    reply = wait_until(lambda: (r := query_status(server.endpoint)) and r.clients and r, 5.0, "a client in status")
    doc = wire.status_to_json(reply)
    assert doc["self"] == doc["master"] == server.id
    assert doc["servers"] == [{"id": server.id, "name": "status-srv", "endpoint": server.endpoint,
                               "role": "master", "alive": True, "clients": 1}]
    assert doc["clients"] == [{"id": alice.id, "name": "alice", "server": server.id}]


def test_async_client_exchanges_messages(start_server, clients):
    server = start_server()
    bob = connect(clients, server, "bob")
    asyncio.run(async_exchange(server, bob))


async def async_exchange(server, bob: zbus.Client) -> None:
    async with zbus.AsyncClient(servers=[server.endpoint], name="async-alice") as alice:
        bob_id = await alice.wait_peer("bob", 5.0)
        for i in range(500):
            await alice.send(bob_id, b"%d" % i)
        assert [bob.recv(timeout=5.0).data for _ in range(500)] == [b"%d" % i for i in range(500)]
        bob.send(alice.id, b"hello async")
        msg = await alice.recv(timeout=5.0)
        assert (msg.src, msg.data, msg.via) == (bob.id, b"hello async", "relay")
        with pytest.raises(TimeoutError):
            await alice.recv(timeout=0.1)
