"""The client engine: one owned thread for a client's control plane.

It owns one control DEALER per server (``IMMEDIATE``, so nothing queues towards a dead server) and a
monitor socket on each, feeds connection events and control headers to the pure
:class:`~zbus.client_core.ClientCore` (Hello, Heartbeat, client lists), and publishes the immutable
:class:`~zbus.routing.Routes` snapshot that user threads choose paths from. User data never passes
through this thread: the user's threads own the data sockets (see :mod:`zbus.client`).

It also runs the client's direct links (:mod:`zbus.links`): the link ROUTER bound at ``listen``
(handshakes, pings, acks from peers that dialed us) and one control DEALER per peer we dialed. The
link *data* sockets belong to user threads: the data ROUTER that peers' data connections arrive on
(read by ``recv``) and one data DEALER per up link (written by ``send``). The engine creates them,
publishes them copy-on-write (``link_out``), and closes a link's DEALER only under the send lock
after the Routes that named it were replaced.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import socket
import threading
import time
import uuid
from types import MappingProxyType
from typing import Any, Callable, Iterator, NamedTuple

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import netinfo, punchlink, sockets, wire
from .client_core import ALT_NONCE, ClientCore, SessionState
from .config import ClientConfig
from .errors import ConfigError
from .ids import new_token
from .links import Close, Dial, LinkCore, OpenData, PunchWanted, Reply, SendLink
from .reflector import ALT_PORT_OFFSET
from .routing import Routes
from .security import claim_refusal, load_security, peer_id
from .sockets import recv_frames
from .wire import DropReason

log = logging.getLogger("zbus.client")

BATCH = 256
ADDRESS_CHECK_S = 5.0  # how often the interfaces are re-read to report address changes
SEND_SLICE_MS = 200  # a blocked send wakes this often to notice a lost server or close()
MAX_IDLE_MS = 1000

_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
# Security on: a server that refuses our key (AUTH), or whose key is not the one we trust for it.
_HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def _behind_nat(net: wire.NetState) -> bool:
    """A server saw us at an address we do not have."""
    return bool(net.public) and not ({p.rpartition(":")[0] for p in net.public} & set(net.private))


class DataSockets(NamedTuple):
    """A client's two data connections to one server. Created here, used only by user threads."""

    out: zmq.Socket  # client -> server Data (routing id = data_out)
    inn: zmq.Socket  # server -> client Data (routing id = data_in)


