"""The server side of a rendezvous: a pure core (the reflector thread is its adapter).

A client's punch socket registers with a server's UDP reflector by sending
:class:`~zbus.wire.PunchRequest` (``to`` = ""); the server remembers the *observed* source of that
very datagram, the client's private addresses and whether its NAT is "hard", and answers with
:class:`~zbus.wire.Observed`. A request with ``to`` = B makes the server send
:class:`~zbus.wire.PunchGo` to both registered sockets at once, each with the other's candidates and a
fresh session id + secret. Repeats of the same request within ``SESSION_REUSE_S`` get the same session
(the request travels over UDP and may be retried), so both sides always punch with one secret.

Authentication. A client registered over TCP gets a *rendezvous key* in its Welcome (a function of a
server secret, its Id and its process instance; with security on that Welcome travels inside CURVE).
Its UDP requests must carry ``mac = HMAC-SHA256(key, request fields)[:16]``; a request for such an Id
without a valid MAC is dropped and counted (``unauthenticated``), so nobody else can register or ask
in its name. What the server sends it (:class:`~zbus.wire.PunchGo`) is MACed with the same key and
its punch ``secret`` sealed (XOR with HMAC-SHA256(key, "seal" + session)), so the secret no longer
travels in clear. Ids not registered over TCP at this server (e.g. ``zbus-node punch`` tests) may
still use the rendezvous unauthenticated; they cannot take a registered Id.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from . import wire

MAC_BYTES = 16


def _mac(key: bytes, *parts: object) -> bytes:
    return hmac.new(key, msgspec.msgpack.encode(parts), hashlib.sha256).digest()[:MAC_BYTES]


def client_key(server_secret: bytes, client_id: str, instance: str) -> bytes:
    """The rendezvous key of one registered client process (sent in its Welcome)."""
    return hmac.new(server_secret, msgspec.msgpack.encode(("rendezvous-key", client_id, instance)),
                    hashlib.sha256).digest()


def request_mac(key: bytes, req: wire.PunchRequest) -> bytes:
    return _mac(key, "request", req.frm, req.to, req.nonce, req.private, req.port, req.hard)


def _go_mac(key: bytes, go: wire.PunchGo) -> bytes:
    return _mac(key, "go", go.peer, go.session, go.secret, go.candidates, go.role, go.peer_role, go.controlling,
                go.refused)


def _xor_secret(key: bytes, session: bytes, secret: bytes) -> bytes:
    stream = hmac.new(key, b"seal" + session, hashlib.sha256).digest()
    return bytes(a ^ b for a, b in zip(secret, stream))


def seal_go(key: bytes, go: wire.PunchGo) -> wire.PunchGo:
    """Server: ``go`` for a client holding ``key``: its secret sealed, everything MACed."""
    sealed = msgspec.structs.replace(go, secret=_xor_secret(key, go.session, go.secret) if go.secret else b"")
    return msgspec.structs.replace(sealed, mac=_go_mac(key, sealed))


def open_go(key: bytes, go: wire.PunchGo) -> wire.PunchGo | None:
    """Client: the PunchGo with its secret unsealed, or None if it is not from the server (bad MAC).
    Without a key (no Welcome gave one) it is taken as it is."""
    if not key:
        return go
    if not hmac.compare_digest(go.mac, _go_mac(key, msgspec.structs.replace(go, mac=b""))):
        return None
    return msgspec.structs.replace(go, secret=_xor_secret(key, go.session, go.secret), mac=b"")

Addr = tuple[str, int]

REGISTRATION_TTL_S = 60.0  # a punch socket re-registers (keepalive) more often than this
SESSION_REUSE_S = 5.0
MAX_REGISTRATIONS = 50_000
MAX_SESSIONS = 50_000  # introductions remembered for SESSION_REUSE_S (oldest forgotten first)
MAX_PRIVATE = 8


@dataclass(frozen=True)
class Registration:
    client_id: str
    observed: Addr
    via: str  # the server address (reflector socket) the client registered on
    private: tuple[str, ...]
    port: int
    hard: bool
    seen: float

    @property
    def role(self) -> str:
        if self.observed[0] in self.private:
            return "open"  # no NAT: the address it reports is the one we see
        return "hard" if self.hard else "easy"

    def candidates(self) -> list[str]:
        found = [f"{self.observed[0]}:{self.observed[1]}"]
        for ip in self.private:
            text = f"{ip}:{self.port}"
            if self.port and not ip.startswith("127.") and text not in found:
                found.append(text)
        return found


@dataclass(frozen=True)
class Reply:
    via: str  # send from the reflector socket bound to this address
    to: Addr
    data: bytes


class Rendezvous:
    def __init__(self, token: Callable[[int], bytes],
                 keys: Callable[[str], bytes | None] = lambda client_id: None) -> None:
        """``token(n)``: n unpredictable bytes (os.urandom in servers, a seeded Random in tests).
        ``keys(client_id)``: the rendezvous key of a client registered over TCP, else None."""
        self._token = token
        self._keys = keys
        self._regs: OrderedDict[str, Registration] = OrderedDict()
        self._sessions: dict[tuple[str, str], tuple[float, bytes, bytes]] = {}
        self.introduced = 0
        self.refused = 0
        self.unauthenticated = 0

    def handle(self, now: float, via: str, src: Addr, msg: wire.PunchRequest) -> list[Reply]:
        if not msg.frm:
            self.refused += 1
            return []
        key = self._keys(msg.frm)
        if key is not None and not hmac.compare_digest(msg.mac, request_mac(key, msg)):
            self.unauthenticated += 1  # someone else speaking for a registered Id (or a stale key)
            return []
        reg = Registration(msg.frm, src, via, tuple(msg.private[:MAX_PRIVATE]), msg.port, msg.hard, now)
        self._regs.pop(msg.frm, None)
        self._regs[msg.frm] = reg  # most recently seen last
        self._expire(now)
        if not msg.to:
            return [Reply(via, src, wire.encode(wire.Observed(msg.nonce, src[0], src[1])))]
        peer = self._regs.get(msg.to)
        if peer is None or msg.to == msg.frm:
            self.refused += 1
            refusal = wire.PunchGo(msg.to, b"", refused=f"{msg.to} is not registered at this server")
            return [Reply(via, src, wire.encode(seal_go(key, refusal) if key is not None else refusal))]
        pair = (msg.frm, msg.to)
        known = self._sessions.get(pair)
        if known is not None and now - known[0] < SESSION_REUSE_S:
            session, secret = known[1], known[2]
        else:
            session, secret = self._token(16), self._token(32)
            self._sessions.pop(pair, None)
            self._sessions[pair] = (now, session, secret)  # insertion order = age
            self.introduced += 1
        while self._sessions:
            oldest_key, (t, _, _) = next(iter(self._sessions.items()))
            if now - t < SESSION_REUSE_S and len(self._sessions) <= MAX_SESSIONS:
                break
            del self._sessions[oldest_key]
        to_requester = wire.PunchGo(peer.client_id, session, secret, peer.candidates(), reg.role, peer.role,
                                    True)
        to_peer = wire.PunchGo(reg.client_id, session, secret, reg.candidates(), peer.role, reg.role, False)
        peer_key = self._keys(peer.client_id)
        if key is not None:
            to_requester = seal_go(key, to_requester)
        if peer_key is not None:
            to_peer = seal_go(peer_key, to_peer)
        return [Reply(via, src, wire.encode(to_requester)),
                Reply(peer.via, peer.observed, wire.encode(to_peer))]

    def registered(self, client_id: str) -> Registration | None:
        return self._regs.get(client_id)

    def _expire(self, now: float) -> None:
        while self._regs:
            oldest = next(iter(self._regs.values()))
            if now - oldest.seen < REGISTRATION_TTL_S and len(self._regs) <= MAX_REGISTRATIONS:
                break
            self._regs.popitem(last=False)
