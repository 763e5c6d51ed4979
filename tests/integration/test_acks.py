"""Acknowledged delivery: ``send(..., ack=True)`` returns only once the destination has the message.

Real ``zbus-node server`` processes on 127.0.0.1; clients in this process, receivers on their own
threads (a receiver acknowledges what its ``recv`` has taken in).
"""

from __future__ import annotations

import asyncio
import threading

import pytest

import zbus
from tests.helpers import wait_until
from tests.integration.test_links import LOCAL, Collector, connect

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("max_links", [0, 64], ids=["relay", "direct-after-first"])
def test_acked_sends_arrive_exactly_once_in_order(start_server, clients, max_links):
    servers = [start_server("s1")]
    alice = connect(clients, servers, "alice", max_links=max_links)
    bob = connect(clients, servers, "bob", max_links=max_links)
    dst = alice.wait_peer("bob", 5.0)
    collector = Collector(bob, 2000, 10.0)
    for i in range(2000):
        alice.send(dst, b"%d" % i, ack=True, timeout=5.0)  # raises TimeoutError if not acknowledged
    got = collector.result(10.0)
    assert [int(m.data) for m in got] == list(range(2000))
    if max_links:
        assert "direct" in {m.via for m in got}


@pytest.mark.parametrize("max_links", [0, 64], ids=["relay", "direct"])
def test_an_acked_send_wakes_when_its_ack_lands(start_server, clients, max_links):
    """With no other thread reading, ``send(ack=True)`` waits on its own data sockets, where the
    receiver's answer to the AckRequest lands, so that answer wakes it (``_read_wakes``) instead of
    the end of a pause (0.5, 1, 2... ms). Counted here, not timed: benchmarks/acks_and_requests.py
    measures what it saves (an acked send took 2.3-4.8 round trips over a link, now 1.1-1.6)."""
    servers = [start_server("s1")]
    alice = connect(clients, servers, "alice", max_links=max_links)
    bob = connect(clients, servers, "bob", max_links=max_links)
    dst = alice.wait_peer("bob", 5.0)
    collector = Collector(bob, 301, 10.0)
    alice.send(dst, b"first", ack=True, timeout=5.0)
    if max_links:
        assert alice.wait_link(dst, 5.0)
    before = alice._read_wakes
    for i in range(300):
        alice.send(dst, b"%d" % i, ack=True, timeout=5.0)
    wakes = alice._read_wakes - before
    assert [m.data for m in collector.result(10.0)] == [b"first"] + [b"%d" % i for i in range(300)]
    assert 240 <= wakes <= 600, wakes  # about one per send (an ack already there when it looks: none)
    if max_links:
        assert {m.via for m in collector.got[-100:]} == {"direct"}


def test_acked_sends_and_a_recv_thread_on_one_client_take_turns_with_the_sockets(start_server, clients):
    """alice sends with ack=True on one thread while another of her threads is in recv: the acked
    sends give the receive lock way to recv (which then reads their acks), and both streams arrive
    whole and in order."""
    servers = [start_server("s1")]
    alice = connect(clients, servers, "alice")
    bob = connect(clients, servers, "bob")
    to_bob, to_alice = alice.wait_peer("bob", 5.0), bob.wait_peer("alice", 5.0)
    at_bob, at_alice = Collector(bob, 300, 15.0), Collector(alice, 300, 15.0)
    failed: list[BaseException] = []

    def bob_sends() -> None:
        try:
            for i in range(300):
                bob.send(to_alice, b"b%d" % i, timeout=5.0)
        except BaseException as exc:  # reported below
            failed.append(exc)

    sender = threading.Thread(target=bob_sends)
    sender.start()
    try:
        for i in range(300):
            alice.send(to_bob, b"a%d" % i, ack=True, timeout=5.0)
    finally:
        sender.join(15.0)
    assert not failed, failed
    assert [m.data for m in at_bob.result(10.0)] == [b"a%d" % i for i in range(300)]
    assert [m.data for m in at_alice.result(10.0)] == [b"b%d" % i for i in range(300)]


