"""A pure, seeded simulation of NATs and an internet, to drive zbus.punch and zbus.rendezvous.

Models what the NAT lab's routers do (docs/natlab.md): "none" (routed, no filtering), "cone"
(endpoint-independent mapping, port kept when free; address-and-port-dependent filtering) and
"symmetric" (a random public port per destination; same filtering). No hairpin. Delay 5–25 ms,
independent loss per NAT crossing.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from zbus import wire
from zbus.punch import PunchLimits, PunchSession, State
from zbus.rendezvous import Rendezvous

Addr = tuple[str, int]
SERVER: Addr = ("203.0.113.10", 7700)
SERVER2: Addr = ("203.0.113.11", 7700)


@dataclass
class SimNat:
    kind: str  # "none" | "cone" | "symmetric"
    public_ip: str
    rng: random.Random
    loss: float = 0.0
    out_map: dict[tuple, int] = field(default_factory=dict)  # (private addr[, dst]) -> public port
    back: dict[int, Addr] = field(default_factory=dict)  # public port -> private addr
    allowed: set[tuple[int, Addr]] = field(default_factory=set)  # (public port, remote) may come in

    def outbound(self, src: Addr, dst: Addr) -> Addr:
        if self.kind == "none":
            return src
        key = (src,) if self.kind == "cone" else (src, dst)
        port = self.out_map.get(key)
        if port is None:
            port = src[1] if self.kind == "cone" and src[1] not in self.back else self._free_port()
            self.out_map[key] = port
            self.back[port] = src
        self.allowed.add((port, dst))
        return self.public_ip, port

    def inbound(self, src: Addr, port: int) -> Addr | None:
        if (port, src) not in self.allowed:
            return None
        return self.back[port]

    def _free_port(self) -> int:
        for _ in range(1000):
            port = self.rng.randint(1024, 65535)
            if port not in self.back:
                return port
        raise RuntimeError("port space exhausted")


@dataclass
class SimHost:
    name: str
    ip: str
    nat: SimNat | None  # None: a public host
    base_port: int = 40000


class SimNet:
    """Datagrams between (host, local port) endpoints through NATs, with delay and loss."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.hosts: dict[str, SimHost] = {}
        self.queue: list[tuple[float, int, str, int, Addr, bytes]] = []  # (time, n, host, port, src, data)
        self._n = 0
        self.sent = 0

    def add(self, name: str, ip: str, nat: SimNat | None) -> SimHost:
        self.hosts[name] = host = SimHost(name, ip, nat)
        return host

    def send(self, host: SimHost, port: int, dst: Addr, data: bytes) -> None:
        self.sent += 1
        src: Addr = (host.ip, port)
        nat = host.nat
        neighbour = next((h for h in self.hosts.values()
                          if nat is not None and h.nat is nat and h.ip == dst[0]), None)
        if neighbour is not None:  # same LAN: the bridge, no router involved
            self._deliver(neighbour, dst[1], src, data)
            return
        if nat is not None:
            if dst[0] == nat.public_ip and nat.kind != "none":
                return  # no hairpin
            if self.rng.random() < nat.loss:
                return
            src = nat.outbound(src, dst)
        for target in self.hosts.values():
            if target.nat is None and target.ip == dst[0]:
                self._deliver(target, dst[1], src, data)
                return
            if target.nat is not None and target.nat.kind == "none" and target.ip == dst[0]:
                if self.rng.random() >= target.nat.loss:
                    self._deliver(target, dst[1], src, data)
                return
        for target_nat in {id(h.nat): h.nat for h in self.hosts.values() if h.nat is not None}.values():
            if target_nat.kind != "none" and target_nat.public_ip == dst[0]:
                if self.rng.random() < target_nat.loss:
                    return
                inside = target_nat.inbound(src, dst[1])
                if inside is None:
                    return  # filtered: no mapping for this remote
                target = next(h for h in self.hosts.values() if h.nat is target_nat and h.ip == inside[0])
                self._deliver(target, inside[1], src, data)
                return
        # a private address of another LAN, or nobody: lost

    def _deliver(self, target: SimHost, port: int, src: Addr, data: bytes) -> None:
        self._n += 1
        at = self.now + self.rng.uniform(0.005, 0.025)
        heapq.heappush(self.queue, (at, self._n, target.name, port, src, data))


@dataclass
class Side:
    host: SimHost
    own_id: str
    hard: bool = False
    session: PunchSession | None = None
    go: wire.PunchGo | None = None
    registered: bool = False

    def port(self, sock: int) -> int:
        return self.host.base_port + sock


def make_nat(kind: str, index: int, rng: random.Random, loss: float) -> SimNat:
    ip = f"10.{index}.0.1" if kind == "none" else f"203.0.113.{100 + index}"
    return SimNat(kind, ip, rng, loss)


@dataclass
class Outcome:
    a: PunchSession
    b: PunchSession
    net: SimNet
    a_side: Side
    b_side: Side


