"""The UDP driver of :mod:`zbus.punch`: sockets, select and the clock; no protocol decisions.

Use from a client (later) or from ``python -m zbus.punchtool``::

    sock = open_punch_socket()
    hard = netcheck(servers, sock).mapping_varies            # optional, before registering
    path = punch(sock, server_udp, own_id, peer_id, hard=hard)  # -> PunchedPath (raises PunchFailed)
    path.send(b"...")          # any datagram whose first byte is not wire.WIRE_VERSION (QUIC/KCP fit)
    for datagram in path.poll(0.5): ...                      # also answers and sends keepalives

The passive side registers and waits: ``register(...)`` then ``go = wait_go(...)`` then
``run_punch(sock, own_id, go)``. All calls are bounded by their timeouts.
"""

from __future__ import annotations

import os
import random
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from . import netinfo, wire
from .punch import Addr, PunchLimits, PunchResult, PunchSession, State
from .rendezvous import open_go, request_mac

REQUEST_RETRY_S = 0.25
RENEW_FOR_S = 2.0  # the requester repeats its request this long into punching (under SESSION_REUSE_S)
REGISTER_EVERY_S = 20.0  # well under the server's registration TTL (60 s) and the usual NAT UDP timeout
MAX_DATAGRAM = 65535
CANCEL_CHECK_S = 0.1  # a punch in progress notices cancellation (the client closing) this fast


class PunchFailed(Exception):
    def __init__(self, result: PunchResult | None, reason: str) -> None:
        super().__init__(reason)
        self.result = result


def open_punch_socket(bind_ip: str = "0.0.0.0", port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind_ip, port))
    return sock


def _request(sock: socket.socket, server: Addr, own_id: str, to: str, nonce: bytes, hard: bool,
             key: bytes | Callable[[], bytes] = b"") -> None:
    """One PunchRequest; MACed with ``key`` (our rendezvous key at that server, from its Welcome; a
    callable is asked at each send, so a retry uses a key that arrived meanwhile) if any."""
    key = key() if callable(key) else key
    port = sock.getsockname()[1]
    private = [ip for ip in netinfo.private_addresses() if not ip.startswith("127.")]
    request = wire.PunchRequest(own_id, to, nonce, private, port, bool(hard))
    if key:
        request = msgspec.structs.replace(request, mac=request_mac(key, request))
    sock.sendto(wire.encode(request), server)


def _recv(sock: socket.socket, timeout: float) -> tuple[bytes, Addr] | None:
    if not select.select([sock], [], [], max(0.0, timeout))[0]:
        return None
    try:
        return sock.recvfrom(MAX_DATAGRAM)
    except OSError:  # e.g. ICMP port unreachable reported on the socket
        return None


def _exchange(sock: socket.socket, send: Callable[[], None], retry: float, first_send: float,
              deadline: float, accept: Callable[[Any], Any]) -> Any:
    """Send (again every ``retry`` s, first at ``first_send``) until a datagram that ``accept`` maps to
    something other than None arrives; that, or None at ``deadline``. Undecodable datagrams are skipped."""
    next_send = first_send
    while (now := time.monotonic()) < deadline:
        if now >= next_send:
            send()
            next_send = now + retry
        got = _recv(sock, min(next_send, deadline) - now)
        if got is None:
            continue
        try:
            answer = accept(wire.decode(got[0]))
        except wire.WireError:
            continue
        if answer is not None:
            return answer
    return None


def register(sock: socket.socket, server: Addr, own_id: str, hard: bool = False,
             timeout: float = 5.0, key: bytes | Callable[[], bytes] = b"") -> Addr:
    """Register ``sock`` at the server's rendezvous; return our public endpoint as the server saw it."""
    nonce = os.urandom(8)
    seen = _exchange(sock, lambda: _request(sock, server, own_id, "", nonce, hard, key), REQUEST_RETRY_S,
                     0.0, time.monotonic() + timeout,
                     lambda m: (m.ip, m.port) if isinstance(m, wire.Observed) and m.nonce == nonce else None)
    if seen is None:
        raise TimeoutError(f"the rendezvous server {server[0]}:{server[1]} did not answer within {timeout:g} s")
    return seen


def wait_go(sock: socket.socket, server: Addr, own_id: str, hard: bool = False, timeout: float = 30.0,
            peer_id: str = "", key: bytes = b"") -> wire.PunchGo:
    """Wait for a PunchGo (re-registering now and then); ``peer_id`` non-empty: also request it.
    ``key``: our rendezvous key at that server; a PunchGo must then carry its MAC (zbus/rendezvous.py)."""
    nonce = os.urandom(8)
    retry = REQUEST_RETRY_S if peer_id else REGISTER_EVERY_S
    first = time.monotonic() if peer_id else time.monotonic() + REGISTER_EVERY_S

    def accept(m: Any) -> wire.PunchGo | None:
        if not isinstance(m, wire.PunchGo) or (peer_id and m.peer != peer_id):
            return None
        return open_go(key, m)  # None (ignored) if it is not the server's

    go = _exchange(sock, lambda: _request(sock, server, own_id, peer_id, nonce, hard, key), retry, first,
                   time.monotonic() + timeout, accept)
    if go is None:
        raise TimeoutError(f"no rendezvous {'with ' + peer_id if peer_id else 'invitation'} within {timeout:g} s")
    if go.refused:
        raise PunchFailed(None, go.refused)
    return go


