"""Backpressure: ``send`` to a destination that does not read blocks up to ``timeout``, then raises
``zbus.Backpressure`` with nothing of that message sent; memory stays bounded while the sender keeps
trying; once the receiver reads, every message whose ``send`` returned arrives exactly once, in order.

Real ``zbus-node server`` processes on 127.0.0.1; the receiving client is in this process but does not
call ``recv`` until the test lets it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest

import zbus
from tests.helpers import wait_until
from tests.integration.test_hostile import config_file, rss_kb
from tests.integration.test_links import LOCAL, Collector, connect
from zbus.status import query_status

pytestmark = pytest.mark.timeout(120)

PAYLOAD = 1024  # bytes per message: the pipes fill after some 20,000 of them
FLOOD_MAX = 200_000  # bound of the fill loop (a path that never fills fails the test)
RETRIES = 30  # sends tried against the full path while memory is watched
RSS_GROWTH_LIMIT_KB = 16 * 1024  # VmRSS growth allowed while the sender keeps trying
SLACK_S = 0.5  # a Backpressure may come this much after its timeout (a loaded machine)


def payload(i: int) -> bytes:
    return b"%08d" % i + b"." * (PAYLOAD - 8)


def fill(sender, dst: str, timeout: float) -> list[int]:
    """Send until the path refuses; the numbers of the messages whose send returned."""
    sent = []
    for i in range(FLOOD_MAX):
        try:
            sender.send(dst, payload(i), timeout=timeout)
        except zbus.Backpressure:
            return sent
        sent.append(i)
    raise AssertionError(f"{FLOOD_MAX} messages sent and the path never filled")


def drain(receiver: zbus.Client, count: int) -> list[int]:
    """Read ``count`` messages, then make sure no more come (no duplicates)."""
    got = []
    deadline = time.monotonic() + 60.0
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} messages arrived"
        got.append(int(receiver.recv(timeout=10.0).data[:8]))
    with pytest.raises(TimeoutError):
        receiver.recv(timeout=1.0)
    return got


def keep_trying(sender, dst: str, first: int, sent: list[int], pids: list[int]) -> dict[int, int]:
    """Try ``RETRIES`` more sends (timeout 0.2 s each) against the full path; VmRSS growth by pid."""
    before = {pid: rss_kb(pid) for pid in pids}
    for i in range(first, first + RETRIES):
        started = time.monotonic()
        try:
            sender.send(dst, payload(i), timeout=0.2)
            sent.append(i)  # the path took one after all: it must arrive like the others
        except zbus.Backpressure:
            assert time.monotonic() - started < 0.2 + SLACK_S
    return {pid: rss_kb(pid) - kb for pid, kb in before.items()}


@pytest.mark.parametrize("max_links", [0, 64], ids=["relay", "direct"])
def test_a_receiver_that_does_not_read_pushes_back_and_loses_nothing(start_server, clients, max_links):
    server = start_server("s1")
    alice = connect(clients, [server], "alice", max_links=max_links)
    deaf = connect(clients, [server], "deaf", max_links=max_links)
    dst = alice.wait_peer("deaf", 5.0)
    if max_links:
        alice.send(dst, payload(0))  # wanting a peer is what starts a link
        assert alice.wait_link(dst, 10.0)
        assert int(deaf.recv(timeout=5.0).data[:8]) == 0
    sent = fill(alice, dst, timeout=1.0)
    assert len(sent) > 1000

    started = time.monotonic()
    with pytest.raises(zbus.Backpressure, match="nothing of this message was sent"):
        alice.send(dst, payload(10**7), timeout=0.5)
    assert 0.45 <= time.monotonic() - started < 0.5 + SLACK_S
    started = time.monotonic()
    with pytest.raises(zbus.Backpressure):
        alice.send(dst, payload(10**7), timeout=0)
    assert time.monotonic() - started < 0.1
    started = time.monotonic()
    with pytest.raises(zbus.Backpressure):  # with ack=True the timeout covers the wait for room too
        alice.send(dst, payload(10**7), ack=True, timeout=0.5)
    assert time.monotonic() - started < 0.5 + SLACK_S

    growth = keep_trying(alice, dst, len(sent) + 1, sent, [os.getpid(), server.proc.pid])
    assert all(kb < RSS_GROWTH_LIMIT_KB for kb in growth.values()), growth
    if max_links:
        assert dst in alice._engine.routes.links  # the whole test ran on the link
    got = drain(deaf, len(sent))
    assert got == sent  # every message whose send returned, once, in order; none that raised
    print(f"\n{len(sent)} messages sent before Backpressure; VmRSS growth (KB) {growth}; "
          f"sender {alice.status().delivery}")


def test_async_client_send_raises_backpressure_and_loses_nothing(start_server, clients):
    server = start_server("s1")
    deaf = connect(clients, [server], "deaf", max_links=0)

    async def flood() -> tuple[list[int], float, float]:
        async with zbus.AsyncClient(servers=[server.endpoint], name="a", listen=LOCAL, max_links=0) as a:
            dst = await a.wait_peer("deaf", 5.0)
            sent = []
            for i in range(FLOOD_MAX):
                try:
                    await a.send(dst, payload(i), timeout=1.0)
                except zbus.Backpressure:
                    break
                sent.append(i)
            started = time.monotonic()
            with pytest.raises(zbus.Backpressure):
                await a.send(dst, payload(10**7), timeout=0.5)
            waited = time.monotonic() - started
            started = time.monotonic()
            with pytest.raises(zbus.Backpressure):
                await a.send(dst, payload(10**7), timeout=0)
            at_once = time.monotonic() - started
            # Read while the sender is open: close() gives what it still holds only 2 s to leave.
            got = await asyncio.to_thread(drain, deaf, len(sent))
            return sent, waited, at_once, got

    sent, waited, at_once, got = asyncio.run(flood())
    assert len(sent) > 1000 and sent[-1] == len(sent) - 1
    assert 0.45 <= waited < 0.5 + SLACK_S
    assert at_once < 0.1
    assert got == sent


def test_async_send_waiting_for_acks_is_woken_by_them_instead_of_polling(start_server, clients):
    """An AsyncClient send that finds its destination's window full waits for the engine's word
    that acks moved: it looks at the window once per ack, or every 0.2 s without one, not every few
    milliseconds (which cost the loop 200 wake-ups a second per waiting send, and up to 5 ms of delay
    once the acks came). And once the receiver reads, the waiting send goes out, nothing lost."""
    server = start_server("s1")
    deaf = connect(clients, [server], "deaf", max_links=0)
    window = 200

    async def scenario() -> tuple[int, int, list[int], list[int]]:
        async with zbus.AsyncClient(servers=[server.endpoint], name="a", listen=LOCAL, max_links=0,
                                    max_unacked=window) as a:
            dst = await a.wait_peer("deaf", 5.0)
            for i in range(window):  # the window holds exactly this many unacknowledged messages
                await a.send(dst, payload(i), timeout=5.0)
            looks = 0
            attempt = a._attempt

            def counted(*args):
                nonlocal looks
                looks += 1
                return attempt(*args)

            a._attempt = counted  # instrumentation only: the real attempt runs
            with pytest.raises(zbus.Backpressure):  # nobody reads, so no ack comes for a second
                await a.send(dst, payload(10**7), timeout=1.0)
            while_deaf, looks = looks, 0
            late = asyncio.create_task(a.send(dst, payload(window), timeout=10.0))
            got = await asyncio.to_thread(drain, deaf, window + 1)
            await asyncio.wait_for(late, 10.0)
            return while_deaf, looks, got, list(range(window + 1))

    while_deaf, after, got, expected = asyncio.run(scenario())
    print(f"\nlooks at the window: {while_deaf} in a 1 s wait without acks, {after} while the receiver read")
    assert while_deaf <= 12, while_deaf  # 6 with 0.2 s waits; polling every 5 ms made it ~200
    assert after <= 30, after
    assert got == expected


def test_send_timeout_config_key_is_the_default(start_server, clients, tmp_path):
    server = start_server("s1")
    config = tmp_path / "zbus.toml"
    config.write_text('[client]\nsend_timeout = 0.3\n')
    alice = zbus.Client(servers=[server.endpoint], name="alice", listen=LOCAL, max_links=0, config=str(config))
    clients.append(alice)
    deaf = connect(clients, [server], "deaf", max_links=0)
    dst = alice.wait_peer("deaf", 5.0)
    assert alice.config.send_timeout == 0.3
    sent = fill(alice, dst, timeout=None)
    started = time.monotonic()
    with pytest.raises(zbus.Backpressure, match="0.3s"):
        alice.send(dst, payload(10**7))
    assert time.monotonic() - started < 0.3 + SLACK_S
    alice.config.send_timeout = alice._default_wait = 0.0  # a default of 0: raise at once
    started = time.monotonic()
    with pytest.raises(zbus.Backpressure):
        alice.send(dst, payload(10**7))
    assert time.monotonic() - started < 0.1
    assert drain(deaf, len(sent)) == sent


def test_a_receiver_that_does_not_read_holds_back_only_the_streams_to_it(start_server, clients, tmp_path):
    """Two senders flood, through one server, a client that does not read. Each gets Backpressure
    once its window (``max_unacked``: what that destination has not acknowledged) is full, and only
    towards that destination; the server keeps at most ``max_queue`` messages for the deaf client and
    drops what comes past that (counted ``slow_receiver``) instead of pausing, so a third client's
    traffic through the same server flows meanwhile (with the old shared bound, ``max_pending``, the
    server stopped reading for everyone). When the deaf client reads, every message whose ``send``
    returned arrives once and in order per sender: the senders repeat what the server dropped."""
    window = 10_000  # two of them: more than the pipes and TCP buffers to the deaf client hold, plus max_queue
    server = start_server("s1", extra=config_file(tmp_path, max_queue=2000, max_pending=4000))
    alice = connect(clients, [server], "alice", max_links=0, max_unacked=window)
    bob = connect(clients, [server], "bob", max_links=0, max_unacked=window)
    carol = connect(clients, [server], "carol", max_links=0)
    deaf = connect(clients, [server], "deaf", max_links=0)
    reader = connect(clients, [server], "reader", max_links=0)
    dst = alice.wait_peer("deaf", 5.0)
    bob.wait_peer("deaf", 5.0)
    reader_id = carol.wait_peer("reader", 5.0)

    sent = {alice.id: fill(alice, dst, timeout=1.0), bob.id: fill(bob, dst, timeout=1.0)}
    assert [len(numbers) for numbers in sent.values()] == [window, window]  # the window, not a pipe, was full
    with pytest.raises(zbus.Backpressure, match="has not acknowledged"):
        alice.send(dst, payload(10**7), timeout=0.2)
    assert alice.status().delivery["window_waits"] > 0
    wait_until(lambda: query_status(server.endpoint).stats.dropped.get("slow_receiver", 0) > 0, 5.0,
               "the server to count what it dropped for the deaf client")  # (its stats are refreshed every 0.5 s)

    flowing = Collector(reader, 5000, timeout=10.0)
    for i in range(5000):  # more than max_pending: this server still reads and relays for others
        carol.send(reader_id, payload(i), timeout=2.0)
    assert [int(m.data[:8]) for m in flowing.result(30.0)] == list(range(5000))

    got: dict[str, list[int]] = {alice.id: [], bob.id: []}
    started = time.monotonic()
    while sum(map(len, got.values())) < 2 * window:
        assert time.monotonic() - started < 60.0, {src: len(numbers) for src, numbers in got.items()}
        try:  # a dropped message comes back once its sender's acks stall (3 s, doubling while repeats are dropped too)
            message = deaf.recv(timeout=1.0)
        except TimeoutError:
            continue
        got[message.src].append(int(message.data[:8]))
    drained = time.monotonic() - started
    with pytest.raises(TimeoutError):
        deaf.recv(timeout=1.0)
    assert got == sent
    assert deaf.status().delivery["gap_skipped"] == 0
    print(f"\n{2 * window} messages read in {drained:.1f}s; server dropped {query_status(server.endpoint).stats.dropped}; "
          f"resent by alice {alice.status().delivery['resent']}, bob {bob.status().delivery['resent']}")


def test_a_send_waiting_for_one_destinations_window_does_not_hold_up_the_clients_other_sends(start_server, clients):
    """One thread of alice blocks in ``send`` to a client that does not read (its window is full);
    meanwhile another thread of the same alice sends to a reading client, which gets everything at
    once: the waiting send does not keep the client's send lock."""
    server = start_server("s1")
    alice = connect(clients, [server], "alice", max_links=0, max_unacked=500)
    deaf = connect(clients, [server], "deaf", max_links=0)
    reader = connect(clients, [server], "reader", max_links=0)
    deaf_id, reader_id = alice.wait_peer("deaf", 5.0), alice.wait_peer("reader", 5.0)
    assert len(fill(alice, deaf_id, timeout=0.5)) == 500
    waits = alice.status().delivery["window_waits"]
    assert waits == 1  # the send that raised: counted once, not per look at the window
    outcome: dict[str, object] = {}

    def blocked() -> None:
        started = time.monotonic()
        try:
            alice.send(deaf_id, payload(10**7), timeout=4.0)
            outcome["blocked"] = "sent"
        except zbus.Backpressure:
            outcome["blocked"] = time.monotonic() - started

    waiter = threading.Thread(target=blocked)
    waiter.start()
    try:
        wait_until(lambda: alice.status().delivery["window_waits"] > waits, 5.0, "the other thread to wait for the window")
        started = time.monotonic()
        for i in range(200):
            alice.send(reader_id, payload(i), timeout=1.0)
        sent_in = time.monotonic() - started
        assert waiter.is_alive(), "the blocked send returned before the other thread was done"
        assert [int(reader.recv(timeout=5.0).data[:8]) for _ in range(200)] == list(range(200))
    finally:
        waiter.join(10.0)
    assert isinstance(outcome.get("blocked"), float) and outcome["blocked"] >= 3.9, outcome
    assert sent_in < 2.0, sent_in  # (not behind the 4 s wait; a loose bound for a loaded machine)
    assert deaf.status().delivery["gap_skipped"] == 0
