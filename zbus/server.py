"""The server driver: one ROUTER, a sync poll loop, and the pure :class:`~zbus.relay.ServerCore`.

The loop drains the socket in batches (``copy=False``; a payload frame is forwarded as received)
and only moves bytes between the socket and the core. Relay sends use ``ROUTER_MANDATORY``: a
destination whose pipe is full gets a per-destination queue of at most ``max_queue`` relayed
messages; past it that destination's messages are dropped and counted (``slow_receiver``: their
senders still hold them in their windows and repeat them), so one receiver that does not read
does not hold up the others. When all queues together pass ``max_pending`` messages or
``max_pending_bytes`` the server stops reading until they drain, which pushes back on every sender
through TCP: memory never grows without bound. Only registered clients get
such a queue: a reply to any other connection whose pipe is full is dropped and counted
(``congested``), so a peer that sends requests and never reads cannot stall the server.

Hostile input (docs/security.md): frames over ``max_frame`` and header frames over ``max_header``
are dropped before decoding; the core rate-limits control messages and bounds its tables; bad
frames are counted by reason and logged once per connection, at most ``LOG_BURST`` lines per
``LOG_EVERY_S`` seconds (a flood from many connections must not flood the log too).
"""

from __future__ import annotations

import collections
import errno
import logging
import threading
import time
from typing import Any

import zmq
import zmq.backend

from . import sockets, wire
from .cluster import RaftCluster
from .config import ServerConfig, load_server_config, parse_endpoint, server_limits
from .guard import RateLimiter
from .ids import new_server_id
from .reflector import Reflector
from .relay import SEQ_TAIL, ServerCore
from .security import claim_refusal, load_security, peer_id
from .wire import DropReason

log = logging.getLogger("zbus.server")

BATCH = 512  # messages handled per wake-up before housekeeping
STALLED_PEER_TIMEOUT_MS = 60_000  # ZMTP: a connection that sends nothing is dropped only after this
POLL_MS = 50  # idle poll; also bounds how long stop() takes
NOBLOCK = int(zmq.NOBLOCK)  # plain ints: pyzmq's IntFlag arithmetic costs more than the send
NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_SEND = zmq.backend.Socket.send  # pyzmq's Socket.send without its Python wrapper (small copied frames)
_RECV = zmq.backend.Socket.recv  # the same for receives: (socket, flags, copy)
RETRY_MS = 1  # poll while messages wait for a full pipe
SWEEP_S = 0.5  # how often silent clients are expired
ATTACH_GRACE_S = 5.0  # how long messages wait for a registered client's data connection to (re)appear (lossy links: SYN retries at 1 s, 3 s)
LOG_BURST = 10  # warnings about bad input logged at once...
LOG_EVERY_S = 10.0  # ...then one per this many seconds; the rest are counted and summarised
MAX_WARNED = 4096  # connections remembered as already warned about


def _size(payload: Any) -> int:
    """The bytes a queued message holds (a control message queued without a payload: none)."""
    return 0 if payload is None else len(payload)


