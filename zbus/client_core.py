"""The client's protocol core, pure: server sessions, their client lists, and the Routes snapshot.

The engine (:mod:`zbus.engine`) tells it when a server connection comes up or goes down and what
arrived; it returns ``(server index, header bytes)`` to send and keeps :meth:`routes` current.
"""

from __future__ import annotations

import enum
from types import MappingProxyType

import msgspec

from . import wire
from .routing import Routes
from .tables import Applied, PeerList

HELLO_RETRY = 0.5  # seconds before the first repeated Hello while a connection is up but not registered,
HELLO_RETRY_MAX = 4.0  # ... doubling up to this (a loaded server is not asked ever faster)
HEARTBEAT = 1.0  # seconds between Heartbeats to a registered server (servers expire after 3 s)
PROBE_INTERVAL = 1.0  # seconds between UDP probes of a server's reflector until it answers
PROBE_TRIES = 5
ALT_NONCE = b"/alt"  # appended to a probe's nonce for the reflector's alternate port (reflector.ALT_PORT_OFFSET)
# A fresh connection first asks the server's reflector for our public endpoint and waits at most this
# long for the answer, so the Hello already carries it: one list delta per join, not Hello + NetState.
HELLO_PROBE_WAIT = 0.2
MAX_SERVERS = 64  # servers a client connects to at most: a (hostile) server table cannot make it dial more


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
        self.max_frame = 0  # the largest frame this server relays, from its Welcome (0: not told)
        self.rendezvous_key = b""  # keys our UDP rendezvous with this server (its Welcome; zbus/rendezvous.py)
        self.peers = PeerList()
        self.next_hello: float | None = None
        self.hellos = 0  # Hellos sent since the connection came up or registration was lost (backoff)
        self.next_heartbeat: float | None = None
        self.refusal: wire.Error | None = None
        self.observed: str | None = None  # "ip:port" this server's reflector saw our UDP socket as
        self.observed_alt: str | None = None  # ... and its alternate port did (differs: a symmetric NAT)
        self.probe_nonce = b""
        self.next_probe: float | None = None
        self.probes_left = 0

    @property
    def synced(self) -> bool:
        return self.state is SessionState.REGISTERED and self.peers.version >= 0


Output = tuple[int, bytes]
_CONNECTED = (SessionState.HELLO_SENT, SessionState.REGISTERED)
_WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]")


