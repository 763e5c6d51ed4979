"""Punched links inside zbus.Client, between real processes in the NAT lab (docs/nat.md).

A real ``zbus-node server`` on a public host (its reflector is the rendezvous) and client worker
processes (tests/natlab/punchlink_worker.py) on hosts behind routers of each NAT type. A sends a
numbered stream to B; the stream starts by relay and must arrive complete and in order while the
path upgrades (direct, punched or none); ``peers()`` on A shows what it got.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .lab import NatLab, wait_until

pytestmark = pytest.mark.timeout(170)

SERVER = "tcp://203.0.113.10:7700"
WORKER = str(Path(__file__).with_name("punchlink_worker.py"))
STREAM = 10_000
RATE = 4000  # messages per second: the 10,000-message stream spans 2.5 s, across the upgrade
NATS = ("none", "cone", "symmetric")
# What A (sender) -> B gets, as kind of A's link to B. A public peer (B on "none") is dialed directly;
# a NATed B is punched (a public A's plain TCP connect reaches B's punch port through the hole B
# opened); cone <-> symmetric is punched over UDP (birthday) but TCP cannot follow: relay.
EXPECTED = {
    ("none", "none"): "direct", ("cone", "none"): "direct", ("symmetric", "none"): "direct",
    ("none", "cone"): "punched", ("none", "symmetric"): "punched",
    ("cone", "cone"): "punched", ("cone", "symmetric"): "relay",
    ("symmetric", "cone"): "relay", ("symmetric", "symmetric"): "relay",
}


def start_server(lab: NatLab) -> None:
    argv = [sys.executable, "-m", "zbus.cli", "server", "--listen", SERVER]
    lab.popen("s1", argv).wait_line(lambda line: "listening on" in line, timeout=20.0,
                                    what="the server's ready line")


def worker(lab: NatLab, host: str, name: str):
    proc = lab.popen(host, [sys.executable, WORKER, "--server", SERVER, "--name", name])
    proc.wait_event("ready", timeout=30.0)
    return proc


def pair(lab: NatLab, a_host: str, b_host: str, tag: str):
    """Start B, then A, and let A find B; returns (a, b)."""
    b = worker(lab, b_host, f"b-{tag}")
    a = worker(lab, a_host, f"a-{tag}")
    a.send_line(f"peer b-{tag}")
    return a, b


def stream(a, b, n: int = STREAM, rate: int = RATE, timeout: float = 60.0) -> dict:
    """A sends n numbered messages to B; returns B's report (asserted complete and in order)."""
    b.send_line("reset")
    a.send_line(f"send {n} {rate}")
    a.wait_line(lambda line: '"event": "sent"' in line and f'"n": {n}' in line, timeout, what="the stream sent")
    before = len([e for e in b.events() if e["event"] == "received"])
    b.send_line(f"expect {n} {timeout}")
    b.wait_line(lambda line: len([e for e in b.events() if e["event"] == "received"]) > before,
                timeout + 5.0, what="B's report")
    report = [e for e in b.events() if e["event"] == "received"][-1]
    assert report["n"] == n and report["in_order"], report
    return report


def paths(proc) -> list[dict]:
    return [e for e in proc.events() if e["event"] == "path"]


def final_kind(a) -> str:
    got = paths(a)
    return got[-1]["kind"] if got else "unknown"


def first_time(a, kind: str) -> float | None:
    return next((p["t"] for p in paths(a) if p["kind"] == kind), None)


def test_cone_cone_punched_link_carries_a_stream_in_order(natlab):
    lab = natlab
    lab.add_public_host("s1")
    lab.add_router("ra", nat="cone")
    lab.add_router("rb", nat="cone")
    lab.add_host("a", router="ra")
    lab.add_host("b", router="rb")
    lab.build()
    start_server(lab)
    a, b = pair(lab, "a", "b", "cc")
    a.wait_event("peer", timeout=20.0)
    report = stream(a, b)
    print(f"\ncone-cone: paths {[(p['kind'], p['t']) for p in paths(a)]}, received via {report['via']}")
    assert final_kind(a) == "punched", paths(a)
    punched = next(p for p in paths(a) if p["kind"] == "punched")
    assert punched["address"].split(":")[0] == lab.public_addr("b"), punched
    assert report["via"].get("punched", 0) > 0, report
