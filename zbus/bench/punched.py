"""Bulk throughput over punched paths in the NAT lab: which transport should carry zbus frames?

    sudo .venv/bin/python -m zbus.bench.punched            # needs root (the NAT lab); ~30 s
    .venv/bin/python -m zbus.bench.punched --tcp-mib 512 --quic-mib 32 --json out.json

Builds a lab (tests/natlab/lab.py): public servers s1, s2 (zbus servers: reflector + rendezvous), a
public host ``pub``, and hosts ``alice`` / ``bob`` behind two different ``cone`` routers. Cases, all
64 KiB messages, one sender -> one receiver, time from the first byte to the receiver's final ack:

* ``tcp-direct``   alice -> pub, an ordinary TCP connection through alice's NAT (the baseline);
* ``tcp-punched``  alice <-> bob, TCP simultaneous open through both NATs (both connect() from a fixed
  port to the other's public endpoint at once), length-prefixed frames;
* ``quic-punched`` alice <-> bob, UDP punched by zbus.punch (rendezvous at s1), then one aioquic
  stream over that very socket (sans-IO QuicConnection, self-signed certificate);
* ``kcp-punched``  the same punched path carrying KCP (C library via the ``kcp`` binding, "fast"
  mode: nodelay, 10 ms interval, fast resend 2, windows of 1024 segments), 64 KiB KCP messages;
* ``kcp-nocc-punched`` the same with KCP's congestion control switched off (its usual "turbo" setting).

The role programs (zbus/bench/punched_roles.py) run inside the namespaces.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


# -- orchestration -------------------------------------------------------------------------------------


def CASES_UDP(quic_mib: int, kcp_mib: int) -> list[tuple[str, int]]:  # noqa: N802 (a table)
    # KCP with its congestion control on moves ~1 MiB/s here: a smaller volume keeps the run short
    return [("quic-punched", quic_mib), ("kcp-punched", max(1, kcp_mib // 16)), ("kcp-nocc-punched", kcp_mib)]



def run_lab(tcp_mib: int, quic_mib: int, kcp_mib: int, repeat: int = 3) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.natlab.lab import NatLab, missing_requirements

    reason = missing_requirements()
    if reason:
        raise SystemExit(f"the NAT lab cannot run here: {reason}")
    me = [sys.executable, "-m", "zbus.bench.punched_roles"]
    results: dict = {}
    with NatLab() as lab:
        lab.add_public_host("s1")
        lab.add_public_host("s2")
        lab.add_public_host("pub")
        lab.add_router("home", nat="cone")
        lab.add_router("office", nat="cone")
        lab.add_host("alice", router="home")
        lab.add_host("bob", router="office")
        lab.build()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        servers = [lab.popen(h, [sys.executable, "-m", "zbus.cli", "server", "--listen",
                                 f"tcp://{lab.addr(h)}:7700"], env=env) for h in ("s1", "s2")]
        for server in servers:
            server.wait_line(lambda line: "listening on" in line, timeout=20.0, what="server ready")

        runs: dict[str, list[dict]] = {"tcp-direct": [], "tcp-punched": []}
        for attempt in range(repeat):  # interleaved, median reported
            port = 9000 + attempt
            sink = lab.popen("pub", [*me, "tcp-sink", "--port", str(port)], env=env)
            sink.wait_event("listening", timeout=10)
            sender = lab.popen("alice", [*me, "tcp-send", "--to", f"{lab.addr('pub')}:{port}",
                                         "--mib", str(tcp_mib)], env=env)
            runs["tcp-direct"].append(sender.wait_event("result", timeout=120))
            port = 9100 + attempt
            so = [*me, "tcp-so", "--local-port", str(port), "--mib", str(tcp_mib), "--peer"]
            recv = lab.popen("bob", [*so, f"{lab.public_addr('alice')}:{port}", "--mode", "recv"], env=env)
            send = lab.popen("alice", [*so, f"{lab.public_addr('bob')}:{port}", "--mode", "send"], env=env)
            try:
                connected = send.wait_event("connected", timeout=30)
                runs["tcp-punched"].append({**send.wait_event("result", timeout=120), "connect": connected})
            except TimeoutError as exc:
                runs["tcp-punched"].append({"error": str(exc)[:300]})
        for case, got in runs.items():
            ok = sorted((r for r in got if "mib_s" in r), key=lambda r: r["mib_s"])
            results[case] = {**ok[len(ok) // 2], "runs": [round(r["mib_s"]) for r in ok]} if ok else got[-1]
            print(f"{case} {[r.get('mib_s', r.get('error')) for r in got]}", file=sys.stderr)

        s1, s2 = f"{lab.addr('s1')}:7700", f"{lab.addr('s2')}:7700"
        for case, mib in CASES_UDP(quic_mib, kcp_mib):
            a_id, b_id = f"C-bench-alice-{case}", f"C-bench-bob-{case}"
            role = case.split("-")[0]
            extra = ["--nocc"] if "nocc" in case else []
            common = [*me, role, "--server", s1, "--netcheck", s2, "--mib", str(mib), *extra]
            recv = lab.popen("bob", [*common, "--id", b_id, "--peer", a_id, "--mode", "recv"], env=env)
            recv.wait_event("registered", timeout=20)
            send = lab.popen("alice", [*common, "--id", a_id, "--peer", b_id, "--mode", "send"], env=env)
            try:
                punched = send.wait_event("punched", timeout=30)
                results[case] = {**send.wait_event("result", timeout=180), "punch": punched}
                print(f"{case} {results[case]['mib_s']:.1f} MiB/s", file=sys.stderr)
            except TimeoutError as exc:
                results[case] = {"error": str(exc)[:600]}
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m zbus.bench.punched", description=__doc__.split("\n")[0])
    ap.add_argument("--tcp-mib", type=int, default=512)
    ap.add_argument("--quic-mib", type=int, default=32)
    ap.add_argument("--kcp-mib", type=int, default=64)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    started = time.monotonic()
    results = run_lab(args.tcp_mib, args.quic_mib, args.kcp_mib)
    print(f"command: python -m zbus.bench.punched {' '.join(argv)}")
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, 64 KiB messages")
    print("| case | MiB | MiB/s |")
    print("|---|---|---|")
    for case, mib in (("tcp-direct", args.tcp_mib), ("tcp-punched", args.tcp_mib),
                      *CASES_UDP(args.quic_mib, args.kcp_mib)):
        r = results.get(case, {})
        runs = f" (runs: {r['runs']})" if "runs" in r else ""
        shown = f"{r['mib_s']:.1f}{runs}" if "mib_s" in r else f"failed: {r.get('error', '?')[:80]}"
        print(f"| {case} | {mib} | {shown} |")
    print(f"total {time.monotonic() - started:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
