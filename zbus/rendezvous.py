"""The server side of a rendezvous: a pure core (the reflector thread is its adapter).

A client's punch socket registers with a server's UDP reflector by sending
:class:`~zbus.wire.PunchRequest` (``to`` = ""); the server remembers the *observed* source of that
very datagram, the client's private addresses and whether its NAT is "hard", and answers with
:class:`~zbus.wire.Observed`. A request with ``to`` = B makes the server send
:class:`~zbus.wire.PunchGo` to both registered sockets at once, each with the other's candidates and a
fresh session id + secret. Repeats of the same request within ``SESSION_REUSE_S`` get the same session
(the request travels over UDP and may be retried), so both sides always punch with one secret.

Not authenticated yet: anyone can register any Id over UDP (issue 6 adds keys). A registration can
only point the server at the registering socket itself, so the worst a forger can do is redirect
punch invitations for that Id to itself, and it cannot produce valid punches without the secret of a
session it was not invited to.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from . import wire

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
    def __init__(self, token: Callable[[int], bytes]) -> None:
        """``token(n)``: n unpredictable bytes (os.urandom in servers, a seeded Random in tests)."""
        self._token = token
        self._regs: OrderedDict[str, Registration] = OrderedDict()
        self._sessions: dict[tuple[str, str], tuple[float, bytes, bytes]] = {}
        self.introduced = 0
        self.refused = 0

    def handle(self, now: float, via: str, src: Addr, msg: wire.PunchRequest) -> list[Reply]:
        if not msg.frm:
            self.refused += 1
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
            return [Reply(via, src, wire.encode(refusal))]
        key = (msg.frm, msg.to)
        known = self._sessions.get(key)
        if known is not None and now - known[0] < SESSION_REUSE_S:
            session, secret = known[1], known[2]
        else:
            session, secret = self._token(16), self._token(32)
            self._sessions.pop(key, None)
            self._sessions[key] = (now, session, secret)  # insertion order = age
            self.introduced += 1
        while self._sessions:
            oldest_key, (t, _, _) = next(iter(self._sessions.items()))
            if now - t < SESSION_REUSE_S and len(self._sessions) <= MAX_SESSIONS:
                break
            del self._sessions[oldest_key]
        to_requester = wire.PunchGo(peer.client_id, session, secret, peer.candidates(), reg.role, peer.role,
                                    True)
        to_peer = wire.PunchGo(reg.client_id, session, secret, reg.candidates(), peer.role, reg.role, False)
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
