"""The in-memory Raft log: entries, commit and apply positions, what still needs persisting,
and the membership in force."""

from __future__ import annotations

from collections.abc import Sequence

from zbus.raft.messages import EntryKind, RaftEntry, RaftMembership, decode_membership


class RaftLog:
    """Entries ``1..last_index`` (index ``i`` lives at list position ``i - 1``; no compaction).

    ``unstable_from`` is the first index the driver has not persisted yet: entries from there on
    are handed out by ``Ready`` and the driver overwrites its stored suffix with them.

    The membership in force is the one in the latest ``CONFIG`` entry of the log, committed or not
    (the Raft thesis' single-server changes), so truncating the log can bring an older one back.
    """

    def __init__(self, entries: Sequence[RaftEntry] = (), committed: int = 0) -> None:
        self._entries: list[RaftEntry] = []
        self._config_changes: list[tuple[int, RaftMembership]] = []
        for position, entry in enumerate(entries, start=1):
            if entry.index != position:
                raise ValueError(f"stored log is not contiguous: entry {entry.index} at position {position}")
            self._add(entry)
        if committed > self.last_index:
            raise ValueError(f"stored commit index {committed} is beyond the last entry {self.last_index}")
        self.committed = committed
        self.applied = 0
        self.unstable_from = self.last_index + 1

    @property
    def last_index(self) -> int:
        return len(self._entries)

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else 0

    @property
    def membership(self) -> RaftMembership:
        return self._config_changes[-1][1] if self._config_changes else RaftMembership()

    @property
    def last_config_index(self) -> int:
        """Index of the latest ``CONFIG`` entry (0 if none): a change is pending while it is uncommitted."""
        return self._config_changes[-1][0] if self._config_changes else 0

    def term_at(self, index: int) -> int | None:
        """The term of entry ``index`` (0 for the empty prefix), ``None`` outside the log."""
        if index == 0:
            return 0
        if 0 < index <= len(self._entries):
            return self._entries[index - 1].term
        return None

    def matches(self, index: int, term: int) -> bool:
        return self.term_at(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Is a log ending at (``last_index``, ``last_term``) at least as up to date as ours?"""
        return (last_term, last_index) >= (self.last_term, self.last_index)

    def slice(self, start: int, max_count: int) -> tuple[RaftEntry, ...]:
        """Up to ``max_count`` entries from index ``start`` on."""
        return tuple(self._entries[start - 1 : start - 1 + max_count])

    def append(self, entry: RaftEntry) -> None:
        """Leader path: add one entry at the end."""
        if entry.index != self.last_index + 1:
            raise ValueError(f"entry {entry.index} does not follow the last index {self.last_index}")
        self._add(entry)

    def try_append(self, prev_index: int, prev_term: int, entries: Sequence[RaftEntry]) -> int | None:
        """Follower path: the consistency check, then conflict resolution.

        Returns the index of the last entry now known to match the leader, or ``None`` when our log
        has no entry (``prev_index``, ``prev_term``). Entries we already hold are kept; the first entry
        whose term differs truncates our log from there. Callers never pass ``prev_index`` below the
        commit index, so committed entries cannot be truncated.
        """
        if not self.matches(prev_index, prev_term):
            return None
        for offset, entry in enumerate(entries):
            if not self.matches(entry.index, entry.term):
                self._truncate_from(entry.index)
                for new_entry in entries[offset:]:
                    self._add(new_entry)
                break
        return prev_index + len(entries)

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The last entry at or before ``index`` whose term is at most ``term``, as (index, term)."""
        index = min(index, self.last_index)
        while index > 0 and self._entries[index - 1].term > term:
            index -= 1
        return index, (self._entries[index - 1].term if index else 0)

    def commit_to(self, index: int) -> bool:
        """Advance the commit index (never backwards, never past the log). True if it moved."""
        index = min(index, self.last_index)
        if index <= self.committed:
            return False
        self.committed = index
        return True

    def unstable_entries(self) -> tuple[RaftEntry, ...]:
        return tuple(self._entries[self.unstable_from - 1 :])

    def unapplied_committed(self) -> tuple[RaftEntry, ...]:
        return tuple(self._entries[self.applied : self.committed])

    def persisted_to(self, index: int) -> None:
        self.unstable_from = max(self.unstable_from, index + 1)

    def applied_to(self, index: int) -> None:
        self.applied = max(self.applied, index)

    def _add(self, entry: RaftEntry) -> None:
        self._entries.append(entry)
        if entry.kind is EntryKind.CONFIG:
            self._config_changes.append((entry.index, decode_membership(entry.data)))

    def _truncate_from(self, index: int) -> None:
        assert index > self.committed, f"committed entry {index} would be overwritten"
        del self._entries[index - 1 :]
        while self._config_changes and self._config_changes[-1][0] >= index:
            self._config_changes.pop()
        self.unstable_from = min(self.unstable_from, index)
