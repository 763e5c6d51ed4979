"""Benchmark harness: zbus next to raw pyzmq and NATS, each role in its own process.

This module is the contract between the harness (`zbus.bench.harness`, the parent process) and the
role modules (`raw`, `nats_roles`, `zbus_roles`, whose functions run in spawned child processes):

- a `Case` names the four role functions of one transport and how to start its infrastructure;
- every role function is `role(ctl: Control, job: Job) -> None`; it reports through `ctl`:
  `ctl.ready(info)` once connected, `ctl.wait_go()` (senders and pingers only), then
  `ctl.report(...)` with one of the report types below, then `ctl.wait_stop()` before closing sockets
  so that nothing still queued is thrown away;
- receiving roles (throughput receiver, RTT echo) receive with short timeouts (`IDLE_POLL_S`) and ask
  a `QuietTimer` after each timeout whether they are done: the harness tells them when their peer has
  reported, so a sender that stopped at its time cap does not cost an idle timeout.

Run it with `python benchmarks/run.py --help` (or `python -m zbus.bench`).
"""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from zbus.bench.processes import Launcher

#: First message of a handshake; it proves the path works both ways before timing starts.
HELLO = b"zbus-bench-hello"
#: Receive timeout of receiving roles: how often, when nothing arrives, they ask their QuietTimer.
IDLE_POLL_S = 0.05


@dataclass(frozen=True)
class Job:
    """What one role process does: sizes, counts and its time bounds."""

    size: int  # payload bytes
    count: int  # messages to send (throughput) or timed pings (latency)
    warmup: int  # latency only: pings sent before timing starts
    time_cap_s: float  # a sender or pinger stops after this long even if count is not reached
    idle_timeout_s: float  # a receiver gives up this long after the last message it got
    first_timeout_s: float  # a receiver gives up if the first message takes longer than this
    endpoint: str = ""  # from the case's infrastructure: relay or server address
    peer: str = ""  # from the first role's ready(): its address, identity or name

    def payload(self) -> bytes:
        """The pre-built payload every message of this job carries."""
        return b"\xa5" * self.size


@dataclass(frozen=True)
class SendReport:
    sent: int
    elapsed_s: float


@dataclass(frozen=True)
class ReceiveReport:
    received: int
    first_ns: int  # perf_counter_ns() at the first message (0 if none)
    last_ns: int  # perf_counter_ns() at the last message (0 if none)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class EchoReport:
    echoed: int


@dataclass(frozen=True)
class PingReport:
    samples_ns: list[int] = field(default_factory=list)  # round trips after warm-up
    timeouts: int = 0
    notes: tuple[str, ...] = ()


RoleFn = Callable[["Control", Job], None]


@dataclass(frozen=True)
class Case:
    """One transport under test.

    The four role functions must be module-level (they are pickled by name into spawned processes).
    `start_infra`, if set, runs in the parent before any role, starts what the roles connect to
    (through the `Launcher`, which ends it afterwards) and returns its endpoint (`Job.endpoint`).
    """

    name: str
    summary: str
    throughput_receiver: RoleFn
    throughput_sender: RoleFn
    rtt_echo: RoleFn
    rtt_ping: RoleFn
    start_infra: Callable[["Launcher"], str] | None = None


class CaseUnavailable(Exception):
    """This case cannot run here (a binary or package is missing); the message says which."""


class Aborted(Exception):
    """The harness told this role to stop (or went away) before it said go."""


class Control:
    """The role side of the control pipe to the harness."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._peer_total: int | None = None

    def ready(self, info: str = "") -> None:
        self._conn.send(("ready", info))

    def report(self, report: object) -> None:
        self._conn.send(("report", report))

    def wait_go(self, timeout_s: float = 60.0) -> None:
        if not self._conn.poll(timeout_s):
            raise Aborted(f"no go from the harness within {timeout_s} s")
        try:
            kind = self._conn.recv()[0]
        except EOFError:
            raise Aborted("the harness went away") from None
        if kind != "go":
            raise Aborted(f"harness said {kind!r} instead of go")

    def peer_total(self) -> int | None:
        """None while the peer role still runs; once it has reported, how many messages this role
        should have in all (a throughput sender's `sent`; 0 for an echo, whose pinger has every answer
        it waited for). Does not block. Raises Aborted if the harness said stop or went away."""
        if self._peer_total is None:
            try:
                if self._conn.poll(0):
                    kind, *value = self._conn.recv()
                    if kind != "peer_done":
                        raise Aborted(f"harness said {kind!r} while this role was receiving")
                    self._peer_total = value[0]
            except (EOFError, OSError):
                raise Aborted("the harness went away") from None
        return self._peer_total

    def wait_stop(self, timeout_s: float = 60.0) -> None:
        """Wait until the harness says stop (or goes away); then the role may close its sockets."""
        deadline = time.monotonic() + timeout_s
        try:
            while self._conn.poll(max(0.0, deadline - time.monotonic())):
                if self._conn.recv()[0] == "stop":
                    return
        except (EOFError, OSError):
            pass


class QuietTimer:
    """Asked by a receiving role each time a receive timed out: is this role done receiving?

    Done once the peer has reported and `count` (messages received or echoed so far) reached what it
    sent, or when `count` has not moved for `idle_timeout_s` (messages were lost; the report shows it).
    """

    def __init__(self, ctl: Control, idle_timeout_s: float) -> None:
        self._ctl = ctl
        self._idle_timeout_s = idle_timeout_s
        self._count = -1
        self._since = 0.0

    def done(self, count: int) -> bool:
        total = self._ctl.peer_total()
        if total is not None and count >= total:
            return True
        now = time.monotonic()
        if count != self._count:
            self._count, self._since = count, now
            return False
        return now - self._since >= self._idle_timeout_s


def free_tcp_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_args(doc: str, count: int, count_max: int, repeat: int, counted: str,
                pin: bool = False) -> tuple[int, int, int] | tuple[int, int, int, bool]:
    """(size, count, repeat) from the command line of a stand-alone script in benchmarks/: ``--size``
    (default 4096), ``--count`` (bounded by ``count_max``: loops stay bounded) and ``--repeat``;
    with ``pin``, also the ``--pin`` flag, as a fourth item."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--count", type=int, default=count, help=f"{counted} per run (at most {count_max:,})")
    parser.add_argument("--repeat", type=int, default=repeat)
    if pin:
        parser.add_argument("--pin", action="store_true", help="each of the two processes on a CPU of its own")
    args = parser.parse_args()
    sizes = max(0, args.size), max(1, min(args.count, count_max)), max(1, args.repeat)
    return (*sizes, args.pin) if pin else sizes


def free_tcp_port_pair() -> int:
    """A free port on 127.0.0.1 whose successor is free too (a server's cluster endpoint is its
    port + 1 by default)."""
    for _ in range(100):
        port = free_tcp_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair on 127.0.0.1")


def wait_until_accepting(port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    """Poll 127.0.0.1:port until a TCP connect succeeds; fail early if `proc` exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode} before accepting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing accepted on 127.0.0.1:{port} within {timeout_s} s")
        time.sleep(0.05)


def retry_until(fn: Callable[[], object], retry_on: type[BaseException], timeout_s: float) -> object:
    """Call fn until it stops raising `retry_on` (then return its value) or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return fn()
        except retry_on:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