def run_punch(a_kind: str, b_kind: str, seed: int, loss: float = 0.0, same_nat: bool = False,
              limits: PunchLimits | None = None, horizon: float = 10.0) -> Outcome:
    """Register both sides at a simulated rendezvous, let a ask for b, and run until both stop."""
    net = SimNet(seed)
    rng = random.Random(seed + 1)
    nat_a = make_nat(a_kind, 1, rng, loss)
    nat_b = nat_a if same_nat else make_nat(b_kind, 2, rng, loss)
    ha = net.add("a", "10.1.0.2", nat_a)
    hb = net.add("b", "10.1.0.3" if same_nat else "10.2.0.2", nat_b)
    if a_kind == "none":
        ha.ip = nat_a.public_ip = "10.1.0.2"
    if b_kind == "none" and not same_nat:
        hb.ip = nat_b.public_ip = "10.2.0.2"
    server_host = net.add("s", SERVER[0], None)
    rendezvous = Rendezvous(rng.randbytes)
    sides = {"a": Side(ha, "C-a", hard=a_kind == "symmetric"),
             "b": Side(hb, "C-b", hard=b_kind == "symmetric")}
    limits = limits or PunchLimits()

    def server_receive(src: Addr, data: bytes) -> None:
        msg = wire.decode(data)
        assert isinstance(msg, wire.PunchRequest)
        for reply in rendezvous.handle(net.now, SERVER[0], src, msg):
            net.send(server_host, SERVER[1], reply.to, reply.data)

    def request(side: Side, to: str) -> None:
        msg = wire.PunchRequest(side.own_id, to, b"n", [side.host.ip], side.port(0), side.hard)
        net.send(side.host, side.port(0), SERVER, wire.encode(msg))

    for _ in range(20):  # b registers, retrying until the server's Observed comes back (as the driver)
        request(sides["b"], "")
        drain(net, sides, server_receive, until=net.now + 0.25)
        if sides["b"].registered:
            break
    for _ in range(20):  # a asks until its PunchGo arrives (as the driver does)...
        request(sides["a"], "C-b")
        drain(net, sides, server_receive, until=net.now + 0.25, limits=limits)
        if sides["a"].session is not None:
            break
    for _ in range(8):  # ...then renews for 2 s (punch_udp.RENEW_FOR_S) in case b's PunchGo was lost
        request(sides["a"], "C-b")
        drain(net, sides, server_receive, until=net.now + 0.25, limits=limits)
    end = net.now + horizon
    while net.now < end:
        drain(net, sides, server_receive, until=min(end, net.now + 0.5), limits=limits)
        if all(s.session is not None and s.session.state is not State.PUNCHING for s in sides.values()):
            break
    a, b = sides["a"].session, sides["b"].session
    assert a is not None and b is not None, "no PunchGo reached a side"
    return Outcome(a, b, net, sides["a"], sides["b"])


def drain(net: SimNet, sides: dict[str, Side], server_receive, until: float,
          limits: PunchLimits | None = None) -> None:
    """Advance simulated time to ``until``, delivering datagrams and firing timers. Bounded."""
    for _ in range(200_000):
        wakes = [s.session.next_deadline() for s in sides.values() if s.session is not None]
        wake = min([w for w in wakes if w is not None], default=float("inf"))
        next_packet = net.queue[0][0] if net.queue else float("inf")
        t = min(wake, next_packet)
        if t > until:
            net.now = until
            return
        net.now = max(net.now, t)
        if next_packet <= net.now:
            _, _, name, port, src, data = heapq.heappop(net.queue)
            if name == "s":
                server_receive(src, data)
                continue
            side = sides[name]
            if isinstance(_decoded(data), wire.Observed):
                side.registered = True
                continue
            msg = _maybe_go(data)
            if msg is not None:
                if side.session is None and not msg.refused:
                    side.go = msg
                    side.session = PunchSession(side.own_id, msg.peer, msg.session, msg.secret, msg.role,
                                                msg.peer_role, msg.controlling, list(msg.candidates), net.now,
                                                random.Random(net.rng.randrange(2**32)),
                                                limits or PunchLimits())
                    _flush(net, side)
                continue
            if side.session is not None:
                side.session.receive(net.now, port - side.host.base_port, src, data)
                _flush(net, side)
            continue
        for side in sides.values():
            if side.session is not None:
                side.session.handle_timer(net.now)
                _flush(net, side)
    raise AssertionError("simulation did not settle (unbounded timers?)")


def _decoded(data: bytes):
    try:
        return wire.decode(data)
    except wire.WireError:
        return None


def _maybe_go(data: bytes) -> wire.PunchGo | None:
    msg = _decoded(data)
    return msg if isinstance(msg, wire.PunchGo) else None


def _flush(net: SimNet, side: Side) -> None:
    assert side.session is not None
    for out in side.session.datagrams_to_send():
        net.send(side.host, side.port(out.sock), out.addr, out.data)