@dataclass
class PunchedPath:
    """A punched UDP path: ``sock`` sends to ``peer_addr`` and the peer answers there."""

    sock: socket.socket
    peer_addr: Addr
    peer_id: str
    core: PunchSession
    elapsed: float  # seconds from PunchGo to punched
    clock: Callable[[], float] = field(default=time.monotonic)

    @property
    def state(self) -> State:
        return self.core.state

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self.peer_addr)

    def poll(self, timeout: float) -> list[bytes]:
        """Datagrams from the peer, waiting up to ``timeout`` for the first; keeps the path alive.

        Punch packets (first byte ``wire.WIRE_VERSION``) go to the punch core (keepalives and their
        answers); everything else from the peer's address is returned, for the transport on top.
        """
        received: list[bytes] = []
        end = self.clock() + timeout
        version = bytes([wire.WIRE_VERSION])
        while True:
            now = self.clock()
            self.core.handle_timer(now)
            self._flush()
            wake = self.core.next_deadline()
            left = min(end, wake if wake is not None else end) - now
            got = _recv(self.sock, max(0.0, left))
            if got is None:
                if self.clock() >= end:
                    return received
                continue
            data, addr = got
            if data[:1] == version:
                self.core.receive(self.clock(), self.core.path[0], addr, data)
            elif addr == self.peer_addr:
                received.append(data)
                end = self.clock()  # got something: drain what is already queued, then return

    def _flush(self) -> None:
        for out in self.core.datagrams_to_send():
            try:
                self.sock.sendto(out.data, out.addr)
            except OSError:
                pass


def run_punch(sock: socket.socket, own_id: str, go: wire.PunchGo, rng: random.Random | None = None,
              limits: PunchLimits | None = None, clock: Callable[[], float] = time.monotonic,
              renew: Callable[[], None] | None = None,
              cancelled: Callable[[], bool] = lambda: False) -> PunchedPath:
    """Punch towards ``go.peer`` from ``sock`` (and extra sockets in birthday mode). Raises PunchFailed.

    ``renew`` (the requester's): called every REQUEST_RETRY_S while punching, to repeat the request
    to the server, which then repeats the same PunchGo to the peer in case that one was lost.
    ``cancelled``: checked at least every CANCEL_CHECK_S; when it returns True the punch fails at once.
    """
    rng = rng or random.Random(os.urandom(16))
    core = PunchSession(own_id, go.peer, go.session, go.secret, go.role, go.peer_role, go.controlling,
                        list(go.candidates), clock(), rng, limits or PunchLimits())
    socks = [sock]
    try:
        for _ in range(core.sockets_wanted - 1):
            socks.append(open_punch_socket())
        index = {s.fileno(): i for i, s in enumerate(socks)}
        next_renew = clock() + REQUEST_RETRY_S
        stop_renewing = clock() + RENEW_FOR_S
        while core.state is State.PUNCHING:
            if cancelled():
                raise PunchFailed(None, "cancelled (the client is closing)")
            if renew is not None and next_renew > stop_renewing:
                renew = None
            if renew is not None and clock() >= next_renew:
                renew()
                next_renew = clock() + REQUEST_RETRY_S
            for out in core.datagrams_to_send():
                try:
                    socks[out.sock].sendto(out.data, out.addr)
                except OSError:
                    pass
            wake = core.next_deadline()
            if renew is not None and wake is not None:
                wake = min(wake, next_renew)
            left = 0.0 if wake is None else min(wake - clock(), CANCEL_CHECK_S)
            readable = select.select(socks, [], [], max(0.0, left))[0] if left > 0 else []
            for s in readable:
                try:
                    data, addr = s.recvfrom(MAX_DATAGRAM)
                except OSError:
                    continue
                core.receive(clock(), index[s.fileno()], addr, data)
            core.handle_timer(clock())
        for out in core.datagrams_to_send():  # e.g. the NOMINATE_ACK that finished us
            try:
                socks[out.sock].sendto(out.data, out.addr)
            except OSError:
                pass
        result = core.result(clock())
        if result.state is not State.PUNCHED:
            raise PunchFailed(result, result.reason)
        winner = socks[result.sock]
        return PunchedPath(winner, result.addr, go.peer, core, result.elapsed, clock)
    finally:
        for i, s in enumerate(socks):
            if i != 0 and (core.path is None or core.path[0] != i):
                s.close()


def punch(sock: socket.socket, server: Addr, own_id: str, peer_id: str, hard: bool = False,
          timeout: float = 5.0, limits: PunchLimits | None = None) -> PunchedPath:
    """Ask ``server`` for a rendezvous with ``peer_id`` and punch. Raises PunchFailed / TimeoutError."""
    go = wait_go(sock, server, own_id, hard, timeout, peer_id=peer_id)
    return run_punch(sock, own_id, go, limits=limits, renew=renewer(sock, server, own_id, peer_id, hard))


def renewer(sock: socket.socket, server: Addr, own_id: str, peer_id: str, hard: bool,
            key: bytes = b"") -> Callable[[], None]:
    nonce = os.urandom(8)
    return lambda: _request(sock, server, own_id, peer_id, nonce, hard, key)
