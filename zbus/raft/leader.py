"""What a Raft leader tracks about its followers, and the appends and heartbeats it sends them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from zbus.raft.log import RaftLog
from zbus.raft.membership import quorum_size
from zbus.raft.messages import (
    EntryKind,
    RaftAppend,
    RaftAppendResp,
    RaftEntry,
    RaftHeartbeat,
    RaftHeartbeatResp,
    RaftMessage,
    RaftTimeoutNow,
)
from zbus.raft.state import RaftConfig


@dataclasses.dataclass(slots=True)
class Progress:
    """The leader's knowledge of one follower's log.

    Probing: one append in flight at a time until the follower confirms where the logs agree.
    Replicating: entries are streamed optimistically and ``next`` runs ahead of ``match``.
    """

    next: int
    match: int = 0
    probing: bool = True
    probe_sent: bool = False
    recent_active: bool = False

    def acknowledge(self, index: int) -> bool:
        """The follower's log matches ours up to ``index``. True if that is news."""
        if index > self.match:
            self.match = index
        elif not (self.probing and index == self.match):
            return False
        if self.probing:
            self.probing, self.probe_sent, self.next = False, False, self.match + 1
        else:
            self.next = max(self.next, self.match + 1)
        return True

    def step_back(self, rejected: int, hint: int) -> bool:
        """The follower has no entry at ``rejected``; the logs may agree up to ``hint``.
        True if ``next`` moved (stale rejections are ignored)."""
        if not self.probing:
            if rejected <= self.match:
                return False
            self.probing, self.probe_sent, self.next = True, False, self.match + 1
            return True
        if rejected != self.next - 1:
            return False
        self.next = max(min(rejected, hint + 1), self.match + 1)
        self.probe_sent = False
        return True


class LeaderState:
    """Exists while its node leads ``term``; dropped as soon as the node steps down."""

    def __init__(
        self, node_id: str, term: int, log: RaftLog, config: RaftConfig, send: Callable[[RaftMessage], None]
    ) -> None:
        self._id, self._term, self._log, self._config, self._send = node_id, term, log, config, send
        self.progress: dict[str, Progress] = {}
        self.transferee: str | None = None
        self._sync_members()

    def append(self, kind: EntryKind, data: bytes) -> int:
        """Append an entry of our term, commit what can be, and replicate. Returns its index."""
        entry = RaftEntry(self._term, self._log.last_index + 1, kind, data)
        self._log.append(entry)
        if kind is EntryKind.CONFIG:
            self._sync_members()
        self._maybe_commit()
        self._broadcast_append()
        return entry.index

    def start_transfer(self, target: str) -> None:
        """Send ``TimeoutNow`` once ``target`` holds our whole log (now, or when it acknowledges)."""
        self.transferee = target
        if self.progress[target].match == self._log.last_index:
            self._send(RaftTimeoutNow(self._id, target, self._term))
        else:
            self._send_append(target, send_if_empty=True)

    def replicated(self) -> tuple[tuple[str, int], ...]:
        return tuple(sorted((peer, progress.match) for peer, progress in self.progress.items()))

    def end_quorum_period(self) -> bool:
        """Was a quorum of voters heard from since the last call? Starts a new period."""
        voters = self._log.membership.voters
        active = sum(1 for voter in voters if voter == self._id or self.progress[voter].recent_active)
        for progress in self.progress.values():
            progress.recent_active = False
        return active >= quorum_size(len(voters))

    def broadcast_heartbeat(self) -> None:
        for peer, progress in self.progress.items():
            # Never tell a follower to commit beyond what it is known to share with us.
            self._send(RaftHeartbeat(self._id, peer, self._term, min(progress.match, self._log.committed)))

    def on_heartbeat_response(self, response: RaftHeartbeatResp) -> None:
        progress = self.progress.get(response.frm)
        if progress is None:
            return
        progress.recent_active = True
        progress.probe_sent = False  # a lost probe is retried once per heartbeat
        if progress.match < self._log.last_index:
            self._send_append(response.frm, send_if_empty=True)

    def on_append_response(self, response: RaftAppendResp) -> None:
        progress = self.progress.get(response.frm)
        if progress is None or response.index > self._log.last_index:
            return  # not a member any more, or a bogus claim to hold entries we never had
        progress.recent_active = True
        if response.reject:
            hint = response.hint_index
            if response.hint_term > 0:  # skip every entry of ours whose term the follower cannot hold there
                hint, _ = self._log.find_conflict_by_term(response.hint_index, response.hint_term)
            if progress.step_back(response.index, hint):
                self._send_append(response.frm, send_if_empty=True)
            return
        if not progress.acknowledge(response.index):
            return
        if self._maybe_commit():
            self._broadcast_append()
        while self._send_append(response.frm, send_if_empty=False):
            pass
        if response.frm == self.transferee and progress.match == self._log.last_index:
            self._send(RaftTimeoutNow(self._id, response.frm, self._term))

    def _sync_members(self) -> None:
        """Track exactly the other members of the membership in force."""
        members = set(self._log.membership.members) - {self._id}
        for gone in self.progress.keys() - members:
            del self.progress[gone]
        for member in sorted(members - self.progress.keys()):
            self.progress[member] = Progress(next=self._log.last_index + 1)
        if self.transferee not in self._log.membership.voters:
            self.transferee = None

    def _maybe_commit(self) -> bool:
        """Commit the highest index a quorum of voters holds, but only if it is of our term:
        older entries commit along with it (Raft §5.4.2)."""
        voters = self._log.membership.voters
        matches = sorted(
            (self._log.last_index if voter == self._id else self.progress[voter].match for voter in voters),
            reverse=True,
        )
        quorum_index = matches[quorum_size(len(voters)) - 1]
        return self._log.term_at(quorum_index) == self._term and self._log.commit_to(quorum_index)

    def _broadcast_append(self) -> None:
        for peer in self.progress:
            self._send_append(peer, send_if_empty=True)

    def _send_append(self, peer: str, send_if_empty: bool) -> bool:
        progress = self.progress[peer]
        if progress.probing and progress.probe_sent:
            return False
        entries = self._log.slice(progress.next, self._config.max_entries_per_append)
        if not entries and not send_if_empty:
            return False
        prev_index = progress.next - 1
        prev_term = self._log.term_at(prev_index)
        assert prev_term is not None, "a leader's next index never passes its log"
        self._send(
            RaftAppend(self._id, peer, self._term, prev_index, prev_term, self._log.committed, entries)
        )
        if progress.probing:
            progress.probe_sent = True
        elif entries:
            progress.next = entries[-1].index + 1
        return True
