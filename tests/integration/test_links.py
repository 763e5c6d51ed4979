"""Direct links between clients, and the delivery layer that makes path switches lossless.

Real `zbus-node server` processes on 127.0.0.1; clients in this process (or a subprocess when one
must be killed). Clients listen on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import zmq

import zbus
from tests.helpers import REPO, wait_until

LOCAL = "tcp://127.0.0.1:0"


def connect(clients: list, servers, name: str, **kw) -> zbus.Client:
    client = zbus.Client(servers=[s.endpoint for s in servers], name=name, listen=LOCAL, **kw)
    clients.append(client)
    wait_until(lambda: all(link.state == "registered" for link in client.status().servers)
               and len(client.status().servers) == len(servers), 5.0, f"{name} registered with every server")
    return client


class Collector:
    """Receives ``count`` messages on its own thread (so senders never wait for a reader)."""

    def __init__(self, client: zbus.Client, count: int, timeout: float) -> None:
        self.client, self.count, self.timeout = client, count, timeout
        self.reading = threading.Event()  # cleared: the collector stops reading (what comes waits)
        self.reading.set()
        self.got: list[zbus.Message] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while len(self.got) < self.count:
                if not self.reading.wait(self.timeout):
                    raise TimeoutError(f"told not to read for over {self.timeout}s")
                self.got.append(self.client.recv(timeout=self.timeout))
        except BaseException as exc:  # reported by result()
            self.error = exc

    def result(self, timeout: float) -> list[zbus.Message]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"receiver still waiting after {timeout}s ({len(self.got)} messages)"
        assert self.error is None, f"receiver failed after {len(self.got)} messages: {self.error!r}"
        return self.got


@pytest.mark.timeout(60)
def test_three_clients_on_two_servers_link_directly_and_peers_shows_the_links(start_server, clients):
    servers = [start_server("s1"), start_server("s2")]
    trio = [connect(clients, servers, name) for name in ("alice", "bob", "carol")]
    ids = {c.name: c.wait_peer(other, 5.0) for c in trio for other in ("alice", "bob", "carol") if other != c.name}
    assert len(ids) == 3
    for sender in trio:
        for receiver in trio:
            if receiver is not sender:
                sender.send(receiver.id, b"hello")  # the first message goes by relay and asks for a link
    for sender in trio:
        for receiver in trio:
            if receiver is not sender:
                assert sender.wait_link(receiver.id, 5.0), f"{sender.name} -> {receiver.name} link"
    for receiver in trio:
        assert sorted(receiver.recv(timeout=5.0).data for _ in range(2)) == [b"hello", b"hello"]
    for sender in trio:
        for receiver in trio:
            if receiver is not sender:
                for i in range(100):
                    sender.send(receiver.id, b"%d" % i)
    for receiver in trio:
        got = [receiver.recv(timeout=5.0) for _ in range(200)]
        assert {m.via for m in got} == {"direct"}
        for sender in trio:
            if sender is not receiver:
                assert [m.data for m in got if m.src == sender.id] == [b"%d" % i for i in range(100)]
    alice = trio[0]
    wait_until(lambda: all(p.rtt is not None for p in alice.peers().values()), 5.0, "link RTTs measured")
    for peer_id, peer in alice.peers().items():
        assert peer.via == "direct" and peer.address.startswith("tcp://127.0.0.1:") and 0 < peer.rtt < 1.0
        print(f"alice -> {peer.name}: {peer.address} rtt {peer.rtt * 1000:.2f} ms")


@pytest.mark.timeout(60)
def test_room_under_max_links_is_filled_before_the_first_message_and_gives_way_to_destinations(
        start_server, clients):
    server = start_server("s1")
    alice = connect(clients, [server], "alice", max_links=2)
    others = [connect(clients, [server], name, prelink=False) for name in ("bob", "carol", "dave")]
    ids = [alice.wait_peer(o.name, 5.0) for o in others]
    # Alice never sent to anyone: two of the three get links anyway (max_links=2), before any message.
    wait_until(lambda: len([p for p in alice.peers().values() if p.via == "direct"]) == 2, 10.0,
               "alice's links filled up to max_links")
    linked = [i for i in ids if alice.peers()[i].via == "direct"]
    for other in others:
        assert other.peers()[alice.id].via == "relay"  # prelink=False: they only link to whom they send to
    # So the first message to a linked peer already goes direct.
    target = next(o for o in others if o.id == linked[0])
    alice.send(target.id, b"first")
    assert target.recv(timeout=5.0) == zbus.Message(alice.id, b"first", "direct")
    # Sending to the peer without a link: it takes the place of the other prelinked one.
    unlinked = next(o for o in others if o.id not in linked)
    for i in range(100):
        alice.send(unlinked.id, b"%d" % i)
    assert alice.wait_link(unlinked.id, 5.0)
    wait_until(lambda: {i for i, p in alice.peers().items() if p.via == "direct"} == {target.id, unlinked.id}, 5.0,
               "the destination replaced the other prelinked peer (max_links holds)")
    got = [unlinked.recv(timeout=5.0) for _ in range(100)]
    assert [m.data for m in got] == [b"%d" % i for i in range(100)]  # nothing lost or reordered on the switch


def relay_pair(start_server, clients):
    """One server, alice and bob with max_links=0 (relay only); returns (server, alice, bob, bob's Id)."""
    server = start_server("s1")
    alice = connect(clients, [server], "alice", max_links=0)
    bob = connect(clients, [server], "bob", max_links=0)
    return server, alice, bob, alice.wait_peer("bob", 5.0)


@pytest.mark.timeout(60)
def test_max_links_zero_keeps_every_message_on_the_relay(start_server, clients):
    server, alice, bob, bob_id = relay_pair(start_server, clients)
    for i in range(2000):
        alice.send(bob_id, b"%d" % i)
        if i % 500 == 0:
            bob.send(alice.id, b"back")
    got = [bob.recv(timeout=5.0) for _ in range(2000)]
    assert [m.data for m in got] == [b"%d" % i for i in range(2000)]
    assert {m.via for m in got} == {"relay"}
    assert {m.via for m in (alice.recv(timeout=5.0) for _ in range(4))} == {"relay"}
    assert alice.peers()[bob_id].via == "relay" and alice.peers()[bob_id].address == server.endpoint
    assert not alice.wait_link(bob_id, 0.5)


@pytest.mark.timeout(120)
def test_a_50000_message_stream_survives_links_going_up_and_down_repeatedly(start_server, clients):
    server = start_server("s1")
    alice, bob = connect(clients, [server], "alice"), connect(clients, [server], "bob")
    bob_id = alice.wait_peer("bob", 5.0)
    total, chunk = 50_000, 2_500
    collector = Collector(bob, total, timeout=15.0)
    switches = 0
    started = time.monotonic()
    link_wanted = True
    for i in range(total):
        if i and i % chunk == 0:
            # The previous switch has taken effect; start the next one and keep sending meanwhile.
            if link_wanted:
                wait_until(lambda: bob_id in alice.peers() and alice.peers()[bob_id].via == "direct", 10.0,
                           "the link to come up")
            else:
                wait_until(lambda: alice.peers()[bob_id].via == "relay", 10.0, "the link to go down")
            link_wanted = not link_wanted
            alice.set_max_links(64 if link_wanted else 0)
            switches += 1
        alice.send(bob_id, i.to_bytes(4, "big"))
    got = collector.result(60.0)
    took = time.monotonic() - started
    assert [int.from_bytes(m.data, "big") for m in got] == list(range(total)), "lost, repeated or reordered"
    assert all(m.src == alice.id for m in got)
    vias = {via: sum(1 for m in got if m.via == via) for via in ("direct", "relay")}
    assert vias["direct"] and vias["relay"], vias
    with pytest.raises(TimeoutError):
        bob.recv(timeout=0.3)  # and nothing twice
    stream = alice._sender.streams[bob_id]
    print(f"{total} messages, {switches} path switches in {took:.1f}s; by path {vias}; "
          f"repeated {stream.resent}; duplicates dropped {bob._receiver.duplicates}")


@pytest.mark.timeout(90)
def test_connections_reset_under_a_link_that_stays_up_lose_nothing(start_server, clients):
    """A path can stay up and still lose messages: when a TCP connection under it is reset, libzmq
    reconnects and discards what the old connection held. The receiver's acks then stall and the
    sender repeats its oldest unacknowledged messages on the same path (no path change involved)."""
    if os.geteuid() != 0 or shutil.which("ss") is None:
        pytest.skip("needs root and iproute2's ss -K to reset TCP connections")
    server = start_server("s1")
    alice, bob = connect(clients, [server], "alice"), connect(clients, [server], "bob")
    bob_id = alice.wait_peer("bob", 5.0)
    alice.send(bob_id, b"hello")
    assert bob.recv(timeout=5.0).data == b"hello"
    wait_until(lambda: alice.peers()[bob_id].via == "direct", 10.0, "the link to come up")
    # bob's link ROUTER (link control) and its link data ROUTER: alice's connections go to these two.
    ports = [alice.peers()[bob_id].address.rpartition(":")[2],
             bob._engine.link_in.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2]]
    total, every = 24_000, 4_000
    collector = Collector(bob, total, timeout=30.0)
    resets = 0
    for i in range(total):
        if i % every == every // 2:  # bob stops reading: the rest of this chunk waits in TCP buffers
            collector.reading.clear()
        if i and i % every == 0:  # alice's ends of the link's connections (control and data) to bob
            for port in ports:
                killed = subprocess.run(["ss", "-K", "-t", "dst", "127.0.0.1", "dport", "=", f":{port}"],
                                        check=True, capture_output=True, text=True, timeout=10)
                resets += killed.stdout.count("ESTAB")
            collector.reading.set()
            # What waited in the reset connections is lost. This send returns once bob has everything
            # up to it (repaired): the sender's window (max_unacked) held all of it.
            alice.send(bob_id, i.to_bytes(4, "big"), ack=True, timeout=30.0)
        else:
            alice.send(bob_id, i.to_bytes(4, "big"))
    collector.reading.set()
    got = collector.result(60.0)
    assert resets >= 3, f"ss -K reset only {resets} connections"
    assert alice.status().delivery["resent"] > 0  # the resets did lose messages: they were repaired
    assert [int.from_bytes(m.data, "big") for m in got] == list(range(total)), "lost, repeated or reordered"
    assert bob.status().delivery["gap_skipped"] == 0
    vias = {via: sum(1 for m in got if m.via == via) for via in ("direct", "relay")}
    print(f"{total} messages, {resets} connection resets; by path {vias}; delivery at the sender "
          f"{alice.status().delivery}, at the receiver {bob.status().delivery}")


