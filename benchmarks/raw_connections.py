"""Round trip of raw pyzmq over one TCP connection against two one-way connections (no zbus).

zbus direct links are one-way: each side sends on its own DEALER to the other's ROUTER (a libzmq
socket may not be used by two threads at once, and a client's ``send`` and ``recv`` run on different
threads), so a ping-pong between two linked clients crosses two TCP connections. This measures what
that costs by itself, in the same minutes, on 127.0.0.1:

- ``one``: the ping's DEALER to the echo's ROUTER, answered on the same connection (the harness's
  raw-dealer-router case);
- ``two``: the ping's DEALER to the echo's ROUTER, answered by the echo's DEALER to the ping's ROUTER.

Both read and write frames as bytes with pyzmq's backend calls. Prints the p50/p90/p99 round trip
of each, interleaved ``--repeat`` times; ``--pin`` runs the echo on the first CPU we may use and the
ping on the second (every thread of each), as if on two hosts::

    .venv/bin/python benchmarks/raw_connections.py --size 4096 --count 10000 --repeat 3 [--pin]

On the 2-core VM of docs/performance.md the answer depends on ``--pin``: left to the scheduler, two
connections cost ~45 us more at 64 KiB in most runs; pinned, they cost nothing (or less than one).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import zmq

from zbus.bench import free_tcp_port, script_args

_RECV = zmq.backend.Socket.recv
_SEND = zmq.backend.Socket.send
_TIMEOUT_MS = 5000


def _open(ctx: zmq.Context, sock_type: int, port: int, bind: bool) -> zmq.Socket:
    sock = ctx.socket(sock_type)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, _TIMEOUT_MS)
    (sock.bind if bind else sock.connect)(f"tcp://127.0.0.1:{port}")
    return sock


def _echo(kind: str, listen: int, answer: int, cpu: int | None) -> None:
    """Echo every payload until the ping goes quiet for _TIMEOUT_MS (the ping has finished)."""
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    ctx = zmq.Context()
    router = _open(ctx, zmq.ROUTER, listen, bind=True)
    back = _open(ctx, zmq.DEALER, answer, bind=False) if kind == "two" else None
    print("ready", flush=True)
    try:
        while True:
            peer = _RECV(router, 0)
            payload = _RECV(router, 0)
            if back is None:
                _SEND(router, peer, zmq.SNDMORE)
                _SEND(router, payload, 0)
            else:
                _SEND(back, payload, 0)
    except zmq.Again:
        pass
    finally:
        ctx.destroy(linger=0)


def _ping(kind: str, size: int, count: int, warmup: int, cpus: list[int] | None) -> list[int]:
    """The ping runs in this process (on cpus[1] if given), the echo in a child (on cpus[0])."""
    listen, answer = free_tcp_port(), free_tcp_port()
    pinned = [str(cpus[0])] if cpus else []
    echo = subprocess.Popen([sys.executable, __file__, "--echo", kind, str(listen), str(answer), *pinned],
                            stdout=subprocess.PIPE, text=True)
    ctx = zmq.Context()
    try:
        if echo.stdout.readline().strip() != "ready":
            raise RuntimeError("the echo process did not start")
        out = _open(ctx, zmq.DEALER, listen, bind=False)
        inn = _open(ctx, zmq.ROUTER, answer, bind=True) if kind == "two" else out
        payload = os.urandom(size)
        samples = []
        clock = time.perf_counter_ns
        for i in range(warmup + count):
            t0 = clock()
            _SEND(out, payload, 0)
            if kind == "two":
                _RECV(inn, 0)  # the echo DEALER's routing id
            _RECV(inn, 0)
            if i >= warmup:
                samples.append(clock() - t0)
        return samples
    finally:
        ctx.destroy(linger=0)
        echo.terminate()
        echo.wait(timeout=10)


def _pct(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1000


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--echo":
        _echo(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else None)
        return
    size, count, repeat, pin = script_args(__doc__, 10_000, 1_000_000, 3, "round trips", pin=True)
    cpus = sorted(os.sched_getaffinity(0)) if pin else None
    if cpus is not None:
        if len(cpus) < 2:
            sys.exit(f"--pin needs at least 2 CPUs to run on; this process may use {len(cpus)}")
        os.sched_setaffinity(0, {cpus[1]})  # before the ping's libzmq threads start: they inherit it
    for run in range(1, repeat + 1):
        for kind in ("one", "two"):
            samples = _ping(kind, size, count, warmup=min(500, count), cpus=cpus)
            print(f"run {run} {kind} connection{'s' if kind == 'two' else ''}, {size} B{', pinned' if pin else ''}: "
                  f"p50 {_pct(samples, 0.5):.1f} us, p90 {_pct(samples, 0.9):.1f} us, p99 {_pct(samples, 0.99):.1f} us",
                  flush=True)


if __name__ == "__main__":
    main()
