"""The cluster's timing and thresholds (from ``ServerConfig``; defaults per ARCHITECTURE.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..raft import RaftConfig
from ..raft.policy import PolicyConfig


@dataclass(frozen=True)
class ClusterSettings:
    tick: float = 0.05  # seconds per Raft tick
    heartbeat_ticks: int = 2  # 100 ms
    election_ticks: int = 6  # 300-600 ms
    status_interval: float = 0.2  # PeerStatus to every peer this often
    peer_timeout: float = 1.5  # a peer silent this long is not live (a reset connection is at once)
    dead_after: float = 30.0  # unreachable this long: removed by a quorum leader
    retry_interval: float = 0.3  # bootstrap questions are repeated this often until answered
    policy: PolicyConfig = field(default_factory=PolicyConfig)

    def __post_init__(self) -> None:
        keys = {"tick": "server.raft_tick", "peer_timeout": "server.peer_timeout",
                "dead_after": "server.dead_after", "status_interval": "status_interval",
                "retry_interval": "retry_interval"}
        for attribute, key in keys.items():
            if not getattr(self, attribute) > 0:
                raise ConfigError(f"{key}: {getattr(self, attribute)}, expected a positive number of seconds")
        try:
            self.raft_config()
        except ValueError as exc:
            raise ConfigError(f"server.raft_heartbeat_ticks / raft_election_ticks: {exc}") from None

    def raft_config(self) -> RaftConfig:
        return RaftConfig(tick_seconds=self.tick, heartbeat_ticks=self.heartbeat_ticks,
                          election_ticks=self.election_ticks)