@pytest.mark.timeout(90)
def test_killing_one_of_two_servers_mid_stream_loses_nothing(start_server, clients):
    servers = [start_server("s1"), start_server("s2")]
    alice = connect(clients, servers, "alice", max_links=0)
    bob = connect(clients, servers, "bob", max_links=0)
    bob_id = alice.wait_peer("bob", 5.0)
    wait_until(lambda: all(l.clients == 2 for l in alice.status().servers), 5.0, "both servers list both")
    carrier = next(s for s in servers if s.endpoint == alice.peers()[bob_id].address)
    total = 30_000
    collector = Collector(bob, total, timeout=15.0)
    for i in range(total):
        if i == total // 3:
            wait_until(lambda: len(collector.got) > 1000, 10.0, "the stream to be flowing")
            carrier.kill()  # SIGKILL, with messages inside it
        alice.send(bob_id, i.to_bytes(4, "big"))
    got = collector.result(60.0)
    assert [int.from_bytes(m.data, "big") for m in got] == list(range(total)), "lost or reordered"
    assert alice.peers()[bob_id].address != carrier.endpoint
    print(f"repeated after the kill: {alice._sender.streams[bob_id].resent}; "
          f"duplicates dropped: {bob._receiver.duplicates}")


VICTIM = """
import sys, zbus
with zbus.Client(servers=[sys.argv[1]], name="victim", listen="tcp://127.0.0.1:0") as c:
    print(c.id, flush=True)
    while True:
        try:
            m = c.recv(timeout=1.0)
        except TimeoutError:
            continue
        c.send(m.src, m.data)
"""


