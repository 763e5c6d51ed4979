"""Ask a server's cluster endpoint for its cluster and Raft state (operators, tests, benchmarks)."""

from __future__ import annotations

from .. import sockets, wire
from .rules import derive_cluster_endpoint


def query_cluster_status(cluster_endpoint: str, timeout: float = 2.0, security=None,
                         server_id: str | None = None) -> wire.ClusterStatusReply:
    """One :class:`~zbus.wire.ClusterStatusReply` from ``cluster_endpoint``; raises ``Disconnected``
    when nothing answers within ``timeout`` seconds. With ``security`` (a :class:`zbus.security.Security`
    trusted by that server), over CURVE, expecting the key of ``server_id``."""
    return sockets.ask(cluster_endpoint, wire.ClusterStatusRequest(), wire.ClusterStatusReply, timeout,
                       name=f"cluster endpoint {cluster_endpoint}", security=security, server_id=server_id)


def cluster_endpoint_of(data_endpoint: str) -> str:
    """The default cluster endpoint of a server listening at ``data_endpoint`` (its port + 1)."""
    return derive_cluster_endpoint(data_endpoint)
