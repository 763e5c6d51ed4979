"""The server's protocol core, pure (no sockets, no clock).

The driver (:mod:`zbus.server`) feeds it what arrives on the ROUTER, keyed by the connection's
routing id, and sends what it returns. Outputs are ``(connection, header_bytes, payload | None)``.
"""

from __future__ import annotations

import collections
from typing import Any

from . import wire
from .ids import is_client_id
from .tables import ClientTable
from .wire import DropReason

Output = tuple[bytes, bytes, Any]


class ServerCore:
    def __init__(self, server_id: str, name: str, endpoint: str, client_timeout: float = 3.0) -> None:
        self.server_id = server_id
        self.client_timeout = client_timeout
        self.name = name
        self.endpoint = endpoint
        self.table = ClientTable(server_id)
        self._conn_of: dict[str, bytes] = {}  # client id -> connection
        self._id_of: dict[bytes, str] = {}  # connection -> client id
        self._instance_of: dict[bytes, str] = {}  # connection -> the registering process's instance
        self._last_seen: dict[bytes, float] = {}  # connection -> when it last sent anything
        self._needs_snapshot: set[bytes] = set()
        self.relayed_msgs = 0
        self.relayed_bytes = 0
        self.dropped: collections.Counter[str] = collections.Counter()
        self._welcome = wire.encode(wire.Welcome(server_id, name))
        self._not_registered = wire.encode(wire.Error("not-registered", "say Hello first"))

    # -- data plane -------------------------------------------------------------------------
    def relay(self, conn: bytes, data: wire.Data, size: int, now: float) -> tuple[bytes, bytes] | None:
        """Route one Data message; returns (destination connection, header to send) or None."""
        self._last_seen[conn] = now
        src = self._id_of.get(conn)
        if src is None:
            self.drop(DropReason.UNREGISTERED)
            return None
        dst_conn = self._conn_of.get(data.dst)
        if dst_conn is None:
            self.drop(DropReason.UNROUTABLE)
            return None
        self.relayed_msgs += 1
        self.relayed_bytes += size
        # The source is stamped from the connection, never taken from the sender's header.
        return dst_conn, wire.encode(wire.Data(data.dst, src, data.seq))

    def drop(self, reason: DropReason, count: int = 1) -> None:
        self.dropped[reason.value] += count

    # -- control plane ----------------------------------------------------------------------
    def receive(self, conn: bytes, header: wire.Header, now: float) -> list[Output]:
        """Handle one control message from ``conn``."""
        self._last_seen[conn] = now
        if isinstance(header, wire.Heartbeat):
            if conn in self._id_of:
                return []
            # We expired it (or restarted): tell it to register again.
            return [(conn, self._not_registered, None)]
        if isinstance(header, wire.Hello):
            return self._hello(conn, header)
        if isinstance(header, wire.NetState):
            client_id = self._id_of.get(conn)
            if client_id is None:
                self.drop(DropReason.UNREGISTERED)
                return []
            old = self.table.get(client_id)
            self.table.upsert(wire.ClientInfo(client_id, old.name if old else "", header))
            return []
        if isinstance(header, wire.Bye):
            self.connection_lost(conn)
            return []
        if isinstance(header, wire.Resync):
            if conn in self._id_of:
                self._needs_snapshot.add(conn)
            return []
        if isinstance(header, wire.StatusRequest):
            return [(conn, wire.encode(self.status()), None)]
        self.drop(DropReason.MALFORMED)
        return []

    def _hello(self, conn: bytes, hello: wire.Hello) -> list[Output]:
        if not is_client_id(hello.id):
            error = wire.Error("bad-id", f"{hello.id!r} is not a client Id (C-<uuid4>)")
            return [(conn, wire.encode(error), None)]
        holder = self._conn_of.get(hello.id)
        if holder is not None and holder != conn and self._instance_of.get(holder) == hello.instance:
            self.connection_lost(holder)  # the same process on a new connection: take over
            holder = None
        if holder is not None and holder != conn:
            error = wire.Error(
                "id-in-use",
                f"{hello.id} is already connected to server {self.server_id} from another "
                f"connection; refusing this one (a client Id may be used by one process at a time)",
            )
            return [(conn, wire.encode(error), None)]
        previous = self._id_of.get(conn)
        if previous is not None and previous != hello.id:
            self.connection_lost(conn)  # the same connection re-registers as someone else
        self._conn_of[hello.id] = conn
        self._id_of[conn] = hello.id
        self._instance_of[conn] = hello.instance
        self.table.upsert(wire.ClientInfo(hello.id, hello.name, hello.net))
        self._needs_snapshot.add(conn)
        return [(conn, self._welcome, None)]

    def expire(self, now: float) -> list[bytes]:
        """Forget connections silent for longer than ``client_timeout``; return them."""
        limit = now - self.client_timeout
        dead = [conn for conn, seen in self._last_seen.items() if seen < limit]
        for conn in dead:
            self.connection_lost(conn)
        return dead

    def connection_lost(self, conn: bytes) -> None:
        self._last_seen.pop(conn, None)
        self._instance_of.pop(conn, None)
        client_id = self._id_of.pop(conn, None)
        self._needs_snapshot.discard(conn)
        if client_id is not None:
            del self._conn_of[client_id]
            self.table.remove(client_id)

    def flush(self) -> list[Output]:
        """Publish coalesced list changes: one delta to each listener, snapshots to newcomers."""
        out: list[Output] = []
        delta = self.table.take_delta()
        if delta is not None:
            encoded = wire.encode(delta)
            out += [(c, encoded, None) for c in self._id_of if c not in self._needs_snapshot]
        if self._needs_snapshot:
            encoded = wire.encode(self.table.snapshot())
            out += [(c, encoded, None) for c in self._needs_snapshot]
            self._needs_snapshot.clear()
        return out

    # -- introspection ----------------------------------------------------------------------
    def stats(self) -> wire.ServerStats:
        return wire.ServerStats(len(self.table), self.relayed_msgs, self.relayed_bytes, dict(self.dropped))

    def status(self) -> wire.StatusReply:
        me = wire.ServerStatus(self.server_id, self.name, self.endpoint, "master", True, len(self.table))
        clients = [wire.ClientStatus(c.id, c.name, self.server_id) for c in self.table.entries()]
        return wire.StatusReply(self.server_id, self.server_id, [me], clients, self.stats())
