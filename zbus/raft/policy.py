"""Who is Master: the seed's rules by number of live servers, layered over the Raft core. Pure.

* 1 live server: it is the *temporary* Master. It serves and relays, but proposes no membership
  change unless it is a real Raft leader (with CheckQuorum on, a leader has heard from a quorum
  within the last election timeout, so a lone survivor of a larger cluster never is).
* 2 live servers: the one started earlier is Master (ties broken by Id). If the other one holds
  Raft leadership, it hands leadership to the Master.
* 3 or more: the Raft leader is Master. It hands leadership to a server with *clearly* more client
  connections (at least ``max(min_extra, ratio x its own)`` more), at most once per cooldown, so
  leadership does not flap between servers with similar loads.

The caller supplies what it observes (live servers, their start times and connection counts, its
own ``RaftStatus``) and the time; the functions decide, the caller acts (``transfer_leadership``).
"""

from __future__ import annotations

import dataclasses
import enum
import math

from zbus.raft.state import RaftStatus, Role


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyConfig:
    transfer_min_extra_connections: int = 2
    transfer_min_extra_ratio: float = 0.25
    transfer_cooldown: float = 30.0  # seconds on the caller's clock between two transfers by this server

    def __post_init__(self) -> None:
        if self.transfer_min_extra_connections < 1:
            raise ValueError(
                "PolicyConfig.transfer_min_extra_connections must be at least 1, "
                f"got {self.transfer_min_extra_connections}: equal loads would hand leadership back and forth"
            )
        if self.transfer_min_extra_ratio < 0 or self.transfer_cooldown < 0:
            raise ValueError(
                "PolicyConfig.transfer_min_extra_ratio and transfer_cooldown must not be negative"
            )


@dataclasses.dataclass(frozen=True, slots=True)
class LiveServer:
    id: str
    started_at: float  # one clock for every server in a view (e.g. observer's now minus reported uptime)
    connections: int  # clients connected to it


@dataclasses.dataclass(frozen=True, slots=True)
class ClusterView:
    """What one server sees: the servers it can reach (itself included) and its Raft status."""

    self_id: str
    live: tuple[LiveServer, ...]
    raft: RaftStatus

    def __post_init__(self) -> None:
        ids = [server.id for server in self.live]
        if len(set(ids)) != len(ids):
            raise ValueError(f"ClusterView.live lists a server twice: {sorted(ids)}")
        if self.self_id not in ids:
            raise ValueError(f"ClusterView.live must include this server ({self.self_id})")

    def server(self, server_id: str) -> LiveServer | None:
        return next((server for server in self.live if server.id == server_id), None)


class MasterBasis(enum.StrEnum):
    ALONE = "alone"  # the only live server: a temporary Master
    EARLIEST_START = "earliest_start"  # two live servers: the one started first
    RAFT_LEADER = "raft_leader"  # three or more: the elected Raft leader


@dataclasses.dataclass(frozen=True, slots=True)
class MasterDecision:
    master: str | None  # None: three or more live servers and no live Raft leader known yet
    basis: MasterBasis
    may_change_membership: bool  # this server may propose Raft membership changes now

    @property
    def temporary(self) -> bool:
        return self.basis is MasterBasis.ALONE


def decide_master(view: ClusterView) -> MasterDecision:
    may_change_membership = view.raft.role is Role.LEADER
    if len(view.live) == 1:
        return MasterDecision(view.self_id, MasterBasis.ALONE, may_change_membership)
    if len(view.live) == 2:
        return MasterDecision(_earliest(view.live).id, MasterBasis.EARLIEST_START, may_change_membership)
    leader = view.raft.leader
    if leader is not None and view.server(leader) is None:
        leader = None  # a leader we believe in but cannot reach is no Master
    return MasterDecision(leader, MasterBasis.RAFT_LEADER, may_change_membership)


def should_transfer(
    view: ClusterView, now: float, last_transfer_at: float | None, config: PolicyConfig = PolicyConfig()
) -> str | None:
    """The server this Raft leader should hand leadership to now, or None.

    ``last_transfer_at`` is when this server last started a transfer (None: never), on ``now``'s clock.
    """
    if view.raft.role is not Role.LEADER or view.raft.transferee is not None:
        return None
    if last_transfer_at is not None and now - last_transfer_at < config.transfer_cooldown:
        return None
    candidates = [
        server for server in view.live if server.id in view.raft.voters and server.id != view.self_id
    ]
    if not candidates:
        return None
    if len(view.live) == 2:
        master = _earliest(view.live)
        return master.id if master in candidates else None
    me = view.server(view.self_id)
    assert me is not None  # ClusterView checks it
    best = min(candidates, key=lambda server: (-server.connections, server.started_at, server.id))
    margin = max(
        config.transfer_min_extra_connections, math.ceil(config.transfer_min_extra_ratio * me.connections)
    )
    return best.id if best.connections >= me.connections + margin else None


def _earliest(servers: tuple[LiveServer, ...]) -> LiveServer:
    return min(servers, key=lambda server: (server.started_at, server.id))
