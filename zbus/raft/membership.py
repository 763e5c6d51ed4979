"""Single-server membership changes and quorum arithmetic."""

from __future__ import annotations

import enum

from zbus.raft.errors import ProposalRejected
from zbus.raft.messages import RaftMembership


class ConfChangeOp(enum.StrEnum):
    ADD_LEARNER = "add_learner"  # joins, receives the log, does not vote
    PROMOTE = "promote"  # learner becomes a voter
    REMOVE = "remove"  # voter or learner leaves


def quorum_size(voter_count: int) -> int:
    return voter_count // 2 + 1


def changed_membership(
    current: RaftMembership, op: ConfChangeOp, node_id: str, leader_id: str
) -> RaftMembership:
    """The membership after one change proposed by ``leader_id``.

    Raises ``ProposalRejected`` for a change that makes no sense (adding a member twice, ...)."""
    voters, learners = set(current.voters), set(current.learners)
    if op is ConfChangeOp.ADD_LEARNER:
        if node_id in voters or node_id in learners:
            raise ProposalRejected(f"{node_id} is already a member")
        learners.add(node_id)
    elif op is ConfChangeOp.PROMOTE:
        if node_id not in learners:
            raise ProposalRejected(f"{node_id} is not a learner; add it as a learner first")
        learners.remove(node_id)
        voters.add(node_id)
    elif op is ConfChangeOp.REMOVE:
        if node_id == leader_id:
            raise ProposalRejected(
                f"{node_id} is the leader and cannot remove itself; transfer leadership first"
            )
        if node_id not in voters and node_id not in learners:
            raise ProposalRejected(f"{node_id} is not a member")
        voters.discard(node_id)
        learners.discard(node_id)
    return RaftMembership(voters=tuple(sorted(voters)), learners=tuple(sorted(learners)))
