"""The programs that ``python -m zbus.bench.punched`` runs inside NAT-lab namespaces.

    python -m zbus.bench.punched_roles tcp-sink --port P
    python -m zbus.bench.punched_roles tcp-send --to IP:PORT --mib M
    python -m zbus.bench.punched_roles tcp-so --local-port P --peer IP:PORT --mode send|recv --mib M
    python -m zbus.bench.punched_roles quic|kcp --server IP:PORT --netcheck IP:PORT --id ID --peer ID
                                        --mode send|recv --mib M [--nocc]

One JSON event per stdout line (``listening``, ``connected``, ``registered``, ``punched``, ``result``
{seconds, mib_s}, ``done`` {bytes}). 64 KiB messages; the sender times from the first byte to the
receiver's final acknowledgement.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import select
import socket
import struct
import sys
import time

CHUNK = 64 * 1024


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


# -- TCP roles ---------------------------------------------------------------------------------------


def _send_frames(conn: socket.socket, total: int) -> float:
    payload = os.urandom(CHUNK)
    frame = struct.pack("!I", CHUNK) + payload
    start = time.perf_counter()
    for _ in range(total // CHUNK):
        conn.sendall(frame)
    conn.sendall(struct.pack("!I", 0))
    if conn.recv(1) != b"k":
        raise RuntimeError("receiver did not acknowledge")
    return time.perf_counter() - start


def _recv_frames(conn: socket.socket) -> int:
    received = 0
    buf = bytearray(4 * CHUNK)
    view = memoryview(buf)
    while True:
        header = conn.recv(4, socket.MSG_WAITALL)
        (size,) = struct.unpack("!I", header)
        if size == 0:
            conn.sendall(b"k")
            return received
        got = 0
        while got < size:
            n = conn.recv_into(view[: size - got])
            if n == 0:
                raise RuntimeError("sender closed early")
            got += n
        received += size


def role_tcp_sink(port: int) -> None:
    listener = socket.create_server(("0.0.0.0", port))
    emit("listening", port=port)
    conn, _ = listener.accept()
    emit("done", bytes=_recv_frames(conn))


def role_tcp_send(to: str, mib: int) -> None:
    host, port = to.rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=10)
    seconds = _send_frames(conn, mib * 1024 * 1024)
    emit("result", seconds=seconds, mib_s=mib / seconds)


def _simultaneous_open(local_port: int, peer: tuple[str, int],
                       attempts: int = 10) -> tuple[socket.socket, int, float]:
    """connect() from a fixed port to the peer's public endpoint until the handshake completes."""
    start = time.monotonic()
    for attempt in range(1, attempts + 1):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("0.0.0.0", local_port))
        sock.settimeout(1.5)
        try:
            sock.connect(peer)
            sock.settimeout(30)
            return sock, attempt, time.monotonic() - start
        except OSError:
            sock.close()
    raise TimeoutError(f"no TCP simultaneous open with {peer} after {attempts} attempts")


def role_tcp_so(local_port: int, peer: str, mode: str, mib: int) -> None:
    host, port = peer.rsplit(":", 1)
    conn, attempts, seconds = _simultaneous_open(local_port, (host, int(port)))
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    emit("connected", attempts=attempts, seconds=round(seconds, 3), local=conn.getsockname()[1],
         peer=f"{conn.getpeername()[0]}:{conn.getpeername()[1]}")
    if mode == "send":
        seconds = _send_frames(conn, mib * 1024 * 1024)
        emit("result", seconds=seconds, mib_s=mib / seconds)
    else:
        emit("done", bytes=_recv_frames(conn))


# -- QUIC over the punched UDP path --------------------------------------------------------------------


def _self_signed():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zbus-punched")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert, key


def _punched(server: str, netcheck_server: str, own_id: str, peer_id: str, mode: str):
    """Rendezvous at ``server`` and punch (the sender asks); return the punched socket and peer."""
    from ..netcheck import netcheck
    from ..punch import parse_addr
    from ..punch_udp import open_punch_socket, register, renewer, run_punch, wait_go

    server_addr = parse_addr(server)
    sock = open_punch_socket()
    hard = bool(netcheck([f"tcp://{server}", f"tcp://{netcheck_server}"], sock).mapping_varies)
    register(sock, server_addr, own_id, hard)
    emit("registered")
    asked = time.monotonic()
    go = wait_go(sock, server_addr, own_id, hard, 30.0, peer_id=peer_id if mode == "send" else "")
    renew = renewer(sock, server_addr, own_id, peer_id, hard) if mode == "send" else None
    path = run_punch(sock, own_id, go, renew=renew)
    emit("punched", seconds=round(time.monotonic() - asked, 3),
         addr=f"{path.peer_addr[0]}:{path.peer_addr[1]}")
    path.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    path.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return path.sock, path.peer_addr


KCP_CONV = 0x7A627532  # first byte on the wire 0x32: never a zbus punch packet (0x01)


