"""How long ``send(..., ack=True)`` and ``request()`` take, next to a plain round trip on the same
path, on 127.0.0.1.

An acknowledged send returns once the destination's client has taken the message in: one round
trip (the message and an AckRequest out, the receiver's Ack back) plus what each side does with it;
a request, once the destination's handler has answered (the Request out, the Reply back, the handler
run on the destination's request thread). This runs a ``zbus-node server`` and a peer process that
echoes messages starting with ``ping:``, only takes in the others, and answers requests with their
own data; then, over a direct link and through the server (``max_links=0``), it times ``--count``
ping-pongs, acknowledged sends and requests of ``--size`` bytes, ``--repeat`` times::

    .venv/bin/python benchmarks/acks_and_requests.py --size 100 --count 2000 --repeat 2

Prints per path the p50 of each and their ratio to the round trip. (While a waiting sender or
requester slept in growing pauses instead of waiting on the socket its answer lands on, both took
~0.67 ms: 4-5 round trips over a link.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import zbus
from zbus.bench import free_tcp_port, script_args, wait_until_accepting

_QUIET_S = 60.0  # the peer stops after this long without a message (or on "stop")


def _peer(endpoint: str, name: str, max_links: int) -> None:
    with zbus.Client(servers=[endpoint], name=name, listen="tcp://127.0.0.1:0", max_links=max_links) as client:
        client.on_request(lambda src, data: data)
        print("ready", flush=True)
        while True:  # until "stop" (or _QUIET_S without a message: the measuring process is gone)
            message = client.recv(timeout=_QUIET_S)
            if message.data == b"stop":
                return
            if message.data.startswith(b"ping:"):
                client.send(message.src, message.data)


def _p50_us(samples: list[int]) -> float:
    return sorted(samples)[len(samples) // 2] / 1000


def _measure(endpoint: str, path: str, size: int, count: int) -> tuple[float, float, float]:
    max_links = 64 if path == "link" else 0
    name = f"acked-peer-{os.getpid()}-{path}"
    peer = subprocess.Popen([sys.executable, __file__, "--peer", endpoint, name, str(max_links)],
                            stdout=subprocess.PIPE, text=True)
    try:
        if peer.stdout.readline().strip() != "ready":
            raise RuntimeError("the peer process did not start")
        with zbus.Client(servers=[endpoint], name=f"acked-{os.getpid()}-{path}", listen="tcp://127.0.0.1:0",
                         max_links=max_links) as client:
            dst = client.wait_peer(name, 10.0)
            client.send(dst, b"ping:hello")
            client.recv(timeout=10.0)
            if path == "link" and not client.wait_link(dst, 10.0):
                raise RuntimeError(f"no direct link to {dst} within 10 s")
            ping, plain = b"ping:" + os.urandom(max(0, size - 5)), os.urandom(size)
            clock, rtt, acked, requests = time.perf_counter_ns, [], [], []
            for i in range(count + 100):  # the first 100 of each warm up
                t0 = clock()
                client.send(dst, ping)
                client.recv(timeout=5.0)
                if i >= 100:
                    rtt.append(clock() - t0)
            for i in range(count + 100):
                t0 = clock()
                client.send(dst, plain, ack=True, timeout=5.0)
                if i >= 100:
                    acked.append(clock() - t0)
            for i in range(count + 100):
                t0 = clock()
                client.request(dst, plain, timeout=5.0)
                if i >= 100:
                    requests.append(clock() - t0)
            if path == "link" and client.peers()[dst].via != "direct":
                raise RuntimeError("the link went down during the run")
            client.send(dst, b"stop")
        return _p50_us(rtt), _p50_us(acked), _p50_us(requests)
    finally:
        try:
            peer.wait(15)
        except subprocess.TimeoutExpired:  # it did not get "stop" (an error above): end it
            peer.kill()
            peer.wait(5)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        _peer(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    size, count, repeat = script_args(__doc__, 2000, 100_000, 2, "round trips, acked sends and requests")
    port = free_tcp_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "zbus.cli", "server", "--listen", endpoint],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0)
    try:
        wait_until_accepting(port, server, 30.0)
        for run in range(1, repeat + 1):
            for path in ("link", "relay"):
                rtt, acked, request = _measure(endpoint, path, size, count)
                print(f"run {run} {path:>5}, {size} B: round trip p50 {rtt:.0f} us, send(ack=True) p50 "
                      f"{acked:.0f} us ({acked / rtt:.2f}x), request p50 {request:.0f} us ({request / rtt:.2f}x)",
                      flush=True)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
