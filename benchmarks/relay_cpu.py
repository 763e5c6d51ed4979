"""CPU time per message of each process on the relay path: zbus (server, sending and receiving client)
against the raw pyzmq relay (the harness's raw-relay roles, written the same way), on 127.0.0.1.

On a machine with fewer cores than busy processes, relay throughput follows the *sum* of the three
processes' CPU time per message, so this says where a gap in ``benchmarks/run.py``'s relay rows
comes from. Each process's user and system time is read from ``/proc/<pid>/stat`` (Linux) just before
the first message and just after the last one arrives; the sender's and receiver's include their
I/O threads. The two cases run alternately ``--repeat`` times::

    .venv/bin/python benchmarks/relay_cpu.py --size 4096 --count 300000 --repeat 2
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import zmq

from zbus.bench import free_tcp_port, free_tcp_port_pair, script_args
from zbus.bench.raw import relay_loop

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_QUIET_MS = 5000  # a receiver gives up after this long without a message


def _cpu(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


# -- the roles (each its own process: this file run with --role) -------------------------------------

def _raw_relay(port: int) -> None:
    """The harness's raw relay (zbus.bench.raw), its socket options included; ended by SIGTERM."""
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    sock.bind(f"tcp://127.0.0.1:{port}")
    print("ready", flush=True)
    relay_loop(sock)


def _raw_client(role: str, port: int, size: int, count: int) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, role.encode())
    sock.setsockopt(zmq.RCVTIMEO, _QUIET_MS)
    sock.connect(f"tcp://127.0.0.1:{port}")
    sock.send_multipart([role.encode(), b"hello"])  # to itself, through the relay: its route exists
    sock.recv_multipart()
    print("ready", flush=True)
    if role == "rx":
        _count(lambda: (sock.recv(), sock.recv(copy=size < 65536)), count)
    else:
        sys.stdin.readline()  # "go"
        payload = os.urandom(size)
        for _ in range(count):
            sock.send(b"rx", zmq.SNDMORE)
            sock.send(payload, copy=False)
        sys.stdin.readline()  # "stop": the receiver has everything
    ctx.destroy(linger=0)


def _zbus_client(role: str, endpoint: str, size: int, count: int) -> None:
    import zbus

    with zbus.Client(servers=[endpoint], name=f"relay-cpu-{role}", max_links=0) as client:
        if role == "rx":
            print("ready", flush=True)
            _count(lambda: client.recv(timeout=_QUIET_MS / 1000), count)
        else:
            rx = client.wait_peer("relay-cpu-rx", 10.0)
            print("ready", flush=True)
            sys.stdin.readline()
            payload, send = os.urandom(size), client.send
            for _ in range(count):
                send(rx, payload)
            sys.stdin.readline()


def _count(receive, count: int) -> None:
    """Say 'first' at the first message; after ``count`` (or silence) 'done <received> <seconds>
    <user s> <system s>', the times since the first message (this process, all its threads)."""
    received, start, cpu = 0, time.perf_counter(), os.times()
    try:
        receive()
        received = 1
        print("first", flush=True)
        start, cpu = time.perf_counter(), os.times()
        while received < count:
            receive()
            received += 1
    except (zmq.Again, TimeoutError):
        pass
    now = os.times()
    print(f"done {received} {time.perf_counter() - start} {now.user - cpu.user} {now.system - cpu.system}", flush=True)


# -- the parent ------------------------------------------------------------------------------------

def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--role", *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _expect(proc: subprocess.Popen, word: str) -> str:
    line = proc.stdout.readline()
    if not line.startswith(word):
        raise RuntimeError(f"expected {word!r} from a role, got {line!r}")
    return line


def _run_case(case: str, size: int, count: int) -> None:
    port = free_tcp_port_pair() if case == "zbus" else free_tcp_port()  # (a zbus server also takes port + 1)
    if case == "zbus":
        relay = subprocess.Popen([sys.executable, "-m", "zbus.cli", "server", "--listen",
                                  f"tcp://127.0.0.1:{port}", "--name", "relay-cpu"], stdout=subprocess.PIPE, text=True)
        _expect(relay, "zbus server")
        target = f"tcp://127.0.0.1:{port}"
    else:
        relay = _spawn("raw-relay", str(port))
        _expect(relay, "ready")
        target = str(port)
    procs = [relay]
    try:
        receiver = _spawn(f"{case}-rx", target, str(size), str(count))
        procs.append(receiver)
        _expect(receiver, "ready")
        sender = _spawn(f"{case}-tx", target, str(size), str(count))
        procs.append(sender)
        _expect(sender, "ready")
        before = {name: _cpu(p.pid) for name, p in (("relay", relay), ("sender", sender))}
        sender.stdin.write("go\n")
        sender.stdin.flush()
        _expect(receiver, "first")
        _, received, seconds, user, system = _expect(receiver, "done").split()
        used = {name: tuple(a - b for a, b in zip(_cpu(p.pid), before[name]))
                for name, p in (("relay", relay), ("sender", sender))}
        used["receiver"] = (float(user), float(system))
        sender.stdin.write("stop\n")
        sender.stdin.flush()
        received, seconds = int(received), float(seconds)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
    rate = received / seconds if seconds else 0.0
    parts = [f"{name} {1e6 * (user + system) / received:.1f} ({1e6 * user / received:.1f} user)"
             for name, (user, system) in used.items()]
    total = sum(user + system for user, system in used.values())
    print(f"{case:4} {size} B: {received:,} in {seconds:.2f} s, {rate:,.0f} msg/s; CPU us per message: "
          + ", ".join(parts) + f"; total {1e6 * total / received:.1f}", flush=True)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        role, args = sys.argv[2], sys.argv[3:]
        if role == "raw-relay":
            _raw_relay(int(args[0]))
        elif role.startswith("raw-"):
            _raw_client(role[4:], int(args[0]), int(args[1]), int(args[2]))
        else:
            _zbus_client(role[5:], args[0], int(args[1]), int(args[2]))
        return
    size, count, repeat = script_args(__doc__, 300_000, 5_000_000, 2, "messages")
    for _ in range(repeat):
        for case in ("raw", "zbus"):
            _run_case(case, size, count)


if __name__ == "__main__":
    main()
