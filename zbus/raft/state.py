"""Values the Raft core takes (``RaftConfig``) and hands out (``Ready``, ``SoftState``, ``RaftStatus``)."""

from __future__ import annotations

import dataclasses
import enum

from zbus.raft.messages import HardState, RaftEntry, RaftMessage


@dataclasses.dataclass(frozen=True, slots=True)
class RaftConfig:
    """Timing and feature switches. The driver calls ``tick()`` every ``tick_seconds``.

    With the defaults: heartbeat every 100 ms, election timeout randomized in [300, 600) ms, so a
    new leader is usually elected well under a second after the old one dies.
    """

    tick_seconds: float = 0.05
    heartbeat_ticks: int = 2
    election_ticks: int = 6  # randomized per election in [election_ticks, 2 * election_ticks)
    pre_vote: bool = True
    check_quorum: bool = True
    max_entries_per_append: int = 64

    def __post_init__(self) -> None:
        if self.tick_seconds <= 0:
            raise ValueError(f"RaftConfig.tick_seconds must be positive, got {self.tick_seconds}")
        if self.heartbeat_ticks < 1:
            raise ValueError(f"RaftConfig.heartbeat_ticks must be at least 1, got {self.heartbeat_ticks}")
        if self.election_ticks <= self.heartbeat_ticks:
            raise ValueError(
                f"RaftConfig.election_ticks ({self.election_ticks}) must exceed "
                f"heartbeat_ticks ({self.heartbeat_ticks}), or followers time out between heartbeats"
            )
        if self.max_entries_per_append < 1:
            raise ValueError(
                f"RaftConfig.max_entries_per_append must be at least 1, got {self.max_entries_per_append}"
            )


class Role(enum.StrEnum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclasses.dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state a driver may want to react to; not persisted."""

    role: Role
    leader: str | None
    term: int


@dataclasses.dataclass(frozen=True, slots=True)
class Ready:
    """Work for the driver, in this order: persist ``hard_state`` and ``entries``, then send
    ``messages``, then apply ``committed_entries``, then ``advance(ready)``."""

    messages: tuple[RaftMessage, ...]
    entries: tuple[RaftEntry, ...]  # replace the stored log from entries[0].index on
    hard_state: HardState | None  # None: unchanged since the last Ready
    committed_entries: tuple[RaftEntry, ...]
    soft_state: SoftState | None  # None: unchanged since the last Ready


@dataclasses.dataclass(frozen=True, slots=True)
class RaftStatus:
    id: str
    term: int
    role: Role
    leader: str | None
    commit: int
    applied: int
    last_index: int
    voters: tuple[str, ...]
    learners: tuple[str, ...]
    transferee: str | None  # leadership transfer in progress (leader only)
    # Leader only: (member, highest index known to be in its log) for every other member, sorted by
    # id. A learner whose index has reached ``commit`` has caught up and can be promoted.
    replicated: tuple[tuple[str, int], ...] = ()
