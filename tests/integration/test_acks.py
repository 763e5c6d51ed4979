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
