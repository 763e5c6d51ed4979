"""This server's place in one Raft cluster: the node, its storage, and the server table it applies.

It drives the Raft core by the Ready contract (persist, send, apply, advance; docs/raft.md) and
keeps the Raft state of clusters it leaves: a server that comes back to a cluster it was in must
come back with its log and votes, or it could help elect a leader that lacks committed entries.
"""

from __future__ import annotations

import logging
import random
import uuid

import msgspec

from ..raft import EntryKind, MemoryStorage, RaftConfig, RaftMessage, RaftNode, RaftStatus
from .table import ServerTable, decode_command

log = logging.getLogger("zbus.cluster")

KEPT_CLUSTERS = 4  # Raft states of clusters this server left, kept in case it joins one again


class RaftMember:
    def __init__(self, server_id: str, config: RaftConfig, rng: random.Random) -> None:
        self.id = server_id
        self._config = config
        self._rng = rng
        self.table = ServerTable()  # the same object for the server's whole life
        self.cluster_id = ""  # "" while in no cluster
        self.storage = MemoryStorage()
        self.node = RaftNode(server_id, (), config, rng, self.storage)
        self._kept: dict[str, MemoryStorage] = {}
        self.news = False  # a new leader or newly applied entries since the caller last looked

    def found(self) -> str:
        """Leave the current cluster for a new one with this server as its only voter."""
        self._leave()
        self.cluster_id = "K-" + str(uuid.UUID(int=self._rng.getrandbits(128), version=4))
        self._start(MemoryStorage(), (self.id,))
        return self.cluster_id

    def leave(self) -> None:
        """Belong to no cluster."""
        self._leave()
        self.cluster_id = ""
        self._start(MemoryStorage(), ())

    def adopt(self, cluster_id: str) -> None:
        """Join ``cluster_id`` (its leader adds us): with our old log if we were in it before."""
        kept = self._kept.pop(cluster_id, None)
        if kept is not None:
            self._start(kept, ())  # replays the committed table on the next drain
        self.cluster_id = cluster_id

    def status(self) -> RaftStatus:
        return self.node.status()

    def is_member(self) -> bool:
        status = self.node.status()
        return self.id in status.voters or self.id in status.learners

    def drain(self) -> list[RaftMessage]:
        """Work off every pending Ready; returns the messages to send (in order)."""
        messages: list[RaftMessage] = []
        while self.node.has_ready():
            ready = self.node.ready()
            self.storage.save(ready.hard_state, ready.entries)
            messages += ready.messages
            for entry in ready.committed_entries:
                if entry.kind is EntryKind.NORMAL:
                    try:
                        self.table.apply(decode_command(entry.data))
                    except msgspec.DecodeError as exc:
                        log.error("%s skips log entry %d: not a table command (%s)", self.id, entry.index,
                                  exc)
            self.node.advance(ready)
            if ready.soft_state is not None or ready.committed_entries:
                self.news = True
            if ready.soft_state is not None:
                log.info("%s is Raft %s at term %d (leader %s)", self.id, ready.soft_state.role.value,
                         ready.soft_state.term, ready.soft_state.leader)
        return messages

    def _leave(self) -> None:
        if self.cluster_id and self.storage.entries:
            self._kept.pop(self.cluster_id, None)
            self._kept[self.cluster_id] = self.storage
            while len(self._kept) > KEPT_CLUSTERS:
                del self._kept[next(iter(self._kept))]

    def _start(self, storage: MemoryStorage, voters: tuple[str, ...]) -> None:
        self.storage = storage
        self.node = RaftNode(self.id, voters, self._config, self._rng, storage)
        self.table.clear()
        self.news = True
