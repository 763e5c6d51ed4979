"""Raft messages, log entries and persisted state as plain msgspec Structs.

Everything here is msgpack-encodable by ``msgspec`` without custom hooks, so the wire module can
carry ``RaftMessage`` as part of its tagged header union and a storage backend can write
``RaftEntry`` and ``HardState`` as they are. Nothing is ever pickled.

Messages and entries are ``array_like`` (compact, and required to share the wire module's tagged
``Header`` union, whose members are all arrays). Every message names its sender ``frm``, its
destination ``to`` and the sender's ``term`` (a granted vote names the term of the election).
"""

from __future__ import annotations

import enum

import msgspec


class EntryKind(enum.IntEnum):
    """What a log entry carries."""

    NORMAL = 0  #: an application command (``data`` is opaque bytes)
    CONFIG = 1  #: a membership change (``data`` is an encoded ``RaftMembership``)
    NOOP = 2  #: the empty entry a new leader appends to commit its term (``data`` is empty)


class RaftEntry(msgspec.Struct, array_like=True, frozen=True):
    term: int
    index: int
    kind: EntryKind
    data: bytes = b""


class RaftMembership(msgspec.Struct, frozen=True):
    """The full cluster membership after a ``CONFIG`` entry (ids sorted, disjoint)."""

    voters: tuple[str, ...] = ()
    learners: tuple[str, ...] = ()

    @property
    def members(self) -> tuple[str, ...]:
        return self.voters + self.learners


class HardState(msgspec.Struct, frozen=True):
    """What a node must persist before it sends the messages of the same ``Ready``."""

    term: int = 0
    vote: str | None = None
    commit: int = 0


_membership_encoder = msgspec.msgpack.Encoder()
_membership_decoder = msgspec.msgpack.Decoder(RaftMembership)


def encode_membership(membership: RaftMembership) -> bytes:
    return _membership_encoder.encode(membership)


def decode_membership(data: bytes) -> RaftMembership:
    return _membership_decoder.decode(data)


class _RaftMsg(msgspec.Struct, tag=True, array_like=True, frozen=True):
    """Fields every Raft message starts with; the tag is the class name."""

    frm: str
    to: str
    term: int


class RaftPreVote(_RaftMsg, frozen=True):
    """Would you vote for me in ``term`` (one past the sender's own)? Changes nothing on the receiver."""

    last_index: int
    last_term: int


class RaftPreVoteResp(_RaftMsg, frozen=True):
    granted: bool


class RaftVote(_RaftMsg, frozen=True):
    last_index: int
    last_term: int
    transfer: bool = False  # campaign started by TimeoutNow: bypasses the receiver's leader lease


class RaftVoteResp(_RaftMsg, frozen=True):
    granted: bool


class RaftAppend(_RaftMsg, frozen=True):
    """Append ``entries`` after (``prev_index``, ``prev_term``); the leader has committed ``commit``."""

    prev_index: int
    prev_term: int
    commit: int
    entries: tuple[RaftEntry, ...] = ()


class RaftAppendResp(_RaftMsg, frozen=True):
    """Accepted: ``index`` is the last index known to match the leader.

    Rejected: ``index`` is the rejected ``prev_index``; (``hint_index``, ``hint_term``) is the follower's
    guess of the last entry the logs may share, so the leader can skip a whole term per round trip.
    """

    index: int = 0
    reject: bool = False
    hint_index: int = 0
    hint_term: int = 0


class RaftHeartbeat(_RaftMsg, frozen=True):
    commit: int  # never beyond what the receiver is known to hold


class RaftHeartbeatResp(_RaftMsg, frozen=True):
    """The follower is alive (CheckQuorum counts it); a lagging one is sent entries in reply."""


class RaftTimeoutNow(_RaftMsg, frozen=True):
    """Leadership transfer: campaign at once, skipping PreVote."""


RaftMessage = (
    RaftPreVote
    | RaftPreVoteResp
    | RaftVote
    | RaftVoteResp
    | RaftAppend
    | RaftAppendResp
    | RaftHeartbeat
    | RaftHeartbeatResp
    | RaftTimeoutNow
)
