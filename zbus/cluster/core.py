"""The cluster's protocol core: bootstrap, the mesh, Raft membership, the Master policy, the view. Pure.

Inputs: ``on_link`` (an outgoing link to a peer's cluster endpoint went up or down),
``on_message`` (a decoded header from an incoming connection), ``on_who`` (a peer asked us to say
hello again), ``set_stats`` and ``tick(now)`` every ``settings.tick`` seconds. Outputs:
``take_actions()`` (:mod:`zbus.cluster.actions`: connect, disconnect, send on a link, reply on a
connection) and ``view``, the immutable :class:`~zbus.cluster.view.ClusterView` the relay loop reads.
No sockets, no clock, no global random: the driver (:mod:`zbus.cluster.driver`) does all of that.

A server goes through three phases (:class:`~zbus.cluster.actions.Phase`):

* ``UNJOINED``: no cluster. It asks a live peer for the Master (:class:`~zbus.wire.MasterQuery`),
  asks the Master for every server (:class:`~zbus.wire.ServerListQuery`), connects them all and
  adopts the cluster's Id: it is then ``JOINING``. Servers that find nobody with a cluster found
  one: the earliest started of those in sight at once, a lone one after ``dead_after``.
* ``JOINING``: it announces the cluster's Id in its :class:`~zbus.wire.PeerStatus`; the Raft leader
  gives it a row in the server table and adds it as a learner.
* ``MEMBER``: in the Raft membership (learner or voter). The leader promotes it once caught up.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from .. import wire
from ..raft import (
    NotLeader,
    ProposalRejected,
    RaftAppend,
    RaftAppendResp,
    RaftHeartbeat,
    RaftHeartbeatResp,
    RaftPreVote,
    RaftPreVoteResp,
    RaftStatus,
    RaftTimeoutNow,
    RaftVote,
    RaftVoteResp,
    Role,
    TransferRejected,
)
from ..raft.policy import ClusterView as PolicyView
from ..raft.policy import LiveServer, decide_master, should_transfer
from .actions import Action, ClusterStatus, Phase
from .links import Links
from .member import RaftMember
from .mesh import Peer
from .reconcile import ChangeMembership, Propose, next_change
from .rules import should_merge, should_refound
from .settings import ClusterSettings
from .table import encode_command
from .view import ClusterView

log = logging.getLogger("zbus.cluster")

RAFT_MESSAGES = (RaftPreVote, RaftPreVoteResp, RaftVote, RaftVoteResp, RaftAppend, RaftAppendResp,
                 RaftHeartbeat, RaftHeartbeatResp, RaftTimeoutNow)
PRUNE_INTERVAL = 1.0  # seconds between sweeps of links and peers nobody needs any more


@dataclass
class _Target:
    """Bootstrap: the cluster we were told about and its Master."""

    cluster_id: str
    master: str
    master_endpoint: str


class ClusterCore:
    def __init__(self, me: wire.ClusterServer, contacts: Sequence[str], settings: ClusterSettings,
                 rng: random.Random, now: float) -> None:
        self.me = me
        self.id = me.id
        self._settings = settings
        self._links = Links(me, contacts)
        self.mesh = self._links.mesh
        self.dropped = self._links.dropped
        self._member = RaftMember(me.id, settings.raft_config(), rng)
        self.table = self._member.table
        self._stats = wire.ServerStats()
        self._down_since: dict[str, float] = {}  # members not participating, since when
        self._pending: tuple[int, int] | None = None  # (index, term) of the leader's last proposal
        self._last_transfer_at: float | None = None
        self._now = now
        self._next_status = now
        self._next_bootstrap = now
        self._next_prune = now + PRUNE_INTERVAL
        self._phase_since = now
        self._leader_seen_at = now
        self._master = me.id
        self._target: _Target | None = None
        self._joining_rows: tuple[wire.ClusterServer, ...] = ()
        alone = wire.ServerStatus(me.id, me.name, me.data_endpoint, "master", True, 0)
        self.view = ClusterView(1, me.id, (alone,))
        contacts = self._links.contacts
        if contacts:
            self._unjoin(now, "bootstrapping from " + ", ".join(contacts))
        else:
            self._found(now, "no peers configured")
        for contact in contacts:
            self._links.ensure(contact, now)

    # -- inputs ----------------------------------------------------------------------------------
    def on_link(self, endpoint: str, up: bool, now: float) -> None:
        """Our outgoing link to ``endpoint`` connected (handshake done) or went down."""
        self._now = now
        self._links.link(endpoint, up, now, self._status_header())
        self._refresh()

    def on_who(self, endpoint: str, now: float) -> None:
        """The peer at ``endpoint`` does not know our connection (it restarted): say hello again."""
        self._now = now
        self._links.greet(endpoint, self._status_header())

    def set_stats(self, stats: wire.ServerStats) -> None:
        self._stats = stats

    def on_message(self, conn: bytes, header: wire.Header, observed_host: str | None, now: float) -> None:
        """One header from incoming connection ``conn`` (``observed_host``: the address it came from)."""
        self._now = now
        if isinstance(header, wire.ClusterHello):
            self._links.hello(conn, header, observed_host, now)
            return
        if isinstance(header, wire.ClusterStatusRequest):  # read-only, answered to anyone
            self._links.reply(conn, wire.encode(self.status_reply()))
            return
        peer = self._links.authenticate(conn, header, now)
        if peer is None:
            return
        if isinstance(header, wire.PeerStatus):
            peer.status = header
        elif isinstance(header, RAFT_MESSAGES):
            self._on_raft(peer, header)
        elif isinstance(header, wire.MasterQuery):
            self._answer_master_query(peer)
        elif isinstance(header, wire.MasterReply):
            self._on_master_reply(header)
        elif isinstance(header, wire.ServerListQuery):
            self._answer_list_query(peer)
        elif isinstance(header, wire.ServerList):
            self._on_server_list(peer, header, now)
        else:
            self._links.drop(conn, "unexpected", f"a {type(header).__name__} on the cluster mesh")

    def tick(self, now: float) -> None:
        self._now = now
        self._member.node.tick()
        self._drain()
        self._track_liveness(now)
        phase = self.phase
        if phase is Phase.UNJOINED:
            self._bootstrap(now)
        elif phase is Phase.JOINING:
            if now - self._phase_since >= self._settings.dead_after:
                self._unjoin(now, f"not admitted to {self.cluster_id} within {self._settings.dead_after}s")
        else:
            self._member_duties(now)
        self._refresh()
        if now >= self._next_status:
            self._next_status = now + self._settings.status_interval
            self._links.broadcast(self._status_header())
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL
            wanted = {r.cluster_endpoint for r in self.table.rows() + self._joining_rows}
            if self._target is not None:
                wanted.add(self._target.master_endpoint)
            self._links.prune(now, wanted, self.table.ids(), max(10 * self._settings.dead_after, 300.0))

    def id_at(self, cluster_endpoint: str) -> str | None:
        """The server Id this node expects at ``cluster_endpoint`` (the driver picks the CURVE key by it)."""
        target = self._target
        if target is not None and target.master_endpoint == cluster_endpoint:
            return target.master
        for row in (*self.table.rows(), *self._joining_rows, *(p.row for p in self.mesh.peers.values())):
            if row.cluster_endpoint == cluster_endpoint:
                return row.id
        return None

    # -- outputs ---------------------------------------------------------------------------------
    def take_actions(self) -> list[Action]:
        return self._links.take_actions()

    @property
    def phase(self) -> Phase:
        if not self.cluster_id:
            return Phase.UNJOINED
        return Phase.MEMBER if self._member.is_member() else Phase.JOINING

    @property
    def cluster_id(self) -> str:
        return self._member.cluster_id

    def status(self) -> ClusterStatus:
        live = tuple(sorted(p.row.id for p in self._live_peers()))
        return ClusterStatus(self.id, self.phase, self.cluster_id, self.view.master, self._member.status(),
                             live, tuple(self.table), dict(self.dropped))

    def server_stats(self) -> dict[str, wire.ServerStats]:
        """Every server's latest figures as heard in PeerStatus (the seed's Master statistics), ours too."""
        stats = {self.id: self._stats}
        stats.update((p.row.id, p.status.stats) for p in self.mesh.peers.values() if p.status is not None)
        return stats

    def status_reply(self) -> wire.ClusterStatusReply:
        status = self.status()
        raft = status.raft
        stats = self.server_stats()
        return wire.ClusterStatusReply(
            self.id, status.cluster_id, status.phase.value, raft.role.value, raft.term, raft.leader or "",
            status.master, list(raft.voters), list(raft.learners), list(status.live), list(status.table),
            stats, status.dropped)

    # -- phases ----------------------------------------------------------------------------------
    def _found(self, now: float, why: str) -> None:
        cluster_id = self._member.found()
        self._after_reset(now)
        log.info("%s founds cluster %s (%s)", self.id, cluster_id, why)

    def _unjoin(self, now: float, why: str) -> None:
        self._member.leave()
        self._after_reset(now)
        log.info("%s looks for a cluster to join (%s)", self.id, why)

    def _after_reset(self, now: float) -> None:
        self._pending = None
        self._target = None
        self._joining_rows = ()
        self._phase_since = self._leader_seen_at = now
        self._next_bootstrap = now
        self._down_since.clear()
        self._drain()

    def _bootstrap(self, now: float) -> None:
        """UNJOINED: Master query -> server list query -> connect all and adopt the cluster."""
        if now < self._next_bootstrap:
            return
        self._next_bootstrap = now + self._settings.retry_interval
        live = [p for p in self._live_peers() if p.status is not None]
        candidates = [p for p in live if p.status.cluster_id]
        if not candidates:
            waited = now - self._phase_since
            # Servers started together, each naming the others: the earliest started founds, the rest join.
            if live and waited >= 2 * self._settings.retry_interval and (self.me.started_at, self.id) < min(
                    (p.row.started_at, p.row.id) for p in live):
                self._found(now, f"the first started of {len(live) + 1} servers without a cluster")
            elif waited >= self._settings.dead_after:
                self._found(now, f"no peer with a cluster answered for {self._settings.dead_after}s")
            return
        target = self._target
        if target is not None and any(p.row.id == target.master and p.status.cluster_id == target.cluster_id
                                      for p in candidates):
            self._send_to(target.master, wire.encode(wire.ServerListQuery(self.id)))
            return
        self._target = None  # none yet, or its Master is gone or in another cluster now: ask again
        # The best cluster in sight: one whose leader we see (it can admit us), then more voters, then the
        # smaller Id; within a cluster, a configured peer first.
        led = {p.status.cluster_id for p in candidates if self._has_leader(p.status)}
        best = min(candidates, key=lambda p: (
            p.status.cluster_id not in led, -p.status.voters, p.status.cluster_id,
            p.row.cluster_endpoint not in self._links.contacts, p.row.id))
        self._send_to(best.row.id, wire.encode(wire.MasterQuery(self.id)))

    def _on_master_reply(self, reply: wire.MasterReply) -> None:
        if self.phase is not Phase.UNJOINED or not reply.cluster_id or reply.master in ("", self.id):
            return
        self._target = _Target(reply.cluster_id, reply.master, reply.master_endpoint)
        self._links.ensure(reply.master_endpoint, self._now)
        if self.mesh.live(reply.master, self._now, self._settings.peer_timeout):
            self._send_to(reply.master, wire.encode(wire.ServerListQuery(self.id)))

    def _on_server_list(self, peer: Peer, listing: wire.ServerList, now: float) -> None:
        target = self._target
        if (self.phase is not Phase.UNJOINED or target is None or peer.row.id != target.master
                or listing.cluster_id != target.cluster_id):
            return
        for row in listing.servers:
            if row.id != self.id:
                self._links.ensure(row.cluster_endpoint, now)
        self._member.adopt(listing.cluster_id)
        self._drain()
        self._joining_rows = tuple(listing.servers)
        self._phase_since = now
        self._next_status = now
        log.info("%s joins cluster %s (Master %s, %d servers)", self.id, listing.cluster_id, target.master,
                 len(listing.servers))

    def _member_duties(self, now: float) -> None:
        raft = self._member.status()
        down_for = {server: now - since for server, since in self._down_since.items()}
        if should_refound(self.id, raft, down_for, self._settings.dead_after):
            log.warning("%s: a quorum of cluster %s has been unreachable for %ss; starting a new cluster",
                        self.id, self.cluster_id, self._settings.dead_after)
            self._found(now, "lost the quorum for good")
            return
        if raft.role is Role.LEADER or (raft.leader is not None and self._participating(raft.leader)):
            self._leader_seen_at = now
        elif self.id not in raft.voters and now - self._leader_seen_at >= self._settings.dead_after:
            # A learner cannot campaign: with no leader for dead_after, its cluster is gone.
            self._unjoin(now, f"no leader of cluster {self.cluster_id} for {self._settings.dead_after}s")
            return
        for peer in self._live_peers():
            status = peer.status
            if status is not None and self._has_leader(status) and should_merge(
                    self.cluster_id, len(raft.voters), status.cluster_id, status.voters):
                self._unjoin(now, f"merging into cluster {status.cluster_id} of {peer.row.id}")
                return
        if raft.role is not Role.LEADER:
            return
        target = should_transfer(self._policy_view(raft), now, self._last_transfer_at, self._settings.policy)
        if target is not None:
            try:
                self._member.node.transfer_leadership(target)
            except (NotLeader, TransferRejected) as exc:
                log.debug("transfer to %s refused: %s", target, exc)
            else:
                log.info("%s hands Raft leadership to %s", self.id, target)
                self._last_transfer_at = now
            self._drain()
            return
        self._reconcile(raft, down_for)

    def _reconcile(self, raft: RaftStatus, down_for: dict[str, float]) -> None:
        """The leader keeps the table and the membership in step with who is alive (one change at a time)."""
        if self._pending is not None:
            index, term = self._pending
            if raft.term == term and raft.applied < index:
                return
            self._pending = None
        if raft.applied < raft.commit:
            return
        announced = {p.row.id: p.row for p in self._live_peers()
                     if p.status is not None and p.status.cluster_id == self.cluster_id}
        live = set(announced) | {self.id}
        change = next_change(self.me, self.table, raft, live, announced, down_for, self._settings.dead_after)
        if change is None:
            return
        node = self._member.node
        try:
            if isinstance(change, Propose):
                index = node.propose(encode_command(change.command))
            else:
                assert isinstance(change, ChangeMembership)
                index = node.propose_conf_change(change.op, change.server_id)
        except (NotLeader, ProposalRejected) as exc:
            log.debug("%s cannot propose %s yet: %s", self.id, change, exc)
            return
        log.info("%s proposes %s at index %d", self.id, _describe(change), index)
        self._pending = (index, raft.term)
        self._drain()

    # -- Raft --------------------------------------------------------------------------------------
    def _on_raft(self, peer: Peer, message: wire.Header) -> None:
        status = peer.status
        if not self.cluster_id or status is None or status.cluster_id != self.cluster_id:
            self.dropped["other-cluster"] += 1
            return
        if isinstance(message, (RaftVote, RaftPreVote)) and not self._admitted():
            # A restarted server (empty log, forgotten votes) votes only once the leader has
            # re-admitted this very process, or it could vote twice in one term.
            self.dropped["not-admitted"] += 1
            return
        applied = self.table.applied
        self._member.node.step(message)
        self._drain()
        if self.table.applied != applied:
            self._refresh()  # clients hear of a table change now, not at the next tick

    def _admitted(self) -> bool:
        row = self.table.get(self.id)
        return row is not None and row.instance == self.me.instance

    def _drain(self) -> None:
        for message in self._member.drain():
            self._send_to(message.to, wire.encode(message))
        if self._member.news:
            self._member.news = False
            self._next_status = self._now  # peers hear of a new leader or of our admission at the next tick

    # -- questions from bootstrapping peers ---------------------------------------------------------
    def _answer_master_query(self, peer: Peer) -> None:
        if self.phase is Phase.MEMBER and self._master:
            mine = self._master == self.id
            endpoint = self.me.cluster_endpoint if mine else self._endpoint_of(self._master)
            reply = wire.MasterReply(self.id, self.cluster_id, self._master, endpoint or "")
        else:
            reply = wire.MasterReply(self.id, "", "", "")
        self._send_to(peer.row.id, wire.encode(reply))

    def _answer_list_query(self, peer: Peer) -> None:
        if self.phase is Phase.MEMBER:
            listing = wire.ServerList(self.id, self.cluster_id, list(self._member_rows()))
        else:
            listing = wire.ServerList(self.id, "", [])
        self._send_to(peer.row.id, wire.encode(listing))

    # -- the mesh ------------------------------------------------------------------------------------
    def _endpoint_of(self, server_id: str) -> str | None:
        endpoint = self.mesh.endpoint_of(server_id)
        if endpoint is None:
            row = self.table.get(server_id)
            endpoint = row.cluster_endpoint if row is not None else None
        return endpoint

    def _send_to(self, server_id: str, header: bytes) -> None:
        self._links.send(self._endpoint_of(server_id), header, self._now)

    def _live_peers(self) -> list[Peer]:
        return self.mesh.live_peers(self._now, self._settings.peer_timeout)

    def _has_leader(self, status: wire.PeerStatus) -> bool:
        return self.mesh.has_leader(status, self._now, self._settings.peer_timeout)

    def _participating(self, server_id: str) -> bool:
        return self.mesh.participating(server_id, self.cluster_id, self._now, self._settings.peer_timeout)

    def _track_liveness(self, now: float) -> None:
        raft = self._member.status()
        known = self.table.ids() | set(raft.voters) | set(raft.learners)
        known.discard(self.id)
        for server in known:
            if self._participating(server):
                self._down_since.pop(server, None)
            else:
                self._down_since.setdefault(server, now)
                row = self.table.get(server)
                if row is not None and self.mesh.endpoint_of(server) is None:
                    self._links.ensure(row.cluster_endpoint, now)
        for server in [s for s in self._down_since if s not in known]:
            del self._down_since[server]

    # -- the view ------------------------------------------------------------------------------------
    def _clients(self, server_id: str) -> int:
        if server_id == self.id:
            return self._stats.clients
        peer = self.mesh.peers.get(server_id)
        return peer.status.stats.clients if peer is not None and peer.status is not None else 0

    def _member_rows(self) -> tuple[wire.ClusterServer, ...]:
        rows = self.table.rows()
        return rows if self.id in self.table else (self.me,) + rows

    def _policy_view(self, raft: RaftStatus) -> PolicyView:
        live = tuple(LiveServer(row.id, row.started_at, self._clients(row.id))
                     for row in self._member_rows() if self._participating(row.id))
        return PolicyView(self.id, live, raft)

    def _reported_master(self) -> str:
        """UNJOINED / JOINING: the Master as the cluster we are joining sees it."""
        cluster = self.cluster_id or (self._target.cluster_id if self._target else "")
        statuses = [p.status for p in self._live_peers() if p.status is not None and p.status.master
                    and (not cluster or p.status.cluster_id == cluster)]
        for status in statuses:
            if status.master == status.frm:
                return status.master
        return statuses[0].master if statuses else self.id

    def _refresh(self) -> None:
        """A new view snapshot, with a new version, only if something in it changed."""
        if self.phase is Phase.MEMBER:
            policy_view = self._policy_view(self._member.status())
            master = decide_master(policy_view).master
            if master is None:  # an election is under way: keep the last Master while it lives
                master = self._master if policy_view.server(self._master) is not None else ""
            rows = self._member_rows()
        else:
            master = self._reported_master()
            joining = self._joining_rows
            rows = joining if any(r.id == self.id for r in joining) else (self.me,) + joining
        self._master = master
        servers = tuple(
            wire.ServerStatus(row.id, row.name, row.data_endpoint, "master" if row.id == master else "server",
                              self._participating(row.id), self._clients(row.id))
            for row in rows
        )
        if master != self.view.master or servers != self.view.servers:
            self.view = ClusterView(self.view.version + 1, master, servers)

    def _status_header(self) -> bytes:
        raft = self._member.status()
        voters = len(raft.voters) if self.cluster_id else 0
        return wire.encode(wire.PeerStatus(self.id, self.cluster_id, voters, raft.leader or "", self._master,
                                           self._stats, self._admitted()))


def _describe(change: Propose | ChangeMembership) -> str:
    if isinstance(change, ChangeMembership):
        return f"{change.op.value} {change.server_id}"
    command = change.command
    return f"{type(command).__name__} {getattr(command, 'id', None) or command.server.id}"
