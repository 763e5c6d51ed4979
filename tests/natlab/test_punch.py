"""Rendezvous and UDP hole punching between real processes in the NAT lab.

Two ``zbus-node server`` processes on public hosts (their UDP reflectors are the rendezvous points;
the second one only lets each side tell a "hard" NAT by netcheck), and ``python -m zbus.punchtool``
on the hosts: the invited side (B) registers first, then the requester (A) asks for B and both punch.
"""

from __future__ import annotations

import sys
import time
import uuid

import pytest

from .lab import NatLab, wait_until

pytestmark = pytest.mark.timeout(120)

SERVER = "203.0.113.10:7700"
SERVER2 = "203.0.113.11:7700"
PLAIN_DEADLINE = 5.0  # PunchLimits.deadline
BIRTHDAY_DEADLINE = 6.0  # PunchLimits.birthday_deadline


def new_id() -> str:
    return f"C-{uuid.uuid4()}"


def start_servers(lab: NatLab) -> None:
    servers = []
    for host, endpoint in (("s1", SERVER), ("s2", SERVER2)):
        argv = [sys.executable, "-m", "zbus.cli", "server", "--listen", f"tcp://{endpoint}"]
        servers.append(lab.popen(host, argv))
    for server in servers:
        server.wait_line(lambda line: "listening on" in line, timeout=20.0, what="the server's ready line")


def add_servers(lab: NatLab) -> None:
    lab.add_public_host("s1")
    lab.add_public_host("s2")


def punchtool(lab: NatLab, host: str, own_id: str, peer: str = "", *extra: str):
    argv = [sys.executable, "-m", "zbus.punchtool", "--server", SERVER, "--netcheck", SERVER2,
            "--id", own_id, "--echo", "--lifetime", "80", *extra]
    if peer:
        argv += ["--peer", peer]
    return lab.popen(host, argv)


def outcome(proc, timeout: float) -> dict:
    proc.wait_line(lambda line: '"event": "punched"' in line or '"event": "failed"' in line, timeout,
                   what="the punch outcome")
    return next(e for e in proc.events() if e["event"] in ("punched", "failed"))


def punch_pairs(lab: NatLab, pairs: list[tuple[str, str]], *extra: str) -> list[tuple]:
    """Punch every (a_host, b_host) pair at once; a asks for b. Returns (a outcome, b outcome, a, b)."""
    ids = [(new_id(), new_id()) for _ in pairs]
    invited = [punchtool(lab, b, b_id, "", *extra) for (_, b), (_, b_id) in zip(pairs, ids)]
    for proc in invited:
        proc.wait_event("registered", timeout=20.0)
    asking = [punchtool(lab, a, a_id, b_id, *extra) for (a, _), (a_id, b_id) in zip(pairs, ids)]
    results = []
    for a, b in zip(asking, invited):
        results.append((outcome(a, 30.0), outcome(b, 30.0), a, b))
    return results


def label(a: dict, b: dict) -> str:
    if a["event"] != "punched" or b["event"] != "punched":
        return "relay"
    if "open" in (a["role"], a["peer_role"]):
        return "direct"
    if {a["role"], a["peer_role"]} == {"easy", "hard"}:
        return "punched (birthday)"
    return "punched"


NATS = ("none", "cone", "symmetric")
EXPECTED = {
    ("none", "none"): "direct", ("none", "cone"): "direct", ("none", "symmetric"): "direct",
    ("cone", "none"): "direct", ("cone", "cone"): "punched", ("cone", "symmetric"): "punched (birthday)",
    ("symmetric", "none"): "direct", ("symmetric", "cone"): "punched (birthday)",
    ("symmetric", "symmetric"): "relay",
}


def test_punch_matrix_direct_punched_birthday_and_relay(natlab):
    lab = natlab
    add_servers(lab)
    for nat in NATS:
        for side in ("a", "b"):
            lab.add_router(f"r{side}{nat[:3]}", nat=nat)
            lab.add_host(f"{side}{nat[:3]}", router=f"r{side}{nat[:3]}")
    lab.build()
    start_servers(lab)
    pairs = [(f"a{x[:3]}", f"b{y[:3]}") for x in NATS for y in NATS]
    results = punch_pairs(lab, pairs)
    got = {}
    print("\nA (asks) \\ B | " + " | ".join(NATS))
    for i, x in enumerate(NATS):
        row = []
        for j, y in enumerate(NATS):
            a, b, _, _ = results[i * len(NATS) + j]
            got[(x, y)] = label(a, b)
            row.append(f"{got[(x, y)]} {a.get('since_request', a.get('elapsed'))}s")
        print(f"{x} | " + " | ".join(row))
    assert got == EXPECTED, got
    for (x, y), (a_host, b_host), (a, b, _, _) in zip(EXPECTED, pairs, results):
        if got[(x, y)] == "relay":
            assert a["elapsed"] < PLAIN_DEADLINE + 2.0, a  # fails cleanly, in bounded time
            assert "use the relay" in a["reason"], a
        else:  # each side sends to the address the other one's packets come from
            assert a["addr"].split(":")[0] == lab.public_addr(b_host), (a, b)
            assert b["addr"].split(":")[0] == lab.public_addr(a_host), (a, b)
        if got[(x, y)] == "direct":
            assert a["elapsed"] < 2.0