@pytest.mark.timeout(60)
def test_a_killed_peer_leaves_the_link_table_and_the_lists_within_a_few_seconds(start_server, clients):
    server = start_server("s1")
    alice = connect(clients, [server], "alice")
    proc = subprocess.Popen([sys.executable, "-c", VICTIM, server.endpoint], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        victim_id = proc.stdout.readline().strip()
        assert alice.wait_peer(victim_id, 10.0) == victim_id
        alice.send(victim_id, b"ping")
        assert alice.recv(timeout=5.0).data == b"ping"
        assert alice.wait_link(victim_id, 5.0)
        alice.send(victim_id, b"ping")
        assert alice.recv(timeout=5.0).data == b"ping"
        proc.kill()
        proc.wait(timeout=10)
        killed = time.monotonic()
        wait_until(lambda: victim_id not in alice._engine.routes.links, 5.0, "the link to be dropped")
        link_gone = time.monotonic() - killed
        wait_until(lambda: victim_id not in alice.peers(), 6.0, "the peer to leave the lists")
        print(f"link dropped {link_gone:.2f}s, peer gone {time.monotonic() - killed:.2f}s after kill -9")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


@pytest.mark.timeout(30)
def test_a_listen_address_that_cannot_be_bound_is_a_config_error_naming_the_key():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(zbus.ConfigError, match=f"client.listen: cannot bind tcp://127.0.0.1:{port}"):
            zbus.Client(servers=["tcp://127.0.0.1:9"], listen=f"tcp://127.0.0.1:{port}", connect_timeout=0.1)


@pytest.mark.timeout(60)
def test_async_clients_use_direct_links_too(start_server):
    import asyncio

    server = start_server("s1")

    async def exchange() -> None:
        async with zbus.AsyncClient(servers=[server.endpoint], name="a", listen=LOCAL) as a, \
                zbus.AsyncClient(servers=[server.endpoint], name="b", listen=LOCAL) as b:
            b_id = await a.wait_peer("b", 5.0)
            await a.send(b_id, b"first")
            assert (await b.recv(timeout=5.0)).data == b"first"
            assert await a.wait_link(b_id, 5.0)
            for i in range(2000):
                await a.send(b_id, b"%d" % i)
            got = [await b.recv(timeout=5.0) for _ in range(2000)]
            assert [m.data for m in got] == [b"%d" % i for i in range(2000)]
            assert {m.via for m in got} == {"direct"}

    asyncio.run(exchange())


@pytest.mark.timeout(60)
def test_a_pure_producer_through_a_relay_hears_acks_without_calling_recv(start_server, clients):
    """Receivers ack relayed streams on their control connection (RelayAcks): the sender's engine reads
    them, so what it retains for repair is released even by a producer that never calls recv."""
    _, alice, bob, bob_id = relay_pair(start_server, clients)
    for i in range(3000):
        alice.send(bob_id, b"%d" % i)
    assert [bob.recv(timeout=5.0).data for _ in range(3000)] == [b"%d" % i for i in range(3000)]
    stream = alice._sender.streams[bob_id]
    last = stream.next_seq - 1
    wait_until(lambda: alice._engine.acked.get(bob_id, 0) >= last, 5.0, "bob's ack at alice's engine")
    alice.send(bob_id, b"one more")  # applied on the next send: nothing of the 3,000 is kept any more
    assert [seq for seq, _, _ in stream.retained] == [last + 1]
    assert alice._engine.control_msgs.get("RelayAcks", 0) >= 1


def test_a_two_way_exchange_over_links_leaves_the_engines_asleep(start_server, clients):
    """Acks go on the upkeep timer (or when a receiver asks, every 1,024 messages). An Ack that arrived
    used to run the upkeep at once, which acked back what had arrived since: during any ping-pong the
    two engines woke each other hundreds of times a second, taking the GIL from the data path."""
    from zbus.dataplane import _UPKEEP_S

    server = start_server()
    alice, bob = connect(clients, [server], "alice"), connect(clients, [server], "bob")
    bob_id, alice_id = alice.wait_peer("bob"), bob.wait_peer("alice")
    alice.send(bob_id, b"hello")
    bob.send(alice_id, bob.recv(timeout=5.0).data)
    alice.recv(timeout=5.0)
    assert alice.wait_link(bob_id, 5.0) and bob.wait_link(alice_id, 5.0)
    before = alice._engine.wakeups, bob._engine.wakeups
    start = time.monotonic()
    rounds = 0
    while time.monotonic() - start < 1.5 and rounds < 200_000:  # bounded in time and count
        alice.send(bob_id, b"ping")
        message = bob.recv(timeout=5.0)
        assert message.via == "direct"
        bob.send(alice_id, message.data)
        assert alice.recv(timeout=5.0).via == "direct"
        rounds += 1
    elapsed = time.monotonic() - start
    woke = max(alice._engine.wakeups - before[0], bob._engine.wakeups - before[1])
    # The upkeep timer, the peer's acks on it, link pings and early-ack requests: a few dozen a second.
    limit = 4 * elapsed / _UPKEEP_S + 30
    assert woke < limit, f"an engine woke {woke} times in {elapsed:.2f}s of ping-pong ({rounds} round trips)"
