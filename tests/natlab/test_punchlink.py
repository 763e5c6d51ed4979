"""Punched links inside zbus.Client, between real processes in the NAT lab (docs/nat.md).

A real ``zbus-node server`` on a public host (its reflector is the rendezvous) and client worker
processes (tests/natlab/punchlink_worker.py) on hosts behind routers of each NAT type. A sends a
numbered stream to B; the stream starts by relay and must arrive complete and in order while the
path upgrades (direct, punched or none); ``peers()`` on A shows what it got.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import Keys

from .lab import NatLab, wait_until

pytestmark = pytest.mark.timeout(170)

SERVER = "tcp://203.0.113.10:7700"
WORKER = str(Path(__file__).with_name("punchlink_worker.py"))
STREAM = 10_000
RATE = 1000  # messages per second: the 10,000-message stream spans 10 s, across the upgrade (busy machine)
NATS = ("none", "cone", "symmetric")
# What A (sender) -> B gets, as kind of A's link to B. A public peer (B on "none") is dialed directly;
# a NATed B is punched (a public A's plain TCP connect reaches B's punch port through the hole B
# opened); cone <-> symmetric is punched over UDP by birthday probing and carried by KCP over that
# UDP path (no TCP can follow it); symmetric <-> symmetric stays on the relay.
EXPECTED = {
    ("none", "none"): "direct", ("cone", "none"): "direct", ("symmetric", "none"): "direct",
    ("none", "cone"): "punched", ("none", "symmetric"): "punched",
    ("cone", "cone"): "punched", ("cone", "symmetric"): "punched",
    ("symmetric", "cone"): "punched", ("symmetric", "symmetric"): "relay",
}


def start_server(lab: NatLab, extra: list[str] = ()):
    argv = [sys.executable, "-m", "zbus.cli", "server", "--listen", SERVER, *extra]
    proc = lab.popen("s1", argv)
    proc.wait_line(lambda line: "listening on" in line, timeout=20.0, what="the server's ready line")
    return proc


def worker(lab: NatLab, host: str, name: str, server: str = SERVER, extra: list[str] = ()):
    proc = lab.popen(host, [sys.executable, WORKER, "--server", server, "--name", name, *extra])
    proc.wait_event("ready", timeout=30.0)
    return proc


def pair(lab: NatLab, a_host: str, b_host: str, tag: str):
    """Start B, then A, and let A find B; returns (a, b)."""
    b = worker(lab, b_host, f"b-{tag}")
    a = worker(lab, a_host, f"a-{tag}")
    a.send_line(f"peer b-{tag}")
    return a, b


def reset(b) -> None:
    """B forgets what it received, and says so before anyone sends: a stream started while B had
    not yet read its reset lost its first messages to it (the matrix's rare "9,950 of 10,000, missing
    1-50" was this: the first batch of 50 goes at once)."""
    token = uuid.uuid4().hex
    b.send_line(f"reset {token}")
    b.wait_event("reset", timeout=20.0, token=token)


def stream(a, b, n: int = STREAM, rate: int = RATE, timeout: float = 60.0) -> dict:
    """A sends n numbered messages to B; returns B's report (asserted complete and in order)."""
    reset(b)
    a.send_line(f"send {n} {rate}")
    a.wait_line(lambda line: '"event": "sent"' in line and f'"n": {n}' in line, timeout, what="the stream sent")
    before = len([e for e in b.events() if e["event"] == "received"])
    b.send_line(f"expect {n} {timeout}")
    b.wait_line(lambda line: len([e for e in b.events() if e["event"] == "received"]) > before,
                timeout + 5.0, what="B's report")
    report = [e for e in b.events() if e["event"] == "received"][-1]
    assert report["n"] == n and report["in_order"], (json.dumps(report), paths(a), a.stderr_text()[-2000:],
                                                     b.stderr_text()[-2000:])
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
    build_two_cones(lab)
    start_server(lab)
    a, b = pair(lab, "a", "b", "cc")
    a.wait_event("peer", timeout=20.0)
    report = stream(a, b)
    print(f"\ncone-cone: paths {[(p['kind'], p['t']) for p in paths(a)]}, received via {report['via']}")
    assert final_kind(a) == "punched", paths(a)
    punched = next(p for p in paths(a) if p["kind"] == "punched")
    assert punched["address"].split(":")[0] == lab.public_addr("b"), punched
    assert report["via"].get("punched", 0) > 0, report


def run_streams(cells: dict, n: int, rate: int, timeout: float) -> dict:
    """Every cell's A streams to its B at once; returns each B's report (asserted complete, in order)."""
    for _, b in cells.values():
        reset(b)
    for a, _ in cells.values():
        a.send_line(f"send {n} {rate}")
    for a, b in cells.values():
        a.wait_line(lambda line: '"event": "sent"' in line, timeout, what="the stream sent")
        b.send_line(f"expect {n} {timeout}")
    reports = {}
    for key, (a, b) in cells.items():
        b.wait_line(lambda line: '"event": "received"' in line, timeout + 5.0, what="B's report")
        reports[key] = [e for e in b.events() if e["event"] == "received"][-1]
    for key, report in reports.items():
        assert report["n"] == n and report["in_order"], f"{key}: {json.dumps(report)}"
    return reports


def test_matrix_direct_punched_relay_and_same_nat(natlab):
    """A behind {none, cone, symmetric} x B behind {none, cone, symmetric}, plus two hosts behind one
    cone NAT; all cells at once, a 10,000-message stream in each while the path upgrades."""
    lab = natlab
    lab.add_public_host("s1")
    for nat in NATS:
        lab.add_router(f"ra{nat[:3]}", nat=nat)
        lab.add_router(f"rb{nat[:3]}", nat=nat)
    cells_hosts = {}
    for x in NATS:
        for y in NATS:
            a_host, b_host = f"a{x[:3]}{y[:3]}", f"b{x[:3]}{y[:3]}"
            lab.add_host(a_host, router=f"ra{x[:3]}")
            lab.add_host(b_host, router=f"rb{y[:3]}")
            cells_hosts[(x, y)] = (a_host, b_host)
    lab.add_host("same1", router="racon")
    lab.add_host("same2", router="racon")
    cells_hosts[("same", "same")] = ("same1", "same2")
    lab.build()
    start_server(lab)
    cells = {}
    for key, (a_host, b_host) in cells_hosts.items():
        tag = f"{key[0][:3]}{key[1][:3]}"
        cells[key] = (worker(lab, a_host, f"a-{tag}"), worker(lab, b_host, f"b-{tag}"))
    for key, (a, _) in cells.items():
        a.send_line(f"peer b-{key[0][:3]}{key[1][:3]}")
    for a, _ in cells.values():
        a.wait_event("peer", timeout=30.0)
    reports = run_streams(cells, STREAM, RATE, 90.0)
    for key, (a, b) in cells.items():  # an upgrade still under way after the stream (busy machine)
        want = EXPECTED.get(key, "direct")
        if want != "relay" and final_kind(a) != want:
            wait_path(a, want, 20.0, b)
            print(f"{key}: {want} only after the stream")
    got = {key: ask_path(a)["kind"] for key, (a, _) in cells.items()}
    print("\nA (sends) \\ B | " + " | ".join(NATS))
    for x in NATS:
        row = []
        for y in NATS:
            a = cells[(x, y)][0]
            kind = got[(x, y)]
            when = first_time(a, kind)
            row.append(f"{kind} {when:.3f}s" if kind != "relay" and when is not None else kind)
        print(f"{x} | " + " | ".join(row))
    same_a = cells[("same", "same")][0]
    print(f"same NAT: {got[('same', 'same')]} {paths(same_a)[-1]['address']} via {reports[('same', 'same')]['via']}")
    for key, report in reports.items():
        print(f"{key}: received via {report['via']}")
    assert {k: v for k, v in got.items() if k != ("same", "same")} == EXPECTED, got
    assert got[("same", "same")] == "direct" and paths(same_a)[-1]["address"].startswith("tcp://10."), paths(same_a)
    for key, kind in got.items():
        if kind != "relay":
            assert reports[key]["via"].get(kind, 0) > 0, (key, reports[key])
        if kind == "punched":
            b_host = cells_hosts[key][1]
            assert paths(cells[key][0])[-1]["address"].split(":")[0] == lab.public_addr(b_host)


def build_two_cones(lab: NatLab, a_side=("a",), b_side=("b",), public=(), loss: int = 0, b_nat: str = "cone") -> None:
    """The server host s1 and ``public`` hosts, routers ra and rb (cone NAT, or ``b_nat`` for rb;
    ``loss`` %), hosts behind them."""
    for host in ("s1", *public):
        lab.add_public_host(host)
    lab.add_router("ra", nat="cone", loss_percent=loss)
    lab.add_router("rb", nat=b_nat, loss_percent=loss)
    for router, hosts in (("ra", a_side), ("rb", b_side)):
        for host in hosts:
            lab.add_host(host, router=router)
    lab.build()


def cone_pair(lab: NatLab, tag: str, loss: int = 0, b_nat: str = "cone"):
    build_two_cones(lab, loss=loss, b_nat=b_nat)
    start_server(lab)
    a, b = pair(lab, "a", "b", tag)
    a.wait_event("peer", timeout=30.0)
    return a, b


def ask_path(a) -> dict:
    """A's path to B now (the worker's ``path`` command)."""
    before = len([e for e in a.events() if e["event"] == "now"])
    a.send_line("path")
    a.wait_line(lambda line: len([e for e in a.events() if e["event"] == "now"]) > before, 10.0, what="A's path")
    return [e for e in a.events() if e["event"] == "now"][-1]


def wait_path(a, kind: str, timeout: float, b=None) -> dict:
    """Ask A for its path to B until it is ``kind`` (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        now = ask_path(a)
        if now["kind"] == kind:
            return now
        assert time.monotonic() < deadline, (f"A's path is still {now} after {timeout} s: {a.stderr_text()[-2000:]}"
                                             f"\nB: {b.stderr_text()[-2000:] if b else ''}")
        time.sleep(0.2)  # pacing the question


DROP_PIPE = """table ip punchdrop {
  chain drop_pipe { type filter hook forward priority -5; policy accept;
    tcp sport PORT drop
    tcp dport PORT drop
  }
}
"""


def test_dead_punched_path_falls_back_to_relay_without_loss(natlab):
    """Mid-stream, B's router starts dropping the pipe's TCP packets (the punched path dies, the
    relay lives): the link goes down, the rest goes by relay, the stream arrives complete and in order."""
    lab = natlab
    a, b = cone_pair(lab, "fb")
    n, rate = 10_000, 1000
    reset(b)
    a.send_line(f"send {n} {rate}")
    punched = a.wait_event("path", timeout=20.0, kind="punched")
    port = punched["address"].rpartition(":")[2]  # B's end of the pipe (its router keeps the port)
    b.send_line("expect 1000 20")  # some of the stream has arrived over the punched link
    early = b.wait_event("received", timeout=25.0)
    assert early["via"].get("punched", 0) > 0, early
    lab._nft("rb", ["-f", "/dev/stdin"], DROP_PIPE.replace("PORT", port))
    try:
        a.wait_line(lambda line: '"event": "sent"' in line, 60.0, what="the stream sent")
    except TimeoutError:
        print("B log:", b.stderr_text()[-4000:], "A log:", a.stderr_text()[-6000:])
        print("server:", lab._processes[0].stderr_text()[-4000:], lab._processes[0].lines[-20:])
        raise
    b.send_line(f"expect {n} 60")
    b.wait_line(lambda line: '"event": "received"' in line and f'"n": {n},' in line, 65.0, what="B's report")
    report = [e for e in b.events() if e["event"] == "received"][-1]
    kinds = [(p["kind"], p["t"]) for p in paths(a)]
    print(f"\nfallback: paths {kinds}, received via {report['via']}")
    assert report["n"] == n and report["in_order"], report
    assert [k for k, _ in kinds][:3] == ["relay", "punched", "relay"], kinds
    assert report["via"].get("punched", 0) > 0 and report["via"].get("relay", 0) > 0, report


@pytest.mark.parametrize("b_nat", ["cone", "symmetric"], ids=["tcp-pipe", "kcp-pipe"])
def test_cone_cone_punches_with_20_percent_loss(natlab, b_nat):
    """20 % loss each way on both routers (UDP punch packets, the TCP pipe's SYNs and the relay alike):
    the link still gets punched (retries with backoff if a try fails), every stream stays complete.
    Whether the punched link then *stays* up is not asserted: a TCP pipe at 36 % round-trip loss
    stalls for seconds (retransmission backoff) and the link's 2 s ping timeout may drop it back to
    the relay, losing nothing (docs/nat.md). With B behind a symmetric NAT the path is found by
    birthday probing and the pipe is KCP over it (its lost NOMINATE_ACKs answered again)."""
    lab = natlab
    a, b = cone_pair(lab, "loss", loss=20, b_nat=b_nat)
    report = stream(a, b, n=3000, rate=500, timeout=120.0)
    print(f"\n20% loss ({b_nat} B): paths {[(p['kind'], p['t']) for p in paths(a)]}, received via {report['via']}")
    if first_time(a, "punched") is None:  # not within the 6 s stream: it must come later (bounded)
        # (watched by A itself every 10 ms: under this loss a link can be up for a moment only)
        a.send_line("watch 30 punched")
        a.wait_event("watched", timeout=40.0)
        report = stream(a, b, n=1000, rate=0, timeout=60.0)  # complete and in order, whatever the path
        print(f"then: paths {[(p['kind'], p['t']) for p in paths(a)]}, received via {report['via']}")
    assert first_time(a, "punched") is not None, (paths(a), a.stderr_text()[-3000:], b.stderr_text()[-3000:])



def test_peers_that_know_different_servers_punch_at_a_common_one(natlab):
    """A is configured with server s1 only, B with s2 only (the two form a cluster): each learns the
    other server, registers its punch socket at both rendezvous, and A's punch goes to a server that
    lists B. Before, the rendezvous was the first configured server only: A asked s1, where B was not
    registered, and the pair stayed on the relay."""
    lab = natlab
    build_two_cones(lab, public=("s2",))
    start_server(lab)
    second = f"tcp://{lab.addr('s2')}:7700"
    proc = lab.popen("s2", [sys.executable, "-m", "zbus.cli", "server", "--listen", second, "--peer", SERVER])
    proc.wait_line(lambda line: "listening on" in line, timeout=20.0, what="the second server's ready line")
    b = worker(lab, "b", "b-two", server=second)
    a = worker(lab, "a", "a-two")
    a.send_line("peer b-two")
    a.wait_event("peer", timeout=30.0)
    report = stream(a, b, n=3000, rate=1000, timeout=60.0)
    if first_time(a, "punched") is None:
        a.send_line("watch 20 punched")
        a.wait_event("watched", timeout=30.0)
    print(f"\ntwo servers: paths {[(p['kind'], p['t']) for p in paths(a)]}, received via {report['via']}")
    assert first_time(a, "punched") is not None, (paths(a), a.stderr_text()[-2000:], b.stderr_text()[-2000:])

IDLE_S = 30.0


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_punched_link_survives_30_s_idle(natlab):
    """Routers here forget an established TCP flow after 10 s of silence (and UDP after 10 s); the
    link's pings (every 0.5 s over the pipe) hold the mapping, so after 30 s without user traffic
    the same punched link carries the next stream."""
    lab = natlab
    a, b = cone_pair(lab, "idle")
    for router in ("ra", "rb"):
        lab.run(router, ["sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_timeout_established=10",
                         "net.netfilter.nf_conntrack_udp_timeout=10", "net.netfilter.nf_conntrack_udp_timeout_stream=10"])
    stream(a, b, n=1000, rate=0)
    first = wait_path(a, "punched", 20.0)
    idle_until = time.monotonic() + IDLE_S
    while time.monotonic() < idle_until:  # 30 s of no user traffic, looking at the link each second
        now = ask_path(a)
        assert (now["kind"], now["address"]) == ("punched", first["address"]), (now, first, a.stderr_text()[-3000:],
                                                                                 b.stderr_text()[-3000:])
        time.sleep(1.0)  # pacing the observation (the idle time is the test), not synchronisation
    report = stream(a, b, n=1000, rate=0)
    assert report["via"] == {"punched": 1000}, report


BENCH_SIZE = 64 * 1024
BENCH_N = 2048  # 128 MiB per run (the last one acknowledged: a smaller volume weighs that round trip)
BENCH_RUNS = 3


@pytest.mark.slow
@pytest.mark.parametrize("b_nat", ["cone", "symmetric"], ids=["tcp-pipe", "kcp-pipe"])
def test_bulk_64k_streams_go_over_the_punched_and_the_direct_link(natlab, b_nat):
    """64 KiB messages, A (behind a cone NAT) to C (public: a direct link through A's NAT) and to B
    (behind another NAT: a punched link; a TCP pipe through a cone NAT, KCP over the birthday UDP path
    through a symmetric one); runs interleaved, every blast acknowledged on the path it was meant for.
    Prints the throughput ratio (the 0.5x target is a benchmark figure, recorded in
    docs/performance.md, not asserted: timed assertions fail on a loaded machine)."""
    lab = natlab
    build_two_cones(lab, a_side=("a", "a2"), public=("c",), b_nat=b_nat)
    start_server(lab)
    worker(lab, "b", "b-bench")  # (the lab ends it)
    worker(lab, "c", "c-bench")
    to_b = worker(lab, "a", "a-bench")
    to_c = worker(lab, "a2", "a2-bench")
    to_b.send_line("peer b-bench")
    to_c.send_line("peer c-bench")
    for proc, kind in ((to_b, "punched"), (to_c, "direct")):
        proc.wait_event("peer", timeout=30.0)
        proc.send_line("send 100 0")
        proc.wait_event("sent", timeout=30.0)
        wait_path(proc, kind, 20.0)
    results: dict[str, list[float]] = {"punched": [], "direct": []}
    for run in range(BENCH_RUNS):
        for proc, kind in ((to_c, "direct"), (to_b, "punched")):
            before = len([e for e in proc.events() if e["event"] == "blasted"])
            proc.send_line(f"blast {BENCH_N} {BENCH_SIZE}")
            proc.wait_line(lambda line: len([e for e in proc.events() if e["event"] == "blasted"]) > before,
                           60.0, what="the blast")
            got = [e for e in proc.events() if e["event"] == "blasted"][-1]
            assert got["kind"] == kind, got
            results[kind].append(got["mib_s"])
    punched, direct = sorted(results["punched"])[1], sorted(results["direct"])[1]
    print(f"\n64 KiB over zbus links in the lab ({b_nat} B): direct {results['direct']} MiB/s, punched {results['punched']} "
          f"MiB/s; medians {direct} / {punched} = {punched / direct:.2f}x")
    assert min(results["punched"] + results["direct"]) > 0, results


def test_with_curve_a_punched_link_runs_end_to_end_and_an_untrusted_key_is_refused_on_it(natlab, tmp_path):
    """Security on (docs/security.md). The bridge carries the link's ZMTP byte for byte, so the link's
    CURVE handshake and ZAP check run end to end over the punched pipe: a (trusted) peer's link comes
    up punched; a peer that the server trusts but B does not gets its pipe punched, yet B's ZAP refuses
    its key on it, so its messages to B stay on the relay (complete) and B logs the refusal."""
    keys = Keys(tmp_path)
    server = keys.new(server=True)
    a, b, c = keys.new(), keys.new(), keys.new()
    b_trust = tmp_path / "b-trust"  # everything but c
    b_trust.mkdir()
    for node in (server, a, b):
        (b_trust / f"{node}.pub").write_bytes((keys.trust / f"{node}.pub").read_bytes())
    lab = natlab
    build_two_cones(lab, a_side=("a", "c"))
    start_server(lab, keys.flags(server))
    pinned = f"{server}@{SERVER}"
    wb = worker(lab, "b", "b-sec", pinned, ["--key", keys.key(b), "--trust", str(b_trust)])
    wa = worker(lab, "a", "a-sec", pinned, keys.flags(a))
    wc = worker(lab, "c", "c-sec", pinned, keys.flags(c))
    for w in (wa, wc):
        w.send_line("peer b-sec")
        w.wait_event("peer", timeout=30.0)
    report = stream(wa, wb, n=3000, rate=500, timeout=60.0)
    punched = wait_path(wa, "punched", 20.0, wb) if first_time(wa, "punched") is None else None
    print(f"\nsecure, trusted: paths {[(p['kind'], p['t']) for p in paths(wa)]}, received via {report['via']}")
    assert first_time(wa, "punched") is not None or punched is not None, paths(wa)
    report = stream(wc, wb, n=2000, rate=500, timeout=60.0)  # complete and in order: by relay
    print(f"secure, untrusted by B: paths {[(p['kind'], p['t']) for p in paths(wc)]}, received via {report['via']}")
    assert report["via"] == {"relay": 2000}, report
    assert all(p["kind"] == "relay" for p in paths(wc)), paths(wc)
    wait_until(lambda: "key not in the trust list" in wb.stderr_text(), 20.0, "B to log the refusal of c's key")
    assert "punched pipe to " + c in wb.stderr_text(), "c's pipe was never punched: the refusal was not on it"


def test_punch_false_keeps_a_natted_peer_on_the_relay(natlab):
    """``punch=False`` (config ``punch = false``): A never asks for a rendezvous, so B is never
    invited; a cone-cone pair that punches in well under a second otherwise stays on the relay."""
    lab = natlab
    build_two_cones(lab)
    start_server(lab)
    b = worker(lab, "b", "b-nopunch")
    a = worker(lab, "a", "a-nopunch", extra=["--no-punch"])
    a.send_line("peer b-nopunch")
    a.wait_event("peer", timeout=30.0)
    report = stream(a, b, n=3000, rate=1000, timeout=60.0)
    assert report["via"] == {"relay": 3000}, report
    assert all(p["kind"] == "relay" for p in paths(a)), paths(a)
    assert "punch" not in a.stderr_text() + b.stderr_text()
