"""Pure rules of the cluster beyond the Raft core and the Master policy: where a peer's cluster
endpoint is, which address to believe, when a server gives up its own cluster for another one,
and when a lone survivor starts afresh. No sockets, no clock (``now`` and durations come in)."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from .. import wire
from ..raft import RaftStatus, Role
from ..raft.membership import quorum_size

WILDCARD_HOSTS = frozenset({"0.0.0.0", "*", "::", "[::]"})


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``tcp://host:port`` -> (host, port); raise ValueError for anything else."""
    if not endpoint.startswith("tcp://"):
        raise ValueError(f"{endpoint!r} is not a tcp://host:port endpoint")
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{endpoint!r} is not a tcp://host:port endpoint")
    return host, int(port)


def derive_cluster_endpoint(data_endpoint: str) -> str:
    """A server's cluster endpoint by convention: its data endpoint's host, the next port.

    ``--peer`` names a peer's data endpoint (the one users know); this is how its Raft mesh
    endpoint is found. Port 0 (any free port) stays 0."""
    host, port = split_endpoint(data_endpoint)
    if port == 65535:
        raise ValueError(f"{data_endpoint!r}: no port after 65535 for the cluster endpoint; "
                         "set cluster_listen")
    return f"tcp://{host}:{port + 1 if port else 0}"


def advertised(endpoint: str, observed_host: str | None) -> str:
    """``endpoint`` as a peer should dial it: a wildcard host (bound on all interfaces) is replaced
    by the address the peer's connection came from."""
    if not observed_host:
        return endpoint
    try:
        host, port = split_endpoint(endpoint)
    except ValueError:
        return endpoint
    if host not in WILDCARD_HOSTS:
        return endpoint
    if ":" in observed_host and not observed_host.startswith("["):
        observed_host = f"[{observed_host}]"
    return f"tcp://{observed_host}:{port}"


def as_observed(server: wire.ClusterServer, observed_host: str | None) -> wire.ClusterServer:
    """A peer's self-description with wildcard endpoints resolved and the observed address as its
    public address (the seed's "public address as observed by each server")."""
    if not observed_host:
        return server
    net = msgspec.structs.replace(server.net, public=[observed_host])
    return msgspec.structs.replace(
        server,
        data_endpoint=advertised(server.data_endpoint, observed_host),
        cluster_endpoint=advertised(server.cluster_endpoint, observed_host),
        net=net,
    )


def should_merge(my_cluster: str, my_voters: int, their_cluster: str, their_voters: int) -> bool:
    """Should this server leave its cluster to join the peer's? Only ever after a split: the cluster
    with more voters wins, equal ones are ordered by cluster Id, so both sides agree on the winner.
    A healthy cluster never meets another one (joiners arrive without a cluster)."""
    if not their_cluster or their_cluster == my_cluster or their_voters == 0 or not my_cluster:
        return False
    return (their_voters, my_cluster) > (my_voters, their_cluster)


def should_refound(self_id: str, raft: RaftStatus, down_for: Mapping[str, float], dead_after: float) -> bool:
    """A survivor whose cluster lost a quorum of voters for good (each unreachable for
    ``dead_after``) starts a new cluster of one: no Raft leader can ever add or remove a server in
    the old one. This is the seed's availability choice; the clusters merge when they meet again."""
    voters = raft.voters
    if raft.role is Role.LEADER or self_id not in voters or len(voters) == 1:
        return False
    gone = sum(1 for voter in voters if voter != self_id and down_for.get(voter, 0.0) >= dead_after)
    return gone > 0 and len(voters) - gone < quorum_size(len(voters))
