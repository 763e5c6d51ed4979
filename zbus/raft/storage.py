"""Where a node's durable Raft state lives between restarts.

The core never writes storage itself: the driver persists each ``Ready`` with
``storage.save(ready.hard_state, ready.entries)`` before it sends that Ready's messages, and a
restarted ``RaftNode`` loads from the same storage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from zbus.raft.messages import HardState, RaftEntry


class RaftStorage(Protocol):
    def load(self) -> tuple[HardState, Sequence[RaftEntry]]:
        """The persisted hard state and the whole log, ``entries[i].index == i + 1``."""
        ...

    def save(self, hard_state: HardState | None, entries: Sequence[RaftEntry]) -> None:
        """Durably store ``hard_state`` (if given) and ``entries``: the stored log keeps its entries
        before ``entries[0].index`` and ends with ``entries`` (a conflicting stored suffix is replaced)."""
        ...


class MemoryStorage:
    """``RaftStorage`` in memory: survives a node object being dropped and rebuilt, not the process."""

    def __init__(self) -> None:
        self.hard_state = HardState()
        self.entries: list[RaftEntry] = []

    def load(self) -> tuple[HardState, Sequence[RaftEntry]]:
        return self.hard_state, tuple(self.entries)

    def save(self, hard_state: HardState | None, entries: Sequence[RaftEntry]) -> None:
        if entries:
            first = entries[0].index
            if first > len(self.entries) + 1:
                raise ValueError(f"entries start at {first}, leaving a gap after {len(self.entries)}")
            del self.entries[first - 1 :]
            self.entries.extend(entries)
        if hard_state is not None:
            self.hard_state = hard_state

    @property
    def last_index(self) -> int:
        return len(self.entries)

    def term_at(self, index: int) -> int | None:
        if index == 0:
            return 0
        return self.entries[index - 1].term if index <= len(self.entries) else None
