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

from zbus.bench import free_tcp_port
from zbus.bench.processes import Launcher

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
