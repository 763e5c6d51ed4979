"""CPU time per message of the server's frame handler, ``Server._on_frames`` (no network, no clients).

Two paths: the relay fast path (a Data on a route already checked) and a control message (a
Heartbeat from a registered client). Frames go to an inproc DEALER, drained between runs. Prints the
best of 5 runs of ``N/5`` calls each, in CPU time (``time.process_time``), so other processes on the
machine disturb it less than a throughput figure.

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
from zbus.server import Server


def main(n: int) -> None:
    server = Server(listen="tcp://127.0.0.1:7", control_rate=1e9, control_burst=10**9)  # never bound
    server.core = ServerCore(server.id, "bench", "tcp://127.0.0.1:7", 3.0, server_limits(server.config))
    ctx = sockets.context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.SNDHWM, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind("inproc://onframes-cpu")
    sinks = []
    for token in (b"\x01" * 16, b"\x03" * 16):
        sink = ctx.socket(zmq.DEALER)
        sink.setsockopt(zmq.RCVHWM, 0)
        sink.setsockopt(zmq.ROUTING_ID, token)
        sink.connect("inproc://onframes-cpu")
        sinks.append(sink)
    alice, bob = new_client_id(), new_client_id()
    now = time.monotonic()
    server.core.receive(b"ctl-a", wire.Hello(alice, "a", instance="i", data_in=b"\x02" * 16, data_out=b"\x04" * 16), now)
    server.core.receive(b"ctl-b", wire.Hello(bob, "b", instance="j", data_in=b"\x01" * 16, data_out=b"\x05" * 16), now)
    data = [zmq.Frame(b"\x04" * 16), zmq.Frame(wire.data_header(wire.data_header_prefix(bob), 7)), zmq.Frame(b"x" * 64)]
    heartbeat = [zmq.Frame(b"ctl-a"), zmq.Frame(wire.encode(wire.Heartbeat()))]
    server._on_frames(router, data, now)  # the first Data checks the route and caches it

    def run(frames: list[zmq.Frame], count: int) -> float:
        on_frames = server._on_frames
        started = time.process_time()
        for _ in range(count):
            on_frames(router, frames, now)
        return (time.process_time() - started) / count * 1e9

    best_fast = best_control = float("inf")
    try:
        for _ in range(5):
            best_fast = min(best_fast, run(data, n // 5))
            for sink in sinks:
                while sink.poll(0):
                    sink.recv_multipart()
            best_control = min(best_control, run(heartbeat, n // 5))
    finally:
        for sock in (router, *sinks):
            sock.close(linger=0)
    print(f"{zbus.__file__}: relay fast path {best_fast:.0f} ns/msg, control (Heartbeat) {best_control:.0f} ns/msg "
          f"({server.core.relayed_msgs} relayed)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000)