class Engine:
    def __init__(self, client_id: str, config: ClientConfig, data_in: bytes, data_out: bytes,
                 tx_lock: threading.Lock | None = None) -> None:
        self.client_id = client_id
        self.config = config
        self.tx_lock = tx_lock or threading.Lock()  # held by whoever writes on data sockets
        self._data_ids = (data_in, data_out)
        # Security (docs/security.md): None when off. On: every socket below is CURVE, servers and
        # peers are dialed with the key the trust list binds to their Id.
        self.security = load_security(config.key_file, config.trust_dir, "client")
        self._link_domain = f"zbus-links-{client_id}"
        self._unkeyed: set[tuple[str | None, str]] = set()  # destinations we had no trusted key for (logged)
        ctx = sockets.context()
        # The link ROUTER (engine thread) at `listen`, and the link data ROUTER (user threads' recv)
        # on the same interface: peers' data connections arrive there, routing id = their token.
        self._link_router = sockets.tune(ctx.socket(zmq.ROUTER), max_frame=config.max_frame)
        self.link_in = sockets.tune(ctx.socket(zmq.ROUTER), max_frame=config.max_frame, heartbeat=False)
        if self.security is not None:  # peers' keys checked by ZAP; each connection carries the peer's Id
            self.security.serve(self._link_router, self._link_domain)
            self.security.serve(self.link_in, self._link_domain)
        try:
            self._link_router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self._link_router.bind(config.listen)
            self.listen_endpoint = self._link_router.getsockopt_string(zmq.LAST_ENDPOINT)
            host = self.listen_endpoint.removeprefix("tcp://").rpartition(":")[0]
            self.link_in.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self.link_in.bind(f"tcp://{host}:0")
        except zmq.ZMQError as exc:
            self._link_router.close(linger=0)
            self.link_in.close(linger=0)
            raise ConfigError(f"client.listen: cannot bind {config.listen}: {exc}; "
                              "expected a free tcp://ip:port of this host (port 0: any free port)") from None
        # One entry per server session, same index; replaced (never mutated) when a server is learnt.
        self.data: tuple[DataSockets, ...] = tuple(
            self._open_data(ep, config.server_ids.get(ep)) for ep in config.servers)
        data_port = int(self.link_in.getsockopt_string(zmq.LAST_ENDPOINT).rpartition(":")[2])
        self.links = LinkCore(client_id, random.Random(), config.max_links, data_port, prelink=config.prelink)
        self.links.can_punch = bool(config.servers) and config.punch
        self.link_out: dict[str, zmq.Socket] = {}  # peer -> data DEALER (replaced, never mutated)
        self.tokens: dict[bytes, tuple[str, str]] = {}  # data token on link_in -> (peer Id, via) (replaced)
        # Punched links (zbus.punchlink): the punch service thread, started when we are behind a NAT
        # (to be invited) or want a punch; its events arrive in a deque, with a byte on a socket pair
        # (which also wakes the loop for upkeep_soon).
        self._punch: punchlink.PunchService | None = None
        self._punch_events: collections.deque[tuple] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)  # (a full pair already holds a wake-up)
        self._bridges: dict[str, punchlink.ProcessBridge] = {}  # peer -> the bridge our LinkCore knows
        self._upkeep_soon = False  # a receiving thread asked for the delivery upkeep (acks) now
        self.wakeups = 0  # turns of the loop (it should sleep between timers and events: tests watch this)
        self.acked: dict[str, int] = {}  # destination -> highest Ack heard (written by any thread)
        self.ack_changed = threading.Condition()  # notified when ``acked`` moves
        self.on_ack: Callable[[], None] | None = None  # also called when ``acked`` moves (AsyncClient)
        self.wanted: list[str] = []  # destinations the user sent to by relay (appended by user threads)
        self._wanted_seen = 0
        self._link_ctl: dict[str, zmq.Socket] = {}  # peer -> control DEALER of a link we dialed
        self._graveyard: list[zmq.Socket] = []  # link data DEALERs to close under the send lock
        self._max_links_request: int | None = None
        self._pending_link_actions: list = []  # from link control messages, applied in _run_links
        self._planned_for: Routes | None = None  # the Routes the last link plan looked at
        self._next_plan = 0.0
        # The client's delivery upkeep (acks, retransmissions), run on this thread; returns when
        # it wants to run next (None: when something else wakes the loop).
        self.on_tick: Callable[[float], float | None] = lambda now: None
        self._dealers: list[zmq.Socket] = []  # control connections by server index (set by the engine thread)
        net = wire.NetState(private=netinfo.private_addresses(), listen=self.listen_endpoint)
        self.core = ClientCore(client_id, config.name, net, list(config.servers), uuid.uuid4().hex,
                               data_in, data_out)
        self.routes: Routes = self.core.routes()
        self.changed = threading.Condition()
        self.dropped: dict[str, int] = {}
        self.control_msgs: dict[str, int] = {}  # received, by message type (read by status())
        self.control_bytes = 0
        self.ctl_endpoint = f"inproc://zbus-ctl-{uuid.uuid4().hex}"
        self._ctl = sockets.context().socket(zmq.PAIR)
        self._ctl.bind(self.ctl_endpoint)  # bound here so the user side can connect before start()
        self._thread = threading.Thread(target=self._run, name=f"zbus-engine-{client_id[:10]}", daemon=True)
        self._started = False

    def _open_data(self, endpoint: str, server_id: str | None = None) -> DataSockets:
        ctx = sockets.context()
        data_in, data_out = self._data_ids
        out = sockets.tune(ctx.socket(zmq.DEALER), max_frame=self.config.max_frame, heartbeat=False)
        out.setsockopt(zmq.ROUTING_ID, data_out)
        out.setsockopt(zmq.IMMEDIATE, 1)
        out.setsockopt(zmq.SNDTIMEO, SEND_SLICE_MS)
        inn = sockets.tune(ctx.socket(zmq.DEALER), max_frame=self.config.max_frame, heartbeat=False)
        inn.setsockopt(zmq.ROUTING_ID, data_in)
        if self._secure(out, server_id, endpoint) and self._secure(inn, server_id, endpoint):
            out.connect(endpoint)
            inn.connect(endpoint)
        return DataSockets(out, inn)

    def _secure(self, sock: zmq.Socket, peer: str | None, endpoint: str) -> bool:
        """Security on: make ``sock`` a CURVE client of ``peer``'s trusted key. False (do not connect:
        nothing unverified is dialed) when no trusted key is bound to ``peer``. Security off: True."""
        if self.security is None or self.security.dial(sock, peer):
            return True
        if (peer, endpoint) not in self._unkeyed:  # once per destination: links retry, servers have 3 sockets
            self._unkeyed.add((peer, endpoint))
            log.warning("client %s: not connecting to %s: %s", self.client_id, endpoint,
                        f"no trusted key for {peer}" if peer else "its Id is unknown (expected S-…@tcp://…)")
        return False

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def stop(self, ctl: zmq.Socket) -> None:
        """Stop the thread (``ctl`` is the user side's PAIR) or, if it never ran, free its socket."""
        if self._started:
            ctl.send(b"stop")
            self._thread.join()
        else:
            self._ctl.close(linger=0)
            self._link_router.close(linger=0)
            self._wake_r.close()
            self._wake_w.close()

    def close_link_data(self) -> None:
        """After stop(), with the user's locks held: close the user-side link sockets."""
        for sock in [self.link_in, *self.link_out.values(), *self._graveyard]:
            sock.close(linger=0)
        self.link_out = {}
        self._graveyard.clear()

    def wait_for(self, predicate: Callable[[Routes], bool], timeout: float) -> bool:
        """Block until ``predicate(routes)`` holds or ``timeout`` passes (for user threads)."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.routes), timeout)

    def _publish(self) -> None:
        if self.core.changed or self.links.changed:
            links_changed = self.links.changed
            self.links.changed = False
            with self.changed:
                routes = self.core.routes()
                if links_changed:
                    self.tokens = self.links.tokens()
                    routes = dataclasses.replace(routes, links=MappingProxyType(self.links.up_links()))
                else:
                    routes = dataclasses.replace(routes, links=self.routes.links)
                self.routes = routes
                self.changed.notify_all()
        if self._graveyard and self.tx_lock.acquire(blocking=False):
            try:  # no user thread can hold these sockets now: the Routes naming them are gone
                for sock in self._graveyard:
                    sock.close(linger=0)
                self._graveyard.clear()
            finally:
                self.tx_lock.release()

    def set_max_links(self, max_links: int) -> None:
        """Change ``max_links`` at run time (0 closes every link); applied by the engine thread."""
        self._max_links_request = max_links

    def ack_via_link(self, peer: str, header: bytes) -> bool:
        """Engine thread: send a delivery Ack to ``peer`` on a link's control connection, if any."""
        dealer = self._link_ctl.get(peer)
        link = self.links.out.get(peer)
        try:
            if dealer is not None and link is not None and link.state == "up":
                dealer.send(header, zmq.NOBLOCK)
                return True
            conn = self.links.incoming_conn(peer)
            if conn is not None:
                self._link_router.send_multipart([conn, header], zmq.NOBLOCK)
                return True
        except zmq.ZMQError:
            pass
        return False

    def send_control(self, index: int, header: bytes) -> bool:
        """Engine thread: ``header`` to the server at ``index`` on its control connection, if it is up."""
        if index >= len(self._dealers) or index not in self.routes.registered:
            return False
        try:
            self._dealers[index].send(header, zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def _note_ack(self, peer: str, ack: wire.Ack) -> None:
        if ack.upto > self.acked.get(peer, 0):
            self.acked[peer] = ack.upto
            with self.ack_changed:  # wakes send(..., ack=True)
                self.ack_changed.notify_all()
            hook = self.on_ack
            if hook is not None:
                hook()

    def _drop(self, reason: DropReason) -> None:
        self.dropped[reason.value] = self.dropped.get(reason.value, 0) + 1

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        dealers: list[zmq.Socket] = []
        self._dealers = dealers  # (the engine thread's own: send_control)
        monitors: list[zmq.Socket] = []
        try:
            for endpoint in self.config.servers:
                self._open_control(endpoint, dealers, monitors, self.config.server_ids.get(endpoint))
            self._loop(dealers, monitors)
        except Exception:
            log.exception("client engine %s failed", self.client_id)
        finally:
            for dealer in dealers:
                dealer.disable_monitor()
                dealer.close(linger=0)
            for sock in [*monitors, self._ctl, self._link_router, *self._link_ctl.values()]:
                sock.close(linger=0)
            if self.security is not None:
                self.security.release(sockets.context(), self._link_domain)
            self._link_ctl.clear()
            if self._punch is not None:
                self._punch.stop()
            self._wake_r.close()
            self._wake_w.close()
            with self.changed:
                self.routes = Routes(endpoints=self.routes.endpoints)
                self.changed.notify_all()

    def _open_control(self, endpoint: str, dealers: list[zmq.Socket], monitors: list[zmq.Socket],
                      server_id: str | None = None) -> None:
        dealer = sockets.tune(sockets.context().socket(zmq.DEALER), max_frame=self.config.max_frame)
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        secure = self._secure(dealer, server_id, endpoint)
        events = _MONITOR_EVENTS | (_HANDSHAKE_FAILED if self.security is not None else 0)
        monitors.append(dealer.get_monitor_socket(events))
        if secure:
            dealer.connect(endpoint)
        dealers.append(dealer)

    def _connect_learnt(self, poller: zmq.Poller, dealers: list[zmq.Socket], monitors: list[zmq.Socket]) -> None:
        """Connect to servers the server tables told us about (data sockets first)."""
        added = self.core.take_added()
        if not added:
            return
        endpoints = [self.core.sessions[index].endpoint for index in added]
        ids = [self.core.sessions[index].server_id for index in added]
        self.data = self.data + tuple(self._open_data(ep, server) for ep, server in zip(endpoints, ids))
        for endpoint, server in zip(endpoints, ids):
            self._open_control(endpoint, dealers, monitors, server)
            poller.register(dealers[-1], zmq.POLLIN)
            poller.register(monitors[-1], zmq.POLLIN)
        log.info("client %s learnt servers %s", self.client_id, ", ".join(endpoints))

    def _loop(self, dealers: list[zmq.Socket], monitors: list[zmq.Socket]) -> None:
        poller = zmq.Poller()
        for sock in (self._ctl, *dealers, *monitors, self._link_router, self._wake_r):
            poller.register(sock, zmq.POLLIN)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # one socket: see netcheck.py
        udp.bind(("0.0.0.0", 0))
        udp.setblocking(False)
        poller.register(udp, zmq.POLLIN)
        next_address_check = time.monotonic() + ADDRESS_CHECK_S
        try:
            self._loop_with(poller, dealers, monitors, udp, next_address_check)
        finally:
            udp.close()

    def _loop_with(self, poller: zmq.Poller, dealers: list[zmq.Socket], monitors: list[zmq.Socket],
                   udp: socket.socket, next_address_check: float) -> None:
        core = self.core
        upkeep_at: float | None = 0.0
        while True:
            self.wakeups += 1
            now = time.monotonic()
            deadlines = [t for t in (core.next_deadline(), self.links.next_deadline(), upkeep_at) if t is not None]
            deadline = min(deadlines) if deadlines else None
            timeout = MAX_IDLE_MS if deadline is None else int((deadline - now) * 1000) + 1
            events = dict(poller.poll(max(0, min(timeout, MAX_IDLE_MS))))
            now = time.monotonic()
            if self._ctl in events and self._ctl.recv() == b"stop":
                return  # (else a poke: the user sent to a new peer by relay; see _run_links)
            if self._link_router in events:
                self._drain_link_router(now)
            for peer, dealer in list(self._link_ctl.items()):
                if dealer in events:
                    self._drain_link(peer, dealer, now)
            for index, monitor in enumerate(monitors):
                if monitor in events:
                    self._on_monitor(monitor, index, dealers, now)
            for index, dealer in enumerate(dealers):
                if dealer in events:
                    self._drain_server(dealers, index, now)
            if udp.fileno() in events or udp in events:
                self._on_udp(udp, dealers, now)
            if self._wake_r.fileno() in events or self._wake_r in events:
                self._on_punch_events(now)
            self._connect_learnt(poller, dealers, monitors)
            for index, header in core.tick(now):
                self._send_control(dealers[index], header)
            for index, nonce in core.probes(now):
                self._probe(udp, index, nonce)
            if now >= next_address_check:
                next_address_check = now + ADDRESS_CHECK_S
                for index, header in core.set_private(netinfo.private_addresses()):
                    self._send_control(dealers[index], header)
            self._publish()
            self._run_links(poller, now)
            self._publish()
            if upkeep_at is None or now >= upkeep_at or self._upkeep_soon:
                self._upkeep_soon = False
                upkeep_at = self.on_tick(now)

    # -- direct links -----------------------------------------------------------------------
    def _run_links(self, poller: zmq.Poller, now: float) -> None:
        links = self.links
        if self._max_links_request is not None:
            links.set_max_links(self._max_links_request)
            self._max_links_request = None
            self._next_plan = now
        wanted = self.wanted
        if len(wanted) > self._wanted_seen:
            links.want(wanted[self._wanted_seen:])
            self._wanted_seen = len(wanted)
            self._next_plan = now
        actions, self._pending_link_actions = self._pending_link_actions, []
        actions += links.tick(now)
        if actions or self.routes is not self._planned_for or now >= self._next_plan:
            # (re)consider which links to keep: on any change, and each second for retries
            self._planned_for, self._next_plan = self.routes, now + 1.0
            actions += links.plan(self.routes.clients, now, self.core.net)
        if self._punch is None and links.can_punch and _behind_nat(self.core.net) \
                and any(s.state is SessionState.REGISTERED for s in self.core.sessions):
            # As soon as we know we are behind a NAT (so that peers can invite us), and once the
            # rendezvous server's Welcome gave us the key our UDP requests must carry.
            self._start_punch()
        self._apply_links(poller, actions)

    def _apply_links(self, poller: zmq.Poller, actions: list) -> None:
        ctx = sockets.context()
        for action in actions:
            if action.__class__ is SendLink:
                dealer = self._link_ctl.get(action.peer)
                if dealer is not None:
                    self._send_control(dealer, action.header)
            elif action.__class__ is Reply:
                try:
                    self._link_router.send_multipart([action.conn, action.header], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # that connection is gone
            elif action.__class__ is Dial:
                dealer = sockets.tune(ctx.socket(zmq.DEALER), max_frame=self.config.max_frame)
                # A fixed routing id: when this connection drops and libzmq reconnects, the listener's
                # ROUTER (ROUTER_HANDOVER) keeps the same connection id, so the acks it sends back on
                # it (links.incoming_conn) still reach us. A generated id changed on every reconnect,
                # and the acks went to the old one, silently.
                dealer.setsockopt(zmq.ROUTING_ID, new_token())
                if self._secure(dealer, action.peer, action.address):  # else the link times out: relay
                    dealer.connect(action.address)
                    dealer.send(action.hello, zmq.NOBLOCK)  # queued until connected
                self._link_ctl[action.peer] = dealer
                poller.register(dealer, zmq.POLLIN)
            elif action.__class__ is OpenData:
                out = sockets.tune(ctx.socket(zmq.DEALER), max_frame=self.config.max_frame, heartbeat=False)
                out.setsockopt(zmq.ROUTING_ID, action.token)
                out.setsockopt(zmq.IMMEDIATE, 1)
                out.setsockopt(zmq.SNDTIMEO, SEND_SLICE_MS)
                if self._secure(out, action.peer, action.endpoint):
                    out.connect(action.endpoint)
                self.link_out = {**self.link_out, action.peer: out}
                log.info("client %s: link to %s up (%s)", self.client_id, action.peer, action.endpoint)
            elif action.__class__ is PunchWanted:
                self._start_punch().request(action.peer, self.routes.holders.get(action.peer, ()))
            elif action.__class__ is Close:
                if action.pipe:
                    bridge = self._bridges.pop(action.peer, None)
                    if bridge is not None:
                        bridge.close()
                dealer = self._link_ctl.pop(action.peer, None)
                if dealer is not None:
                    if action.bye is not None:
                        self._send_control(dealer, action.bye)
                    poller.unregister(dealer)
                    dealer.close(linger=100 if action.bye is not None else 0)
                out = self.link_out.get(action.peer)
                if out is not None:
                    self.link_out = {p: s for p, s in self.link_out.items() if p != action.peer}
                    self._graveyard.append(out)

    # -- punched links ----------------------------------------------------------------------------
    def _start_punch(self) -> punchlink.PunchService:
        if self._punch is None:
            data_endpoint = self.link_in.getsockopt_string(zmq.LAST_ENDPOINT)
            self._punch = punchlink.PunchService(
                self.client_id, self._rendezvous_servers, self.listen_endpoint,
                data_endpoint, lambda: punchlink.hard_from_public(self.core.net.public),
                self._post_punch_event, key=lambda index: self.core.sessions[index].rendezvous_key).start()
        return self._punch

    def _rendezvous_servers(self) -> dict[int, tuple[str, int]]:
        """(The punch thread's view) every server we are registered with: index -> its UDP rendezvous."""
        return {s.index: punchlink.server_udp(s.endpoint) for s in list(self.core.sessions)
                if s.state is SessionState.REGISTERED}

    def upkeep_soon(self) -> None:
        """Any thread: run the delivery upkeep (``on_tick``: acks) at the next turn of the loop."""
        self._upkeep_soon = True
        self._wake()

    def _post_punch_event(self, event: tuple) -> None:
        """Punch service / bridge threads: hand an event to the engine thread and wake it."""
        self._punch_events.append(event)
        self._wake()

    def _wake(self) -> None:
        """Any thread: make the engine's poll return (a byte on the wake-up pair)."""
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # the pair is full (a wake-up is already there) or the engine is gone

    def _on_punch_events(self, now: float) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        links = self.links
        while self._punch_events:
            event = self._punch_events.popleft()
            kind, peer = event[0], event[1]
            if kind == "up":
                bridge = event[2]
                old = self._bridges.get(peer)
                self._bridges[peer] = bridge
                self._pending_link_actions += links.pipe_up(peer, bridge.ctl_endpoint, bridge.data_endpoint,
                                                            event[3], now)
                if old is not None and old is not bridge:
                    old.close()
            elif kind == "down":
                if self._bridges.get(peer) is event[2]:
                    del self._bridges[peer]
                    self._pending_link_actions += links.pipe_down(peer, now)
            elif kind == "failed":
                links.punch_failed(peer, now)
        self._next_plan = now

    def _messages(self, sock: zmq.Socket, frame_count: int) -> Iterator[tuple[list[zmq.Frame], Any]]:
        """Up to BATCH waiting messages of ``frame_count`` frames (the last one a header), decoded;
        anything else is dropped and counted."""
        for _ in range(BATCH):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return
            if len(frames) != frame_count:
                oversized = wire.oversized(frames, self.config.max_frame)
                self._drop(DropReason.OVERSIZED if oversized else DropReason.MALFORMED)
                continue
            try:
                header = wire.decode(frames[-1].buffer)
            except wire.WireError as exc:
                self._drop(exc.reason)
                continue
            yield frames, header

    def _drain_link_router(self, now: float) -> None:
        router, links = self._link_router, self.links
        for frames, header in self._messages(router, 2):
            conn = frames[0].bytes
            if header.__class__ is wire.Ack:
                link = links.incoming.get(conn)
                if link is not None:
                    link.last_seen = now
                    self._note_ack(link.peer, header)
                continue  # (no upkeep for an ack: ours would answer theirs, theirs ours, without end)
            if header.__class__ is not wire.LinkPing:
                self._upkeep_soon = True  # a link coming or going (not its pings, twice a second a link)
            if self.security is not None and header.__class__ is wire.LinkHello:
                why = claim_refusal(header.id, peer_id(frames[1]))  # the Id ZAP bound to the dialer's key
                if why is not None:
                    log.warning("client %s refused a direct link: %s", self.client_id, why)
                    refusal = wire.encode(wire.Error("not-your-id", f"{self.client_id} refused the link: {why}"))
                    try:
                        router.send_multipart([conn, refusal], zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
                    continue
            for action in links.on_listener(conn, header, self.routes.clients, now):
                try:
                    router.send_multipart([action.conn, action.header], zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass

    def _drain_link(self, peer: str, dealer: zmq.Socket, now: float) -> None:
        for _, header in self._messages(dealer, 1):
            if header.__class__ is wire.Ack:
                self._note_ack(peer, header)
                continue
            self._pending_link_actions += self.links.on_link_message(peer, header, now)

    def _probe(self, udp: socket.socket, index: int, nonce: bytes) -> None:
        """Ask server ``index``'s UDP reflector (same host and port number as its endpoint), and its
        alternate port (a different answer: our NAT is symmetric)."""
        host, _, port = self.core.sessions[index].endpoint.removeprefix("tcp://").rpartition(":")
        try:
            udp.sendto(wire.encode(wire.Probe(nonce)), (host.strip("[]"), int(port)))
            udp.sendto(wire.encode(wire.Probe(nonce + ALT_NONCE)), (host.strip("[]"), int(port) + ALT_PORT_OFFSET))
        except OSError as exc:  # unresolvable or unreachable: the net state just lacks this entry
            log.debug("UDP probe to %s failed: %s", host, exc)

    def _on_udp(self, udp: socket.socket, dealers: list[zmq.Socket], now: float) -> None:
        for _ in range(BATCH):
            try:
                datagram, _ = udp.recvfrom(2048)
            except (BlockingIOError, OSError):
                return
            try:
                answer = wire.decode(datagram)
            except wire.WireError as exc:
                self._drop(exc.reason)
                continue
            if isinstance(answer, wire.Observed):
                for index, header in self.core.observed(answer.nonce, answer.ip, answer.port, now):
                    self._send_control(dealers[index], header)

    def _on_monitor(self, monitor: zmq.Socket, index: int, dealers: list[zmq.Socket], now: float) -> None:
        for _ in range(BATCH):
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                for i, header in self.core.transport_up(index, now):
                    self._send_control(dealers[i], header)
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.core.transport_down(index)
            elif event["event"] & _HANDSHAKE_FAILED:
                session = self.core.sessions[index]
                why = (f"server {session.endpoint} refused our key ({self.client_id} is not in its trust list)"
                       if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH else
                       f"CURVE handshake with {session.endpoint} failed (its key is not the one trusted for "
                       f"{session.server_id or self.config.server_ids.get(session.endpoint)}, or the connection "
                       f"broke mid-handshake; retrying)")
                if session.refusal is None or session.refusal.message != why:
                    log.warning("client %s: %s", self.client_id, why)
                self.core.transport_refused(index, why)

    def _drain_server(self, dealers: list[zmq.Socket], index: int, now: float) -> None:
        for frames, header in self._messages(dealers[index], 1):
            kind = header.__class__.__name__
            self.control_msgs[kind] = self.control_msgs.get(kind, 0) + 1
            self.control_bytes += len(frames[0])
            if header.__class__ is wire.RelayAcks:  # delivery acks through this server (stamped by it)
                for peer, upto in header.acks[:wire.RELAY_ACKS_MAX]:
                    self._note_ack(peer, wire.Ack(upto))
                continue
            for i, out in self.core.receive(index, header, now):
                self._send_control(dealers[i], out)

    @staticmethod
    def _send_control(dealer: zmq.Socket, header: bytes) -> None:
        try:
            dealer.send(header, zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected (yet) or full: Hello is retried on a timer, lists resync on gaps
