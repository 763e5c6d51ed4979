"""What the cluster core asks its driver to do, and the snapshots it hands out."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..raft import RaftStatus


@dataclass(frozen=True)
class Connect:
    endpoint: str  # open an outgoing link (DEALER) to this cluster endpoint


@dataclass(frozen=True)
class Disconnect:
    endpoint: str


@dataclass(frozen=True)
class Send:
    endpoint: str  # on the outgoing link to this endpoint
    header: bytes


@dataclass(frozen=True)
class Reply:
    conn: bytes  # back on this incoming connection (ClusterWho, ClusterStatusReply)
    header: bytes


Action = Connect | Disconnect | Send | Reply


class Phase(enum.StrEnum):
    UNJOINED = "unjoined"  # in no cluster: bootstrapping
    JOINING = "joining"  # knows its cluster, waits for the leader to add it
    MEMBER = "member"  # a learner or voter of the Raft membership


@dataclass(frozen=True)
class ClusterStatus:
    """A snapshot for introspection and tests."""

    id: str
    phase: Phase
    cluster_id: str
    master: str
    raft: RaftStatus
    live: tuple[str, ...]
    table: tuple[str, ...]
    dropped: dict[str, int]
