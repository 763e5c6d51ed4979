"""The mesh as the cluster core drives it: hellos, authentication, outgoing links, sends, drops. Pure.

Everything here produces :mod:`~zbus.cluster.actions` for the driver; who a connection speaks for
and which peers are live is kept by :class:`~zbus.cluster.mesh.Mesh`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable, Sequence

from .. import wire
from .actions import Action, Connect, Disconnect, Reply, Send
from .mesh import Mesh, Peer
from .rules import as_observed

log = logging.getLogger("zbus.cluster")

WHO_INTERVAL = 1.0  # at most one ClusterWho per unknown connection per this many seconds
MAX_WARNED = 10_000  # connections logged about, at most (each once per reason)


class Links:
    def __init__(self, me: wire.ClusterServer, contacts: Sequence[str]) -> None:
        self.me = me
        self.mesh = Mesh(me.id)
        self.contacts = [c for c in dict.fromkeys(contacts) if c != me.cluster_endpoint]
        self.actions: list[Action] = []
        self.dropped: collections.Counter[str] = collections.Counter()
        self._hello = wire.encode(wire.ClusterHello(me))
        self._who_sent: dict[bytes, float] = {}
        self._self_conns: set[bytes] = set()
        self._warned: set[tuple[bytes, str]] = set()

    def take_actions(self) -> list[Action]:
        actions, self.actions = self.actions, []
        return actions

    # -- incoming ------------------------------------------------------------------------------
    def hello(self, conn: bytes, hello: wire.ClusterHello, observed_host: str | None, now: float) -> None:
        """Bind ``conn`` to the server it speaks for, and dial that server back (full mesh)."""
        if hello.server.id == self.me.id:
            self._self_conns.add(conn)  # a configured peer endpoint that is our own
            return
        row = as_observed(hello.server, observed_host)
        if not self.mesh.bind(conn, row, now):
            self.drop(conn, "hello-refused", f"a ClusterHello for {row.id} on a connection of another server")
            return
        self.ensure(row.cluster_endpoint, now)

    def authenticate(self, conn: bytes, header: wire.Header, now: float) -> Peer | None:
        """The peer behind ``conn`` if ``header`` may be believed: the connection said hello and the
        header names that server as its sender. Anything else is dropped and counted."""
        peer = self.mesh.sender(conn)
        if peer is None:
            if conn not in self._self_conns:
                self.drop(conn, "no-hello", "a message before ClusterHello")
                if now - self._who_sent.get(conn, -WHO_INTERVAL) >= WHO_INTERVAL:
                    self._who_sent[conn] = now
                    self.reply(conn, wire.encode(wire.ClusterWho()))
            return None
        if getattr(header, "frm", None) != peer.row.id:
            self.drop(conn, "wrong-sender", f"a {type(header).__name__} whose sender is not {peer.row.id}")
            return None
        peer.last_heard = now
        return peer

    def drop(self, conn: bytes, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        if (conn, reason) not in self._warned and len(self._warned) < MAX_WARNED:
            self._warned.add((conn, reason))
            log.warning("%s drops cluster messages from connection %s: %s (logged once)", self.me.id,
                        conn.hex(), detail)

    # -- outgoing ------------------------------------------------------------------------------
    def link(self, endpoint: str, up: bool, now: float, status: bytes) -> None:
        """Our link to ``endpoint`` connected or went down; a new connection starts with our hello."""
        self.mesh.set_link(endpoint, up, now)
        if up:
            self.greet(endpoint, status)

    def greet(self, endpoint: str, status: bytes) -> None:
        if self.mesh.link_up(endpoint):
            self.actions.append(Send(endpoint, self._hello))
            self.actions.append(Send(endpoint, status))

    def ensure(self, endpoint: str, now: float) -> None:
        """Dial ``endpoint`` unless we already do (or it is our own)."""
        if endpoint and endpoint != self.me.cluster_endpoint and self.mesh.add_link(endpoint, now):
            self.actions.append(Connect(endpoint))

    def send(self, endpoint: str | None, header: bytes, now: float) -> None:
        """Send if the link is up; a message to a peer that is down is lost (Raft and statuses retry)."""
        if endpoint is None:
            self.dropped["no-route"] += 1
        elif self.mesh.link_up(endpoint):
            self.actions.append(Send(endpoint, header))
        else:
            self.ensure(endpoint, now)

    def broadcast(self, header: bytes) -> None:
        for endpoint in self.mesh.links():
            if self.mesh.link_up(endpoint):
                self.actions.append(Send(endpoint, header))

    def reply(self, conn: bytes, header: bytes) -> None:
        self.actions.append(Reply(conn, header))

    def prune(self, now: float, wanted: Iterable[str], known: set[str], keep_for: float) -> None:
        """Close links and forget peers nobody needs: not configured, not ``wanted`` (endpoints) or
        ``known`` (server Ids), and gone for ``keep_for`` seconds."""
        wanted = set(wanted) | set(self.contacts)
        for endpoint in self.mesh.links():
            if endpoint not in wanted and self.mesh.down_for(endpoint, now) >= keep_for:
                self.mesh.remove_link(endpoint)
                self.actions.append(Disconnect(endpoint))
        for server, peer in list(self.mesh.peers.items()):
            if server not in known and now - peer.last_heard >= keep_for:
                self.mesh.forget(server)
        self._who_sent = {c: t for c, t in self._who_sent.items() if now - t < WHO_INTERVAL}
