"""The server cluster as the relay loop sees it: an immutable :class:`ClusterView` and its provider.

A server's relay loop only ever calls ``start()``, ``stop()`` and ``view()`` on its cluster object
(and ``report()`` with its own statistics). :class:`SoloCluster` is a cluster of one: the server is
its own (temporary) master. The Raft-backed cluster (bootstrap, full mesh, elected master,
replicated server table) provides the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import wire


@dataclass(frozen=True)
class ClusterView:
    version: int  # moves whenever anything below changes
    master: str  # server Id
    servers: tuple[wire.ServerStatus, ...]

    def table(self) -> wire.ServerTable:
        return wire.ServerTable(self.version, self.master, list(self.servers))


class SoloCluster:
    """A cluster of one server, which is therefore the master."""

    def __init__(self, server_id: str, name: str, endpoint: str) -> None:
        self._view = ClusterView(1, server_id, (wire.ServerStatus(server_id, name, endpoint, "master", True, 0),))

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def view(self) -> ClusterView:
        return self._view

    def report(self, stats: wire.ServerStats) -> None:
        """This server's figures, for the master's cluster-wide statistics (nothing to do alone)."""
