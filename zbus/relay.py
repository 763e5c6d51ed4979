"""The server's protocol core, pure (no sockets, no clock).

The driver (:mod:`zbus.server`) feeds it what arrives on the ROUTER, keyed by the connection's
routing id, and sends what it returns. Outputs are ``(connection, header_bytes, payload | None)``.

Each registered client has three connections to a server: a *control* connection (auto routing
id; Hello, Heartbeat, lists) and two data connections whose routing ids it announced in its Hello:
``data_out`` (client -> server Data) and ``data_in`` (server -> client Data). Keeping data off the
control connection lets the client's user thread own its data sockets, so a message crosses no
thread inside a client.

Hostile input (docs/security.md): every control message passes a per-connection token bucket
(:class:`~zbus.guard.RateLimiter`); registrations are bounded by ``max_clients`` and names by
``max_name_bytes``; every frame the core turns away is counted by :class:`~zbus.wire.DropReason`.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass
from typing import Any

import msgspec

from . import wire
from .cluster import ClusterView
from .guard import Limits, RateLimiter
from .ids import is_client_id
from .rendezvous import client_key
from .tables import ClientTable
from .wire import DropReason

Output = tuple[bytes, bytes, Any]
TOKEN_BYTES = 16
SEQ_TAIL = 9  # a client's Data header ends in msgpack uint64: 0xCF and 8 bytes of seq (wire.data_header)
FAST_ROUTES_MAX = 65_536  # per table level; past it the cache starts over
DELTA_SPACING_S = 0.0005  # list deltas: at most one per (this x listening clients) seconds ...
DELTA_MAX_DELAY_S = 0.25  # ... and never held back longer than this


@dataclass(frozen=True)
class Registration:
    client_id: str
    instance: str
    control: bytes
    data_in: bytes
    data_out: bytes


def valid_token(token: bytes) -> bool:
    # libzmq reserves routing ids that start with a zero byte for its own generated ids.
    return len(token) == TOKEN_BYTES and token[0] != 0


class ServerCore:
    def __init__(self, server_id: str, name: str, endpoint: str, client_timeout: float = 3.0,
                 limits: Limits = Limits()) -> None:
        self.server_id = server_id
        self.limits = limits
        self._control_rate = RateLimiter(limits.control_rate, limits.control_burst, limits.max_tracked)
        self.client_timeout = client_timeout
        self.name = name
        self.endpoint = endpoint
        self.table = ClientTable(server_id)
        self._by_id: dict[str, Registration] = {}
        self._by_control: dict[bytes, Registration] = {}
        self._by_sender: dict[bytes, Registration] = {}  # data_out routing id -> registration
        self._receivers: set[bytes] = set()  # data_in routing ids of registered clients
        self._last_seen: dict[bytes, float] = {}  # control connection -> when it last spoke
        self._needs_snapshot: set[bytes] = set()
        self._next_delta = 0.0  # when the next list delta may go (see flush)
        self.cluster = ClusterView(0, server_id, (wire.ServerStatus(server_id, name, endpoint, "master", True, 0),))
        self.cluster_stats: dict[str, wire.ServerStats] = {}  # every server's figures, from the cluster
        self._cluster_changed = False
        self._forgotten: list[bytes] = []
        self.relayed_msgs = 0
        self.relayed_bytes = 0
        # Routes already checked, for the hot path: sender connection -> {header without its seq tail:
        # (destination data_in, stamped header without seq)}. Cleared whenever any registration
        # changes, so an entry is exactly what relay() would answer now.
        self.fast_routes: dict[bytes, dict[bytes, tuple[bytes, bytes]]] = {}
        self.dropped: collections.Counter[str] = collections.Counter()
        # Rendezvous keys (zbus/rendezvous.py) of registered clients, by Id; read by the reflector thread.
        self.rendezvous_keys: dict[str, bytes] = {}
        self._rendezvous_secret = os.urandom(32)
        self._not_registered = wire.encode(wire.Error("not-registered", "say Hello first"))

    # -- data plane -------------------------------------------------------------------------
    def relay(self, conn: bytes, data: wire.Data, size: int, raw: bytes = b"") -> tuple[bytes, bytes] | None:
        """Route one Data message; returns (destination connection, header to send) or None.

        ``raw``, the header as received: when it has the form clients send (:func:`wire.data_header`:
        the prefix for ``dst`` with an empty source, then the 9-byte seq), the route is remembered
        for :meth:`fast_route`, so the next message on it is routed without decoding or encoding.
        """
        src = self._by_sender.get(conn)
        if src is None:
            self.drop(DropReason.UNREGISTERED)
            return None
        dst = self._by_id.get(data.dst)
        if dst is None:
            self.drop(DropReason.UNROUTABLE)
            return None
        self.relayed_msgs += 1
        self.relayed_bytes += size
        # The source is stamped from the connection, never taken from the sender's header.
        out = wire.encode(wire.Data(data.dst, src.client_id, data.seq))
        if len(raw) > SEQ_TAIL and raw[-SEQ_TAIL] == 0xCF and raw[:-SEQ_TAIL] == wire.data_header_prefix(data.dst):
            routes = self.fast_routes.get(conn)
            if routes is None:
                if len(self.fast_routes) >= FAST_ROUTES_MAX:
                    self.fast_routes.clear()
                routes = self.fast_routes[conn] = {}
            if len(routes) < FAST_ROUTES_MAX:
                stamped = wire.data_header_prefix(data.dst, src.client_id)
                routes[raw[:-SEQ_TAIL]] = (dst.data_in, stamped)
        return dst.data_in, out

    def count_relayed(self, msgs: int, size: int) -> None:
        """Messages routed by :meth:`fast_route`'s answer, and their payload bytes."""
        self.relayed_msgs += msgs
        self.relayed_bytes += size

    def is_receiver(self, conn: bytes) -> bool:
        """True if ``conn`` is a registered client's data connection (it may still be connecting)."""
        return conn in self._receivers

    def may_queue(self, conn: bytes) -> bool:
        """True if output for ``conn`` may wait for its pipe to drain (a registered client's control or
        data_in connection); output for anyone else that does not read is dropped, not queued."""
        return conn in self._by_control or conn in self._receivers

    def drop(self, reason: DropReason, count: int = 1) -> None:
        self.dropped[reason.value] += count

    # -- control plane ----------------------------------------------------------------------
    def receive(self, conn: bytes, header: wire.Header, now: float) -> list[Output]:
        """Handle one control message from ``conn``."""
        if not self._control_rate.allow(conn, now):
            self.drop(DropReason.RATE_LIMITED)
            return []
        if isinstance(header, wire.Hello):
            out = self._hello(conn, header)
            if conn in self._by_control:  # only registrations are remembered (a refusal leaves nothing)
                self._last_seen[conn] = now
            return out
        if isinstance(header, wire.StatusRequest):
            return [(conn, wire.encode(self.status()), None)]
        if isinstance(header, wire.Bye) and conn in self._by_sender:
            # Bye comes in-band on the data connection, behind the last message the client sent.
            self.connection_lost(self._by_sender[conn].control)
            return []
        registration = self._by_control.get(conn)
        if registration is None:
            self.drop(DropReason.UNREGISTERED)
            if isinstance(header, (wire.Heartbeat, wire.NetState, wire.Resync)):
                # We expired it (or restarted): tell it to register again.
                return [(conn, self._not_registered, None)]
            return []
        self._last_seen[conn] = now
        if isinstance(header, wire.Heartbeat):
            return []
        if isinstance(header, wire.Bye):
            self.connection_lost(conn)
            return []
        if isinstance(header, wire.NetState):
            old = self.table.get(registration.client_id)
            self.table.upsert(wire.ClientInfo(registration.client_id, old.name if old else "", header))
            return []
        if isinstance(header, wire.Resync):
            self._needs_snapshot.add(conn)
            return []
        if isinstance(header, wire.RelayAcks):
            out = []
            for sender, upto in header.acks[:wire.RELAY_ACKS_MAX]:  # to each sender's control connection
                to = self._by_id.get(sender)
                if to is not None:
                    out.append((to.control, wire.encode(wire.RelayAcks([(registration.client_id, upto)])), None))
            return out
        self.drop(DropReason.MALFORMED)
        return []

    def _refuse(self, conn: bytes, code: str, message: str) -> list[Output]:
        self.drop(DropReason.REFUSED)
        return [(conn, wire.encode(wire.Error(code, message)), None)]

    def _hello(self, conn: bytes, hello: wire.Hello) -> list[Output]:
        if not is_client_id(hello.id):
            return self._refuse(conn, "bad-id", f"{hello.id!r} is not a client Id (C-<uuid4>)")
        if len(hello.name.encode("utf-8", "surrogatepass")) > self.limits.max_name_bytes:
            return self._refuse(conn, "bad-name",
                                f"a client name is at most {self.limits.max_name_bytes} bytes (UTF-8)")
        if not (valid_token(hello.data_in) and valid_token(hello.data_out)) or hello.data_in == hello.data_out:
            return self._refuse(conn, "bad-hello", f"data connection ids must be two distinct {TOKEN_BYTES}-byte ids")
        holder = self._by_id.get(hello.id)
        if holder is None and conn not in self._by_control and len(self._by_id) >= self.limits.max_clients:
            return self._refuse(
                conn, "server-full",
                f"server {self.server_id} has max_clients={self.limits.max_clients} clients registered; "
                f"try another server or later")
        if holder is not None and holder.control != conn:
            if holder.instance != hello.instance:
                return self._refuse(
                    conn, "id-in-use",
                    f"{hello.id} is already connected to server {self.server_id} from another process; "
                    f"refusing this one (a client Id may be used by one process at a time)")
            self.connection_lost(holder.control)  # the same process on a new connection: take over
        previous = self._by_control.get(conn)
        if previous is not None:
            if (previous.client_id, previous.instance, previous.data_in, previous.data_out) == \
                    (hello.id, hello.instance, hello.data_in, hello.data_out):
                # A repeated Hello (the client retries while our Welcome is on its way, e.g. on a
                # loaded server): answer again, change nothing. Re-registering here would publish a
                # remove + add to every client, send another full list and drop the client's queue.
                self.table.upsert(wire.ClientInfo(hello.id, hello.name, hello.net))
                return [(conn, self._welcome(previous), None)]
            self.connection_lost(conn)  # re-registration on the same connection
        for token in (hello.data_in, hello.data_out):
            if token in self._receivers or token in self._by_sender:
                return self._refuse(conn, "bad-hello", "data connection id already in use")
        registration = Registration(hello.id, hello.instance, conn, hello.data_in, hello.data_out)
        self.fast_routes.clear()
        self._by_id[hello.id] = registration
        self._by_control[conn] = registration
        self._by_sender[hello.data_out] = registration
        self._receivers.add(hello.data_in)
        self.table.upsert(wire.ClientInfo(hello.id, hello.name, hello.net))
        self._needs_snapshot.add(conn)
        self.rendezvous_keys[hello.id] = client_key(self._rendezvous_secret, hello.id, hello.instance)
        return [(conn, self._welcome(registration), None)]

    def _welcome(self, registration: Registration) -> bytes:
        return wire.encode(wire.Welcome(self.server_id, self.name, self.limits.max_frame,
                                        self.rendezvous_keys.get(registration.client_id, b"")))

    def expire(self, now: float) -> None:
        """Forget clients whose control connection was silent past ``client_timeout``."""
        limit = now - self.client_timeout
        for conn in [c for c, seen in self._last_seen.items() if seen < limit]:
            self.connection_lost(conn)
        self._control_rate.sweep(now)

    def connection_lost(self, conn: bytes) -> None:
        """Forget the client on control connection ``conn``."""
        self._last_seen.pop(conn, None)
        self._needs_snapshot.discard(conn)
        # The rate bucket stays (the sweep forgets it once full): Hello + Bye must not reset it.
        registration = self._by_control.pop(conn, None)
        if registration is None:
            return
        self.fast_routes.clear()
        del self._by_id[registration.client_id]
        self.rendezvous_keys.pop(registration.client_id, None)
        del self._by_sender[registration.data_out]
        self._receivers.discard(registration.data_in)
        self.table.remove(registration.client_id)
        self._forgotten += [conn, registration.data_in, registration.data_out]

    def take_forgotten(self) -> list[bytes]:
        """Connections of clients forgotten since the last call (the driver drops their queues)."""
        forgotten, self._forgotten = self._forgotten, []
        return forgotten

    def set_cluster_stats(self, stats: dict[str, wire.ServerStats]) -> None:
        """Every server's figures as the cluster last heard them (for ``status``)."""
        self.cluster_stats = stats

    def set_cluster(self, view: ClusterView) -> None:
        """The cluster changed (servers, master): every client gets the new server table."""
        if view.version != self.cluster.version:
            self.cluster = view
            self._cluster_changed = True

    def flush(self, now: float) -> list[Output]:
        """Publish coalesced changes: the server table and one list delta to each listener,
        the server table and a list snapshot to newcomers.

        List deltas go at most every ``DELTA_SPACING_S`` x listeners (capped at DELTA_MAX_DELAY_S): a
        server sends at most ~1/DELTA_SPACING_S delta messages a second whatever the join rate, so a
        join storm costs each client a few large deltas instead of one wake-up per join. A quiet
        server (or a small one) publishes at once."""
        out: list[Output] = []
        if self._cluster_changed or self._needs_snapshot:
            table = wire.encode(self.cluster.table())
            targets = self._by_control if self._cluster_changed else self._needs_snapshot
            out += [(c, table, None) for c in targets]
            self._cluster_changed = False
        if self.table.pending and now >= self._next_delta:
            delta = self.table.take_delta()
            self._next_delta = now + min(DELTA_MAX_DELAY_S, len(self._by_control) * DELTA_SPACING_S)
            encoded = wire.encode(delta)
            out += [(c, encoded, None) for c in self._by_control if c not in self._needs_snapshot]
        if self._needs_snapshot:
            encoded = wire.encode(self.table.snapshot())
            out += [(c, encoded, None) for c in self._needs_snapshot]
            self._needs_snapshot.clear()
        return out

    def next_flush(self) -> float | None:
        """When a held-back list delta is due (None: nothing held back)."""
        return self._next_delta if self.table.pending else None

    # -- introspection ----------------------------------------------------------------------
    def stats(self) -> wire.ServerStats:
        return wire.ServerStats(len(self.table), self.relayed_msgs, self.relayed_bytes, dict(self.dropped))

    def status(self) -> wire.StatusReply:
        servers = [
            msgspec.structs.replace(s, clients=len(self.table)) if s.id == self.server_id else s
            for s in self.cluster.servers
        ]
        clients = [wire.ClientStatus(c.id, c.name, self.server_id) for c in self.table.entries()]
        own = self.stats()
        cluster_stats = {**self.cluster_stats, self.server_id: own}
        return wire.StatusReply(self.server_id, self.cluster.master, servers, clients, own, cluster_stats)
