"""``python -m zbus.punchtool``: register at a server's rendezvous, punch to a peer, keep the path.

One JSON object per stdout line (events ``ready``, ``registered``, ``punched``, ``failed``, ``data``,
``lost``); stdin commands once punched: ``send N`` (N datagrams to the peer). Exits on stdin EOF or
after ``--lifetime`` seconds. Used by the NAT lab tests (tests/natlab/test_punch.py)::

    python -m zbus.punchtool --server 203.0.113.10:7700 --netcheck 203.0.113.11:7700 --id C-b
    python -m zbus.punchtool --server 203.0.113.10:7700 --netcheck 203.0.113.11:7700 --id C-a --peer C-b
"""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time

from .netcheck import netcheck
from .punch import PunchLimits, State, parse_addr
from .punch_udp import PunchFailed, open_punch_socket, register, renewer, run_punch, wait_go


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m zbus.punchtool")
    ap.add_argument("--server", required=True, help="rendezvous server UDP ip:port (its reflector)")
    ap.add_argument("--netcheck", action="append", default=[],
                    help="another server ip:port, to tell a hard NAT")
    ap.add_argument("--id", required=True)
    ap.add_argument("--peer", default="", help="ask for a rendezvous with this Id (else wait to be invited)")
    ap.add_argument("--keepalive", type=float, default=PunchLimits.keepalive, help="seconds; 0 = none")
    ap.add_argument("--echo", action="store_true", help="send every received datagram back")
    ap.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a rendezvous")
    ap.add_argument("--lifetime", type=float, default=90.0)
    args = ap.parse_args(argv)
    end = time.monotonic() + args.lifetime
    server = parse_addr(args.server)
    sock = open_punch_socket()
    hard = False
    if args.netcheck:
        servers = [f"tcp://{e}" for e in [args.server, *args.netcheck]]
        report = netcheck(servers, sock)
        hard = bool(report.mapping_varies)
    emit("ready", local_port=sock.getsockname()[1], hard=hard)
    observed = register(sock, server, args.id, hard)
    emit("registered", observed=f"{observed[0]}:{observed[1]}")
    limits = PunchLimits(keepalive=args.keepalive or 1e9, dead_after=max(16.0, 3.2 * (args.keepalive or 5.0)))
    asked = time.monotonic()
    try:
        go = wait_go(sock, server, args.id, hard, args.wait, peer_id=args.peer)
        renew = renewer(sock, server, args.id, args.peer, hard) if args.peer else None
        path = run_punch(sock, args.id, go, limits=limits, renew=renew)
    except (PunchFailed, TimeoutError) as exc:
        result = getattr(exc, "result", None)
        emit("failed", reason=str(exc), elapsed=round(time.monotonic() - asked, 3),
             packets=result.packets_sent if result else 0)
        return 1
    emit("punched", addr=f"{path.peer_addr[0]}:{path.peer_addr[1]}", sock=path.core.path[0],
         role=go.role, peer_role=go.peer_role, elapsed=round(path.elapsed, 3),
         since_request=round(time.monotonic() - asked, 3), packets=path.core.packets_sent)
    stdin = sys.stdin.fileno()
    buffered = b""
    lost_reported = False
    while time.monotonic() < end:
        for datagram in path.poll(0.05):
            emit("data", text=datagram[1:].decode(errors="replace"))
            if args.echo and datagram[1:].startswith(b"ping"):
                path.send(b"\0echo" + datagram[5:])
        if path.state is State.LOST and not lost_reported:
            emit("lost", reason=path.core.reason)
            lost_reported = True
        if select.select([stdin], [], [], 0)[0]:
            chunk = os.read(stdin, 4096)
            if not chunk:
                return 0
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                words = line.decode().split()
                if words[:1] == ["send"]:
                    for i in range(int(words[1])):
                        path.send(b"\0ping %d" % i)
    return 0


if __name__ == "__main__":
    sys.exit(main())
