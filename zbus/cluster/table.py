"""The replicated server table: the state machine every server applies from the Raft log.

Seed names: the Master's table **B**, and its copy **C** on every server. A row is a
:class:`zbus.wire.ClusterServer`; the log carries :data:`TableCommand` entries (``NORMAL`` Raft
entries), encoded with msgspec, never pickled. Raft membership (voters, learners) lives in the Raft
log's own ``CONFIG`` entries; the leader keeps the two in step (:mod:`zbus.cluster.reconcile`).
"""

from __future__ import annotations

from collections.abc import Iterator

import msgspec

from .. import wire


class TableUpsert(msgspec.Struct, tag=True, array_like=True, frozen=True):
    """Add a server, or replace its row (a restart: new instance, new endpoints)."""

    server: wire.ClusterServer


class TableRemove(msgspec.Struct, tag=True, array_like=True, frozen=True):
    """Drop a server (dead past ``dead_after``, already out of the Raft membership)."""

    id: str


TableCommand = TableUpsert | TableRemove

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(TableCommand)


def encode_command(command: TableCommand) -> bytes:
    return _encoder.encode(command)


def decode_command(data: bytes) -> TableCommand:
    """Raises ``msgspec.DecodeError`` for bytes that are not a table command."""
    return _decoder.decode(data)


def same_server(a: wire.ClusterServer | None, b: wire.ClusterServer | None) -> bool:
    """Do two rows describe the same server process at the same addresses?

    ``net`` is left out: its observed public address depends on who observed it."""
    if a is None or b is None:
        return a is b
    return (a.id, a.name, a.instance, a.data_endpoint, a.cluster_endpoint, a.started_at) == (
        b.id, b.name, b.instance, b.data_endpoint, b.cluster_endpoint, b.started_at)


class ServerTable:
    """Rows by server Id, in the order servers joined."""

    def __init__(self) -> None:
        self._rows: dict[str, wire.ClusterServer] = {}
        self.applied = 0  # commands applied: moves on every change

    def apply(self, command: TableCommand) -> bool:
        """Apply one committed command; True if the table changed."""
        if isinstance(command, TableUpsert):
            if self._rows.get(command.server.id) == command.server:
                return False
            self._rows[command.server.id] = command.server
        elif self._rows.pop(command.id, None) is None:
            return False
        self.applied += 1
        return True

    def clear(self) -> None:
        self._rows.clear()
        self.applied += 1

    def get(self, server_id: str) -> wire.ClusterServer | None:
        return self._rows.get(server_id)

    def rows(self) -> tuple[wire.ClusterServer, ...]:
        return tuple(self._rows.values())

    def ids(self) -> set[str]:
        return set(self._rows)

    def __contains__(self, server_id: object) -> bool:
        return server_id in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)