class Server:
    """A zbus relay server. ``run()`` blocks; ``start()`` runs it in an owned thread."""

    def __init__(self, config: ServerConfig | None = None, **overrides: Any) -> None:
        self.config = config if config is not None else load_server_config(None, **overrides)
        # Security (docs/security.md): None when off; then nothing below costs anything per message.
        self.security = load_security(self.config.key_file, self.config.trust_dir, "server")
        self.id = self.security.id if self.security is not None else (self.config.id or new_server_id())
        self.name = self.config.name or self.id[:10]
        self._stopping = threading.Event()
        self._bound = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.endpoint = self.config.listen
        self.core: ServerCore | None = None
        self.cluster: RaftCluster | None = None
        self.reflector: Reflector | None = None
        self._pending: dict[bytes, collections.deque] = {}
        self._pending_count = 0
        self._pending_bytes = 0  # payload bytes in _pending
        self._warned: set[bytes] = set()
        self._log_budget = RateLimiter(1.0 / LOG_EVERY_S, LOG_BURST, max_keys=1)
        self._log_suppressed = 0
        self._unreachable_since: dict[bytes, float] = {}
        self.max_frame = self.config.max_frame
        self.max_header = self.config.max_header

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 5.0) -> "Server":
        self._thread = threading.Thread(target=self._run_captured, name=f"zbus-server-{self.name}", daemon=True)
        self._thread.start()
        if not self._bound.wait(timeout) or self._error is not None:
            self.stop()
            raise self._error or TimeoutError(f"server did not bind {self.config.listen} within {timeout}s")
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
            self._thread = None

    close = stop

    def __enter__(self) -> "Server":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run_captured(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # surfaced to start()
            self._error = exc
            self._bound.set()

    def run(self) -> None:
        """Bind and serve until :meth:`stop` is called."""
        # ZMTP heartbeats with a long timeout of our own: while intake is paused (max_pending) libzmq
        # reads no connection whose pipe is full, and a short timeout would cut exactly the senders we
        # push back on, losing what their pipes hold. But we keep pinging (with the usual TTL): without
        # our pings the 500-client fan-in test's clients lost their control connections during the join
        # storm and re-registered in a loop (measured; 2 of 2 runs fail without, 2 of 2 pass with).
        # Silent clients expire by client_timeout anyway.
        router = sockets.tune(sockets.context().socket(zmq.ROUTER), max_frame=self.config.max_frame,
                              heartbeat_timeout_ms=STALLED_PEER_TIMEOUT_MS)
        domain = f"zbus-server-{self.id}"
        try:
            if self.security is not None:  # CURVE: only trusted keys get in; each connection carries its Id
                self.security.serve(router, domain)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting data connection takes its id back
            router.bind(self.config.listen)
            self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            self.core = ServerCore(self.id, self.name, self.endpoint, self.config.client_timeout,
                                   server_limits(self.config))
            host, port = parse_endpoint(self.endpoint, "listen")
            self.reflector = Reflector(host, port, keys=self.core.rendezvous_keys.get).start()
            self.cluster = RaftCluster(self.id, self.name, self.endpoint, self.config, self.security)
            self.cluster.start()
            self._bound.set()
            log.info("server %s (%s) listening on %s", self.id, self.name, self.endpoint)
            self._serve(router)
        finally:
            if self.cluster is not None:
                self.cluster.stop()
            if self.reflector is not None:
                self.reflector.stop()
            router.close(linger=0)
            if self.security is not None:
                self.security.release(router.context, domain)

    # -- the loop ---------------------------------------------------------------------------
    def _serve(self, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        # Security on: handshakes that fail before ZAP (a plain-text peer, a peer expecting another key) are
        # only visible as monitor events; they are logged from the sweep, at most once per LOG_EVERY_S.
        monitor = None
        if self.security is not None:
            monitor = router.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL |
                                                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        try:
            self._serve_loop(router, poller, monitor)
        finally:
            if monitor is not None:
                router.disable_monitor()
                monitor.close(linger=0)

    def _serve_loop(self, router: zmq.Socket, poller: zmq.Poller, monitor: zmq.Socket | None) -> None:
        core = self.core
        assert core is not None
        failed_handshakes, next_handshake_log = 0, 0.0
        next_sweep = 0.0
        expired_at = 0.0
        paused_total = 0.0  # the core's clock stops while we are not reading, so no one expires
        drained = False  # the last retry moved queued messages out: retry again at once
        while not self._stopping.is_set():
            paused = self._pending_count >= self.config.max_pending or self._pending_bytes >= self.config.max_pending_bytes
            poll_started = time.monotonic()
            timeout = RETRY_MS if self._pending_count else POLL_MS
            due = core.next_flush()
            if due is not None:  # a held-back list delta
                timeout = min(timeout, max(0, int((due - (poll_started - paused_total)) * 1000) + 1))
            if paused:
                # Not reading. While the queues drain, go straight on; while they are stuck, wait
                # (a poller with nothing to poll for returns at once: that spun at 100 % CPU with the
                # clock running, and expired the clients whose heartbeats we were not reading).
                if not drained:
                    self._stopping.wait(timeout / 1000)
                ready = None
                paused_total += time.monotonic() - poll_started
            else:
                ready = poller.poll(timeout)
            now = time.monotonic() - paused_total
            caught_up = True  # everything that arrived is read (a heartbeat may wait in what is not)
            if ready and not paused:
                caught_up = self._read_batch(router, now)
            if now >= next_sweep:
                next_sweep = now + SWEEP_S
                if monitor is not None:
                    failed_handshakes += self._count_failed_handshakes(monitor)
                    if failed_handshakes and now >= next_handshake_log:
                        next_handshake_log = now + LOG_EVERY_S
                        log.warning("refused %d connection(s) at the CURVE handshake since the last report: a "
                                    "plain-text peer (no key) or one expecting another server key at %s",
                                    failed_handshakes, self.endpoint)
                        failed_handshakes = 0
                # Behind on input, a silent-looking client's heartbeat may wait unread: expire only
                # when caught up, or once expiry has waited a whole client_timeout (a flood that never
                # lets the input drain must not keep dead clients listed for ever).
                if caught_up or now - expired_at >= self.config.client_timeout:
                    core.expire(now)
                    expired_at = now
                if self.reflector is not None and self.reflector.rendezvous.unauthenticated:  # UDP requests for a registered Id without its MAC
                    core.dropped["unauthenticated"] = self.reflector.rendezvous.unauthenticated
                self.cluster.report(core.stats())
                core.set_cluster_stats(self.cluster.server_stats())
            for conn in core.take_forgotten():
                self._lost(conn)
            core.set_cluster(self.cluster.view())
            for conn, header, payload in core.flush(now):
                self._send(router, conn, header, payload, now)
            if self._pending_count:
                before = self._pending_count
                self._retry_pending(router, now)
                drained = self._pending_count < before
            else:
                drained = False

    @staticmethod
    def _count_failed_handshakes(monitor: zmq.Socket) -> int:
        count = 0
        for _ in range(BATCH):
            try:
                monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            count += 1
        return count

    def _read_batch(self, router: zmq.Socket, now: float) -> bool:
        """Read and handle up to BATCH messages; True if that drained the input.

        The relay's hot path is inlined here: a [conn, Data header, payload] on a route already
        checked (ServerCore.fast_routes) is forwarded with one dict lookup, its header's route part
        swapped for the destination's; everything else goes to _on_frames. The connection id is
        read as bytes (a ROUTER's first frame always has more after it), header and payload as
        Frames (their ``more`` flags give the framing; the payload is forwarded without a copy).
        """
        core = self.core
        fast_routes, forward, on_frames, max_frame = core.fast_routes, self._forward, self._on_frames, self.max_frame
        recv = _RECV
        relayed = relayed_bytes = 0
        try:
            for _ in range(BATCH):
                try:
                    conn = recv(router, NOBLOCK)
                except zmq.Again:
                    return True
                head = recv(router, NOBLOCK, False)  # the rest of a message is there once its first frame is
                if not head.more:
                    on_frames(router, conn, [head], now)
                    continue
                payload = recv(router, NOBLOCK, False)
                if not payload.more:
                    routes = fast_routes.get(conn)
                    if routes is not None:
                        raw = head.bytes
                        hit = routes.get(raw[:-SEQ_TAIL])
                        if hit is not None and raw[-SEQ_TAIL] == 0xCF and len(payload) <= max_frame:
                            relayed += 1
                            relayed_bytes += len(payload)
                            forward(router, hit[0], hit[1] + raw[-SEQ_TAIL:], payload, now)
                            continue
                    on_frames(router, conn, [head, payload], now)
                    continue
                frames = [head, payload]
                while frames[-1].more:
                    frames.append(recv(router, NOBLOCK, False))
                on_frames(router, conn, frames, now)
            return False
        finally:
            core.count_relayed(relayed, relayed_bytes)

    def _on_frames(self, router: zmq.Socket, conn: bytes, frames: list[zmq.Frame], now: float) -> None:
        """One message from connection ``conn``: its frames after the connection id."""
        core = self.core
        if wire.oversized(frames, self.max_frame):
            return self._bad(conn, DropReason.OVERSIZED, f"a frame over max_frame={self.max_frame}")
        if len(frames[0]) > self.max_header:
            return self._bad(conn, DropReason.OVERSIZED, f"a header frame over max_header={self.max_header}")
        try:
            header = wire.decode(frames[0].buffer)
        except wire.WireError as exc:
            return self._bad(conn, exc.reason, str(exc))
        if header.__class__ is wire.Data:
            if len(frames) != 2:
                return self._bad(conn, DropReason.MALFORMED, "Data without exactly one payload frame")
            routed = core.relay(conn, header, len(frames[1]), frames[0].bytes)
            if routed is not None:
                self._forward(router, routed[0], routed[1], frames[1], now)
            return
        if len(frames) != 1:
            return self._bad(conn, DropReason.MALFORMED, f"{type(header).__name__} with a payload frame")
        if self.security is not None and header.__class__ is wire.Hello:
            why = claim_refusal(header.id, peer_id(frames[0]))  # the Id ZAP bound to the connection's key
            if why is not None:
                self._bad(conn, DropReason.REFUSED, f"refused a Hello: {why}")
                refusal = wire.encode(wire.Error("not-your-id", f"server {self.id} refused {header.id}: {why}"))
                return self._send(router, conn, refusal, None, now)
        for out_conn, out_header, payload in core.receive(conn, header, now):
            self._send(router, out_conn, out_header, payload, now)

    def _forward(self, router: zmq.Socket, dst: bytes, header: bytes, payload: zmq.Frame, now: float) -> None:
        """One relayed message to ``dst``; behind what already waits for it, if anything does."""
        if dst in self._pending:
            return self._send(router, dst, header, payload, now)
        try:  # the common case, inlined: nothing waiting; pyzmq's backend send (no wrapper)
            _SEND(router, dst, NOBLOCK_MORE)
            _SEND(router, header, NOBLOCK_MORE)
            _SEND(router, payload, NOBLOCK, False)  # a received Frame: forwarded without a copy
        except zmq.ZMQError:
            self._send(router, dst, header, payload, now)

    def _bad(self, conn: bytes, reason: DropReason, detail: str) -> None:
        self.core.drop(reason)
        if conn in self._warned:
            return
        if len(self._warned) >= MAX_WARNED:
            self._warned.clear()
        self._warned.add(conn)
        if not self._log_budget.allow(b"", time.monotonic()):
            self._log_suppressed += 1
            return
        more = f"; {self._log_suppressed} more connections sent bad frames since the last warning (see " \
               f"zbus-node status)" if self._log_suppressed else ""
        self._log_suppressed = 0
        log.warning("dropping frames from connection %s: %s (logged once per connection%s)",
                    conn.hex(), detail[:200], more)

    def _lost(self, conn: bytes) -> None:
        """The core forgot the client behind ``conn``: drop what still waits for it."""
        self._warned.discard(conn)
        self._unreachable_since.pop(conn, None)
        queued = self._pending.pop(conn, None)
        if queued:
            self._unqueue_all(queued)
            self.core.drop(DropReason.UNROUTABLE, len(queued))

    def _send(self, router: zmq.Socket, conn: bytes, header: bytes, payload: Any, now: float) -> None:
        queued = self._pending.get(conn)
        if queued is not None:  # keep order behind what is already waiting
            if payload is not None and len(queued) >= self.config.max_queue:
                # This receiver does not keep up: its senders' windows (their retention) still
                # hold the message and repeat it once acks stall, while everyone else's traffic flows.
                self.core.drop(DropReason.SLOW_RECEIVER)
                return
            queued.append((header, payload))
            self._pending_count += 1
            self._pending_bytes += _size(payload)
            return
        try:
            self._send_now(router, conn, header, payload)
            return
        except zmq.Again:
            if not self.core.may_queue(conn):  # not a registered client: it does not read, we do not wait
                self.core.drop(DropReason.CONGESTED)
                return
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            if not self.core.is_receiver(conn):
                self.core.drop(DropReason.UNROUTABLE)
                return
            # A registered client whose data connection is still (re)connecting: hold it a while.
            self._unreachable_since.setdefault(conn, now)
        self._pending[conn] = collections.deque([(header, payload)])
        self._pending_count += 1
        self._pending_bytes += _size(payload)

    def _unqueue_all(self, queued: collections.deque) -> None:
        """``queued`` leaves the pending queues (its messages are dropped or were sent)."""
        self._pending_count -= len(queued)
        self._pending_bytes -= sum(_size(payload) for _, payload in queued)

    @staticmethod
    def _send_now(router: zmq.Socket, conn: bytes, header: bytes, payload: Any) -> None:
        # Only the first frame can hit the high-water mark; the rest of a message always goes.
        # (pyzmq's backend send, without its Python wrapper; a payload Frame goes without a copy.)
        _SEND(router, conn, NOBLOCK_MORE)
        if payload is None:
            _SEND(router, header, NOBLOCK)
        else:
            _SEND(router, header, NOBLOCK_MORE)
            _SEND(router, payload, NOBLOCK, False)

    def _retry_pending(self, router: zmq.Socket, now: float) -> None:
        for conn in list(self._pending):
            queued = self._pending[conn]
            sent = sent_bytes = 0
            try:
                while queued:  # (the path of every message while a receiver is slower than its senders)
                    header, payload = queued[0]
                    self._send_now(router, conn, header, payload)
                    queued.popleft()
                    sent += 1
                    sent_bytes += _size(payload)
            except zmq.ZMQError as exc:
                if sent:
                    self._sent_from_queue(conn, sent, sent_bytes)
                if exc.errno == errno.EAGAIN:
                    continue
                if exc.errno != errno.EHOSTUNREACH:
                    raise
                since = self._unreachable_since.setdefault(conn, now)
                if self.core.is_receiver(conn) and now - since < ATTACH_GRACE_S:
                    continue
                self._unqueue_all(queued)
                self.core.drop(DropReason.UNROUTABLE, len(queued))
                queued.clear()
                self._unreachable_since.pop(conn, None)
            else:
                self._sent_from_queue(conn, sent, sent_bytes)
            del self._pending[conn]

    def _sent_from_queue(self, conn: bytes, count: int, size: int) -> None:
        """``count`` messages (``size`` payload bytes) left ``conn``'s queue: it is reachable."""
        self._pending_count -= count
        self._pending_bytes -= size
        self._unreachable_since.pop(conn, None)
