"""How long ``send(..., ack=True)`` takes, next to a plain round trip on the same path, on 127.0.0.1.

An acknowledged send returns once the destination's client has taken the message in: one round
trip (the message and an AckRequest out, the receiver's Ack back) plus what each side does with it.
This runs a ``zbus-node server`` and a peer process that echoes messages starting with ``ping:`` and
only takes in the others, then, over a direct link and through the server (``max_links=0``), times
``--count`` ping-pongs and ``--count`` acknowledged sends of ``--size`` bytes, ``--repeat`` times::

    .venv/bin/python benchmarks/acked_send.py --size 100 --count 2000 --repeat 2

Prints per path the p50 of each and their ratio (an acked send costs about one round trip when the
wait for the Ack wakes as it lands; it cost ~5 of them while that wait slept in growing pauses).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import zbus
from zbus.bench import free_tcp_port, script_args, wait_until_accepting

_QUIET_S = 3.0  # the peer stops after this long without a message


def _peer(endpoint: str, name: str, max_links: int) -> None:
    with zbus.Client(servers=[endpoint], name=name, listen="tcp://127.0.0.1:0", max_links=max_links) as client:
        print("ready", flush=True)
        try:
            while True:
                message = client.recv(timeout=_QUIET_S)
                if message.data.startswith(b"ping:"):
                    client.send(message.src, message.data)
        except TimeoutError:
            pass


def _p50_us(samples: list[int]) -> float:
    return sorted(samples)[len(samples) // 2] / 1000


def _measure(endpoint: str, path: str, size: int, count: int) -> tuple[float, float]:
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
            clock, rtt, acked = time.perf_counter_ns, [], []
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
            if path == "link" and client.peers()[dst].via != "direct":
                raise RuntimeError("the link went down during the run")
        return _p50_us(rtt), _p50_us(acked)
    finally:
        peer.wait(_QUIET_S + 10)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        _peer(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    size, count, repeat = script_args(__doc__, 2000, 100_000, 2, "round trips and acked sends")
    port = free_tcp_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "zbus.cli", "server", "--listen", endpoint],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, process_group=0)
    try:
        wait_until_accepting(port, server, 30.0)
        for run in range(1, repeat + 1):
            for path in ("link", "relay"):
                rtt, acked = _measure(endpoint, path, size, count)
                print(f"run {run} {path:>5}, {size} B: round trip p50 {rtt:.0f} us, send(ack=True) p50 "
                      f"{acked:.0f} us ({acked / rtt:.2f}x)", flush=True)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
