"""The server's UDP reflector: tells a client which public ip:port its UDP packets come from.

One socket per server address: a socket bound to 0.0.0.0 may answer from another source address
than the one the probe was sent to, and a NAT drops such an answer. So a server listening on all
interfaces binds one UDP socket per interface address, on the same port number as its TCP endpoint.
Each address also gets a second socket on the next port number (``ALT_PORT_OFFSET``), which answers
probes only: a client that asks both sees whether its NAT maps one local socket to different public
ports per destination (a *symmetric*, endpoint-dependent NAT: the punch role "hard", which needs
birthday probing) with a single server, as RFC 5780's behaviour discovery does with an alternate port.
Datagrams are :class:`~zbus.wire.Probe` / :class:`~zbus.wire.Observed` headers, and
:class:`~zbus.wire.PunchRequest`, which the socket hands to the pure rendezvous core
(:mod:`zbus.rendezvous`) and sends what it answers; anything else is dropped and counted.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable

from . import netinfo, wire
from .rendezvous import Rendezvous

log = logging.getLogger("zbus.reflector")

MAX_DATAGRAM = 2048
ALT_PORT_OFFSET = 1  # the probe-only socket's port: the server's port + this (UDP; the cluster's port + 1 is TCP)
POLL_S = 0.2  # bounds how long stop() takes


def bind_addresses(host: str) -> list[str]:
    """The addresses to bind for a listen host: itself, or every interface address for a wildcard."""
    if host in ("0.0.0.0", "*", ""):
        return netinfo.private_addresses()
    return [host]


class Reflector:
    def __init__(self, host: str, port: int, keys: Callable[[str], bytes | None] = lambda client_id: None) -> None:
        """``keys``: a registered client's rendezvous key by Id (zbus/rendezvous.py), read from this thread."""
        self.port = port
        self.sockets: list[socket.socket] = []
        self.alt: set[socket.socket] = set()  # the probe-only sockets (port + ALT_PORT_OFFSET)
        for address in bind_addresses(host):
            for number in (port, port + ALT_PORT_OFFSET):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    sock.bind((address, number))
                except OSError as exc:
                    sock.close()
                    log.warning("no UDP reflector on %s:%d: %s", address, number, exc)
                    continue
                self.sockets.append(sock)
                if number != port:
                    self.alt.add(sock)
        self.answered = 0
        self.dropped = 0
        self.rendezvous = Rendezvous(os.urandom, keys)
        self._by_address = {sock.getsockname()[0]: sock for sock in self.sockets if sock not in self.alt}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"zbus-reflector-{port}", daemon=True)

    def start(self) -> "Reflector":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        for sock in self.sockets:
            sock.close()

    def _run(self) -> None:
        while not self._stopping.is_set() and self.sockets:
            readable, _, _ = select.select(self.sockets, [], [], POLL_S)
            for sock in readable:
                try:
                    datagram, (ip, port) = sock.recvfrom(MAX_DATAGRAM)
                except OSError:
                    continue
                self._answer(sock, datagram, ip, port)

    def _answer(self, sock: socket.socket, datagram: bytes, ip: str, port: int) -> None:
        try:
            probe = wire.decode(datagram)
        except wire.WireError:
            self.dropped += 1
            return
        if isinstance(probe, wire.PunchRequest) and sock not in self.alt:
            for reply in self.rendezvous.handle(time.monotonic(), sock.getsockname()[0], (ip, port), probe):
                try:
                    self._by_address.get(reply.via, sock).sendto(reply.data, reply.to)
                    self.answered += 1
                except OSError:
                    self.dropped += 1
            return
        if not isinstance(probe, wire.Probe):
            self.dropped += 1
            return
        try:
            sock.sendto(wire.encode(wire.Observed(probe.nonce, ip, port)), (ip, port))
            self.answered += 1
        except OSError:
            self.dropped += 1
