"""Request/reply: ``client.request(dst, data, timeout)`` and ``client.on_request(handler)``.

Real ``zbus-node server`` processes on 127.0.0.1; requester and responder clients in this process.
Handlers that must be slow block on an Event the test releases (no sleeps).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest

import zbus
from tests.helpers import wait_until
from tests.integration.test_links import LOCAL, connect

pytestmark = pytest.mark.timeout(60)


class Counting:
    """A handler that upper-cases and counts its calls; ``gate`` (if set) holds each call until released."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[bytes] = []
        self.gate = gate
        self.lock = threading.Lock()

    def __call__(self, src: str, data: bytes) -> bytes:
        with self.lock:
            self.calls.append(data)
        if self.gate is not None:
            assert self.gate.wait(30.0), "the test never released the handler"
        return data.upper()


def test_requests_to_a_client_whose_own_thread_is_in_recv_are_served_as_they_come(start_server, clients):
    """bob's main thread sits in recv while alice sends him requests: his recv reads them and wakes
    his request thread, which must be waiting for exactly that. (It used to wait for the receive
    lock instead, missed the wake-up and found each request only when its 20 ms wait ran out:
    ~20 ms per request, benchmarks/acks_and_requests.py.) Counted, not timed: ``_serve_late``."""
    server = start_server("s1")
    alice = connect(clients, [server], "alice")
    bob = connect(clients, [server], "bob")
    dst = alice.wait_peer("bob", 5.0)
    handler = Counting()
    bob.on_request(handler)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(bob.recv(timeout=30.0).data))
    reader.start()
    try:
        wait_until(lambda: bob._rx_lock.locked(), 5.0, "bob's reader in recv")
        for i in range(300):
            assert alice.request(dst, b"req-%d" % i, timeout=5.0) == b"REQ-%d" % i
        assert handler.calls == [b"req-%d" % i for i in range(300)]
        assert bob._serve_late == 0
    finally:
        alice.send(dst, b"done")
        reader.join(10.0)
    assert got == [b"done"]


def test_an_idle_async_responder_reads_each_request_as_it_lands(start_server, clients):
    """An AsyncClient that only serves requests (no recv) waits on its data sockets, so a request
    wakes its request task as it lands (``_read_wakes``), instead of waiting for a pause of 1 ms and
    more to run out (~1.2 ms per request; benchmarks/acks_and_requests.py measures the sync side)."""
    server = start_server("s1")
    alice = connect(clients, [server], "alice")

    async def main() -> tuple[int, list[bytes]]:
        async with zbus.AsyncClient(servers=[server.endpoint], name="bob", listen=LOCAL) as bob:
            bob.on_request(lambda src, data: data.upper())
            dst = await asyncio.to_thread(alice.wait_peer, "bob", 5.0)
            await asyncio.to_thread(alice.request, dst, b"first", 5.0)
            before = bob._read_wakes
            answers = await asyncio.to_thread(lambda: [alice.request(dst, b"r%d" % i, 5.0) for i in range(100)])
            return bob._read_wakes - before, answers

    wakes, answers = asyncio.run(main())
    assert answers == [b"R%d" % i for i in range(100)]
    assert 80 <= wakes <= 300, wakes


def test_async_requests_while_a_recv_task_reads_are_woken_by_their_replies(start_server, clients):
    """An AsyncClient with a recv task waiting (it reads the sockets, so the requests do not): each
    Reply that recv reads wakes the waiting request (``_read_wakes``) instead of a pause running out."""
    server = start_server("s1")
    bob = connect(clients, [server], "bob")
    bob.on_request(lambda src, data: data.upper())

    async def main() -> tuple[int, list[bytes], bytes]:
        async with zbus.AsyncClient(servers=[server.endpoint], name="a", listen=LOCAL) as a:
            dst = await a.wait_peer("bob", 5.0)
            assert await a.request(dst, b"first", timeout=5.0) == b"FIRST"
            reading = asyncio.ensure_future(a.recv(timeout=30.0))
            await asyncio.sleep(0)  # (a yield: the task starts and waits on the sockets)
            assert a._receivers == 1
            before = a._read_wakes
            answers = [await a.request(dst, b"r%d" % i, timeout=5.0) for i in range(100)]
            wakes = a._read_wakes - before
            await asyncio.to_thread(bob.send, a.id, b"done")
            return wakes, answers, (await reading).data

    wakes, answers, last = asyncio.run(main())
    assert answers == [b"R%d" % i for i in range(100)]
    assert last == b"done"
    assert 80 <= wakes <= 300, wakes


