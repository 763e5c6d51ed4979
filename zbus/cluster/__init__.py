"""The server cluster as the relay loop sees it: an immutable :class:`ClusterView` and its provider.

A server's relay loop only ever calls ``start()``, ``stop()`` and ``view()`` on its cluster object
(and ``report()`` with its own statistics). :class:`RaftCluster` is the real one (bootstrap, full
mesh, elected Master, replicated server table; see docs/cluster.md). :class:`SoloCluster` is a
cluster of one without any sockets: the server is its own (temporary) master.

Layout: ``view`` (the snapshot), ``table`` (the replicated server table), ``member`` (this server's
Raft node), ``mesh`` and ``links`` (connections, liveness, authentication), ``rules`` and
``reconcile`` (pure decisions), ``core`` (the sans-IO cluster protocol), ``driver`` (the thread and
the sockets), ``status`` (ask a cluster endpoint for its state). See docs/cluster.md.
"""

from __future__ import annotations

from .. import wire
from .driver import RaftCluster
from .view import ClusterView


class SoloCluster:
    """A cluster of one server, which is therefore the master."""

    def __init__(self, server_id: str, name: str, endpoint: str) -> None:
        alone = wire.ServerStatus(server_id, name, endpoint, "master", True, 0)
        self._view = ClusterView(1, server_id, (alone,))

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def view(self) -> ClusterView:
        return self._view

    def report(self, stats: wire.ServerStats) -> None:
        """This server's figures, for the master's cluster-wide statistics (nothing to do alone)."""

    def server_stats(self) -> dict[str, wire.ServerStats]:
        return {}

__all__ = ["ClusterView", "RaftCluster", "SoloCluster"]
