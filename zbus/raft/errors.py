"""Errors raised by the Raft core to its driver."""

from __future__ import annotations

from zbus.errors import ZbusError


class RaftError(ZbusError):
    """Base class of the Raft core's errors."""


class NotLeader(RaftError):
    """The request needs the leader; ``leader`` is the one this node knows of, if any."""

    def __init__(self, node_id: str, leader: str | None) -> None:
        hint = f"the leader is {leader}" if leader else "no leader is known yet"
        super().__init__(f"{node_id} is not the Raft leader; {hint}")
        self.leader = leader


class ProposalRejected(RaftError):
    """The leader refuses the proposal for now; the message says why and when to retry."""


class TransferRejected(RaftError):
    """``transfer_leadership`` cannot hand leadership to that node."""
