"""Versioned client lists, pure (no I/O).

* :class:`ClientTable` is a server's list of its connected clients (the seed's table A). Changes are
  coalesced and published as :class:`~zbus.wire.ClientDelta` messages, so the control traffic of a
  join is one small delta per listening client, whatever the number of clients.
* :class:`PeerList` is a client's copy of one server's list (the seed's tables B1..Bn): it applies
  deltas in version order and asks for a full snapshot when it sees a gap.
"""

from __future__ import annotations

import enum

from .wire import ClientDelta, ClientInfo


class ClientTable:
    """A server's registered clients, with a version that moves on every published change."""

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self.version = 0
        self._entries: dict[str, ClientInfo] = {}
        self._changed: dict[str, ClientInfo | None] = {}  # id -> new info, None = removed
        self._published: set[str] = set()  # ids in the last published version

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, client_id: str) -> bool:
        return client_id in self._entries

    def get(self, client_id: str) -> ClientInfo | None:
        return self._entries.get(client_id)

    def entries(self) -> list[ClientInfo]:
        return list(self._entries.values())

    def upsert(self, info: ClientInfo) -> None:
        if self._entries.get(info.id) != info:
            self._entries[info.id] = info
            self._changed[info.id] = info

    def remove(self, client_id: str) -> None:
        if self._entries.pop(client_id, None) is None:
            return
        if client_id in self._published:
            self._changed[client_id] = None
        else:
            self._changed.pop(client_id, None)  # came and went between two publications

    def take_delta(self) -> ClientDelta | None:
        """The changes since the last call as one delta (and a new version), or None if none."""
        if not self._changed:
            return None
        self.version += 1
        upsert = [info for info in self._changed.values() if info is not None]
        removed = [cid for cid, info in self._changed.items() if info is None]
        self._published.difference_update(removed)
        self._published.update(info.id for info in upsert)
        self._changed.clear()
        return ClientDelta(self.server_id, self.version, False, upsert, removed)

    @property
    def pending(self) -> bool:
        """Changes not yet published in a delta."""
        return bool(self._changed)

    def snapshot(self) -> ClientDelta:
        """The whole list as it is now, labelled with the last published version.

        Unpublished changes are already in it; the next delta (version + 1) repeats them, which a
        list applies idempotently (an upsert carries the whole entry, a removal of an absent Id is
        a no-op). So a newcomer can get its snapshot at once while a delta is being held back.
        What a snapshot showed counts as published: removing it later must go out in a delta."""
        self._published.update(self._entries)
        return ClientDelta(self.server_id, self.version, True, list(self._entries.values()), [])


class Applied(enum.Enum):
    APPLIED = "applied"
    STALE = "stale"  # an old or duplicate delta: ignored
    GAP = "gap"  # a version is missing: ask the server for a snapshot


class PeerList:
    """A client's copy of one server's client list."""

    def __init__(self) -> None:
        self.server_id: str | None = None
        self.version = -1  # nothing received yet
        self.entries: dict[str, ClientInfo] = {}

    def apply(self, delta: ClientDelta) -> Applied:
        if delta.full:
            self.server_id = delta.server_id
            self.version = delta.version
            self.entries = {info.id: info for info in delta.upsert}
            return Applied.APPLIED
        if self.version < 0 or delta.server_id != self.server_id or delta.version > self.version + 1:
            return Applied.GAP
        if delta.version <= self.version:
            return Applied.STALE
        self.version = delta.version
        for info in delta.upsert:
            self.entries[info.id] = info
        for client_id in delta.removed:
            self.entries.pop(client_id, None)
        return Applied.APPLIED

    def clear(self) -> None:
        self.server_id = None
        self.version = -1
        self.entries = {}