@pytest.mark.parametrize("max_links", [0, 64], ids=["relay", "direct"])
def test_request_reply_over_relay_and_link(start_server, clients, max_links):
    server = start_server("s1")
    alice = connect(clients, [server], "alice", max_links=max_links)
    bob = connect(clients, [server], "bob", max_links=max_links)
    dst = alice.wait_peer("bob", 5.0)
    handler = Counting()
    bob.on_request(handler)
    if max_links:  # wanting a peer is what starts a link (one each way: the reply takes bob's)
        alice.send(dst, b"hello")
        bob.send(alice.id, b"hello back")
        assert alice.wait_link(dst, 10.0)
        assert bob.wait_link(alice.id, 10.0)
        assert alice.recv(timeout=5.0).data == b"hello back"
    for i in range(100):
        assert alice.request(dst, b"req-%d" % i, timeout=5.0) == b"REQ-%d" % i
    assert handler.calls == [b"req-%d" % i for i in range(100)]  # once each, in order
    assert alice.request(dst, b"", timeout=5.0) == b""
    if max_links:
        assert dst in alice._engine.routes.links and alice.id in bob._engine.routes.links
        assert bob.recv(timeout=5.0).data == b"hello"  # plain messages still reach recv, read by the server thread


def test_plain_messages_read_by_the_request_server_reach_recv_in_order(start_server, clients):
    server = start_server("s1")
    alice = connect(clients, [server], "alice", max_links=0)
    bob = connect(clients, [server], "bob", max_links=0)
    dst = alice.wait_peer("bob", 5.0)
    bob.on_request(Counting())
    for i in range(500):
        alice.send(dst, b"%d" % i)
        if i % 100 == 0:
            assert alice.request(dst, b"x", timeout=5.0) == b"X"
    wait_until(lambda: len(bob._ready) >= 500, 10.0, "the request server to read the plain messages")
    assert [int(bob.recv(timeout=5.0).data) for _ in range(500)] == list(range(500))


def test_concurrent_requests_from_several_threads(start_server, clients):
    server = start_server("s1")
    alice = connect(clients, [server], "alice", max_links=0)
    bob = connect(clients, [server], "bob", max_links=0)
    dst = alice.wait_peer("bob", 5.0)
    handler = Counting()
    bob.on_request(handler)
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            results[n] = [alice.request(dst, b"t%d-%d" % (n, i), timeout=10.0) for i in range(50)]
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(40.0)
    assert not any(thread.is_alive() for thread in threads)
    assert not errors, errors
    for n in range(8):
        assert results[n] == [b"T%d-%d" % (n, i) for i in range(50)]
    assert len(handler.calls) == 400


def test_handler_exception_is_a_remote_error(start_server, clients):
    server = start_server("s1")
    alice = connect(clients, [server], "alice", max_links=0)
    bob = connect(clients, [server], "bob", max_links=0)
    dst = alice.wait_peer("bob", 5.0)

    def broken(src: str, data: bytes) -> bytes:
        raise ValueError(f"cannot handle {data!r} from {src}")

    bob.on_request(broken)
    with pytest.raises(zbus.RemoteError, match=r"ValueError: cannot handle b'boom' from " + alice.id):
        alice.request(dst, b"boom", timeout=5.0)
    bob.on_request(lambda src, data: "not bytes")
    with pytest.raises(zbus.RemoteError, match="returned str, expected bytes"):
        alice.request(dst, b"x", timeout=5.0)


def test_no_handler_is_a_remote_error_at_once(start_server, clients):
    server = start_server("s1")
    alice = connect(clients, [server], "alice", max_links=0)
    bob = connect(clients, [server], "bob", max_links=0)
    dst = alice.wait_peer("bob", 5.0)
    got: list = []
    reader = threading.Thread(target=lambda: got.append(_recv_or_timeout(bob, 3.0)))
    reader.start()  # bob reads (recv), but serves no requests
    try:
        started = time.monotonic()
        with pytest.raises(zbus.RemoteError, match="no request handler"):
            alice.request(dst, b"anyone?", timeout=5.0)
        assert time.monotonic() - started < 1.0
    finally:
        reader.join(10.0)
    assert got == ["timeout"]  # the request never showed up as a message
    bob.on_request(Counting())
    assert alice.request(dst, b"now", timeout=5.0) == b"NOW"
    bob.on_request(None)  # removed: the server thread still reads, and answers that there is no handler
    started = time.monotonic()
    with pytest.raises(zbus.RemoteError, match="no request handler"):
        alice.request(dst, b"again?", timeout=5.0)
    assert time.monotonic() - started < 1.0


def _recv_or_timeout(client: zbus.Client, timeout: float) -> object:
    try:
        return client.recv(timeout=timeout)
    except TimeoutError:
        return "timeout"


def test_unknown_destination_is_unreachable(start_server, clients):
    server = start_server("s1")
    alice = connect(clients, [server], "alice", max_links=0)
    started = time.monotonic()
    with pytest.raises(zbus.Unreachable):
        alice.request(f"C-{uuid.uuid4()}", b"hello", timeout=5.0)
    assert time.monotonic() - started < 1.0


def test_request_times_out_when_the_handler_is_too_slow(start_server, clients):
    server = start_server("s1")
    alice = connect(clients, [server], "alice", max_links=0)
    bob = connect(clients, [server], "bob", max_links=0)
    dst = alice.wait_peer("bob", 5.0)
    gate = threading.Event()
    handler = Counting(gate)
    bob.on_request(handler)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no reply"):
            alice.request(dst, b"slow", timeout=1.5)
        assert 1.5 <= time.monotonic() - started < 2.5
    finally:
        gate.set()
    assert handler.calls == [b"slow"]  # repeated for 1.5 s, run once