def test_an_async_acked_send_wakes_when_its_ack_lands(start_server, clients):
    servers = [start_server("s1")]
    bob = connect(clients, servers, "bob")

    async def main() -> int:
        async with zbus.AsyncClient(servers=[servers[0].endpoint], name="a", listen=LOCAL) as a:
            dst = await a.wait_peer("bob", 5.0)
            await a.send(dst, b"first", ack=True, timeout=5.0)
            before = a._read_wakes
            for i in range(200):
                await a.send(dst, b"%d" % i, ack=True, timeout=5.0)
            wakes = a._read_wakes - before
            reading = asyncio.ensure_future(a.recv(timeout=30.0))  # now a recv reads the acks for us...
            await asyncio.sleep(0)  # (a yield: the task starts and waits on the sockets)
            assert a._receivers == 1
            for i in range(200, 300):  # ...and wakes the sends through the engine's on_ack
                await a.send(dst, b"%d" % i, ack=True, timeout=5.0)
            assert not reading.done()
            reading.cancel()
            return wakes

    collector = Collector(bob, 301, 15.0)
    wakes = asyncio.run(main())
    assert [m.data for m in collector.result(10.0)] == [b"first"] + [b"%d" % i for i in range(300)]
    assert 160 <= wakes <= 400, wakes


def test_an_acked_send_to_a_peer_that_does_not_read_times_out(start_server, clients):
    servers = [start_server("s1")]
    alice = connect(clients, servers, "alice", max_links=0)
    connect(clients, servers, "deaf", max_links=0)  # never calls recv, so never takes the message in
    dst = alice.wait_peer("deaf", 5.0)
    with pytest.raises(TimeoutError, match="no acknowledgement"):
        alice.send(dst, b"hello?", ack=True, timeout=0.5)


def test_acked_messages_survive_the_kill_of_the_server_carrying_them(start_server, clients):
    servers = [start_server("s1"), start_server("s2")]
    alice = connect(clients, servers, "alice", max_links=0)
    bob = connect(clients, servers, "bob", max_links=0)
    dst = alice.wait_peer("bob", 5.0)
    total = 6000
    collector = Collector(bob, total, 15.0)
    acked: list[int] = []
    failed: list[BaseException] = []

    def send_all() -> None:
        for i in range(total):
            try:
                alice.send(dst, b"%d" % i, ack=True, timeout=10.0)
                acked.append(i)
            except BaseException as exc:  # reported below
                failed.append(exc)
                return

    sender = threading.Thread(target=send_all)
    sender.start()
    try:
        wait_until(lambda: len(acked) >= total // 3, 20.0, "a third of the stream acknowledged")
        servers[0].kill()  # with two servers, the stream's server or the other one: both must lose nothing
        wait_until(lambda: len(acked) >= 2 * total // 3 or failed, 20.0, "the stream to go on through s2")
    finally:
        sender.join(30.0)
    assert not failed, failed
    assert len(acked) == total
    got = collector.result(15.0)
    assert [int(m.data) for m in got] == list(range(total))  # every one once, in order


def test_async_client_acked_send(start_server):
    servers = [start_server("s1")]

    async def main() -> list[bytes]:
        async with zbus.AsyncClient(servers=[servers[0].endpoint], name="a", listen=LOCAL) as a, \
                zbus.AsyncClient(servers=[servers[0].endpoint], name="b", listen=LOCAL) as b:
            dst = await a.wait_peer("b", 5.0)
            receiving = asyncio.ensure_future(asyncio.gather(*[b.recv(timeout=10.0) for _ in range(1)]))
            await a.send(dst, b"one", ack=True, timeout=5.0)
            return [m.data for m in await receiving]

    assert asyncio.run(main()) == [b"one"]
