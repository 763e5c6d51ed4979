"""The client engine: one owned thread that does all of a client's socket I/O.

User threads talk to it over two inproc sockets (never Python queues):

* ``tx``: user PUSH -> engine PULL, frames ``[server index (2 bytes), header, payload]``;
* ``rx``: engine PUSH -> user PULL, frames ``[src id, via, payload]``;

plus a ``ctl`` PAIR to stop it. The engine owns one DEALER per server (``IMMEDIATE`` so nothing
queues towards a dead server) and a monitor socket on each, and feeds connection events and control
headers to the pure :class:`~zbus.client_core.ClientCore`. The path is chosen in the user's thread
from the immutable :class:`~zbus.routing.Routes` snapshot the engine publishes, so ``send`` can raise
``Unreachable`` / ``Disconnected`` at once.

Backpressure: when a server pipe is full the engine holds the message and stops reading ``tx`` (the
user's ``send`` then blocks on the inproc high-water mark); when the user is not reading, the engine
stops reading the servers, and TCP pushes back on the senders.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import netinfo, sockets, wire
from .client_core import ClientCore, SessionState
from .config import ClientConfig
from .routing import Routes
from .wire import DropReason

log = logging.getLogger("zbus.client")

BATCH = 512
STALL_CHECK_MS = 100
MAX_IDLE_MS = 1000
CLOSE_LINGER_MS = 1000  # how long close() lets already-sent messages drain to the servers
VIA_RELAY = b"relay"

_MONITOR_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


def index_frame(index: int) -> bytes:
    return index.to_bytes(2, "big")


class Engine:
    def __init__(self, client_id: str, config: ClientConfig) -> None:
        self.client_id = client_id
        self.config = config
        net = wire.NetState(private=netinfo.private_addresses())
        self.core = ClientCore(client_id, config.name, net, list(config.servers), uuid.uuid4().hex)
        self.routes: Routes = self.core.routes()
        self.changed = threading.Condition()
        self.dropped: dict[str, int] = {}
        tag = uuid.uuid4().hex
        self.tx_endpoint = f"inproc://zbus-tx-{tag}"
        self.rx_endpoint = f"inproc://zbus-rx-{tag}"
        self.ctl_endpoint = f"inproc://zbus-ctl-{tag}"
        ctx = sockets.context()
        # Bound here so user-side sockets can connect before the thread starts.
        self._tx = ctx.socket(zmq.PULL)
        self._tx.bind(self.tx_endpoint)
        self._rx = ctx.socket(zmq.PUSH)
        self._rx.bind(self.rx_endpoint)
        self._ctl = ctx.socket(zmq.PAIR)
        self._ctl.bind(self.ctl_endpoint)
        self._thread = threading.Thread(target=self._run, name=f"zbus-engine-{client_id[:10]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def close_unstarted(self) -> None:
        """Release the inproc sockets of an engine whose thread never ran."""
        for sock in (self._tx, self._rx, self._ctl):
            sock.close(linger=0)

    def _publish(self) -> None:
        if self.core.changed:
            with self.changed:
                self.routes = self.core.routes()
                self.changed.notify_all()

    def wait_for(self, predicate: Callable[[Routes], bool], timeout: float) -> bool:
        """Block until ``predicate(routes)`` holds or ``timeout`` passes (for user threads)."""
        with self.changed:
            return self.changed.wait_for(lambda: predicate(self.routes), timeout)

    def _drop(self, reason: DropReason) -> None:
        self.dropped[reason.value] = self.dropped.get(reason.value, 0) + 1

    # -- the thread -------------------------------------------------------------------------
    def _run(self) -> None:
        ctx = sockets.context()
        dealers: list[zmq.Socket] = []
        monitors: list[zmq.Socket] = []
        try:
            for endpoint in self.config.servers:
                dealer = sockets.tune(ctx.socket(zmq.DEALER), max_frame=self.config.max_frame)
                dealer.setsockopt(zmq.IMMEDIATE, 1)
                monitors.append(dealer.get_monitor_socket(_MONITOR_EVENTS))
                dealer.connect(endpoint)
                dealers.append(dealer)
            self._loop(dealers, monitors)
        except Exception:
            log.exception("client engine %s failed", self.client_id)
        finally:
            for dealer in dealers:
                dealer.disable_monitor()
                dealer.close(linger=CLOSE_LINGER_MS)
            for sock in [*monitors, self._tx, self._rx, self._ctl]:
                sock.close(linger=0)
            with self.changed:
                self.routes = Routes(endpoints=self.routes.endpoints)
                self.changed.notify_all()

    def _loop(self, dealers: list[zmq.Socket], monitors: list[zmq.Socket]) -> None:
        core = self.core
        poller = zmq.Poller()
        for sock in (self._ctl, *monitors):
            poller.register(sock, zmq.POLLIN)
        index_of_monitor = {m: i for i, m in enumerate(monitors)}
        stalled_tx: tuple | None = None  # (server index, frames) waiting for a full pipe
        stalled_rx: list | None = None  # frames waiting for the user to read
        armed = None
        while True:
            if armed != (stalled_tx is None, stalled_rx is None):
                armed = (stalled_tx is None, stalled_rx is None)
                self._arm(poller, dealers, stalled_tx, stalled_rx)
            now = time.monotonic()
            deadline = core.next_deadline()
            timeout = MAX_IDLE_MS if deadline is None else int((deadline - now) * 1000) + 1
            if stalled_tx is not None:
                timeout = min(timeout, STALL_CHECK_MS)  # its server may go away meanwhile
            events = dict(poller.poll(max(0, min(timeout, MAX_IDLE_MS))))
            now = time.monotonic()
            if self._ctl in events:
                self._flush_tx(dealers, stalled_tx)
                for index, header in core.goodbye():
                    self._send_control(dealers[index], header)
                return
            for monitor, index in index_of_monitor.items():
                if monitor in events:
                    self._on_monitor(monitor, index, dealers, now)
            if stalled_rx is not None and self._deliver(stalled_rx):
                stalled_rx = None
            if stalled_rx is None:
                for index, dealer in enumerate(dealers):
                    if events.get(dealer, 0) & zmq.POLLIN:
                        stalled_rx = self._drain_server(dealers, index, now)
                        if stalled_rx is not None:
                            break
            if stalled_tx is not None and self._forward(dealers, *stalled_tx):
                stalled_tx = None
            if stalled_tx is None and self._tx in events:
                stalled_tx = self._drain_user(dealers)
            for index, header in core.tick(now):
                self._send_control(dealers[index], header)
            self._publish()

    def _arm(self, poller: zmq.Poller, dealers: list[zmq.Socket], stalled_tx: tuple | None,
             stalled_rx: list | None) -> None:
        """Wait only for what can make progress: a stalled direction waits for POLLOUT."""
        poller.register(self._tx, 0 if stalled_tx is not None else zmq.POLLIN)
        poller.register(self._rx, zmq.POLLOUT if stalled_rx is not None else 0)
        for index, dealer in enumerate(dealers):
            flags = 0 if stalled_rx is not None else zmq.POLLIN
            if stalled_tx is not None and stalled_tx[0] == index:
                flags |= zmq.POLLOUT
            poller.register(dealer, flags)

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

    def _drain_server(self, dealers: list[zmq.Socket], index: int, now: float) -> list | None:
        core = self.core
        dealer = dealers[index]
        max_frame = self.config.max_frame
        for _ in range(BATCH):
            try:
                frames = dealer.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            if wire.oversized(frames, max_frame):
                self._drop(DropReason.OVERSIZED)
                continue
            try:
                header = wire.decode(frames[0].buffer)
            except wire.WireError as exc:
                self._drop(exc.reason)
                continue
            if type(header) is wire.Data:
                if len(frames) != 2:
                    self._drop(DropReason.MALFORMED)
                    continue
                delivery = [header.src.encode(), VIA_RELAY, frames[1]]
                if not self._deliver(delivery):
                    return delivery
                continue
            for i, out in core.receive(index, header, now):
                self._send_control(dealers[i], out)
        return None

    def _deliver(self, frames: list) -> bool:
        try:
            self._rx.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False

    def _drain_user(self, dealers: list[zmq.Socket]) -> list | None:
        for _ in range(BATCH):
            try:
                frames = self._tx.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return None
            index = int.from_bytes(frames[0].bytes, "big")
            if not self._forward(dealers, index, frames[1:]):
                return index, frames[1:]
        return None

    def _forward(self, dealers: list[zmq.Socket], index: int, frames: list) -> bool:
        """Send on to server ``index``; False means "pipe full, hold it and retry"."""
        try:
            dealers[index].send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if self.core.sessions[index].state is SessionState.REGISTERED:
                return False
            # IMMEDIATE: the server is gone, nothing would carry it; drop rather than block the user.
            self._drop(DropReason.UNROUTABLE)
        return True

    def _send_control(self, dealer: zmq.Socket, header: bytes) -> None:
        try:
            dealer.send(header, zmq.NOBLOCK)
        except zmq.Again:
            pass  # not connected (yet) or full: Hello is retried on a timer, lists resync on gaps

    def _flush_tx(self, dealers: list[zmq.Socket], stalled_tx: tuple | None) -> None:
        """On close: pass on what the user already handed us, waiting at most CLOSE_LINGER_MS."""
        deadline = time.monotonic() + CLOSE_LINGER_MS / 1000
        pending = [stalled_tx] if stalled_tx is not None else []
        while True:
            if not pending:
                try:
                    frames = self._tx.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    return
                pending.append((int.from_bytes(frames[0].bytes, "big"), frames[1:]))
            index, frames = pending[0]
            left_ms = int((deadline - time.monotonic()) * 1000)
            if self.core.sessions[index].state is SessionState.REGISTERED and left_ms > 0 \
                    and dealers[index].poll(left_ms, zmq.POLLOUT):
                dealers[index].send_multipart(frames, zmq.NOBLOCK, copy=False)
            else:
                self._drop(DropReason.UNROUTABLE)
            pending.pop()
