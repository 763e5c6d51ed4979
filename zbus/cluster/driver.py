"""The cluster's I/O: an owned thread with the Raft mesh sockets around a :class:`ClusterCore`.

Sockets (all on the cluster endpoint, never on the data ROUTER, so relay traffic cannot delay a
heartbeat):

* one ``ROUTER`` bound at the cluster endpoint: every message from every peer arrives here;
* one ``DEALER`` per peer, connected to the peer's cluster endpoint: everything we send to it.
  ``IMMEDIATE`` (nothing queues towards a peer that is down: Raft retries by itself) and a fixed
  random routing id (the peer's ROUTER keeps knowing the connection across a reconnect);
* a monitor socket per DEALER: a completed handshake (send ClusterHello first) and a disconnect
  (a killed peer's connection resets, so it stops counting as live at once).

The relay loop reads :meth:`RaftCluster.view` (an immutable snapshot, swapped by reference) and
hands :meth:`RaftCluster.report` its figures (a reference too); no locks, no queues.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from .. import sockets, wire
from ..config import ServerConfig, parse_endpoint
from ..errors import ConfigError
from ..netinfo import private_addresses
from ..security import Security, claim_refusal, peer_id
from ..sockets import recv_frames
from .actions import Connect, Disconnect, Reply, Send
from .core import ClusterCore
from .rules import derive_cluster_endpoint
from .settings import ClusterSettings
from .view import ClusterView

log = logging.getLogger("zbus.cluster")

CLUSTER_MAX_FRAME = 1024 * 1024  # cluster messages are small; anything larger is dropped by libzmq
BATCH = 256  # messages handled per wake-up before the timers are checked
DEALER_HWM = 1000
MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
# With security on, a peer that refuses our key (or whose key is not the one we expect) fails the handshake.
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
MAX_LOGGED_FAILURES = 10


def settings_from(config: ServerConfig) -> ClusterSettings:
    return ClusterSettings(tick=config.raft_tick, heartbeat_ticks=config.raft_heartbeat_ticks,
                           election_ticks=config.raft_election_ticks, peer_timeout=config.peer_timeout,
                           dead_after=config.dead_after)


class _Link:
    """Our DEALER to one peer and its monitor."""

    def __init__(self, context: zmq.Context, endpoint: str, security: Security | None = None,
                 peer: str | None = None) -> None:
        self.endpoint = endpoint
        self.peer = peer  # the server Id expected there (security on), else None
        self.failed_logged = False
        self.dealer = sockets.tune(context.socket(zmq.DEALER), max_frame=CLUSTER_MAX_FRAME)
        self.dealer.setsockopt(zmq.IMMEDIATE, 1)
        self.dealer.setsockopt(zmq.SNDHWM, DEALER_HWM)
        self.dealer.setsockopt(zmq.ROUTING_ID, b"\x01" + os.urandom(15))  # libzmq reserves a leading 0
        events = MONITOR_EVENTS
        if security is not None:  # CURVE client of the key bound to ``peer`` in the trust list
            security.dial(self.dealer, peer)
            events |= HANDSHAKE_FAILED
        self.monitor = self.dealer.get_monitor_socket(events)
        self.dealer.connect(endpoint)

    def close(self) -> None:
        try:
            self.dealer.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.dealer.close(linger=0)


class RaftCluster:
    """The Raft-backed cluster of one server: ``start()``, ``view()``, ``report()``, ``stop()``."""

    def __init__(self, server_id: str, name: str, data_endpoint: str, config: ServerConfig,
                 security: Security | None = None) -> None:
        self.server_id = server_id
        self.security = security  # None: plain TCP, no per-message cost
        self.refused = 0  # ClusterHellos refused because the key belongs to another Id (security on)
        self.name = name
        self.data_endpoint = data_endpoint
        self.config = config
        self.settings = settings_from(config)
        if config.cluster_listen:
            parse_endpoint(config.cluster_listen, "server.cluster_listen", allow_port_zero=True)
        self.contacts = []
        self._contact_ids: dict[str, str] = {}  # configured peers' cluster endpoints -> their pinned Ids
        for i, peer in enumerate(config.peers):
            try:
                self.contacts.append(derive_cluster_endpoint(peer))
            except ValueError as exc:
                raise ConfigError(f"server.peers[{i}]: {exc}") from None
            if peer in config.peer_ids:
                self._contact_ids[self.contacts[-1]] = config.peer_ids[peer]
        self.started_at = time.time()
        self.instance = uuid.uuid4().hex
        self.endpoint = ""  # the bound cluster endpoint, once started
        alone = wire.ServerStatus(server_id, name, data_endpoint, "master", True, 0)
        self._view = ClusterView(1, server_id, (alone,))
        self._stats = wire.ServerStats()
        self._server_stats: dict[str, wire.ServerStats] = {}
        self._stopping = threading.Event()
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.core: ClusterCore | None = None  # owned by the cluster thread; read it only for tests

    # -- the relay loop's interface ------------------------------------------------------------
    def start(self, timeout: float = 5.0) -> None:
        self._thread = threading.Thread(target=self._run, name=f"zbus-cluster-{self.name}", daemon=True)
        self._thread.start()
        if not self._bound.wait(timeout) or self._error is not None:
            self.stop()
            raise self._error or TimeoutError(f"cluster endpoint not bound within {timeout}s")

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None

    def view(self) -> ClusterView:
        return self._view

    def report(self, stats: wire.ServerStats) -> None:
        """This server's figures; sent to every peer with the next PeerStatus."""
        self._stats = stats

    def server_stats(self) -> dict[str, wire.ServerStats]:
        """Every live server's latest figures, by Id (a snapshot; replaced, never changed)."""
        return self._server_stats

    # -- the thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        context = sockets.context()
        router = sockets.tune(context.socket(zmq.ROUTER), max_frame=CLUSTER_MAX_FRAME)
        links: dict[str, _Link] = {}
        domain = f"zbus-cluster-{self.server_id}"
        try:
            if self.security is not None:  # only trusted servers' keys get in (ZAP), bound to their Ids
                self.security.serve(router, domain)
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._bind(router)
            core = self._make_core()
            self.core = core
            self._bound.set()
            log.info("cluster endpoint of %s is %s", self.server_id, self.endpoint)
            self._loop(context, router, core, links)
        except BaseException as exc:
            if not self._bound.is_set():
                self._error = exc
                self._bound.set()
            else:
                log.exception("the cluster thread of %s failed", self.server_id)
        finally:
            for link in links.values():
                link.close()
            router.close(linger=0)
            if self.security is not None:
                self.security.release(context, domain)

    def _bind(self, router: zmq.Socket) -> None:
        wanted = self.config.cluster_listen or derive_cluster_endpoint(self.data_endpoint)
        try:
            router.bind(wanted)
        except zmq.ZMQError as exc:
            if self.config.cluster_listen:
                raise ConfigError(f"server.cluster_listen: cannot bind {wanted}: {exc}") from None
            fallback = derive_cluster_endpoint(self.data_endpoint).rsplit(":", 1)[0] + ":0"
            log.warning("cannot bind the cluster endpoint %s (%s); using a free port instead: servers that "
                        "name this one with --peer will not find it (set cluster_listen)", wanted, exc)
            router.bind(fallback)
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)

    def _make_core(self) -> ClusterCore:
        me = wire.ClusterServer(
            self.server_id, self.name, self.instance, self.data_endpoint, self.endpoint, self.started_at,
            wire.NetState(private=private_addresses(), listen=self.data_endpoint))
        return ClusterCore(me, self.contacts, self.settings, random.Random(), time.monotonic())

    def _loop(self, context: zmq.Context, router: zmq.Socket, core: ClusterCore,
              links: dict[str, _Link]) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        by_socket: dict[Any, _Link] = {}
        tick = self.settings.tick
        next_tick = time.monotonic()
        failures = 0
        while not self._stopping.is_set():
            self._execute(context, core, router, links, poller, by_socket)
            self._view = core.view
            self._server_stats = core.server_stats()
            timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000) + 1)
            ready = dict(poller.poll(timeout_ms))
            now = time.monotonic()
            if router in ready:
                self._drain_router(router, core, now)
            for sock in ready:
                link = by_socket.get(sock)
                if link is None:
                    continue
                if sock is link.monitor:
                    self._drain_monitor(link, core, now)
                else:
                    self._drain_dealer(link, core, now)
            if now >= next_tick:
                core.set_stats(self._stats)
                try:
                    core.tick(now)
                except Exception:  # a bug: say so (a few times), keep serving the relay loop's view
                    failures += 1
                    if failures <= MAX_LOGGED_FAILURES:
                        log.exception("cluster core failed on a tick (%d so far)", failures)
                next_tick = max(next_tick + tick, now)  # after a stall, no burst of catch-up ticks

    def _drain_router(self, router: zmq.Socket, core: ClusterCore, now: float) -> None:
        for _ in range(BATCH):
            try:
                frames = recv_frames(router)
            except zmq.Again:
                return
            conn = frames[0].bytes
            if len(frames) != 2:
                core.dropped["malformed"] += 1
                continue
            try:
                header = wire.decode(frames[1].buffer)
            except wire.WireError as exc:
                core.dropped[exc.reason.value] += 1
                continue
            if self.security is not None and header.__class__ is wire.ClusterHello:
                why = claim_refusal(header.server.id, peer_id(frames[1]))  # the Id bound to its key by ZAP
                if why is not None:
                    core.dropped["not-your-id"] += 1
                    self.refused += 1
                    if self.refused <= MAX_LOGGED_FAILURES:
                        log.warning("%s refused a ClusterHello on connection %s: %s", self.server_id,
                                    conn.hex(), why)
                    continue
            try:
                observed = frames[1].get("Peer-Address")
            except (zmq.ZMQError, AttributeError):
                observed = None
            try:
                core.on_message(conn, header, observed, now)
            except Exception:  # a bug, not bad input: keep the cluster thread alive, say so loudly
                core.dropped["error"] += 1
                log.exception("cluster core failed on a %s from connection %s", type(header).__name__,
                              conn.hex())

    @staticmethod
    def _drain_dealer(link: _Link, core: ClusterCore, now: float) -> None:
        while True:
            try:
                frames = recv_frames(link.dealer)
            except zmq.Again:
                return
            try:
                header = wire.decode(frames[0].buffer) if len(frames) == 1 else None
            except wire.WireError:
                header = None
            if isinstance(header, wire.ClusterWho):
                core.on_who(link.endpoint, now)
            else:
                core.dropped["malformed"] += 1

    def _drain_monitor(self, link: _Link, core: ClusterCore, now: float) -> None:
        while True:
            try:
                event = recv_monitor_message(link.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                link.failed_logged = False
                core.on_link(link.endpoint, True, now)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                core.on_link(link.endpoint, False, now)
            elif event["event"] & HANDSHAKE_FAILED and not link.failed_logged:
                link.failed_logged = True  # once per failure streak: libzmq retries every second
                why = "it refused our key (not in its trust list)" if event["event"] == \
                    zmq.EVENT_HANDSHAKE_FAILED_AUTH else "CURVE handshake failed (its key is not the one we trust for it)"
                log.warning("%s: cluster link to %s (%s) failed: %s", self.server_id, link.endpoint,
                            link.peer, why)

    def _execute(self, context: zmq.Context, core: ClusterCore, router: zmq.Socket, links: dict[str, _Link],
                 poller: zmq.Poller, by_socket: dict[Any, _Link]) -> None:
        for action in core.take_actions():
            if isinstance(action, Send):
                link = links.get(action.endpoint)
                if link is not None:
                    try:
                        link.dealer.send(action.header, zmq.NOBLOCK)
                    except zmq.Again:
                        core.dropped["peer-busy"] += 1  # down or full: lost, Raft and statuses retry
            elif isinstance(action, Reply):
                try:
                    router.send_multipart([action.conn, action.header], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            elif isinstance(action, Connect):
                if action.endpoint not in links:
                    peer = None
                    if self.security is not None:
                        peer = self._contact_ids.get(action.endpoint) or core.id_at(action.endpoint)
                        if self.security.key_of(peer) is None:
                            log.warning("%s: not connecting to cluster endpoint %s: %s", self.server_id,
                                        action.endpoint, f"no trusted key for {peer}" if peer else
                                        "no server Id known there (name configured peers S-…@tcp://…)")
                            continue
                    link = _Link(context, action.endpoint, self.security, peer)
                    links[action.endpoint] = link
                    by_socket[link.dealer] = by_socket[link.monitor] = link
                    poller.register(link.dealer, zmq.POLLIN)
                    poller.register(link.monitor, zmq.POLLIN)
            elif isinstance(action, Disconnect):
                link = links.pop(action.endpoint, None)
                if link is not None:
                    for sock in (link.dealer, link.monitor):
                        poller.unregister(sock)
                        del by_socket[sock]
                    link.close()
