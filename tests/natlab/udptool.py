"""Small UDP/TCP programs that the NAT lab runs inside its namespaces.

Standard library only, run as a script (`python udptool.py <command> ...`). Every program prints one
JSON object per stdout line (`{"event": ...}`), exits when its stdin reaches EOF (so it never outlives
the test that started it) and has a hard lifetime cap. Commands:

- `reflect --port P`      UDP reflector: answers `{"t": "stun"}` with the source ip:port it observed.
- `peer`                  one UDP socket driven by stdin lines:
                              `stun IP:PORT [TAG [TRIES]]`  ask a reflector for this socket's
                                               public mapping (event `mapped` or `stun-timeout`)
                              `punch IP:PORT`  send punch packets there (and to every peer-reflexive
                                               source that punched us) every --interval for --duration
                              `send IP:PORT N` send N plain `hello` datagrams
- `sink --port P`         count `data` datagrams until an `end` datagram arrives.
- `blast --to IP:PORT --count N`  send N `data` datagrams in chunks, then `end` copies.
- `tcp-reflect --port P`  TCP: on accept, write the observed peer ip:port and close.
- `tcp-probe --to IP:PORT` TCP connect and print what the reflector observed.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
import time

RECV_BUFFER = 4 * 1024 * 1024
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; bypasses rmem_max as root
STUN_RETRY_SECONDS = 0.1
STUN_MAX_TRIES = 30


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def fmt(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


def decode(datagram: bytes) -> dict | None:
    try:
        message = json.loads(datagram)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


class StdinLines:
    """Non-blocking line reader for stdin; `eof` turns true when the parent closes the pipe."""

    def __init__(self) -> None:
        self.fd = sys.stdin.fileno()
        self.buffer = b""
        self.eof = False

    def read(self) -> list[str]:
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.eof = True
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [line.decode().strip() for line in lines if line.strip()]


def udp_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RECV_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket) -> list[tuple[bytes, tuple[str, int]]]:
    datagrams = []
    while True:
        try:
            datagrams.append(sock.recvfrom(65536))
        except (BlockingIOError, InterruptedError):
            return datagrams
        except ConnectionRefusedError:  # ICMP error queued on the socket; not a datagram
            continue


def cmd_reflect(args: argparse.Namespace) -> int:
    sock = udp_socket(args.port)
    stdin = StdinLines()
    emit("ready", addr=fmt(sock.getsockname()))
    deadline = time.monotonic() + args.lifetime
    while not stdin.eof and time.monotonic() < deadline:
        readable, _, _ = select.select([sock, stdin.fd], [], [], 0.5)
        if stdin.fd in readable:
            stdin.read()
        if sock in readable:
            for datagram, source in drain(sock):
                message = decode(datagram)
                if message and message.get("t") == "stun":
                    reply = {"t": "stun-reply", "id": message.get("id"), "observed": fmt(source)}
                    sock.sendto(json.dumps(reply).encode(), source)
    return 0


class Peer:
    """One UDP socket: STUN queries, hole punching with peer-reflexive learning, plain sends."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sock = udp_socket(args.port)
        self.stun: dict[str, tuple[int, int, float, str]] = {}  # reflector -> tries, max, next send, tag
        self.punch_targets: list[tuple[str, int]] = []
        self.reflexive: list[tuple[str, int]] = []
        self.punch_until: float | None = None
        self.next_punch = 0.0
        self.punch_seq = 0
        self.reported: set[tuple[str, str]] = set()
        self.received_from: list[str] = []

    def command(self, line: str, now: float) -> None:
        words = line.split()
        if words[0] == "stun":
            tag = words[2] if len(words) > 2 else ""
            max_tries = int(words[3]) if len(words) > 3 else STUN_MAX_TRIES
            self.stun[words[1]] = (0, max_tries, now, tag)
        elif words[0] == "punch":
            target = endpoint(words[1])
            self.punch_targets = [target] + [a for a in self.reflexive if a != target]
            self.punch_until = now + self.args.duration
            self.next_punch = now
            emit("punching", to=words[1])
        elif words[0] == "send":
            target, count = endpoint(words[1]), int(words[2]) if len(words) > 2 else 1
            for _ in range(count):
                self.sock.sendto(b'{"t": "hello"}', target)
            emit("sent", to=words[1], count=count)
        else:
            emit("error", message=f"unknown command {line!r}")

    def datagram(self, datagram: bytes, source: tuple[str, int]) -> None:
        message = decode(datagram) or {}
        kind = str(message.get("t", "?"))
        if kind == "stun-reply":
            pending = self.stun.pop(fmt(source), None)
            if pending is not None:
                emit("mapped", via=fmt(source), addr=message.get("observed"), tag=pending[3])
            return
        if kind == "punch" and source not in self.reflexive:
            self.reflexive.append(source)
            if self.punch_until is not None and source not in self.punch_targets:
                self.punch_targets.append(source)
        if (fmt(source), kind) not in self.reported:
            self.reported.add((fmt(source), kind))
            if fmt(source) not in self.received_from:
                self.received_from.append(fmt(source))
            emit("received", kind=kind, **{"from": fmt(source)})

    def timers(self, now: float) -> float:
        """Fire due timers; return the next deadline."""
        next_due = now + 0.5
        for reflector, (tries, max_tries, due, tag) in list(self.stun.items()):
            if due > now:
                next_due = min(next_due, due)
            elif tries >= max_tries:
                del self.stun[reflector]
                emit("stun-timeout", via=reflector, tag=tag)
            else:
                query = {"t": "stun", "id": tries}
                self.sock.sendto(json.dumps(query).encode(), endpoint(reflector))
                self.stun[reflector] = (tries + 1, max_tries, now + STUN_RETRY_SECONDS, tag)
                next_due = min(next_due, now + STUN_RETRY_SECONDS)
        if self.punch_until is not None:
            if now >= self.punch_until:
                self.punch_until = None
                emit("punch-done", received_from=self.received_from)
            else:
                if now >= self.next_punch:
                    self.punch_seq += 1
                    packet = json.dumps({"t": "punch", "seq": self.punch_seq}).encode()
                    for target in self.punch_targets:
                        self.sock.sendto(packet, target)
                    self.next_punch = now + self.args.interval
                next_due = min(next_due, self.next_punch, self.punch_until)
        return next_due


