"""Who is on the other end of each cluster connection, and which peers are live. Pure.

Each server dials every peer with its own DEALER (an *outgoing link*, keyed by the peer's cluster
endpoint) and receives everything on its ROUTER (an *incoming connection*, keyed by the routing id
of the peer's DEALER). A connection is bound to a server Id by the :class:`~zbus.wire.ClusterHello`
that opens it; every later message on it must name that Id in ``frm`` (checked by the caller with
:meth:`Mesh.sender`). A peer is *live* while our link to it is up (libzmq tells us at once when a
killed peer's TCP connection resets) and it has spoken within ``peer_timeout``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import wire


@dataclass
class Peer:
    row: wire.ClusterServer  # as it described itself, wildcard hosts resolved
    last_heard: float
    status: wire.PeerStatus | None = None
    displaced: bool = False  # another server now answers at its cluster endpoint (it restarted)


class Mesh:
    def __init__(self, self_id: str) -> None:
        self.self_id = self_id
        self.peers: dict[str, Peer] = {}
        self._owner: dict[bytes, str] = {}  # incoming connection -> server Id
        self._links: dict[str, bool] = {}  # outgoing link endpoint -> up
        self._link_since: dict[str, float] = {}  # when the link last went up or down

    # -- outgoing links ------------------------------------------------------------------------
    def add_link(self, endpoint: str, now: float) -> bool:
        """Start tracking a link; False if it is tracked already."""
        if endpoint in self._links:
            return False
        self._links[endpoint] = False
        self._link_since[endpoint] = now
        return True

    def remove_link(self, endpoint: str) -> None:
        self._links.pop(endpoint, None)
        self._link_since.pop(endpoint, None)

    def set_link(self, endpoint: str, up: bool, now: float) -> None:
        if endpoint in self._links and self._links[endpoint] != up:
            self._links[endpoint] = up
            self._link_since[endpoint] = now

    def link_up(self, endpoint: str | None) -> bool:
        return endpoint is not None and self._links.get(endpoint, False)

    def links(self) -> list[str]:
        return list(self._links)

    def down_for(self, endpoint: str, now: float) -> float:
        """Seconds the link has been down (0 while up or unknown)."""
        if self._links.get(endpoint, True):
            return 0.0
        return now - self._link_since[endpoint]

    # -- incoming connections ------------------------------------------------------------------
    def bind(self, conn: bytes, row: wire.ClusterServer, now: float) -> bool:
        """A ClusterHello on ``conn``. False (refused) if ``conn`` already speaks for another server
        or the hello claims to be us."""
        owner = self._owner.get(conn)
        if row.id == self.self_id or (owner is not None and owner != row.id):
            return False
        self._owner[conn] = row.id
        for other in self.peers.values():
            if other.row.id != row.id and other.row.cluster_endpoint == row.cluster_endpoint:
                other.displaced = True
        peer = self.peers.get(row.id)
        if peer is None:
            self.peers[row.id] = Peer(row, now)
        else:
            if row.instance != peer.row.instance:
                peer.status = None  # a new process: its old status says nothing
            peer.row, peer.last_heard, peer.displaced = row, now, False
        return True

    def sender(self, conn: bytes) -> Peer | None:
        """The peer that said hello on ``conn``, if any."""
        owner = self._owner.get(conn)
        return self.peers.get(owner) if owner is not None else None

    def forget(self, server_id: str) -> None:
        self.peers.pop(server_id, None)
        for conn in [c for c, owner in self._owner.items() if owner == server_id]:
            del self._owner[conn]

    # -- liveness ------------------------------------------------------------------------------
    def endpoint_of(self, server_id: str) -> str | None:
        peer = self.peers.get(server_id)
        return None if peer is None or peer.displaced else peer.row.cluster_endpoint

    def live(self, server_id: str, now: float, timeout: float) -> bool:
        if server_id == self.self_id:
            return True
        peer = self.peers.get(server_id)
        return (
            peer is not None
            and not peer.displaced
            and self.link_up(peer.row.cluster_endpoint)
            and now - peer.last_heard < timeout
        )

    def live_peers(self, now: float, timeout: float) -> list[Peer]:
        return [peer for peer_id, peer in self.peers.items() if self.live(peer_id, now, timeout)]

    def participating(self, server_id: str, cluster_id: str, now: float, timeout: float) -> bool:
        """Live, says it is in ``cluster_id``, and admitted there: a server that went over to another
        cluster, a joiner, or a restart that forgot its Raft state cannot vote, so it does not count."""
        if server_id == self.self_id:
            return True
        if not self.live(server_id, now, timeout):
            return False
        status = self.peers[server_id].status
        return status is not None and status.cluster_id == cluster_id and status.admitted

    def has_leader(self, status: wire.PeerStatus, now: float, timeout: float) -> bool:
        """Does the cluster ``status`` speaks of have a leader, as far as we can tell? A follower's
        leader may be stale: it must not be us, and if we know it, it must be live and say so itself."""
        if not status.leader or status.leader == self.self_id:
            return False
        leader = self.peers.get(status.leader)
        if leader is None:
            return True  # a server we do not know: take the peer's word
        return (self.live(status.leader, now, timeout) and leader.status is not None
                and leader.status.cluster_id == status.cluster_id and leader.status.leader == status.leader)
