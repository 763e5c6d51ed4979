"""The Raft state machine: messages and ticks in, ``Ready`` out. No I/O, no clock, no global random.

Modelled on etcd-io/raft (``raft.go``): PreVote, CheckQuorum with leader lease, fast log
backtracking, leadership transfer by ``TimeoutNow`` and single-server membership changes that take
effect when appended. See docs/raft.md for the driver contract.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable

import msgspec

from zbus.raft.errors import NotLeader, ProposalRejected, TransferRejected
from zbus.raft.leader import LeaderState
from zbus.raft.log import RaftLog
from zbus.raft.membership import ConfChangeOp, changed_membership, quorum_size
from zbus.raft.messages import (
    EntryKind,
    HardState,
    RaftAppend,
    RaftAppendResp,
    RaftEntry,
    RaftHeartbeat,
    RaftHeartbeatResp,
    RaftMembership,
    RaftMessage,
    RaftPreVote,
    RaftPreVoteResp,
    RaftTimeoutNow,
    RaftVote,
    RaftVoteResp,
    decode_membership,
    encode_membership,
)
from zbus.raft.state import RaftConfig, RaftStatus, Ready, Role, SoftState
from zbus.raft.storage import RaftStorage

logger = logging.getLogger(__name__)


class RaftNode:
    """One Raft server.

    ``peers`` are the initial voters (this node is added to them) used to bootstrap an empty
    storage; pass ``()`` for a server that will join an existing cluster as a learner. A node whose
    storage holds a log ignores ``peers`` and resumes with its stored term, vote and log.
    """

    def __init__(
        self,
        id: str,
        peers: Iterable[str],
        config: RaftConfig,
        rng: random.Random,
        storage: RaftStorage | None = None,
    ) -> None:
        self.id = id
        self._config = config
        self._rng = rng
        hard_state, entries = storage.load() if storage is not None else (HardState(), ())
        self._log = RaftLog(entries, hard_state.commit)
        self._term, self._vote = hard_state.term, hard_state.vote
        self._persisted_hard_state = hard_state
        initial_voters = set(peers)
        if not entries and initial_voters:
            bootstrap = RaftMembership(voters=tuple(sorted(initial_voters | {id})))
            self._log.append(RaftEntry(1, 1, EntryKind.CONFIG, encode_membership(bootstrap)))
            self._log.commit_to(1)
            self._term = max(self._term, 1)
        self._role = Role.FOLLOWER
        self._leader: str | None = None
        self._outbox: list[RaftMessage] = []
        self._votes: dict[str, bool] = {}
        self._leading: LeaderState | None = None  # present exactly while the role is LEADER
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._election_timeout = self._random_election_timeout()
        self._reported_soft_state: SoftState | None = None
        self._outstanding_ready: Ready | None = None

    # ----------------------------------------------------------------- driver API

    def tick(self) -> None:
        """Advance logical time by one tick (``config.tick_seconds`` of the driver's clock)."""
        self._require_no_outstanding_ready()
        if self._leading is not None:
            self._tick_leader(self._leading)
        else:
            self._tick_election()

    def step(self, message: RaftMessage) -> None:
        """Feed one message from a peer."""
        self._require_no_outstanding_ready()
        if message.to != self.id or message.frm == self.id:
            return
        if message.term > self._term:
            if isinstance(message, RaftPreVote | RaftVote) and self._in_leader_lease(message):
                return
            # A PreVote, and a granted one, speak of a term someone may campaign in: no term moves.
            pre_election = isinstance(message, RaftPreVote) or (
                isinstance(message, RaftPreVoteResp) and message.granted
            )
            if not pre_election:
                sender_leads = isinstance(message, RaftAppend | RaftHeartbeat)
                self._become_follower(message.term, message.frm if sender_leads else None)
        elif message.term < self._term:
            self._answer_stale(message)
            return
        self._dispatch(message)

    def propose(self, data: bytes) -> int:
        """Append a command; returns its log index. Raises ``NotLeader`` or ``ProposalRejected``."""
        return self._require_accepting_proposals().append(EntryKind.NORMAL, data)

    def propose_conf_change(self, op: ConfChangeOp, node_id: str) -> int:
        """Append a single-server membership change, in force as soon as it is in a log.

        Only one change may be uncommitted at a time, and only after this leader has committed an
        entry of its own term (the fix to the single-server change bug found after the thesis).
        """
        leading = self._require_accepting_proposals()
        if self._log.last_config_index > self._log.committed:
            raise ProposalRejected(
                f"membership change at index {self._log.last_config_index} is not committed yet; "
                "retry after it is"
            )
        if self._log.term_at(self._log.committed) != self._term:
            raise ProposalRejected(
                f"leader {self.id} has not committed an entry of term {self._term} yet; retry"
            )
        membership = changed_membership(self._log.membership, op, node_id, self.id)
        return leading.append(EntryKind.CONFIG, encode_membership(membership))

    def transfer_leadership(self, target: str) -> None:
        """Catch ``target`` up, then tell it to campaign at once. Proposals are refused meanwhile;
        the transfer is abandoned if it has not happened within an election timeout."""
        self._require_no_outstanding_ready()
        if self._leading is None:
            raise NotLeader(self.id, self._leader)
        if target == self.id:
            raise TransferRejected(f"{target} is already the leader")
        if target not in self._log.membership.voters:
            raise TransferRejected(f"{target} is not a voter; only voters can lead")
        if target != self._leading.transferee:
            logger.info("%s transfers leadership to %s at term %d", self.id, target, self._term)
            self._election_elapsed = 0  # the transfer gets one election timeout
            self._leading.start_transfer(target)

    def has_ready(self) -> bool:
        persisted, reported = self._persisted_hard_state, self._reported_soft_state
        return bool(
            self._outbox
            or self._log.unstable_from <= self._log.last_index
            or self._log.committed > self._log.applied
            or (self._term, self._vote, self._log.committed)
            != (persisted.term, persisted.vote, persisted.commit)
            or reported is None
            or (self._role, self._leader, self._term) != (reported.role, reported.leader, reported.term)
        )

    def ready(self) -> Ready:
        """Take the pending work. Nothing else may be called until ``advance(ready)``."""
        self._require_no_outstanding_ready()
        hard_state, soft_state = self._hard_state(), self._soft_state()
        ready = Ready(
            messages=tuple(self._outbox),
            entries=self._log.unstable_entries(),
            hard_state=hard_state if hard_state != self._persisted_hard_state else None,
            committed_entries=self._log.unapplied_committed(),
            soft_state=soft_state if soft_state != self._reported_soft_state else None,
        )
        self._outbox.clear()
        self._outstanding_ready = ready
        return ready

    def advance(self, ready: Ready) -> None:
        """The driver has persisted, sent and applied ``ready``."""
        if ready is not self._outstanding_ready:
            raise RuntimeError("advance() takes the Ready returned by the last ready() call")
        self._outstanding_ready = None
        if ready.entries:
            self._log.persisted_to(ready.entries[-1].index)
        if ready.hard_state is not None:
            self._persisted_hard_state = ready.hard_state
        if ready.committed_entries:
            self._log.applied_to(ready.committed_entries[-1].index)
        if ready.soft_state is not None:
            self._reported_soft_state = ready.soft_state

    def status(self) -> RaftStatus:
        membership = self._log.membership
        return RaftStatus(
            id=self.id,
            term=self._term,
            role=self._role,
            leader=self._leader,
            commit=self._log.committed,
            applied=self._log.applied,
            last_index=self._log.last_index,
            voters=membership.voters,
            learners=membership.learners,
            transferee=self._leading.transferee if self._leading is not None else None,
            replicated=self._leading.replicated() if self._leading is not None else (),
        )

    # ----------------------------------------------------------------- roles and timers

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._election_elapsed >= self._election_timeout and self._promotable():
            self._election_elapsed = 0
            self._campaign(pre_vote=self._config.pre_vote)

    def _tick_leader(self, leading: LeaderState) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self._config.election_ticks:
            self._election_elapsed = 0
            heard_from_quorum = leading.end_quorum_period()
            if self._config.check_quorum and not heard_from_quorum:
                logger.info("%s steps down at term %d: no quorum heard from", self.id, self._term)
                self._become_follower(self._term, None)
                return
            leading.transferee = None  # a transfer not done within an election timeout is abandoned
        if self._heartbeat_elapsed >= self._config.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            leading.broadcast_heartbeat()

    def _random_election_timeout(self) -> int:
        return self._rng.randrange(self._config.election_ticks, 2 * self._config.election_ticks)

    def _reset(self, term: int) -> None:
        if term != self._term:
            self._term, self._vote = term, None
        self._leader = None
        self._election_elapsed = self._heartbeat_elapsed = 0
        self._election_timeout = self._random_election_timeout()
        self._votes = {}
        self._leading = None

    def _become_follower(self, term: int, leader: str | None) -> None:
        self._reset(term)
        self._role, self._leader = Role.FOLLOWER, leader

    def _become_leader(self) -> None:
        self._reset(self._term)
        self._role, self._leader = Role.LEADER, self.id
        logger.info("%s is leader at term %d", self.id, self._term)
        self._leading = LeaderState(self.id, self._term, self._log, self._config, self._send)
        self._leading.append(EntryKind.NOOP, b"")

    def _campaign(self, pre_vote: bool, transfer: bool = False) -> None:
        if pre_vote:
            self._reset(self._term)
            self._role = Role.PRE_CANDIDATE
            election_term = self._term + 1
        else:
            self._reset(self._term + 1)
            self._role, self._vote = Role.CANDIDATE, self.id
            election_term = self._term
        self._votes = {self.id: True}
        if self._tally_votes() is True:
            self._win_vote()
            return
        last_index, last_term = self._log.last_index, self._log.last_term
        for voter in self._log.membership.voters:
            if voter == self.id:
                continue
            if pre_vote:
                self._send(RaftPreVote(self.id, voter, election_term, last_index, last_term))
            else:
                self._send(RaftVote(self.id, voter, election_term, last_index, last_term, transfer))

    def _win_vote(self) -> None:
        if self._role is Role.PRE_CANDIDATE:
            self._campaign(pre_vote=False)
        else:
            self._become_leader()

    def _tally_votes(self) -> bool | None:
        """True: won, False: lost, None: undecided. Only voters of the current membership count."""
        voters = self._log.membership.voters
        granted = sum(1 for voter in voters if self._votes.get(voter) is True)
        rejected = sum(1 for voter in voters if self._votes.get(voter) is False)
        needed = quorum_size(len(voters))
        if granted >= needed:
            return True
        if rejected > len(voters) - needed:
            return False
        return None

    def _promotable(self) -> bool:
        return self.id in self._log.membership.voters

    def _in_leader_lease(self, request: RaftPreVote | RaftVote) -> bool:
        """CheckQuorum's lease: having heard from a leader within the minimum election timeout,
        ignore (pre)votes for a later term, unless the campaign is a leadership transfer."""
        if isinstance(request, RaftVote) and request.transfer:
            return False
        return (
            self._config.check_quorum
            and self._leader is not None
            and self._election_elapsed < self._config.election_ticks
        )

    # ----------------------------------------------------------------- messages

    def _send(self, message: RaftMessage) -> None:
        self._outbox.append(message)

    def _answer_stale(self, message: RaftMessage) -> None:
        """A message from an older term. A deposed leader still appending is told our term, so
        it steps down (with PreVote/CheckQuorum our term may be ahead of everyone's after a
        partition); a stale pre-candidate is told no."""
        if isinstance(message, RaftAppend | RaftHeartbeat):
            if self._config.check_quorum or self._config.pre_vote:
                self._send(RaftAppendResp(self.id, message.frm, self._term))
        elif isinstance(message, RaftPreVote):
            self._send(RaftPreVoteResp(self.id, message.frm, self._term, granted=False))

    def _dispatch(self, message: RaftMessage) -> None:
        match message:
            case RaftPreVote() | RaftVote():
                self._handle_vote_request(message)
            case RaftPreVoteResp() | RaftVoteResp():
                self._handle_vote_response(message)
            case RaftAppend() | RaftHeartbeat() if self._leading is None:
                if self._role is not Role.FOLLOWER:  # a (pre-)candidate meets this term's leader
                    self._become_follower(self._term, message.frm)
                self._leader, self._election_elapsed = message.frm, 0
                if isinstance(message, RaftAppend):
                    self._handle_append(message)
                else:
                    self._log.commit_to(message.commit)
                    self._send(RaftHeartbeatResp(self.id, message.frm, self._term))
            case RaftAppendResp() if self._leading is not None:
                self._leading.on_append_response(message)
            case RaftHeartbeatResp() if self._leading is not None:
                self._leading.on_heartbeat_response(message)
            case RaftTimeoutNow() if self._role is Role.FOLLOWER and self._promotable():
                logger.info("%s campaigns at once on TimeoutNow from %s", self.id, message.frm)
                self._campaign(pre_vote=False, transfer=True)

    def _handle_vote_request(self, request: RaftPreVote | RaftVote) -> None:
        pre_vote = isinstance(request, RaftPreVote)
        can_vote = (
            self._vote == request.frm
            or (self._vote is None and self._leader is None)
            or (pre_vote and request.term > self._term)
        )
        granted = can_vote and self._log.is_up_to_date(request.last_index, request.last_term)
        response = RaftPreVoteResp if pre_vote else RaftVoteResp
        # A grant names the term asked about (for a PreVote, one ahead of ours); a refusal names ours.
        self._send(response(self.id, request.frm, request.term if granted else self._term, granted))
        if granted and not pre_vote:
            self._vote, self._election_elapsed = request.frm, 0

    def _handle_vote_response(self, response: RaftPreVoteResp | RaftVoteResp) -> None:
        if self._role is Role.PRE_CANDIDATE and isinstance(response, RaftPreVoteResp):
            if response.granted and response.term != self._term + 1:
                return  # a grant left over from an earlier pre-election
        elif not (self._role is Role.CANDIDATE and isinstance(response, RaftVoteResp)):
            return
        self._votes[response.frm] = response.granted
        outcome = self._tally_votes()
        if outcome is True:
            self._win_vote()
        elif outcome is False:
            self._become_follower(self._term, None)

    def _handle_append(self, append: RaftAppend) -> None:
        problem = _malformed(append)
        if problem is not None:
            logger.warning("%s drops an append from %s: %s", self.id, append.frm, problem)
            return
        if append.prev_index < self._log.committed:
            self._send(RaftAppendResp(self.id, append.frm, self._term, index=self._log.committed))
            return
        last_match = self._log.try_append(append.prev_index, append.prev_term, append.entries)
        if last_match is not None:
            self._log.commit_to(min(append.commit, last_match))
            self._send(RaftAppendResp(self.id, append.frm, self._term, index=last_match))
            return
        hint_index, hint_term = self._log.find_conflict_by_term(append.prev_index, append.prev_term)
        self._send(
            RaftAppendResp(
                self.id,
                append.frm,
                self._term,
                index=append.prev_index,
                reject=True,
                hint_index=hint_index,
                hint_term=hint_term,
            )
        )

    # ----------------------------------------------------------------- guards and snapshots of state

    def _require_no_outstanding_ready(self) -> None:
        if self._outstanding_ready is not None:
            raise RuntimeError("call advance(ready) before feeding the node again")

    def _require_accepting_proposals(self) -> LeaderState:
        self._require_no_outstanding_ready()
        if self._leading is None:
            raise NotLeader(self.id, self._leader)
        if self._leading.transferee is not None:
            raise ProposalRejected(
                f"leadership is moving to {self._leading.transferee}; retry at the new leader"
            )
        return self._leading

    def _hard_state(self) -> HardState:
        return HardState(self._term, self._vote, self._log.committed)

    def _soft_state(self) -> SoftState:
        return SoftState(self._role, self._leader, self._term)


def _malformed(append: RaftAppend) -> str | None:
    """Why ``append`` cannot come from a correct leader, if it cannot."""
    for offset, entry in enumerate(append.entries, start=1):
        if entry.index != append.prev_index + offset:
            return f"entry {entry.index} does not follow index {append.prev_index + offset - 1}"
        if entry.kind is EntryKind.CONFIG:
            try:
                decode_membership(entry.data)
            except msgspec.DecodeError as error:
                return f"membership entry {entry.index} does not decode: {error}"
    return None
