"""Chaos soak: a cluster of real servers and clients, servers killed -9 and restarted at random.

    python -m tests.chaos.chaos --duration 60 [--servers 3] [--clients 6] [--kill-every 4] [--seed N]

Starts ``--servers`` ``zbus-node server`` processes (a cluster, each knowing the first) and
``--clients`` client processes (``tests/chaos/worker.py``; half of them relay-only with
``max_links=0``, half free to open direct links). Every client sends numbered messages with
``send(..., ack=True)`` round-robin to every other client. Meanwhile, every ``--kill-every`` seconds
(jittered) a random server (the Master first, then the Master one time in three) is killed with SIGKILL and restarted on
the same endpoint a moment later. At the end every client reports what it got acked and what it
received, and the run checks: every acked message arrived (0 lost), none arrived twice
(0 duplicated), and each sender's messages arrived in the order sent. Every loop is bounded in
count and time; every process is ended, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from tests.helpers import REPO, ServerProcess, free_port_pair
from zbus.errors import ZbusError
from zbus.status import query_status

READY_TIMEOUT_S = 60.0


class Worker:
    """A worker process and a thread that turns its stdout into a queue of lines."""

    def __init__(self, name: str, servers: list[str], peers: list[str], max_links: int, limit_s: float,
                 ack: bool = True) -> None:
        argv = [sys.executable, "-m", "tests.chaos.worker", "--servers", ",".join(servers), "--name", name,
                "--peers", ",".join(peers), "--max-links", str(max_links), "--limit-s", str(limit_s)]
        argv += [] if ack else ["--no-ack"]
        self.name = name
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name=f"chaos-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def tell(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"worker {self.name} exited (code {self.proc.wait()}) before {prefix!r}")
            if line.startswith(prefix):
                return line
        raise RuntimeError(f"worker {self.name}: no {prefix!r} line within {timeout}s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


@dataclass
class Outcome:
    acked: int = 0
    failed: int = 0
    received: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    kills: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.out_of_order == 0 and self.acked > 0

    def summary(self) -> str:
        return (f"acked {self.acked}, not acked {self.failed}, received {self.received}; lost {self.lost}, "
                f"duplicated {self.duplicated}, out of order {self.out_of_order}; {len(self.kills)} kills "
                f"({sum('master' in k for k in self.kills)} of the Master); send errors {self.errors}")


def check(reports: list[dict]) -> Outcome:
    """Every acked message arrived exactly once, in the order its sender sent it."""
    outcome = Outcome()
    by_id = {r["id"]: r for r in reports}
    for sender in reports:
        outcome.failed += sum(sender["failed"].values())
        for kind, count in sender["errors"].items():
            outcome.errors[kind] = outcome.errors.get(kind, 0) + count
        for dst, counters in sender["acked"].items():
            outcome.acked += len(counters)
            got = by_id[dst]["received"].get(sender["id"], [])
            outcome.lost += len(set(counters) - set(got))
    for receiver in reports:
        for src, counters in receiver["received"].items():
            outcome.received += len(counters)
            outcome.duplicated += len(counters) - len(set(counters))
            outcome.out_of_order += sum(1 for a, b in zip(counters, counters[1:]) if b < a)
    return outcome


def master_of(servers: list[ServerProcess]) -> str | None:
    for server in servers:
        try:
            return query_status(server.endpoint, timeout=0.5).master
        except ZbusError:
            continue
    return None


def run(duration: float = 60.0, n_servers: int = 3, n_clients: int = 6, kill_every: float = 4.0,
        down_for: float = 1.0, seed: int | None = None, ack: bool = True, log=print) -> Outcome:
    rng = random.Random(seed)
    servers: list[ServerProcess] = []
    workers: list[Worker] = []
    outcome_kills: list[str] = []
    try:
        for i in range(n_servers):
            peer = ["--peer", servers[0].endpoint] if servers else []
            servers.append(ServerProcess(free_port_pair(), f"chaos-s{i}", peer).start())
        endpoints = [s.endpoint for s in servers]
        names = [f"chaos-c{i}" for i in range(n_clients)]
        limit = duration + 120.0
        for i, name in enumerate(names):
            workers.append(Worker(name, endpoints, [n for n in names if n != name], 0 if i % 2 else 64, limit, ack))
        for worker in workers:
            worker.expect("ready", READY_TIMEOUT_S)
        for worker in workers:
            worker.tell("go")
        kind = "acked messages" if ack else "plain messages (no ack: 'acked' below counts sends that returned)"
        log(f"chaos: {n_servers} servers, {n_clients} clients sending {kind} for {duration:.0f} s")
        started = time.monotonic()
        next_kill = started + kill_every * rng.uniform(0.5, 1.5)
        while (now := time.monotonic()) < started + duration:
            time.sleep(max(0.0, min(next_kill, started + duration) - now))  # the chaos schedule, not a sync
            if time.monotonic() < next_kill:
                continue
            master = master_of(servers)
            by_id = {s.id: s for s in servers}
            want_master = not outcome_kills or rng.random() < 1 / 3  # the first kill is always the Master
            victim = by_id[master] if master in by_id and want_master else rng.choice(servers)
            what = f"{victim.name}{' (master)' if victim.id == master else ''}"
            log(f"  t={time.monotonic() - started:5.1f}s kill -9 {what}")
            victim.kill()
            outcome_kills.append(what)
            time.sleep(down_for)  # how long the server stays dead: part of the scenario
            others = [s for s in servers if s is not victim]
            restarted = ServerProcess(victim.port, victim.name, ["--peer", rng.choice(others).endpoint])
            servers[servers.index(victim)] = restarted
            restarted.start()
            next_kill = time.monotonic() + kill_every * rng.uniform(0.5, 1.5)
        for worker in workers:
            worker.tell("stop")
        for worker in workers:
            worker.expect("stopped", 30.0)
        for worker in workers:
            worker.tell("report")
        reports = [json.loads(worker.expect("{", 60.0)) for worker in workers]
        outcome = check(reports)
        outcome.kills = outcome_kills
        log("chaos: " + outcome.summary())
        return outcome
    finally:
        for worker in workers:
            worker.kill()
        for server in servers:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos (default 60)")
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--kill-every", type=float, default=4.0, help="mean seconds between kills")
    parser.add_argument("--down-for", type=float, default=1.0, help="seconds a killed server stays down")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-ack", action="store_true", help="plain send(): shows what acknowledgements buy")
    args = parser.parse_args()
    outcome = run(args.duration, args.servers, args.clients, args.kill_every, args.down_for, args.seed,
                  ack=not args.no_ack)
    sys.exit(0 if outcome.ok else 1)


if __name__ == "__main__":
    main()
