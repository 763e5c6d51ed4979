"""The client's protocol core, pure: server sessions, their client lists, and the Routes snapshot.

The engine (:mod:`zbus.engine`) tells it when a server connection comes up or goes down and what
arrived; it returns ``(server index, header bytes)`` to send and keeps :meth:`routes` current.
"""

from __future__ import annotations

import enum
from types import MappingProxyType

from . import wire
from .routing import Routes
from .tables import Applied, PeerList

HELLO_RETRY = 0.5  # seconds between Hellos while a connection is up but not registered
HEARTBEAT = 1.0  # seconds between Heartbeats to a registered server (servers expire after 3 s)


class SessionState(enum.Enum):
    DOWN = "down"
    HELLO_SENT = "hello-sent"
    REGISTERED = "registered"
    REFUSED = "refused"


class ServerSession:
    def __init__(self, index: int, endpoint: str) -> None:
        self.index = index
        self.endpoint = endpoint
        self.state = SessionState.DOWN
        self.server_id: str | None = None
        self.server_name: str | None = None
        self.peers = PeerList()
        self.next_hello: float | None = None
        self.next_heartbeat: float | None = None
        self.refusal: wire.Error | None = None

    @property
    def synced(self) -> bool:
        return self.state is SessionState.REGISTERED and self.peers.version >= 0


Output = tuple[int, bytes]


class ClientCore:
    def __init__(
        self, client_id: str, name: str, net: wire.NetState, endpoints: list[str], instance: str,
        data_in: bytes, data_out: bytes,
    ) -> None:
        self.client_id = client_id
        self.instance = instance
        self.data_in = data_in
        self.data_out = data_out
        self._heartbeat = wire.encode(wire.Heartbeat())
        self.name = name
        self.net = net
        self.sessions = [ServerSession(i, ep) for i, ep in enumerate(endpoints)]
        self._routes = Routes(endpoints=tuple(endpoints))
        self._dirty = False

    # -- events -----------------------------------------------------------------------------
    def transport_up(self, index: int, now: float) -> list[Output]:
        session = self.sessions[index]
        session.state = SessionState.HELLO_SENT
        session.refusal = None
        return self._hello(session, now)

    def transport_down(self, index: int) -> None:
        session = self.sessions[index]
        if session.state is SessionState.REFUSED:
            return  # keep the refusal visible; a new connection retries
        session.state = SessionState.DOWN
        session.next_hello = None
        session.next_heartbeat = None
        session.peers.clear()
        self._dirty = True

    def receive(self, index: int, header: wire.Header, now: float) -> list[Output]:
        session = self.sessions[index]
        if isinstance(header, wire.ClientDelta):
            if session.state is not SessionState.REGISTERED:
                return []
            result = session.peers.apply(header)
            if result is Applied.GAP:
                return [(index, wire.encode(wire.Resync()))]
            self._dirty = self._dirty or result is Applied.APPLIED
            return []
        if isinstance(header, wire.Welcome):
            session.state = SessionState.REGISTERED
            session.server_id = header.server_id
            session.server_name = header.server_name
            session.next_hello = None
            session.next_heartbeat = now + HEARTBEAT
            session.refusal = None
            session.peers.clear()
            self._dirty = True
            return []
        if isinstance(header, wire.Error):
            if header.code == "not-registered" and session.state is SessionState.REGISTERED:
                session.state = SessionState.HELLO_SENT
                session.next_heartbeat = None
                session.peers.clear()
                self._dirty = True
                return self._hello(session, now)
            if header.code in ("id-in-use", "bad-id"):
                session.state = SessionState.REFUSED
                session.refusal = header
                session.next_hello = now + 1.0  # the old holder may be a dead connection: retry
                self._dirty = True
            return []
        return []

    def tick(self, now: float) -> list[Output]:
        out: list[Output] = []
        for session in self.sessions:
            if session.next_hello is not None and now >= session.next_hello:
                out += self._hello(session, now)
            if session.next_heartbeat is not None and now >= session.next_heartbeat:
                session.next_heartbeat = now + HEARTBEAT
                out.append((session.index, self._heartbeat))
        return out

    def next_deadline(self) -> float | None:
        deadlines = [
            t for s in self.sessions for t in (s.next_hello, s.next_heartbeat) if t is not None
        ]
        return min(deadlines) if deadlines else None

    def _hello(self, session: ServerSession, now: float) -> list[Output]:
        session.next_hello = now + HELLO_RETRY
        hello = wire.Hello(self.client_id, self.name, self.net, self.instance, self.data_in, self.data_out)
        return [(session.index, wire.encode(hello))]

    # -- outputs ----------------------------------------------------------------------------
    def routes(self) -> Routes:
        """The current immutable snapshot (rebuilt only after a change)."""
        if self._dirty:
            self._dirty = False
            self._routes = self._build_routes()
        return self._routes

    @property
    def changed(self) -> bool:
        return self._dirty

    def _build_routes(self) -> Routes:
        holders: dict[str, list[int]] = {}
        clients: dict[str, wire.ClientInfo] = {}
        registered = []
        for session in self.sessions:
            if not session.synced:
                continue
            registered.append(session.index)
            for client_id, info in session.peers.entries.items():
                if client_id == self.client_id:
                    continue
                holders.setdefault(client_id, []).append(session.index)
                clients[client_id] = info
        names: dict[str, list[str]] = {}
        for client_id, info in clients.items():
            if info.name:
                names.setdefault(info.name, []).append(client_id)
        return Routes(
            registered=tuple(registered),
            holders=MappingProxyType({k: tuple(v) for k, v in holders.items()}),
            clients=MappingProxyType(clients),
            names=MappingProxyType({k: tuple(sorted(v)) for k, v in names.items()}),
            endpoints=self._routes.endpoints,
            refusals=tuple(
                f"{s.endpoint}: {s.refusal.message}" for s in self.sessions if s.refusal is not None
            ),
        )