def role_kcp(server: str, netcheck_server: str, own_id: str, peer_id: str, mode: str, mib: int,
             nocc: bool) -> None:
    """KCP (C, via the ``kcp`` binding) over the punched socket; "fast" mode, windows of 1024."""
    from kcp import KCP

    sock, peer = _punched(server, netcheck_server, own_id, peer_id, mode)
    kcp = KCP(KCP_CONV, max_transmission=1400, no_delay=True, update_interval=10, resend_count=2,
              no_congestion_control=nocc, send_window_size=1024,
              receive_window_size=1024)
    kcp.include_outbound_handler(lambda _kcp, data: sock.sendto(data, peer))
    sock.setblocking(False)
    origin = time.monotonic()

    def ms() -> int:
        return int((time.monotonic() - origin) * 1000) & 0xFFFFFFFF

    total = mib * 1024 * 1024
    chunk = os.urandom(CHUNK)
    queued = received = 0
    start = time.perf_counter()
    finish_by = time.monotonic() + 120.0
    done_at = None
    while time.monotonic() < finish_by:
        if mode == "send":
            while queued < total and kcp.get_outbound_packets() < 2048:
                kcp.enqueue(chunk)
                queued += CHUNK
        kcp.update(ms())
        if done_at is not None and time.monotonic() - done_at > 0.3:
            break
        wait = max(0.0, (kcp.update_check(ms()) - ms()) / 1000.0)
        if select.select([sock], [], [], min(wait, 0.01))[0]:
            for _ in range(256):
                try:
                    data, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr == peer and data[:1] != b"\x01":
                    kcp.receive(data)
        for message in kcp.get_all_received():
            if mode == "send" and bytes(message) == b"k":
                seconds = time.perf_counter() - start
                emit("result", seconds=seconds, mib_s=mib / seconds)
                done_at = time.monotonic()
            elif mode == "recv":
                received += len(message)
                if received >= total and done_at is None:
                    kcp.enqueue(b"k")
                    kcp.flush()
                    emit("done", bytes=received)
                    done_at = time.monotonic()


def role_quic(server: str, netcheck_server: str, own_id: str, peer_id: str, mode: str, mib: int) -> None:
    import ssl

    from aioquic.buffer import Buffer
    from aioquic.quic import events
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection
    from aioquic.quic.packet import pull_quic_header

    sock, peer = _punched(server, netcheck_server, own_id, peer_id, mode)
    config = QuicConfiguration(is_client=mode == "send", alpn_protocols=["zbus"], max_datagram_size=1350,
                               idle_timeout=30.0)
    conn = None
    if mode == "send":
        config.verify_mode = ssl.CERT_NONE
        conn = QuicConnection(configuration=config)
        conn.connect(peer, now=time.monotonic())
    else:
        config.certificate, config.private_key = _self_signed()
    total = mib * 1024 * 1024
    received = 0
    start = None
    finish_by = time.monotonic() + 120.0
    done_at = None
    while time.monotonic() < finish_by:
        if conn is not None:
            for data, addr in conn.datagrams_to_send(now=time.monotonic()):
                try:
                    sock.sendto(data, peer)
                except BlockingIOError:
                    pass
            timer = conn.get_timer()
        else:
            timer = None
        if done_at is not None and time.monotonic() - done_at > 0.5:
            break
        wait = 0.5 if timer is None else max(0.0, timer - time.monotonic())
        if select.select([sock], [], [], wait)[0]:
            for _ in range(64):
                try:
                    data, addr = sock.recvfrom(65535)
                except BlockingIOError:
                    break
                sock.setblocking(False)
                if addr != peer or data[:1] == b"\x01":  # punch keepalives: not the transport's
                    continue
                if conn is None:
                    header = pull_quic_header(Buffer(data=data), host_cid_length=config.connection_id_length)
                    conn = QuicConnection(configuration=config,
                                          original_destination_connection_id=header.destination_cid)
                conn.receive_datagram(data, addr, now=time.monotonic())
            sock.setblocking(True)
        if conn is None:
            continue
        if timer is not None and time.monotonic() >= timer:
            conn.handle_timer(now=time.monotonic())
        while (event := conn.next_event()) is not None:
            if isinstance(event, events.HandshakeCompleted) and mode == "send":
                stream = conn.get_next_available_stream_id()
                chunk = os.urandom(CHUNK)
                start = time.perf_counter()
                for i in range(total // CHUNK):
                    conn.send_stream_data(stream, chunk, end_stream=i == total // CHUNK - 1)
            elif isinstance(event, events.StreamDataReceived):
                if mode == "send":
                    if event.data == b"k":
                        seconds = time.perf_counter() - start
                        emit("result", seconds=seconds, mib_s=mib / seconds)
                        conn.close()
                        done_at = time.monotonic()
                else:
                    received += len(event.data)
                    if event.end_stream:
                        conn.send_stream_data(event.stream_id, b"k", end_stream=True)
                        emit("done", bytes=received)
                        done_at = time.monotonic()
            elif isinstance(event, events.ConnectionTerminated):
                done_at = done_at or time.monotonic()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m zbus.bench.punched_roles")
    ap.add_argument("role")
    ap.add_argument("--port", type=int)
    ap.add_argument("--to")
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--local-port", type=int)
    ap.add_argument("--peer")
    ap.add_argument("--mode")
    ap.add_argument("--server")
    ap.add_argument("--netcheck")
    ap.add_argument("--id")
    ap.add_argument("--nocc", action="store_true")
    args = ap.parse_args(argv)
    if args.role == "tcp-sink":
        role_tcp_sink(args.port)
    elif args.role == "tcp-send":
        role_tcp_send(args.to, args.mib)
    elif args.role == "tcp-so":
        role_tcp_so(args.local_port, args.peer, args.mode, args.mib)
    elif args.role == "quic":
        role_quic(args.server, args.netcheck, args.id, args.peer, args.mode, args.mib)
    elif args.role == "kcp":
        role_kcp(args.server, args.netcheck, args.id, args.peer, args.mode, args.mib, args.nocc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