def test_cone_to_symmetric_birthday_probing_success_rate(natlab):
    lab = natlab
    add_servers(lab)
    lab.add_router("easy", nat="cone")
    lab.add_router("hard", nat="symmetric")
    lab.add_host("e", router="easy")
    lab.add_host("h", router="hard")
    lab.build()
    start_servers(lab)
    tries = [("e", "h"), ("h", "e"), ("e", "h")]
    results = punch_pairs(lab, tries)
    ok = [a["event"] == "punched" and b["event"] == "punched" for a, b, _, _ in results]
    times = [a.get("since_request") for a, _, _, _ in results]
    packets = [(a["packets"], b["packets"]) for a, b, _, _ in results]
    print(f"\ncone<->symmetric birthday punching: {sum(ok)}/{len(ok)} succeeded; "
          f"request->punched {times} s; packets sent (a, b) {packets}")
    for a, b, _, _ in results:
        hard = a if a.get("role") == "hard" else b
        if a["event"] == "punched":
            assert max(a["packets"], b["packets"]) <= 2048 + 256 * 3 + 200  # bounded (docs/nat.md)
            assert hard["sock"] >= 0
    assert sum(ok) >= 2, results


def test_two_hosts_behind_one_nat_meet_by_private_address(natlab):
    lab = natlab
    add_servers(lab)
    lab.add_router("home", nat="cone")
    lab.add_host("alice", router="home")
    lab.add_host("carol", router="home")
    lab.build()
    start_servers(lab)
    [(a, b, a_proc, _)] = punch_pairs(lab, [("alice", "carol")])
    print(f"\nsame NAT: {a}")
    assert a["event"] == b["event"] == "punched", (a, b)
    assert a["addr"].split(":")[0] == lab.addr("carol")
    assert b["addr"].split(":")[0] == lab.addr("alice")
    a_proc.send_line("send 1")
    a_proc.wait_event("data", text="echo 0", timeout=5.0)


def test_cone_to_cone_punches_through_20_percent_loss_on_both_routers(natlab):
    lab = natlab
    add_servers(lab)
    lab.add_router("home", nat="cone", loss_percent=20)
    lab.add_router("office", nat="cone", loss_percent=20)
    lab.add_host("alice", router="home")
    lab.add_host("bob", router="office")
    lab.build()
    start_servers(lab)
    results = punch_pairs(lab, [("alice", "bob")] * 3)
    print("\ncone<->cone at 20% loss: " + ", ".join(
        f"{a['event']} in {a.get('since_request', a.get('elapsed'))} s" for a, _, _, _ in results))
    assert all(a["event"] == b["event"] == "punched" for a, b, _, _ in results), results


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_punched_path_survives_30s_idle_with_keepalives_and_dies_without(natlab):
    """The routers forget an idle UDP mapping after 10 s here (conntrack udp timeouts lowered)."""
    lab = natlab
    add_servers(lab)
    lab.add_router("home", nat="cone")
    lab.add_router("office", nat="cone")
    lab.add_host("alice", router="home")
    lab.add_host("bob", router="office")
    lab.build()
    for router in ("home", "office"):
        lab.run(router, ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_udp_timeout=10",
                         "net.netfilter.nf_conntrack_udp_timeout_stream=10"])
    start_servers(lab)
    [(kept, _, kept_a, kept_b)] = punch_pairs(lab, [("alice", "bob")], "--keepalive", "4")
    [(idle, _, idle_a, idle_b)] = punch_pairs(lab, [("alice", "bob")], "--keepalive", "0")
    assert kept["event"] == idle["event"] == "punched"
    start = time.monotonic()
    idle_a.wait_event("lost", timeout=25.0)  # no keepalive: the peer fell silent (dead_after 16 s)
    assert not [e for e in kept_a.events() if e["event"] == "lost"]
    wait_until(lambda: time.monotonic() - start >= 30.0, timeout=35.0, what="30 s of idle time")
    kept_port = kept["addr"].split(":")[1]
    idle_port = idle["addr"].split(":")[1]
    office = "\n".join(lab.conntrack("office"))
    assert f"dport={kept_port} " in office or f"sport={kept_port} " in office, office
    assert f"sport={idle_port} " not in office and f"dport={idle_port} " not in office, office
    idle_a.send_line("send 2")
    kept_a.send_line("send 2")
    kept_a.wait_event("data", text="echo 1", timeout=5.0)
    assert not [e for e in idle_b.events() if e["event"] == "data"]
    print("\nafter 30 s idle: keepalive path delivered, path without keepalive was dropped by the NAT")


def test_tcp_simultaneous_open_connects_two_hosts_behind_cone_nats(natlab):
    """Both connect() from a fixed port to the other's public endpoint (item 4 (a), docs/nat.md)."""
    lab = natlab
    lab.add_router("home", nat="cone")
    lab.add_router("office", nat="cone")
    lab.add_host("alice", router="home")
    lab.add_host("bob", router="office")
    lab.build()
    role = [sys.executable, "-m", "zbus.bench.punched_roles", "tcp-so", "--local-port", "9100", "--mib", "8"]
    bob = lab.popen("bob", [*role, "--peer", f"{lab.public_addr('alice')}:9100", "--mode", "recv"])
    alice = lab.popen("alice", [*role, "--peer", f"{lab.public_addr('bob')}:9100", "--mode", "send"])
    connected = alice.wait_event("connected", timeout=20.0)
    assert connected["peer"] == f"{lab.public_addr('bob')}:9100"
    result = alice.wait_event("result", timeout=20.0)
    assert bob.wait_event("done", timeout=5.0)["bytes"] == 8 * 1024 * 1024
    print(f"\nTCP simultaneous open: {connected}, {result['mib_s']:.0f} MiB/s")
