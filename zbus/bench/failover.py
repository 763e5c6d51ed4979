"""Failover benchmark: time from kill -9 of the Master to a new Master agreed by every survivor.

    python -m zbus.bench.failover [--trials 20] [--servers 3] [--dead-after 1.0]

Each trial: a settled cluster of ``servers`` real ``zbus-node server`` processes on 127.0.0.1 (one
Raft membership, every server a voter); SIGKILL the Master; poll every survivor's status (the same
``StatusRequest`` ``zbus-node status`` sends) until all of them name the same new Master, one of
them. Then a replacement server (fresh Id) joins through ``--peer`` and the dead one is removed after
``dead_after``, so the next trial starts from a settled cluster of the same size again.

With 3 servers the survivors are 2, so the seed's 2-server rule applies (the one started earlier is
Master) the moment both see the killed server's connection reset; with 5 the survivors wait for a
Raft election (300-600 ms election timeout). Public: ``measure_failover()``, ``main()``.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from zbus.bench import free_tcp_port_pair
from zbus.cluster.status import cluster_endpoint_of, query_cluster_status
from zbus.errors import ZbusError
from zbus.status import query_status

START_TIMEOUT_S = 15.0  # one server process: interpreter, imports, bind
SETTLE_TIMEOUT_S = 20.0  # a cluster (re)forming, including the removal of a dead server
FAILOVER_TIMEOUT_S = 10.0  # a trial that takes longer than this fails the run
POLL_S = 0.002


class FailoverError(Exception):
    """A cluster did not form, or did not agree on a new Master, in time."""


@dataclass
class _Server:
    name: str
    endpoint: str
    proc: subprocess.Popen
    id: str

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _start(name: str, peer: str | None, dead_after: float) -> _Server:
    endpoint = f"tcp://127.0.0.1:{free_tcp_port_pair()}"
    argv = [sys.executable, "-m", "zbus.cli", "server", "--listen", endpoint, "--name", name,
            "--dead-after", str(dead_after), *(["--peer", peer] if peer else [])]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()  # "zbus server S-… (name) listening on …", or EOF if it died
    if "listening on" not in line:
        proc.kill()
        proc.wait()
        raise FailoverError(f"server {name} did not start: {line!r}")
    return _Server(name, endpoint, proc, line.split()[2])


def _wait(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise FailoverError(f"{what}: not within {timeout}s")
        time.sleep(POLL_S)


def _settled(servers: list[_Server]) -> bool:
    """One Raft membership of exactly these servers, each a voter, one leader."""
    try:
        statuses = [query_cluster_status(cluster_endpoint_of(s.endpoint), 1.0) for s in servers]
    except ZbusError:
        return False
    ids = {s.id for s in servers}
    return (len({st.cluster_id for st in statuses}) == 1
            and all(st.phase == "member" and set(st.voters) == set(st.table) == ids for st in statuses)
            and sum(st.role == "leader" for st in statuses) == 1)


def _agreed_master(servers: list[_Server]) -> str | None:
    try:
        masters = {query_status(s.endpoint, 1.0).master for s in servers}
    except ZbusError:
        return None
    master = masters.pop() if len(masters) == 1 else None
    return master if master in {s.id for s in servers} else None


def measure_failover(trials: int = 20, servers: int = 3, dead_after: float = 1.0) -> list[float]:
    """Seconds from kill -9 of the Master to a new Master agreed by all survivors, one per trial."""
    if servers < 2:
        raise ValueError(f"servers={servers}: failover needs at least 2 servers")
    cluster: list[_Server] = []
    started = 0
    times: list[float] = []
    try:
        for _ in range(servers):
            cluster.append(_start(f"fo{started}", cluster[-1].endpoint if cluster else None, dead_after))
            started += 1
        for _ in range(trials):
            _wait(lambda: _settled(cluster), SETTLE_TIMEOUT_S, f"a settled cluster of {servers}")
            master = _wait(lambda: _agreed_master(cluster), SETTLE_TIMEOUT_S, "an agreed master")
            victim = next(s for s in cluster if s.id == master)
            cluster.remove(victim)
            victim.kill()
            killed = time.monotonic()
            _wait(lambda: _agreed_master(cluster) not in (None, master), FAILOVER_TIMEOUT_S,
                  "a new agreed master")
            times.append(time.monotonic() - killed)
            cluster.append(_start(f"fo{started}", cluster[0].endpoint, dead_after))
            started += 1
    finally:
        for server in cluster:
            server.kill()
    return times


def summary(times: list[float]) -> str:
    return (f"p50 {statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms "
            f"over {len(times)} trials")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zbus.bench.failover",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--servers", type=int, nargs="+", default=[3, 5], help="cluster sizes to measure")
    parser.add_argument("--dead-after", type=float, default=1.0,
                        help="seconds before a killed server is removed (lets the next trial start sooner)")
    args = parser.parse_args(argv)
    for count in args.servers:
        times = measure_failover(args.trials, count, args.dead_after)
        print(f"failover, {count} servers: kill -9 of the Master -> new Master agreed by all survivors: "
              f"{summary(times)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