def cmd_peer(args: argparse.Namespace) -> int:
    peer = Peer(args)
    stdin = StdinLines()
    emit("ready", local=fmt(peer.sock.getsockname()))
    deadline = time.monotonic() + args.lifetime
    next_due = time.monotonic()
    while not stdin.eof:
        now = time.monotonic()
        if now >= deadline:
            break
        readable, _, _ = select.select([peer.sock, stdin.fd], [], [], max(0.0, next_due - now))
        now = time.monotonic()
        if stdin.fd in readable:
            for line in stdin.read():
                peer.command(line, now)
        if peer.sock in readable:
            for datagram, source in drain(peer.sock):
                peer.datagram(datagram, source)
        next_due = peer.timers(time.monotonic())
    return 0


def cmd_sink(args: argparse.Namespace) -> int:
    sock = udp_socket(args.port)
    stdin = StdinLines()
    emit("ready", addr=fmt(sock.getsockname()))
    sequence_numbers: set[int] = set()
    deadline = time.monotonic() + args.lifetime
    while not stdin.eof and time.monotonic() < deadline:
        readable, _, _ = select.select([sock, stdin.fd], [], [], 0.5)
        if stdin.fd in readable:
            stdin.read()
        for datagram, source in drain(sock) if sock in readable else []:
            if datagram == b"ping":
                sock.sendto(b"pong", source)
            elif datagram.startswith(b"data "):
                sequence_numbers.add(int(datagram[5:]))
            elif datagram == b"end":
                emit("count", received=len(sequence_numbers), ended=True)
                return 0
    emit("count", received=len(sequence_numbers), ended=False)
    return 1


def ping(sock: socket.socket, target: tuple[str, int], tries: int) -> bool:
    """One ping/pong round trip to a sink (retried): resolves ARP on every hop and, between chunks,
    lets the previous chunk drain so a burst never exceeds a queue (netdev backlog, neighbour queue)."""
    for _ in range(tries):
        sock.sendto(b"ping", target)
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable and any(datagram == b"pong" for datagram, _ in drain(sock)):
            return True
    return False


def cmd_blast(args: argparse.Namespace) -> int:
    sock = udp_socket()
    target = endpoint(args.to)
    for first in range(0, args.count, args.chunk):
        if not ping(sock, target, args.ping_tries):
            emit("no-pong", to=args.to)
            return 1
        for sequence_number in range(first, min(first + args.chunk, args.count)):
            sock.sendto(b"data %d" % sequence_number, target)
    for _ in range(args.end_copies):
        sock.sendto(b"end", target)
    emit("sent", to=args.to, count=args.count)
    return 0


def cmd_tcp_reflect(args: argparse.Namespace) -> int:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", args.port))
    listener.listen(64)
    stdin = StdinLines()
    emit("ready", addr=fmt(listener.getsockname()))
    deadline = time.monotonic() + args.lifetime
    while not stdin.eof and time.monotonic() < deadline:
        readable, _, _ = select.select([listener, stdin.fd], [], [], 0.5)
        if stdin.fd in readable:
            stdin.read()
        if listener in readable:
            connection, source = listener.accept()
            with connection:
                connection.sendall(json.dumps({"observed": fmt(source)}).encode() + b"\n")
    return 0


def cmd_tcp_probe(args: argparse.Namespace) -> int:
    try:
        with socket.create_connection(endpoint(args.to), timeout=args.timeout) as connection:
            reply = connection.makefile("rb").readline()
    except OSError as error:
        emit("tcp-failed", to=args.to, error=type(error).__name__)
        return 1
    emit("mapped", via=args.to, addr=json.loads(reply)["observed"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--lifetime", type=float, default=60.0, help="hard cap on run time, seconds")
    commands = parser.add_subparsers(dest="command", required=True)
    reflect = commands.add_parser("reflect")
    reflect.add_argument("--port", type=int, default=3478)
    peer = commands.add_parser("peer")
    peer.add_argument("--port", type=int, default=0)
    peer.add_argument("--interval", type=float, default=0.02, help="seconds between punch rounds")
    peer.add_argument("--duration", type=float, default=1.5, help="seconds of punching per command")
    sink = commands.add_parser("sink")
    sink.add_argument("--port", type=int, default=9000)
    blast = commands.add_parser("blast")
    blast.add_argument("--to", required=True)
    blast.add_argument("--count", type=int, default=1000)
    blast.add_argument("--chunk", type=int, default=100, help="datagrams between ping/pong syncs")
    blast.add_argument("--end-copies", type=int, default=50)
    blast.add_argument("--ping-tries", type=int, default=100)
    tcp_reflect = commands.add_parser("tcp-reflect")
    tcp_reflect.add_argument("--port", type=int, default=3479)
    tcp_probe = commands.add_parser("tcp-probe")
    tcp_probe.add_argument("--to", required=True)
    tcp_probe.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    handlers = {
        "reflect": cmd_reflect,
        "peer": cmd_peer,
        "sink": cmd_sink,
        "blast": cmd_blast,
        "tcp-reflect": cmd_tcp_reflect,
        "tcp-probe": cmd_tcp_probe,
    }
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