def reachable_endpoint(announced: str, via: str) -> str:
    """A server announced as bound to all interfaces is reached at the host we reached its peer by."""
    host, _, port = announced.removeprefix("tcp://").rpartition(":")
    if host in _WILDCARD_HOSTS:
        host = via.removeprefix("tcp://").rpartition(":")[0]
    return f"tcp://{host}:{port}"


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
        self.master: str | None = None
        self._probe_count = 0
        self._added: list[int] = []  # sessions learnt from server tables, not yet opened by the engine
        self._routes = Routes(endpoints=tuple(endpoints))
        self._dirty = False
        # Working maps behind the published Routes, kept up to date incrementally: a delta of k
        # entries costs O(k) here plus C-level dict copies, not a Python pass over every peer.
        self._full = False
        self._changed_ids: set[str] = set()
        self._holders: dict[str, tuple[int, ...]] = {}
        self._clients: dict[str, wire.ClientInfo] = {}
        self._names: dict[str, tuple[str, ...]] = {}
        self.servers_ignored = 0  # servers announced past MAX_SERVERS

    # -- events -----------------------------------------------------------------------------
    def transport_up(self, index: int, now: float) -> list[Output]:
        session = self.sessions[index]
        session.state = SessionState.HELLO_SENT
        session.refusal = None
        session.hellos = 0
        if session.observed is None:
            self._start_probing(session, now)
            session.next_hello = now + HELLO_PROBE_WAIT  # the Hello goes when the answer comes, or then
            return []
        return self._hello(session, now)

    def transport_refused(self, index: int, reason: str) -> None:
        """Security on: the server at ``index`` refused our key, or its key is not the one we trust for it.
        Shown like a refused Hello. libzmq does not reconnect after a refused key (ZAP), so that stays; after
        a failed handshake (a key that is not the expected one) it keeps retrying, and a success clears it."""
        session = self.sessions[index]
        if session.state is SessionState.REFUSED and session.refusal is not None \
                and session.refusal.message == reason:
            return
        session.state = SessionState.REFUSED
        session.refusal = wire.Error("key-refused", reason)
        session.next_hello = session.next_heartbeat = None
        session.peers.clear()
        self._dirty = self._full = True

    def transport_down(self, index: int) -> None:
        session = self.sessions[index]
        if session.state is SessionState.REFUSED:
            return  # keep the refusal visible; a new connection retries
        session.state = SessionState.DOWN
        session.observed = session.observed_alt = None  # a new connection asks again (the NAT may have moved us)
        session.next_probe = None
        session.next_hello = None
        session.next_heartbeat = None
        session.peers.clear()
        self._dirty = self._full = True

    def receive(self, index: int, header: wire.Header, now: float) -> list[Output]:
        session = self.sessions[index]
        if isinstance(header, wire.ClientDelta):
            if session.state is not SessionState.REGISTERED:
                return []
            result = session.peers.apply(header)
            if result is Applied.GAP:
                return [(index, wire.encode(wire.Resync()))]
            if result is Applied.APPLIED:
                self._dirty = True
                if header.full:
                    self._full = True
                else:
                    self._changed_ids.update(info.id for info in header.upsert)
                    self._changed_ids.update(header.removed)
            return []
        if isinstance(header, wire.ServerTable):
            self._learn_servers(session, header)
            return []
        if isinstance(header, wire.Welcome):
            if session.state is SessionState.REGISTERED and session.server_id == header.server_id:
                return []  # the answer to a repeated Hello: we are registered and keep our list
            session.state = SessionState.REGISTERED
            session.hellos = 0
            session.server_id = header.server_id
            session.server_name = header.server_name
            session.max_frame = header.max_frame
            session.rendezvous_key = header.rendezvous_key
            session.next_hello = None
            session.next_heartbeat = now + HEARTBEAT
            session.refusal = None
            session.peers.clear()
            self._dirty = self._full = True
            if session.observed is None and session.next_probe is None:
                self._start_probing(session, now)
            return []
        if isinstance(header, wire.Error):
            if header.code == "not-registered" and session.state is SessionState.REGISTERED:
                session.state = SessionState.HELLO_SENT
                session.hellos = 0
                session.next_heartbeat = None
                session.peers.clear()
                self._dirty = self._full = True
                return self._hello(session, now)
            if header.code in ("id-in-use", "bad-id", "not-your-id"):
                session.state = SessionState.REFUSED
                session.refusal = header
                session.next_hello = now + 1.0  # the old holder may be a dead connection: retry
                self._dirty = self._full = True
            return []
        return []

    def _learn_servers(self, session: ServerSession, table: wire.ServerTable) -> None:
        self.master = table.master
        known = {s.endpoint for s in self.sessions}
        connected = {s.server_id for s in self.sessions}
        for server in table.servers:
            endpoint = reachable_endpoint(server.endpoint, session.endpoint)
            if endpoint not in known and server.id not in connected:
                if len(self.sessions) >= MAX_SERVERS:
                    self.servers_ignored += 1  # counted in status().dropped as "too_many_servers"
                    continue
                known.add(endpoint)
                self.sessions.append(ServerSession(len(self.sessions), endpoint))
                self.sessions[-1].server_id = server.id  # known from the table (security picks its key by it)
                self._added.append(len(self.sessions) - 1)
                self._dirty = self._full = True

    # -- net state ---------------------------------------------------------------------------
    def _start_probing(self, session: ServerSession, now: float) -> None:
        self._probe_count += 1
        session.probe_nonce = f"{self.instance}/{session.index}/{self._probe_count}".encode()
        session.next_probe, session.probes_left = now, PROBE_TRIES

    def probes(self, now: float) -> list[tuple[int, bytes]]:
        """(server index, nonce) of the UDP reflector probes due now."""
        due = []
        for s in self.sessions:
            if s.next_probe is not None and now >= s.next_probe and s.state in _CONNECTED:
                s.probes_left -= 1
                s.next_probe = now + PROBE_INTERVAL if s.probes_left > 0 else None
                due.append((s.index, s.probe_nonce))
        return due

    def observed(self, nonce: bytes, ip: str, port: int, now: float) -> list[Output]:
        """A reflector answered (its main port: ``nonce``; its alternate port: ``nonce + ALT_NONCE``):
        remember our public endpoint; report a changed net state. ``public`` holds every distinct
        endpoint seen, so more than one port means a symmetric NAT (punchlink.hard_from_public)."""
        for session in self.sessions:
            # Probing goes on (PROBE_TRIES) until both ports answered: a lost answer from the
            # alternate port would hide a symmetric NAT.
            if session.probe_nonce and nonce == session.probe_nonce + ALT_NONCE:
                session.observed_alt = f"{ip}:{port}"
                if session.observed:
                    session.next_probe = None
                return self._report(msgspec.structs.replace(self.net, public=self._public()))
            if session.probe_nonce and session.probe_nonce == nonce:
                session.observed = f"{ip}:{port}"
                if session.observed_alt:
                    session.next_probe = None
                out = self._report(msgspec.structs.replace(self.net, public=self._public()))
                if session.state is SessionState.HELLO_SENT:
                    out += self._hello(session, now)  # it was waiting for this answer
                return out
        return []

    def _public(self) -> list[str]:
        return sorted({o for s in self.sessions for o in (s.observed, s.observed_alt) if o})

    def set_private(self, addresses: list[str]) -> list[Output]:
        """The interfaces' addresses now (polled by the engine): report them if they changed."""
        return self._report(msgspec.structs.replace(self.net, private=addresses))

    def _report(self, net: wire.NetState) -> list[Output]:
        if net == self.net:
            return []
        self.net = net
        frame = wire.encode(net)
        return [(s.index, frame) for s in self.sessions if s.state is SessionState.REGISTERED]

    def take_added(self) -> list[int]:
        """Indexes of servers learnt since the last call: the engine connects to them."""
        added, self._added = self._added, []
        return added

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
            t for s in self.sessions for t in (s.next_hello, s.next_heartbeat, s.next_probe) if t is not None
        ]
        return min(deadlines) if deadlines else None

    def _hello(self, session: ServerSession, now: float) -> list[Output]:
        session.next_hello = now + min(HELLO_RETRY_MAX, HELLO_RETRY * 2 ** session.hellos)
        session.hellos += 1
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
        if self._full:
            self._full = False
            self._changed_ids.clear()
            self._holders, self._clients, self._names = {}, {}, {}
            for session in self.sessions:
                if session.synced:
                    self._changed_ids.update(session.peers.entries)
        for client_id in self._changed_ids:
            self._recompute(client_id)
        self._changed_ids.clear()
        return Routes(
            registered=tuple(s.index for s in self.sessions if s.synced),
            holders=MappingProxyType(dict(self._holders)),
            clients=MappingProxyType(dict(self._clients)),
            names=MappingProxyType(dict(self._names)),
            endpoints=tuple(s.endpoint for s in self.sessions),
            max_frames=tuple(s.max_frame for s in self.sessions),
            refusals=tuple(
                f"{s.endpoint}: {s.refusal.message}" for s in self.sessions if s.refusal is not None
            ),
        )

    def _recompute(self, client_id: str) -> None:
        """Bring the working maps up to date for one client Id."""
        old = self._clients.pop(client_id, None)
        self._holders.pop(client_id, None)
        if old is not None and old.name:
            remaining = tuple(i for i in self._names.get(old.name, ()) if i != client_id)
            if remaining:
                self._names[old.name] = remaining
            else:
                self._names.pop(old.name, None)
        if client_id == self.client_id:
            return
        holders = tuple(s.index for s in self.sessions if s.synced and client_id in s.peers.entries)
        if not holders:
            return
        info = self.sessions[holders[0]].peers.entries[client_id]
        self._holders[client_id] = holders
        self._clients[client_id] = info
        if info.name:
            self._names[info.name] = tuple(sorted({*self._names.get(info.name, ()), client_id}))
