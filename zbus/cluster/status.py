"""Ask a server's cluster endpoint for its cluster and Raft state (operators, tests, benchmarks)."""

from __future__ import annotations

import zmq

from .. import sockets, wire
from ..errors import Disconnected, ProtocolError
from .rules import derive_cluster_endpoint


def query_cluster_status(cluster_endpoint: str, timeout: float = 2.0) -> wire.ClusterStatusReply:
    """One :class:`~zbus.wire.ClusterStatusReply` from ``cluster_endpoint``; raises ``Disconnected``
    when nothing answers within ``timeout`` seconds."""
    sock = sockets.tune(sockets.context().socket(zmq.DEALER), max_frame=wire.DEFAULT_MAX_FRAME)
    try:
        sock.connect(cluster_endpoint)
        sock.send(wire.encode(wire.ClusterStatusRequest()))
        if not sock.poll(int(timeout * 1000)):
            raise Disconnected(f"no answer from cluster endpoint {cluster_endpoint} within {timeout}s")
        frames = sock.recv_multipart()
        try:
            reply = wire.decode(frames[0])
        except wire.WireError as exc:
            raise ProtocolError(
                f"{cluster_endpoint} answered something that is not a cluster status: {exc}") from None
        if not isinstance(reply, wire.ClusterStatusReply):
            raise ProtocolError(
                f"{cluster_endpoint} answered {type(reply).__name__}, expected ClusterStatusReply")
        return reply
    finally:
        sock.close(linger=0)


def cluster_endpoint_of(data_endpoint: str) -> str:
    """The default cluster endpoint of a server listening at ``data_endpoint`` (its port + 1)."""
    return derive_cluster_endpoint(data_endpoint)
