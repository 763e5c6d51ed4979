"""A small sans-IO Raft core in the style of etcd-io/raft, and the seed's Master policy over it.

The driver feeds ``RaftNode.step(message)`` and ``RaftNode.tick()``, then drains
``RaftNode.ready()``: persist, send, apply, ``advance(ready)``. See docs/raft.md.
"""

from zbus.raft.core import RaftNode
from zbus.raft.errors import NotLeader, ProposalRejected, RaftError, TransferRejected
from zbus.raft.membership import ConfChangeOp
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
from zbus.raft.storage import MemoryStorage, RaftStorage

__all__ = [
    "ConfChangeOp",
    "EntryKind",
    "HardState",
    "MemoryStorage",
    "NotLeader",
    "ProposalRejected",
    "RaftAppend",
    "RaftAppendResp",
    "RaftConfig",
    "RaftEntry",
    "RaftError",
    "RaftHeartbeat",
    "RaftHeartbeatResp",
    "RaftMembership",
    "RaftMessage",
    "RaftNode",
    "RaftPreVote",
    "RaftPreVoteResp",
    "RaftStatus",
    "RaftStorage",
    "RaftTimeoutNow",
    "RaftVote",
    "RaftVoteResp",
    "Ready",
    "Role",
    "SoftState",
    "TransferRejected",
    "decode_membership",
    "encode_membership",
]
