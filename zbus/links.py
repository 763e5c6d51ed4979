"""Direct links, pure: which peers to link to, the Hello/Welcome handshake, pings, timeouts.

A client listens on its *link ROUTER* (``listen``) and advertises it in its net state; servers pass
it on in their client lists. To link to peer P the engine dials P's link ROUTER with a control
DEALER and sends :class:`~zbus.wire.LinkHello` (our Id, the Id we expect, a nonce, and the routing
id of our future data connection). P answers :class:`~zbus.wire.LinkWelcome` only if it *is* the
expected Id and a server lists us; it then stamps our Id on every Data that arrives from that data
connection, never trusting a header. We open the data connection (a DEALER, to P's data ROUTER at
the port the Welcome names) and the link is up. Wrong Ids, stale addresses and silence are dropped
quietly: the next candidate address is tried, then the peer is retried with backoff.

The dialer pings every :data:`PING_INTERVAL` on the control connection; the round trip is the
link's RTT; no Pong for :data:`LINK_TIMEOUT` closes the link (the sender falls back to relay). The
listener forgets a link that sent nothing for :data:`LINK_TIMEOUT` + 1 s, or at once on LinkBye.

Links are opened to peers this client sends to, in the order it first sent to them, up to
``max_links`` (0: relay only); a peer that leaves every server's list loses its link. Room left
under ``max_links`` is filled with links to other listed peers (``prelink``, the seed's "connect to
as many clients as the configured maximum allows"), so a first message to them is already direct:
only peers reachable without punching, not already linked to us, in an order of our own (each
client spreads its links differently), at most :data:`PRELINK_DIALS` handshakes at a time. These
links give way to peers we send to: when ``max_links`` is reached, a new destination replaces one.

Punched links (:mod:`zbus.punchlink`) are the same links dialed through a loopback bridge: when a
peer is behind a NAT other than ours (:func:`needs_punch`), the core asks for a punch
(:class:`PunchWanted`) instead of dialing its unreachable private addresses; once the engine reports
a pipe (:meth:`LinkCore.pipe_up`) the peer is dialed at the bridge, with kind "punched".

The core returns actions for the engine (:class:`Dial`, :class:`OpenData`, :class:`Close`,
:class:`SendLink`, :class:`Reply`); it never touches a socket or a clock.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from dataclasses import dataclass, field
from typing import Iterable, Mapping, NamedTuple, Union

from . import wire

PING_INTERVAL = 0.5
LINK_TIMEOUT = 2.0  # seconds without a Pong before the dialer closes a link
HANDSHAKE_TIMEOUT = 2.0  # seconds to wait for a Welcome on one candidate address
# ...and through a punched pipe: that path is known to work (its TCP or KCP connection is up), but it
# crosses the internet, where a lost segment waits for TCP's retransmission backoff (0.2, 0.4, 0.8,
# 1.6 s...); giving up at 2 s threw the pipe away and punched again with a growing backoff (at 20 %
# loss each way the link then took up to a minute to come up; docs/nat.md).
PUNCHED_HANDSHAKE_TIMEOUT = 6.0
INCOMING_TIMEOUT = LINK_TIMEOUT + 1.0  # the listener forgets a silent link after this
RETRY_MIN = 1.0  # backoff before retrying a peer whose every address failed
RETRY_MAX = 30.0
TOKEN_BYTES = 16
PRELINK_DIALS = 2  # links to peers we have not sent to: handshakes in flight at once
PRELINK_ORDER_MAX = 100_000  # cached places in that order (peers seen); cleared when full
PRELINK_SCAN_S = 1.0  # the client lists are searched for new such peers at most this often
_WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]", "::")


class Dial(NamedTuple):
    peer: str
    address: str
    hello: bytes  # first message on the new control connection


class OpenData(NamedTuple):
    peer: str
    endpoint: str  # the peer's data ROUTER
    token: bytes  # our data connection's routing id


class Close(NamedTuple):
    peer: str
    bye: bytes | None  # say LinkBye first (on a link that was up)
    pipe: bool = False  # a punched link: close its bridge too


class PunchWanted(NamedTuple):
    peer: str  # ask the punch service for a pipe to this peer


class SendLink(NamedTuple):
    peer: str
    header: bytes


class Reply(NamedTuple):
    conn: bytes  # routing id on our link ROUTER
    header: bytes


Action = Union[Dial, OpenData, Close, SendLink, Reply, PunchWanted]
PUNCH_STALE = 30.0  # a punch request without an answer for this long is forgotten (asked again)


def link_addresses(net: wire.NetState) -> list[str]:
    """Where a peer's link ROUTER may be reached: its listen endpoint, or every private address
    with its port when it listens on all interfaces."""
    if not net.listen:
        return []
    host, _, port = net.listen.removeprefix("tcp://").rpartition(":")
    if host in _WILDCARD_HOSTS:
        return [f"tcp://{ip}:{port}" for ip in net.private]
    return [net.listen]


def _ips(endpoints: Iterable[str]) -> set[str]:
    return {e.rpartition(":")[0] for e in endpoints}


def needs_punch(own: wire.NetState | None, peer: wire.NetState) -> bool:
    """True when ``peer`` is behind a NAT (servers see it at an address it does not have) that is
    not ours (a different public address): its listen addresses cannot be reached, punch instead.
    Unknown public endpoints (no reflector answer yet): False, dial directly as before."""
    if own is None or not own.public or not peer.public:
        return False
    peer_public = _ips(peer.public)
    if peer_public & set(peer.private):
        return False  # the peer has its public address: no NAT in front of it
    return not (_ips(own.public) & peer_public)  # same public address: same NAT, private addresses


def _host_of(address: str) -> str:
    return address.removeprefix("tcp://").rpartition(":")[0]


@dataclass
class OutLink:
    peer: str
    candidates: list[str]
    index: int = 0
    state: str = "dialing"  # "dialing" | "up"
    nonce: bytes = b""
    token: bytes = b""
    deadline: float = 0.0  # handshake deadline while dialing; Pong deadline when up
    next_ping: float = 0.0
    rtt: float | None = None
    kind: str = "direct"  # "direct" | "punched" (dialed at a loopback bridge)
    shown: str = ""  # the address users see (a punched link: the peer's punched endpoint)
    data_endpoint: str = ""  # where the data connection goes, when not the dialed host (punched)
    prelinked: bool = False  # opened to fill max_links, not because we sent to the peer

    @property
    def address(self) -> str:
        return self.candidates[self.index]


@dataclass
class InLink:
    peer: str
    token: bytes
    last_seen: float
    kind: str = "direct"  # "punched": the dialer came through a punched pipe (its LinkHello says so)


@dataclass(frozen=True)
class LinkView:
    """One up link as user threads see it (published in the Routes snapshot)."""

    peer: str
    kind: str  # "direct" | "punched"
    address: str
    rtt: float | None


@dataclass
class LinkCore:
    my_id: str
    rng: random.Random
    max_links: int
    data_port: int
    out: dict[str, OutLink] = field(default_factory=dict)
    incoming: dict[bytes, InLink] = field(default_factory=dict)  # control conn -> link
    wanted: list[str] = field(default_factory=list)  # peers we sent to, first first
    retry_at: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer -> (when, backoff)
    changed: bool = False  # the set of up links (or their RTT) changed since the last take
    can_punch: bool = False  # the engine runs a punch service
    pipes: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # peer -> (ctl, data, shown)
    punching: dict[str, float] = field(default_factory=dict)  # peer -> when we asked for a punch
    punched_in: set[str] = field(default_factory=set)  # peers with a pipe (their links to us are punched)
    prelink: bool = True  # fill room under max_links with links to listed peers we have not sent to
    prelink_retry_at: dict[str, tuple[float, float]] = field(default_factory=dict)  # as retry_at, prelinks
    prelink_scan_at: float = 0.0  # when the lists may next be searched for new prelinks
    prelink_order: dict[str, bytes] = field(default_factory=dict)  # peer -> its place in our order

    # -- decisions ----------------------------------------------------------------------------
    def want(self, peers: Iterable[str]) -> None:
        """Peers the user sent to by relay (in first-send order)."""
        for peer in peers:
            if peer not in self.wanted and peer != self.my_id:
                self.wanted.append(peer)

    def set_max_links(self, max_links: int) -> None:
        self.max_links = max_links

    def plan(self, clients: Mapping[str, wire.ClientInfo], now: float,
             own: wire.NetState | None = None) -> list[Action]:
        """Open links to wanted peers up to ``max_links``; close links to peers no longer listed.
        ``own``: our net state (to tell when a peer needs a punched link)."""
        actions: list[Action] = []
        target = [p for p in self.wanted if p in clients][: self.max_links]  # (a peer may come back)
        keep = set(target)
        prelinks = self._prelinks(clients, keep, now, own) if self.prelink else []
        keep.update(prelinks)
        for peer in [p for p in self.out if p not in keep]:
            actions += self._close(peer)
        for peer in prelinks:
            if peer not in self.out:
                link = OutLink(peer, link_addresses(clients[peer].net), prelinked=True)
                actions += self._dial(link, now)
        for peer in target:
            link = self.out.get(peer)
            if link is not None and link.prelinked and link.state == "dialing" and self.can_punch \
                    and needs_punch(own, clients[peer].net):
                actions += self._close(peer)  # a prelink dialed before we knew it needs a punch: punch now
            elif link is not None:
                link.prelinked = False  # a destination now (its failures back off as such)
                continue
            when = self.retry_at.get(peer)
            if when is not None and now < when[0]:
                continue  # (the engine calls plan at least once a second)
            pipe = self.pipes.get(peer)
            if pipe is not None:
                actions += self._dial(OutLink(peer, [pipe[0]], kind="punched", shown=pipe[2],
                                              data_endpoint=pipe[1]), now)
                continue
            if self.can_punch and needs_punch(own, clients[peer].net):
                if now - self.punching.get(peer, -PUNCH_STALE) >= PUNCH_STALE:
                    self.punching[peer] = now
                    actions.append(PunchWanted(peer))
                continue
            candidates = link_addresses(clients[peer].net)
            if candidates:
                actions += self._dial(OutLink(peer, candidates), now)
        return actions

    def _prelinks(self, clients: Mapping[str, wire.ClientInfo], wanted: set[str], now: float,
                  own: wire.NetState | None) -> list[str]:
        """Peers to link to beyond ``wanted``, up to ``max_links`` in all: those already linked (no
        churn), then new ones, at most PRELINK_DIALS handshakes in flight."""
        room = self.max_links - len(wanted)
        if room <= 0:
            return []
        chosen = [p for p, link in self.out.items() if link.prelinked and p not in wanted and p in clients][:room]
        dialing = sum(1 for p in chosen if self.out[p].state == "dialing")
        if len(chosen) >= room or dialing >= PRELINK_DIALS or now < self.prelink_scan_at:
            return chosen
        self.prelink_scan_at = now + PRELINK_SCAN_S
        for gone in [p for p in self.prelink_retry_at if p not in clients]:
            del self.prelink_retry_at[gone]
        taken = wanted.union(chosen, (link.peer for link in self.incoming.values()))
        fresh = []
        for peer, info in clients.items():
            if peer in taken or peer == self.my_id or not info.net.listen:
                continue
            when = self.prelink_retry_at.get(peer) or self.retry_at.get(peer)
            if when is not None and now < when[0]:
                continue
            if self.can_punch and (own is None or not own.public or not info.net.public or needs_punch(own, info.net)):
                continue  # it needs a punch, or we cannot tell yet (public endpoints unknown)
            fresh.append(peer)
        return chosen + heapq.nsmallest(min(room - len(chosen), PRELINK_DIALS - dialing), fresh,
                                        key=self._prelink_order)

    def _prelink_order(self, peer: str) -> bytes:
        """A fixed order of peers that differs from client to client (so links spread evenly)."""
        order = self.prelink_order.get(peer)
        if order is None:
            if len(self.prelink_order) >= PRELINK_ORDER_MAX:
                self.prelink_order.clear()
            order = self.prelink_order[peer] = hashlib.blake2b(peer.encode(), digest_size=8,
                                                               key=self.my_id.encode()[:64]).digest()
        return order

    def _dial(self, link: OutLink, now: float) -> list[Action]:
        self.out[link.peer] = link
        link.state = "dialing"
        link.nonce = self.rng.randbytes(8)
        token = self.rng.randbytes(TOKEN_BYTES)
        link.token = bytes([token[0] | 1]) + token[1:]  # libzmq reserves ids starting with 0
        link.deadline = now + (PUNCHED_HANDSHAKE_TIMEOUT if link.kind == "punched" else HANDSHAKE_TIMEOUT)
        hello = wire.encode(wire.LinkHello(self.my_id, link.peer, link.nonce, link.token,
                                           "punched" if link.kind == "punched" else ""))
        return [Dial(link.peer, link.address, hello)]

    def _close(self, peer: str) -> list[Action]:
        link = self.out.pop(peer, None)
        if link is None:
            return []
        if link.state == "up":
            self.changed = True
        punched = link.kind == "punched"
        if punched:
            self.pipes.pop(peer, None)  # a failed handshake or a lost pipe: punch afresh next time
        return [Close(peer, wire.encode(wire.LinkBye()) if link.state == "up" else None, punched)]

    def _failed(self, peer: str, now: float) -> list[Action]:
        """The current address did not answer or answered wrongly: next candidate, else backoff."""
        link = self.out[peer]
        actions = self._close(peer)
        if link.state == "dialing" and link.index + 1 < len(link.candidates):
            link.index += 1
            return actions + self._dial(link, now)
        # A failed prelink backs off on its own: it must not delay the link (or the punch) that a
        # first message to the peer asks for (e.g. its private addresses were tried before its
        # public endpoint, which tells that it needs a punch, was known).
        table = self.prelink_retry_at if link.prelinked else self.retry_at
        backoff = min(table.get(peer, (0.0, RETRY_MIN / 2))[1] * 2, RETRY_MAX)
        table[peer] = (now + backoff * (0.5 + self.rng.random()), backoff)
        return actions

    # -- the dialer side ------------------------------------------------------------------------
    def on_link_message(self, peer: str, header: wire.Header, now: float) -> list[Action]:
        """A control message from the peer we dialed."""
        link = self.out.get(peer)
        if link is None:
            return []
        if isinstance(header, wire.LinkWelcome) and link.state == "dialing":
            if header.id != peer or header.nonce != link.nonce or not 0 < header.data_port < 65536:
                return self._failed(peer, now)
            link.state = "up"
            link.deadline = now + LINK_TIMEOUT
            link.next_ping = now
            self.retry_at.pop(peer, None)
            self.prelink_retry_at.pop(peer, None)
            self.changed = True
            endpoint = link.data_endpoint or f"tcp://{_host_of(link.address)}:{header.data_port}"
            return [OpenData(peer, endpoint, link.token), *self.tick(now)]
        if isinstance(header, wire.LinkPong) and link.state == "up":
            link.deadline = now + LINK_TIMEOUT
            rtt = max(0.0, now - header.sent)
            link.rtt = rtt if link.rtt is None else 0.8 * link.rtt + 0.2 * rtt
            self.changed = True
            return []
        if isinstance(header, wire.Error):
            return self._failed(peer, now)
        return []

    # -- the listener side ----------------------------------------------------------------------
    def on_listener(self, conn: bytes, header: wire.Header, clients: Mapping[str, wire.ClientInfo],
                    now: float) -> list[Action]:
        """A message on our link ROUTER from connection ``conn``."""
        if isinstance(header, wire.LinkHello):
            if header.expected != self.my_id:
                return [Reply(conn, wire.encode(wire.Error("wrong-id", f"this is {self.my_id}")))]
            if header.id not in clients:
                return [Reply(conn, wire.encode(wire.Error("unknown-peer", "no server lists you")))]
            if len(header.data_token) != TOKEN_BYTES or header.data_token[0] == 0 or any(
                    link.token == header.data_token and c != conn for c, link in self.incoming.items()):
                return [Reply(conn, wire.encode(wire.Error("bad-hello", "data token invalid or in use")))]
            kind = "punched" if header.kind == "punched" else "direct"  # only a label of the dialer's own messages
            self.incoming[conn] = InLink(header.id, header.data_token, now, kind)
            self.changed = True
            return [Reply(conn, wire.encode(wire.LinkWelcome(self.my_id, header.nonce, self.data_port)))]
        link = self.incoming.get(conn)
        if link is None:
            return []
        link.last_seen = now
        if isinstance(header, wire.LinkPing):
            return [Reply(conn, wire.encode(wire.LinkPong(header.sent)))]
        if isinstance(header, wire.LinkBye):
            del self.incoming[conn]
            self.changed = True
        return []

    def incoming_conn(self, peer: str) -> bytes | None:
        """The control connection of ``peer``'s link to us, if any (acks can go back on it)."""
        for conn, link in self.incoming.items():
            if link.peer == peer:
                return conn
        return None

    # -- time -----------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for peer, link in list(self.out.items()):
            if now >= link.deadline:
                actions += self._failed(peer, now)
            elif link.state == "up" and now >= link.next_ping:
                link.next_ping = now + PING_INTERVAL
                actions.append(SendLink(peer, wire.encode(wire.LinkPing(now))))
        for conn in [c for c, link in self.incoming.items() if now - link.last_seen > INCOMING_TIMEOUT]:
            del self.incoming[conn]
            self.changed = True
        return actions

    def next_deadline(self) -> float | None:
        times = [min(l.deadline, l.next_ping) if l.state == "up" else l.deadline for l in self.out.values()]
        times += [l.last_seen + INCOMING_TIMEOUT for l in self.incoming.values()]
        return min(times) if times else None

    # -- outputs --------------------------------------------------------------------------------
    def up_links(self) -> dict[str, LinkView]:
        return {p: LinkView(p, l.kind, l.shown or l.address, l.rtt) for p, l in self.out.items() if l.state == "up"}

    def tokens(self) -> dict[bytes, tuple[str, str]]:
        """Data connection routing id -> (the peer Id it was authenticated as, "direct" | "punched")."""
        punched = self.punched_in
        return {link.token: (link.peer, "punched" if link.kind == "punched" or link.peer in punched else "direct")
                for link in self.incoming.values()}

    # -- punched pipes (events from the punch service) -------------------------------------------
    def pipe_up(self, peer: str, ctl: str, data: str, shown: str, now: float) -> list[Action]:
        """A pipe to ``peer`` is bridged at ``ctl``/``data`` (loopback); dial through it when wanted."""
        actions: list[Action] = []
        link = self.out.get(peer)
        if link is not None and link.kind == "punched":
            actions = self._close(peer)  # it ran through the pipe this one replaces
        self.punching.pop(peer, None)
        self.pipes[peer] = (ctl, data, shown)
        self.punched_in.add(peer)
        self.changed = True  # (tokens: the peer's links to us are now punched)
        self.retry_at.pop(peer, None)
        return actions

    def pipe_down(self, peer: str, now: float) -> list[Action]:
        """The pipe to ``peer`` closed: its punched link goes down now (traffic falls back to relay)."""
        self.pipes.pop(peer, None)
        self.punched_in.discard(peer)
        self.changed = True
        link = self.out.get(peer)
        if link is not None and link.kind == "punched":
            return self._failed(peer, now)
        return []

    def punch_failed(self, peer: str, now: float) -> None:
        """No pipe: back off like a failed dial (the relay keeps carrying the traffic)."""
        self.punching.pop(peer, None)
        backoff = min(self.retry_at.get(peer, (0.0, RETRY_MIN / 2))[1] * 2, RETRY_MAX)
        self.retry_at[peer] = (now + backoff * (0.5 + self.rng.random()), backoff)
