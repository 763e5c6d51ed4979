"""CPU time per message of the server's input handler, ``Server._read_batch`` (no network, no clients).

Two paths: the relay fast path (a Data on a route already checked) and a control message (a
Heartbeat from a registered client). Messages are queued on an inproc ROUTER first (untimed), then
read and handled by ``_read_batch`` (timed: the reads, the checks and the forwarding sends); the
forwarded ones go to inproc DEALERs, drained between runs. Prints the best of 5 runs of ``N/5``
messages each, in CPU time (``time.process_time``), so other processes on the machine disturb it less
than a throughput figure.

For an A/B of two trees (e.g. a branch against its base, to check a change adds nothing per message),
run it alternately under each tree's code and compare the minima::

    git archive <base> | tar -x -C /tmp/base
    for i in 1 2 3 4; do for t in /tmp/base "$PWD"; do
        (cd /tmp && PYTHONPATH=$t python "$OLDPWD"/benchmarks/server_onframes_cpu.py 200000); done; done
"""

from __future__ import annotations

import sys
import time

import zmq

import zbus
from zbus import sockets, wire
from zbus.config import server_limits
from zbus.ids import new_client_id
from zbus.relay import ServerCore
from zbus.server import BATCH, Server


def main(n: int) -> None:
    server = Server(listen="tcp://127.0.0.1:7", control_rate=1e9, control_burst=10**9)  # never bound
    server.core = ServerCore(server.id, "bench", "tcp://127.0.0.1:7", 3.0, server_limits(server.config))
    ctx = sockets.context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.SNDHWM, 0)
    router.setsockopt(zmq.RCVHWM, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind("inproc://onframes-cpu")
    peers = {}
    for token in (b"\x01" * 16, b"\x03" * 16, b"\x04" * 16, b"ctl-a"):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.ROUTING_ID, token)
        sock.connect("inproc://onframes-cpu")
        peers[token] = sock
    alice, bob = new_client_id(), new_client_id()
    now = time.monotonic()
    server.core.receive(b"ctl-a", wire.Hello(alice, "a", instance="i", data_in=b"\x02" * 16, data_out=b"\x04" * 16), now)
    server.core.receive(b"ctl-b", wire.Hello(bob, "b", instance="j", data_in=b"\x01" * 16, data_out=b"\x05" * 16), now)
    data = [wire.data_header(wire.data_header_prefix(bob), 7), b"x" * 64]
    heartbeat = [wire.encode(wire.Heartbeat())]

    def run(sender: zmq.Socket, frames: list[bytes], count: int) -> float:
        for _ in range(count):
            sender.send_multipart(frames)
        while not router.poll(1000):
            pass
        handled, started = 0, time.process_time()
        while handled < count:
            server._read_batch(router, now)
            handled += min(BATCH, count - handled)
        elapsed = time.process_time() - started
        for sink in peers.values():
            while sink.poll(0):
                sink.recv_multipart()
        return elapsed / count * 1e9

    run(peers[b"\x04" * 16], data, 1)  # the first Data checks the route and caches it
    best_fast = best_control = float("inf")
    try:
        for _ in range(5):
            best_fast = min(best_fast, run(peers[b"\x04" * 16], data, n // 5))
            best_control = min(best_control, run(peers[b"ctl-a"], heartbeat, n // 5))
    finally:
        for sock in (router, *peers.values()):
            sock.close(linger=0)
    print(f"{zbus.__file__}: relay fast path {best_fast:.0f} ns/msg, control (Heartbeat) {best_control:.0f} ns/msg "
          f"({server.core.relayed_msgs} relayed)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
