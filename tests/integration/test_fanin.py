"""500 clients on one server converge fast, and a join costs control traffic independent of N."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

import zbus
from tests.helpers import REPO

PROCESSES, PER_PROCESS = 5, 100
TOTAL = PROCESSES * PER_PROCESS


def ask(proc: subprocess.Popen, command: str) -> list[str]:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().split()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_500_clients_converge_within_5s_and_a_join_costs_one_small_delta_each(start_server):
    server = start_server("fan-in", extra=[])
    started = time.monotonic()
    workers = [
        subprocess.Popen([sys.executable, "-m", "tests.integration.fanin_worker", server.endpoint, f"w{p}",
                          str(PER_PROCESS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        for p in range(PROCESSES)
    ]
    try:
        joined = [proc.stdout.readline().split() for proc in workers]
        assert all(line and line[0] == "joined" for line in joined), joined
        last_join = max(float(line[1]) for line in joined)
        print(f"{TOTAL} clients joined in {last_join - started:.1f}s")
        for proc in workers:
            proc.stdin.write(f"wait {TOTAL}\n")
            proc.stdin.flush()
        converged = [proc.stdout.readline().split() for proc in workers]
        assert all(line[0] == "converged" for line in converged), converged
        took = max(float(line[1]) for line in converged) - last_join
        print(f"{TOTAL} clients: every list complete {took:.2f}s after the last join")
        assert took < 5.0

        # A client's Hello carries its public UDP endpoint when the reflector answered within 0.2 s;
        # under load some answers land later (one more delta each): count only once all have settled.
        for proc in workers:
            proc.stdin.write("settle\n")
            proc.stdin.flush()
        settled = [proc.stdout.readline() for proc in workers]
        assert all(line.startswith("settled") for line in settled), settled
        before = [ask(proc, "counts") for proc in workers]
        with zbus.Client(servers=[server.endpoint], name="late-joiner") as late:
            for proc in workers:
                proc.stdin.write(f"wait {TOTAL + 1}\n")
                proc.stdin.flush()
            waited = [proc.stdout.readline() for proc in workers]
            assert all(line.startswith("converged") for line in waited), waited
            assert len(late.peers()) == TOTAL
            after = [ask(proc, "counts") for proc in workers]
        deltas = sum(int(a[1]) - int(b[1]) for a, b in zip(after, before))
        delta_bytes = sum(int(a[2]) - int(b[2]) for a, b in zip(after, before))
        per_client = delta_bytes / TOTAL
        print(f"one join: {deltas} deltas to {TOTAL} clients, {per_client:.0f} control bytes each")
        # One join = about one delta of one entry per listening client, whatever the list's size
        # (a full list of 500 entries would be tens of kilobytes per client).
        assert deltas <= 2 * TOTAL
        assert per_client < 1000
    finally:
        for proc in workers:
            if proc.poll() is None:
                try:
                    proc.stdin.write("quit\n")
                    proc.stdin.flush()
                except BrokenPipeError:
                    pass
        deadline = time.monotonic() + 20
        for proc in workers:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdin.close()
            proc.stdout.close()
