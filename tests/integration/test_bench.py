"""The benchmark harness end to end (real processes on 127.0.0.1), and how it starts servers.

The numbers themselves are not judged here (they belong to docs/performance.md); what is: every case
moves every message it sent and measures a round trip, the JSON has one row per run, and a server the
harness starts is scheduled like the roles it is compared with (same session).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from zbus.bench import Job, free_tcp_port
from zbus.bench.processes import READY_TIMEOUT_S, Launcher
from zbus.bench.raw import relay_main

pytestmark = pytest.mark.timeout(180)


def test_quick_run_of_the_relay_and_direct_cases_moves_every_message(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "zbus.cli", "bench", "--quick", "--sizes", "4096",
         "--cases", "raw-relay,zbus-relay,zbus-direct", "--repeat", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert any(line.startswith("| zbus-relay") for line in done.stdout.splitlines()), done.stdout[-2000:]
    results = json.loads(out.read_text())["results"]
    assert sorted(r["case"] for r in results) == ["raw-relay", "zbus-direct", "zbus-relay"]
    for row in results:
        assert row["notes"] == [], row
        assert row["sent"] > 0 and row["received"] == row["sent"], row
        assert row["msgs_per_s"] > 0 and row["rtt_samples"] > 0 and row["rtt_p50_ms"] > 0, row


_SERVICE = """
import os, socket, sys
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
with open(sys.argv[2], "w") as out:
    out.write(f"{os.getsid(0)} {os.getpgid(0)}")
while True:
    listener.accept()[0].close()
"""


def test_a_started_server_shares_the_harness_session_but_not_its_process_group(tmp_path):
    """A new session would be a scheduler autogroup of its own (Linux): CPU shared unlike the roles'.
    Its own process group keeps a terminal's Ctrl-C for the harness, which ends it on close()."""
    port, ids = free_tcp_port(), tmp_path / "ids"
    launcher = Launcher()
    try:
        launcher.start_command([sys.executable, "-c", _SERVICE, str(port), str(ids)], port)
        sid, pgid = (int(x) for x in ids.read_text().split())
    finally:
        launcher.close()
    assert sid == os.getsid(0)
    assert pgid != os.getpgid(0)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs 2 CPUs")
def test_pinned_roles_run_every_thread_on_a_cpu_of_their_own():
    """--pin: the first role alive on the first CPU, the next on the next; the libzmq threads a role
    starts after that inherit its CPU. (The relay role stands in for any: it starts libzmq.)"""
    cpus = sorted(os.sched_getaffinity(0))
    job = Job(0, 0, 0, 0.0, 0.0, 0.0)
    with Launcher(pin=True) as launcher:
        first, second = (launcher.role(relay_main, job, f"pinned {i}") for i in range(2))
        for role in (first, second):
            role.expect("ready", READY_TIMEOUT_S)
        placed = []
        for role in (first, second):
            tasks = os.listdir(f"/proc/{role.pid}/task")
            assert len(tasks) >= 3, tasks  # the main thread and libzmq's I/O and reaper threads
            placed.append({cpu for tid in tasks for cpu in os.sched_getaffinity(int(tid))})
        launcher.stop(first)
        third = launcher.role(relay_main, job, "pinned 3")  # takes the CPU the first gave back
        third.expect("ready", READY_TIMEOUT_S)
        placed.append(os.sched_getaffinity(third.pid))
    assert placed == [{cpus[0]}, {cpus[1]}, {cpus[0]}]
    with Launcher() as launcher:
        free = launcher.role(relay_main, job, "not pinned")
        free.expect("ready", READY_TIMEOUT_S)
        assert os.sched_getaffinity(free.pid) == set(cpus)


def test_pin_on_a_single_cpu_is_refused_before_anything_runs():
    cpu = min(os.sched_getaffinity(0))
    done = subprocess.run([sys.executable, "-c", f"import os, sys; os.sched_setaffinity(0, {{{cpu}}}); "
                           "from zbus.cli import main; sys.argv = ['zbus-node', 'bench', '--pin']; main()"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--pin needs at least 2 CPUs to run on; this process may use 1" in done.stderr
    assert "| case" not in done.stdout
