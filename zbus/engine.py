"""The client engine: one owned thread for a client's control plane.

It owns one control DEALER per server (``IMMEDIATE``, so nothing queues towards a dead server) and a
monitor socket on each, feeds connection events and control headers to the pure
:class:`~zbus.client_core.ClientCore` (Hello, Heartbeat, client lists), and publishes the immutable
:class:`~zbus.routing.Routes` snapshot that user threads choose paths from. User data never passes
through this thread: the user's threads own the data sockets (see :mod:`zbus.client`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from typing import Callable, NamedTuple

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import netinfo, sockets, wire
from .sockets import recv_frames
from .client_core import ClientCore
from .config import ClientConfig
from .routing import Routes
from .wire import DropReason

log = logging.getLogger("zbus.client")

BATCH = 256
ADDRESS_CHECK_S = 5.0  # how often the interfaces are re-read to report address changes
SEND_SLICE_MS = 200  # a blocked send wakes this often to notice a lost server or close()
MAX_IDLE_MS = 1000

_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


class DataSockets(NamedTuple):
    """A client's two data connections to one server. Created here, used only by user threads."""

    out: zmq.Socket  # client -> server Data (routing id = data_out)
    inn: zmq.Socket  # server -> client Data (routing id = data_in)


class Engine:
    def __init__(self, client_id: str, config: ClientConfig, data_in: bytes, data_out: bytes) -> None:
        self.client_id = client_id
        self.config = config
        self._data_ids = (data_in, data_out)
        # One entry per server session, same index; replaced (never mutated) when a server is learnt.
        self.data: tuple[DataSockets, ...] = tuple(self._open_data(ep) for ep in config.servers)
        net = wire.NetState(private=netinfo.private_addresses())
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

    def _open_data(self, endpoint: str) -> DataSockets:
        ctx = sockets.context()
        data_in, data_out = self._data_ids
        out = sockets.tune(ctx.socket(zmq.DEALER), max_frame=self.config.max_frame)
        out.setsockopt(zmq.ROUTING_ID, data_out)
        out.setsockopt(zmq.IMMEDIATE, 1)
        out.setsockopt(zmq.SNDTIMEO, SEND_SLICE_MS)
        out.connect(endpoint)
        inn = sockets.tune(ctx.socket(zmq.DEALER), max_frame=self.config.max_frame)
        inn.setsockopt(zmq.ROUTING_ID, data_in)
        inn.connect(endpoint)
        return DataSockets(out, inn)

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

    def wait_for(self, predicate: Callable[[Routes], bool], timeout: float) -> bool:
        """Block until ``predicate(routes)`` holds or ``timeout`` passes (for user threads)."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.routes), timeout)

    def _publish(self) -> None:
        if self.core.changed:
            with self.changed:
                self.routes = self.core.routes()
                self.changed.notify_all()

    def _drop(self, reason: DropReason) -> None:
        self.dropped[reason.value] = self.dropped.get(reason.value, 0) + 1

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        ctx = sockets.context()
        dealers: list[zmq.Socket] = []
        monitors: list[zmq.Socket] = []
        try:
            for endpoint in self.config.servers:
                self._open_control(endpoint, dealers, monitors)
            self._loop(dealers, monitors)
        except Exception:
            log.exception("client engine %s failed", self.client_id)
        finally:
            for dealer in dealers:
                dealer.disable_monitor()
                dealer.close(linger=0)
            for sock in [*monitors, self._ctl]:
                sock.close(linger=0)
            with self.changed:
                self.routes = Routes(endpoints=self.routes.endpoints)
                self.changed.notify_all()

    def _open_control(self, endpoint: str, dealers: list[zmq.Socket], monitors: list[zmq.Socket]) -> None:
        dealer = sockets.tune(sockets.context().socket(zmq.DEALER), max_frame=self.config.max_frame)
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        monitors.append(dealer.get_monitor_socket(_MONITOR_EVENTS))
        dealer.connect(endpoint)
        dealers.append(dealer)

    def _connect_learnt(self, poller: zmq.Poller, dealers: list[zmq.Socket], monitors: list[zmq.Socket]) -> None:
        """Connect to servers the server tables told us about (data sockets first)."""
        added = self.core.take_added()
        if not added:
            return
        endpoints = [self.core.sessions[index].endpoint for index in added]
        self.data = self.data + tuple(self._open_data(ep) for ep in endpoints)
        for endpoint in endpoints:
            self._open_control(endpoint, dealers, monitors)
            poller.register(dealers[-1], zmq.POLLIN)
            poller.register(monitors[-1], zmq.POLLIN)
        log.info("client %s learnt servers %s", self.client_id, ", ".join(endpoints))

    def _loop(self, dealers: list[zmq.Socket], monitors: list[zmq.Socket]) -> None:
        core = self.core
        poller = zmq.Poller()
        for sock in (self._ctl, *dealers, *monitors):
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
        while True:
            now = time.monotonic()
            deadline = core.next_deadline()
            timeout = MAX_IDLE_MS if deadline is None else int((deadline - now) * 1000) + 1
            events = dict(poller.poll(max(0, min(timeout, MAX_IDLE_MS))))
            now = time.monotonic()
            if self._ctl in events:
                return
            for index, monitor in enumerate(monitors):
                if monitor in events:
                    self._on_monitor(monitor, index, dealers, now)
            for index, dealer in enumerate(dealers):
                if dealer in events:
                    self._drain_server(dealers, index, now)
            if udp.fileno() in events or udp in events:
                self._on_udp(udp, dealers)
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

    def _probe(self, udp: socket.socket, index: int, nonce: bytes) -> None:
        """Ask server ``index``'s UDP reflector (same host and port number as its endpoint)."""
        host, _, port = self.core.sessions[index].endpoint.removeprefix("tcp://").rpartition(":")
        try:
            udp.sendto(wire.encode(wire.Probe(nonce)), (host.strip("[]"), int(port)))
        except OSError as exc:  # unresolvable or unreachable: the net state just lacks this entry
            log.debug("UDP probe to %s failed: %s", host, exc)

    def _on_udp(self, udp: socket.socket, dealers: list[zmq.Socket]) -> None:
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
                for index, header in self.core.observed(answer.nonce, answer.ip, answer.port):
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

    def _drain_server(self, dealers: list[zmq.Socket], index: int, now: float) -> None:
        max_frame = self.config.max_frame
        for _ in range(BATCH):
            try:
                frames = recv_frames(dealers[index])
            except zmq.Again:
                return
            if len(frames) != 1:
                self._drop(DropReason.OVERSIZED if wire.oversized(frames, max_frame) else DropReason.MALFORMED)
                continue
            try:
                header = wire.decode(frames[0].buffer)
            except wire.WireError as exc:
                self._drop(exc.reason)
                continue
            kind = header.__class__.__name__
            self.control_msgs[kind] = self.control_msgs.get(kind, 0) + 1
            self.control_bytes += len(frames[0])
            for i, out in self.core.receive(index, header, now):
                self._send_control(dealers[i], out)

    @staticmethod
    def _send_control(dealer: zmq.Socket, header: bytes) -> None:
        try:
            dealer.send(header, zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected (yet) or full: Hello is retried on a timer, lists resync on gaps
