"""What the relay loop reads from its cluster: one immutable :class:`ClusterView` snapshot."""

from __future__ import annotations

from dataclasses import dataclass

from .. import wire


@dataclass(frozen=True)
class ClusterView:
    version: int  # moves whenever anything below changes
    master: str  # server Id ("" while an election is under way and no Master is known)
    servers: tuple[wire.ServerStatus, ...]

    def table(self) -> wire.ServerTable:
        return wire.ServerTable(self.version, self.master, list(self.servers))
