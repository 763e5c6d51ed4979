"""UDP hole punching: a pure state machine (no sockets, no clock, no global random).

One :class:`PunchSession` per rendezvous. The server's :class:`~zbus.wire.PunchGo` gives both sides
the peer's candidates, a session id and a secret; each side then

* sends authenticated PINGs to every candidate, with backoff, until the deadline;
* answers every authenticated PING with a PONG to the address it *actually came from* (a public peer
  answers the observed source, not the reported one) and learns that address as a new candidate
  (peer-reflexive, as ICE does), pinging it at once;
* counts a path as confirmed when a PONG for one of its own PINGs arrives (both directions work);
* the controlling side (the one that asked for the rendezvous) NOMINATEs its first confirmed path and
  repeats it until NOMINATE_ACK; the controlled side takes the path a NOMINATE arrived on. First
  authenticated reply wins.

Birthday mode (one side "hard" = endpoint-dependent mapping, the other "easy" behind a NAT): the hard
side opens ``birthday_sockets`` sockets that each PING the easy side's public endpoint (each gets its
own random public port), and the easy side PINGs up to ``birthday_max_probes`` random ports of the hard
side's public address, ``birthday_probes_per_tick`` every ``birthday_tick``. With 256 open ports out
of 64512 and 1024 probes the chance of a hit is 1-(1-256/64512)^1024 = 98 % (Tailscale's numbers).

Socket indexes: 0 is the socket registered at the server; 1.. are the hard side's extra sockets. The
driver opens :attr:`PunchSession.sockets_wanted` sockets and moves datagrams; nothing else.

Authentication: ``mac = HMAC-SHA256(secret, frm, to, session, kind, txid)[:16]``. Only holders of the
server-issued secret can produce a valid punch packet. (Until issue 6 the secret travels in clear over
UDP from the server, so a stranger who can read that link could forge; one who cannot, cannot.)
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import random
from dataclasses import dataclass, field

from . import wire

Addr = tuple[str, int]


class Kind(enum.IntEnum):
    PING = 0
    PONG = 1
    NOMINATE = 2
    NOMINATE_ACK = 3


class State(str, enum.Enum):
    PUNCHING = "punching"
    PUNCHED = "punched"
    FAILED = "failed"
    LOST = "lost"  # punched, then the peer went silent for ``dead_after``


@dataclass(frozen=True)
class PunchLimits:
    """Every bound of a punch attempt (docs/nat.md lists the defaults)."""

    first_interval: float = 0.05  # seconds between the first PING rounds
    backoff: float = 1.5
    max_interval: float = 0.25
    deadline: float = 5.0  # plain punching gives up after this
    birthday_deadline: float = 6.0
    birthday_sockets: int = 256  # hard side
    birthday_probes_per_tick: int = 64  # easy side
    birthday_tick: float = 0.05
    birthday_max_probes: int = 2048
    birthday_hard_rounds: int = 3  # PINGs per extra hard-side socket (t=0, then spread over the deadline)
    port_range: tuple[int, int] = (1024, 65535)  # where a NAT picks random public ports
    keepalive: float = 5.0  # once punched: PING the path this often
    dead_after: float = 16.0  # once punched: nothing heard for this long -> LOST
    max_candidates: int = 16  # reported + learned, per session


@dataclass(frozen=True)
class Send:
    sock: int
    addr: Addr
    data: bytes


@dataclass(frozen=True)
class PunchResult:
    state: State
    sock: int = -1
    addr: Addr | None = None
    reason: str = ""
    elapsed: float = 0.0
    packets_sent: int = 0


def parse_addr(text: str) -> Addr:
    host, _, port = text.rpartition(":")
    return host, int(port)


def punch_mac(secret: bytes, frm: str, to: str, session: bytes, kind: int, txid: bytes) -> bytes:
    msg = b"zbus-punch\0%s\0%s\0%s\0%d\0%s" % (frm.encode(), to.encode(), session, kind, txid)
    return hmac.new(secret, msg, hashlib.sha256).digest()[:16]


def birthday_mode(role: str, peer_role: str) -> bool:
    return {role, peer_role} == {"easy", "hard"}


@dataclass
class _Candidate:
    sock: int
    addr: Addr
    next_ping: float
    interval: float
    rounds_left: int | None = None  # None: until the deadline


@dataclass
class PunchSession:
    own_id: str
    peer_id: str
    session: bytes
    secret: bytes = field(repr=False)
    role: str  # "open" | "easy" | "hard"
    peer_role: str
    controlling: bool
    candidates: list[str]
    now: float
    rng: random.Random
    limits: PunchLimits = field(default_factory=PunchLimits)

    def __post_init__(self) -> None:
        self.started = self.now
        self.ended: float | None = None  # when PUNCHED or FAILED was reached
        self.state = State.PUNCHING
        self.reason = ""
        self.path: tuple[int, Addr] | None = None
        self.packets_sent = 0
        self.dropped = 0
        self._out: list[Send] = []
        self._cands: dict[tuple[int, Addr], _Candidate] = {}
        self._pings: dict[bytes, tuple[int, Addr]] = {}  # txid -> where that PING went
        self._confirmed: tuple[int, Addr] | None = None
        self._nominate_next = 0.0
        self._nominate_interval = self.limits.first_interval
        self._last_heard = self.now
        self._next_keepalive = 0.0
        self.birthday = birthday_mode(self.role, self.peer_role)
        self.deadline = self.now + (self.limits.birthday_deadline if self.birthday else self.limits.deadline)
        self.sockets_wanted = self.limits.birthday_sockets if self.birthday and self.role == "hard" else 1
        self._probe_ports: list[int] = []
        self._probe_ip = ""
        reported = []
        for text in self.candidates:
            try:
                reported.append(parse_addr(text))
            except ValueError:
                self.dropped += 1
        reported = reported[: self.limits.max_candidates]
        for addr in reported:
            self._add_candidate(0, addr, self.now)
        if self.birthday and reported:
            public = reported[0]  # the server lists the observed public endpoint first
            if self.role == "hard":
                spread = self.limits.birthday_deadline / max(1, self.limits.birthday_hard_rounds)
                for sock in range(1, self.sockets_wanted):
                    self._cands[(sock, public)] = _Candidate(sock, public, self.now, spread,
                                                             self.limits.birthday_hard_rounds)
            else:
                lo, hi = self.limits.port_range
                count = min(self.limits.birthday_max_probes, hi - lo + 1)
                self._probe_ip = public[0]
                self._probe_ports = self.rng.sample(range(lo, hi + 1), count)
                self._probe_ports.reverse()  # pop() from the end
                self._next_probe = self.now
        self._run(self.now)

    # -- inputs ------------------------------------------------------------------------------------

    def receive(self, now: float, sock: int, addr: Addr, data: bytes) -> bool:
        """A datagram arrived on socket ``sock`` from ``addr``. True if it was ours (authenticated)."""
        try:
            msg = wire.decode(data)
        except wire.WireError:
            self.dropped += 1
            return False
        if not isinstance(msg, wire.Punch) or not self._authentic(msg):
            self.dropped += 1
            return False
        self._last_heard = now
        if msg.kind == Kind.PING:
            self._send(sock, addr, Kind.PONG, msg.txid)
            if self.state is State.PUNCHING:
                cand = self._cands.get((sock, addr))
                if cand is None:
                    if len(self._cands) < self.limits.max_candidates + self.sockets_wanted:
                        self._add_candidate(sock, addr, now)  # peer-reflexive: ping where it came from
                elif cand.rounds_left is not None:  # a birthday socket got through: ping back now
                    cand.rounds_left, cand.next_ping, cand.interval = None, now, self.limits.first_interval
        elif msg.kind == Kind.PONG:
            sent_to = self._pings.pop(msg.txid, None)
            if sent_to is not None and self.state is State.PUNCHING and self._confirmed is None:
                self._confirmed = (sock, addr)
                if self.controlling:
                    self._nominate_next = now
                # else: wait for the controlling side's NOMINATE (it may pick another path)
        elif msg.kind == Kind.NOMINATE:
            self._send(sock, addr, Kind.NOMINATE_ACK, msg.txid)
            if self.state is State.PUNCHING and not self.controlling:
                self._finish(now, (sock, addr))
        elif msg.kind == Kind.NOMINATE_ACK:
            if self.state is State.PUNCHING and self.controlling and self._confirmed == (sock, addr):
                self._finish(now, (sock, addr))
        self._run(now)
        return True

    def handle_timer(self, now: float) -> None:
        self._run(now)

    # -- outputs -----------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[Send]:
        out, self._out = self._out, []
        return out

    def next_deadline(self) -> float | None:
        if self.state is State.PUNCHED:
            return min(self._next_keepalive, self._last_heard + self.limits.dead_after)
        if self.state is not State.PUNCHING:
            return None
        times = [self.deadline]
        times += [c.next_ping for c in self._cands.values() if c.rounds_left != 0]
        if self._probe_ports:
            times.append(self._next_probe)
        if self.controlling and self._confirmed is not None:
            times.append(self._nominate_next)
        return min(times)

    def result(self, now: float) -> PunchResult:
        sock, addr = self.path if self.path else (-1, None)
        end = self.ended if self.ended is not None else now
        return PunchResult(self.state, sock, addr, self.reason, end - self.started, self.packets_sent)

    # -- internals ---------------------------------------------------------------------------------

    def _authentic(self, msg: wire.Punch) -> bool:
        if msg.frm != self.peer_id or msg.to != self.own_id or msg.session != self.session:
            return False
        expected = punch_mac(self.secret, msg.frm, msg.to, msg.session, msg.kind, msg.txid)
        return hmac.compare_digest(expected, msg.mac)

    def _add_candidate(self, sock: int, addr: Addr, now: float) -> None:
        if (sock, addr) not in self._cands:
            self._cands[(sock, addr)] = _Candidate(sock, addr, now, self.limits.first_interval)

    def _send(self, sock: int, addr: Addr, kind: Kind, txid: bytes | None = None) -> bytes:
        txid = txid if txid is not None else self.rng.randbytes(8)
        mac = punch_mac(self.secret, self.own_id, self.peer_id, self.session, int(kind), txid)
        data = wire.encode(wire.Punch(self.own_id, self.peer_id, self.session, int(kind), txid, mac))
        self._out.append(Send(sock, addr, data))
        self.packets_sent += 1
        return txid

    def _ping(self, sock: int, addr: Addr) -> None:
        txid = self._send(sock, addr, Kind.PING)
        if len(self._pings) > 4096:  # bounded: forget the oldest
            self._pings.pop(next(iter(self._pings)))
        self._pings[txid] = (sock, addr)

    def _finish(self, now: float, path: tuple[int, Addr]) -> None:
        self.state = State.PUNCHED
        self.ended = now
        self.path = path
        self._last_heard = now
        self._next_keepalive = now + self.limits.keepalive
        self._probe_ports = []
        self._pings.clear()

    def _run(self, now: float) -> None:
        if self.state is State.PUNCHED:
            if now - self._last_heard >= self.limits.dead_after:
                self.state = State.LOST
                self.reason = f"nothing heard from {self.peer_id} for {self.limits.dead_after:g} s"
            elif now >= self._next_keepalive:
                self._ping(*self.path)
                self._next_keepalive = now + self.limits.keepalive
            return
        if self.state is not State.PUNCHING:
            return
        if now >= self.deadline:
            self.state = State.FAILED
            self.ended = now
            kinds = f"{self.role}/{self.peer_role}"
            self.reason = (f"no authenticated reply from {self.peer_id} within "
                           f"{self.deadline - self.started:g} s ({kinds}); use the relay")
            self._probe_ports = []
            return
        for cand in self._cands.values():
            if cand.rounds_left != 0 and now >= cand.next_ping:
                self._ping(cand.sock, cand.addr)
                cand.next_ping = now + cand.interval
                if cand.rounds_left is None:
                    cand.interval = min(cand.interval * self.limits.backoff, self.limits.max_interval)
                else:
                    cand.rounds_left -= 1
        if self._probe_ports and now >= self._next_probe:
            for _ in range(min(self.limits.birthday_probes_per_tick, len(self._probe_ports))):
                self._ping(0, (self._probe_ip, self._probe_ports.pop()))
            self._next_probe = now + self.limits.birthday_tick
        if self.controlling and self._confirmed is not None and now >= self._nominate_next:
            self._send(*self._confirmed, Kind.NOMINATE)
            self._nominate_next = now + self._nominate_interval
            self._nominate_interval = min(self._nominate_interval * self.limits.backoff,
                                          self.limits.max_interval)