def test_the_handler_runs_once_when_the_relaying_server_dies_mid_request(start_server, clients):
    servers = [start_server("s1"), start_server("s2")]
    alice = connect(clients, servers, "alice", max_links=0)
    bob = connect(clients, servers, "bob", max_links=0)
    dst = alice.wait_peer("bob", 5.0)
    wait_until(lambda: len(alice._engine.routes.holders.get(dst, ())) == 2, 5.0, "bob listed by both servers")
    gate = threading.Event()
    handler = Counting(gate)
    bob.on_request(handler)
    relaying = alice.peers()[dst].address
    result: list = []
    requester = threading.Thread(target=lambda: result.append(_request(alice, dst, b"survive", 20.0)))
    requester.start()
    try:
        wait_until(lambda: handler.calls, 10.0, "the handler to start")
        next(s for s in servers if s.endpoint == relaying).kill()  # kill -9 the server the request came by
        wait_until(lambda: alice.peers()[dst].address != relaying, 10.0, "alice to route to bob by the other server")
        gate.set()  # the reply goes now; if it took the dead server's path, the repeat gets it from the cache
    finally:
        gate.set()
        requester.join(30.0)
    assert result == [b"SURVIVE"]
    assert handler.calls == [b"survive"]  # once, although the request was repeated


def _request(client: zbus.Client, dst: str, data: bytes, timeout: float) -> object:
    try:
        return client.request(dst, data, timeout=timeout)
    except BaseException as exc:  # the test compares it
        return exc


def test_async_request_reply(start_server):
    server = start_server("s1")

    async def main() -> None:
        async with zbus.AsyncClient(servers=[server.endpoint], name="a", listen=LOCAL, max_links=0) as a, \
                zbus.AsyncClient(servers=[server.endpoint], name="b", listen=LOCAL, max_links=0) as b:
            dst = await a.wait_peer("b", 5.0)
            with pytest.raises(zbus.Unreachable):
                await a.request(f"C-{uuid.uuid4()}", b"x", timeout=2.0)
            calls = []

            async def handler(src: str, data: bytes) -> bytes:
                calls.append(data)
                await asyncio.sleep(0)  # an async handler may await
                if data == b"fail":
                    raise KeyError("nope")
                return data[::-1]

            b.on_request(handler)
            replies = await asyncio.gather(*[a.request(dst, b"abc%d" % i, timeout=10.0) for i in range(50)])
            assert replies == [(b"abc%d" % i)[::-1] for i in range(50)]
            assert sorted(calls) == sorted(b"abc%d" % i for i in range(50))
            with pytest.raises(zbus.RemoteError, match="KeyError"):
                await a.request(dst, b"fail", timeout=5.0)
            b.on_request(lambda src, data: b"sync:" + data)  # a plain function works too
            assert await a.request(dst, b"x", timeout=5.0) == b"sync:x"
            await a.send(dst, b"plain")  # plain messages still reach recv
            assert (await b.recv(timeout=5.0)).data == b"plain"
            b.on_request(None)
            with pytest.raises(zbus.RemoteError, match="no request handler"):
                await a.request(dst, b"x", timeout=5.0)
            # and a sync responder answers an async requester
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await a.request(dst, b"x", timeout=0.0)
            assert time.monotonic() - started < 0.5

    asyncio.run(main())


def test_sync_client_answers_an_async_requester(start_server, clients):
    server = start_server("s1")
    bob = connect(clients, [server], "bob", max_links=0)
    bob.on_request(Counting())

    async def main() -> bytes:
        async with zbus.AsyncClient(servers=[server.endpoint], name="a", listen=LOCAL, max_links=0) as a:
            dst = await a.wait_peer("bob", 5.0)
            return await a.request(dst, b"hi", timeout=5.0)

    assert asyncio.run(main()) == b"HI"


def test_closing_an_async_client_ends_the_requests_it_has_waiting(start_server, clients):
    """A request waiting for its Reply (a recv task reads for it; the handler is held) when its
    AsyncClient closes raises ZbusError instead of waiting out its timeout."""
    server = start_server("s1")
    bob = connect(clients, [server], "bob")
    gate = threading.Event()
    handler = Counting(gate)
    bob.on_request(handler)

    async def main() -> BaseException:
        async with zbus.AsyncClient(servers=[server.endpoint], name="a", listen=LOCAL) as a:
            dst = await a.wait_peer("bob", 5.0)
            reading = asyncio.ensure_future(a.recv(timeout=30.0))
            asking = asyncio.ensure_future(a.request(dst, b"held", timeout=30.0))
            await asyncio.to_thread(wait_until, lambda: handler.calls, 5.0, "bob's handler holding the request")
            await a.close()
            results = await asyncio.gather(asking, reading, return_exceptions=True)
            return results[0]

    try:
        error = asyncio.run(main())
    finally:
        gate.set()
    assert isinstance(error, zbus.ZbusError) and "closed" in str(error), error
