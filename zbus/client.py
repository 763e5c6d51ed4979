"""The public clients: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Per server a client has three connections. The engine thread (:mod:`zbus.engine`) owns the control
connection. The user's threads own the two data connections: ``send`` writes the Data header and
the payload straight onto the ``data_out`` DEALER, ``recv`` reads them straight off the ``data_in``
DEALER, so a message crosses no thread inside a client. Their routing ids are random per client and
announced to the server in the Hello, which is how the server stamps the source Id.

Direct links (:mod:`zbus.links`) work the same way: ``send`` writes on the link's data DEALER,
``recv`` reads the client's link data ROUTER, where the source is the Id the link's handshake
authenticated (never the header's). Every message carries a per-destination sequence number
(:mod:`zbus.delivery`): the receiver delivers in order and exactly once whatever path each message
took, and the sender repeats unacknowledged messages when the path changes. The send and receive
paths themselves live in :mod:`zbus.dataplane`; this module is the API, lookups and lifecycle.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import random
import socket
import threading
import time
import types
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import zmq
import zmq.asyncio
import zmq.backend

from . import sockets, wire
from .config import ClientConfig, load_client_config
from .dataplane import (
    _ACK_LOCK_WAIT_S,
    _LINK_SEQ_PACK,
    _MORE,
    _NO_SOCKET,
    _NOBLOCK_MORE,
    _SEND_COPY,
    _SEQ_PACK,
    _WINDOW,
    _WINDOW_WAIT_S,
    BACKLOG_MAX,
    DataPlane,
    Message,
    _AckWait,
    _Call,
    handler_error,
)
from .delivery import Receiver, Sender
from .engine import SEND_SLICE_MS, Engine
from .errors import Backpressure, IdInUse, Refused, Unreachable, ZbusError
from .ids import new_client_id, new_token
from .relay import TOKEN_BYTES
from .routing import Routes, choose_path
from .sockets import ZERO_COPY_MIN
from .wire import LINK_INLINE_MAX

_SLICE_MS = 200  # blocking calls wake this often so Ctrl-C, close() and lost servers get through
_SEND_SLICE_S = SEND_SLICE_MS / 1000  # a blocking send on a full pipe waits this long (SNDTIMEO)
_SERVE_SLICE_S = 0.02  # the request server holds the receive lock at most this long at a time
_CLOSE_LINGER_MS = 2000  # how long close() lets already-sent messages drain to the servers
_BYE = wire.encode(wire.Bye())


class Peer(NamedTuple):
    name: str
    via: str  # how we would reach it now: "direct" | "punched" | "relay"
    address: str  # the link's address, or the relaying server's endpoint
    rtt: float | None  # seconds, for links that measure it


@dataclass(frozen=True)
class ServerLink:
    endpoint: str
    state: str  # "down" | "hello-sent" | "registered" | "refused"
    server_id: str | None
    clients: int  # entries in that server's client list as we hold it


def _backpressure(dst: str, limit: float, full: object) -> Backpressure:
    """The error of a send that found no room for ``limit`` seconds (``full``: what was full)."""
    if full is _WINDOW:
        why = "it has not acknowledged what it was sent before (it does not read, or not fast enough)"
    else:
        why = "it or a server on the way does not keep up"
    return Backpressure(f"no room towards {dst} for {limit}s ({why}); nothing of this message was sent")


@dataclass(frozen=True)
class ClientStatus:
    """An immutable snapshot of a client (``client.status()``)."""

    id: str
    name: str
    master: str | None
    servers: tuple[ServerLink, ...]
    control_msgs: dict[str, int]  # control messages received, by type
    control_bytes: int
    dropped: dict[str, int]
    # The delivery layer (docs/delivery.md): "gap_skipped" (messages given up on after gap_timeout),
    # "duplicates", "reorder_overflow" (early arrivals not buffered), "resent", "window_waits" (sends
    # that found their destination's window full and waited for its acks).
    delivery: dict[str, int] = field(default_factory=dict)


class _ClientBase(DataPlane):
    """What both clients share: config, Id, engine, data sockets, path choice and lookups."""

    def __init__(
        self,
        servers: list[str] | None = None,
        name: str | None = None,
        *,
        listen: str | None = None,
        max_links: int | None = None,
        config: str | None = None,
        id: str | None = None,
        connect_timeout: float | None = None,
        max_frame: int | None = None,
        key_file: str | None = None,
        trust_dir: str | None = None,
        punch: bool | None = None,
        prelink: bool | None = None,
        max_unacked: int | None = None,
    ) -> None:
        self.config: ClientConfig = load_client_config(
            config, servers=servers, name=name, listen=listen, max_links=max_links, id=id,
            connect_timeout=connect_timeout, max_frame=max_frame, key_file=key_file, trust_dir=trust_dir,
            punch=punch, prelink=prelink, max_unacked=max_unacked,
        )
        self.id: str = self.config.id or new_client_id()
        self.name: str = self.config.name
        data_in, data_out = new_token(TOKEN_BYTES), new_token(TOKEN_BYTES)
        self._tx_lock = threading.Lock()  # whoever writes on data sockets (user send, engine upkeep)
        self._engine = Engine(self.id, self.config, data_in, data_out, self._tx_lock)
        self._engine.on_tick = self._upkeep
        self._rng = random.Random()
        self._prefixes: dict[str, bytes] = {}
        self._relay_sources: dict[bytes, str] = {}  # a relayed header without its seq tail -> its source Id
        self._sender = Sender(self._rng, self.config.max_unacked, self.config.max_unacked_bytes)
        self._receiver = Receiver(self.config.max_reorder, self.config.max_reorder_bytes)
        self._max_frame = self.config.max_frame
        # bound once, to the backend's recv (the hot path reads two frames per message)
        self._link_recv = types.MethodType(zmq.backend.Socket.recv, self._engine.link_in)
        self._link_in = self._engine.link_in
        self._ready: collections.deque[Message] = collections.deque()  # released from the reorder buffer
        self._wanted: set[str] = set()
        self._relay_acked_at = 0.0  # when acks through a relay (RelayAcks) last went
        self._acks_soon = False  # a stream asked for its ack early (dataplane._ack_soon)
        # dst -> (routes, socket, header prefix, stream) of its last send: while the engine's Routes
        # are the very same object, the path is too, and send skips path choice (the hot path).
        self._fast: dict[str, tuple] = {}
        self._upkeep_missed = False  # the engine found the send lock taken: the hot path does the upkeep
        self._closed = False
        self.dropped: dict[str, int] = {}
        self._ctl = sockets.context().socket(zmq.PAIR)
        self._ctl.connect(self._engine.ctl_endpoint)
        self._polled: tuple = ()  # the engine's data sockets our poller was built for
        self._hot: zmq.Socket | None = None  # the data socket that delivered last (read first)
        self._flowing = False  # its last read found a message: read it again without asking first
        self._items: list = []  # for zmq_poll: every data socket we read (DataPlane._poll_items)
        self._items_for: Any = None  # the engine's data sockets _items was built for
        self._read_wakes = 0  # waits on the data sockets (acked sends, requests, the async request server) that ended early
        # request/reply (dataplane.py): our waiting requests by rid; the handler, its queue, its replies
        self._calls: dict[int, Any] = {}
        self._reply_changed = threading.Condition()
        self._handler: Any = None
        self._serve_lock = threading.Lock()
        self._requests_in: collections.deque[tuple[str, int, bytes]] = collections.deque()
        self._served: collections.OrderedDict[tuple[str, int], bytes | None] = collections.OrderedDict()
        self._served_bytes = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} name={self.name!r}>"

    # -- lookups ----------------------------------------------------------------------------
    def _status(self) -> ClientStatus:
        engine = self._engine
        links = tuple(
            ServerLink(s.endpoint, s.state.value, s.server_id, len(s.peers.entries))
            for s in list(engine.core.sessions)
        )
        dropped = {**engine.dropped}
        for reason, count in self.dropped.items():
            dropped[reason] = dropped.get(reason, 0) + count
        if engine.core.servers_ignored:
            dropped["too_many_servers"] = engine.core.servers_ignored
        receiver, streams = self._receiver, list(self._sender.streams.values())
        delivery = {"gap_skipped": receiver.skipped, "duplicates": receiver.duplicates,
                    "reorder_overflow": receiver.overflow, "resent": sum(s.resent for s in streams),
                    "window_waits": sum(s.window_waits for s in streams)}
        return ClientStatus(self.id, self.name, engine.core.master, links, dict(engine.control_msgs),
                            engine.control_bytes, dropped, delivery)

    def _peers(self) -> dict[str, Peer]:
        """The link table: each known peer with the path a message to it would take now."""
        routes = self._engine.routes
        peers = {}
        for client_id, info in routes.clients.items():
            link = routes.links.get(client_id)
            if link is not None:
                peers[client_id] = Peer(info.name, link.kind, link.address, link.rtt)
            else:
                peers[client_id] = Peer(info.name, "relay", routes.endpoints[choose_path(client_id, routes)], None)
        for peer, link in routes.links.items():
            if peer not in peers:
                peers[peer] = Peer("", link.kind, link.address, link.rtt)
        return peers

    def _resolve(self, name_or_id: str) -> str:
        routes = self._engine.routes
        if name_or_id in routes.clients:
            return name_or_id
        ids = routes.names.get(name_or_id)
        if not ids:
            raise Unreachable(f"no client named {name_or_id!r} is known to any connected server")
        if len(ids) > 1:
            raise ZbusError(f"name {name_or_id!r} is ambiguous: {', '.join(ids)}; use an Id")
        return ids[0]

    def _knows(self, name_or_id: str) -> bool:
        try:
            self._resolve(name_or_id)
            return True
        except ZbusError:
            return False

    @staticmethod
    def _settled(routes: Routes) -> bool:
        return bool(routes.registered) or len(routes.refusals) == len(routes.endpoints)

    def _raise_if_refused(self) -> None:
        routes = self._engine.routes
        if not routes.registered and routes.refusals and len(routes.refusals) == len(routes.endpoints):
            codes = {s.refusal.code for s in self._engine.core.sessions if s.refusal is not None}
            raise (IdInUse if codes <= {"id-in-use", "bad-id"} else Refused)("; ".join(routes.refusals))

    def _close_sockets(self) -> None:
        """Say Bye in-band (behind the last data) and close; data_out lingers to deliver it."""
        for index, data in enumerate(self._engine.data):
            if index in self._engine.routes.registered:
                try:
                    data.out.send(_BYE, zmq.NOBLOCK)
                except zmq.Again:
                    pass
            data.out.close(linger=_CLOSE_LINGER_MS)
            data.inn.close(linger=0)
        self._engine.close_link_data()
        self._ctl.close(linger=0)

    def _poll_set_changed(self) -> bool:
        """True once after the engine opened data sockets to a newly learnt server."""
        if self._polled is self._engine.data:
            return False
        self._polled = self._engine.data
        return True


class Client(_ClientBase):
    """A blocking zbus client. Thread-safe.

    The constructor returns once a server has registered the client and sent its client list, or
    after ``connect_timeout`` seconds (then ``send`` raises ``Disconnected`` until a server is up).
    It raises :class:`~zbus.IdInUse` if every server refused the Id, :class:`~zbus.Refused` if every
    server refused it for another reason (security: its key is not trusted, or is bound to another Id).
    """

    def __init__(self, servers: list[str] | None = None, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(servers, name, **kwargs)
        self._rx_lock = threading.Lock()
        self._rx_queued: collections.deque = collections.deque()  # one item per recv waiting for _rx_lock
        # Whoever holds the receive lock without being recv (an acked send or a request reading for
        # itself, the request server) waits on the data sockets and on this pair's far end, so a recv
        # that finds the lock taken gets it at once (``_nudge``). Socket objects, not raw fds: a
        # write after close() fails cleanly instead of landing on a reused descriptor.
        self._nudge_out, self._nudge_in = socket.socketpair()
        for end in (self._nudge_out, self._nudge_in):
            end.setblocking(False)
        self._nudge_fd = self._nudge_in.fileno()
        self._serve_wake = threading.Condition()
        self._serve_late = 0  # requests the server found only when its wait ran out (see _serve)
        self._server_thread: threading.Thread | None = None
        # send()'s wait when its timeout is None; a wait under one SNDTIMEO slice avoids the fast path
        # (whose first wait on a full pipe is a whole slice).
        self._default_wait = self.config.send_timeout
        self._engine.start()
        self._engine.wait_for(self._settled, self.config.connect_timeout)
        try:
            self._raise_if_refused()
        except Refused:
            self.close()
            raise

    def send(self, dst: str, data: bytes, ack: bool = False, timeout: float | None = None) -> None:
        """Send ``data`` to the client ``dst`` by the best path. Blocks only under backpressure.

        Raises ``Unreachable`` if no path to ``dst`` is known, ``Disconnected`` if no server is,
        ``ValueError`` if ``data`` is over ``max_frame`` (ours, or that of the server that would
        relay it), with nothing sent. When the path stays full for ``timeout`` seconds (None: the
        ``send_timeout`` config key, 10 s; 0: do not wait) raises ``Backpressure``, with nothing
        of the message sent.
        ``ack=True``: return only once ``dst`` has received the message (repeated over any path,
        delivered once); ``TimeoutError`` if that did not happen within ``timeout`` (which covers
        the wait for room too).
        """
        if not ack and (self._default_wait if timeout is None else timeout) >= _SEND_SLICE_S:
            self._send_one(dst, data, timeout)  # the hot path (its first wait is one SNDTIMEO slice)
            return
        limit = self.config.send_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        with self._tx_lock:
            if self._closed:
                raise ZbusError(f"{self.id} is closed")
            call = _Call(self._sender.streams.get(dst) or self._sender.stream(dst))
            seq = self._send_waiting(dst, data, call, deadline, limit)
        if ack:
            self._await_ack(dst, seq, max(0.0, deadline - time.monotonic()))

    def _send_one(self, dst: str, data: bytes, timeout: float | None = None) -> int:
        with self._tx_lock:
            fast = self._fast.get(dst)
            if fast is not None and fast[0] is self._engine.routes and len(data) <= fast[4] and not self._closed:
                _, sock, prefix, stream, _ = fast  # same Routes, so the same path: no choice to make
                acked = self._engine.acked.get(dst)
                if acked is not None and acked > stream.acked:
                    stream.ack(acked)
                if len(stream.retained) < stream.max_msgs and stream.retained_bytes + len(data) <= stream.max_bytes:
                    # (SendStream.room, inlined: the window has room.) The message goes on the wire
                    # first and is numbered and retained just after (push gives it this very seq; the
                    # send lock keeps everyone else out): on a round trip that bookkeeping then runs
                    # while the message travels, not before.
                    seq = stream.next_seq
                    try:  # _put, inlined; blocks up to SNDTIMEO on a full pipe
                        if prefix is None and 0 < len(data) <= LINK_INLINE_MAX:
                            _SEND_COPY(sock, _LINK_SEQ_PACK(seq) + data, 0)
                        else:
                            _SEND_COPY(sock, _LINK_SEQ_PACK(seq) if prefix is None else prefix + _SEQ_PACK(0xCF, seq),
                                       _MORE)
                            if len(data) < ZERO_COPY_MIN:
                                _SEND_COPY(sock, data, 0)
                            else:
                                sock.send(data, 0, copy=False)
                    except zmq.Again:  # the pipe stayed full for SNDTIMEO already; nothing of it was sent
                        limit = self.config.send_timeout if timeout is None else timeout
                        return self._send_waiting(dst, data, _Call(stream), time.monotonic() + limit - _SEND_SLICE_S,
                                                  limit)
                    stream.push(data, len(data))
                    if self._upkeep_missed:  # the engine could not get the lock from this loop
                        self._upkeep_missed = False
                        self._sender_upkeep(time.monotonic())
                    return seq
            if self._closed:
                raise ZbusError(f"{self.id} is closed")
            call = _Call(self._sender.streams.get(dst) or self._sender.stream(dst))
            limit = self.config.send_timeout if timeout is None else timeout
            return self._send_waiting(dst, data, call, time.monotonic() + limit, limit)

    def _send_waiting(self, dst: str, data: bytes, call: _Call, deadline: float, limit: float) -> int:
        """Move one message on, waiting for room on a full path until ``deadline``; the send lock is held.

        Waits in SNDTIMEO slices (a blocking send), or with a poll for the last bit of the time; past
        ``deadline`` the message is taken back (nothing of it left) and ``Backpressure`` raised.
        """
        while True:
            left = deadline - time.monotonic()
            more = _MORE if left >= _SEND_SLICE_S else _NOBLOCK_MORE
            full = self._attempt(dst, data, call, more)  # with _MORE: blocks up to SNDTIMEO on a full pipe
            if full is None:
                return call.seq
            if self._closed:
                raise ZbusError(f"{self.id} is closed")
            left = deadline - time.monotonic()
            if left <= 0:
                self._give_back(call)
                raise _backpressure(dst, limit, full)
            if full is _WINDOW:
                self._wait_for_window(dst, min(left, _WINDOW_WAIT_S))
            elif full is _NO_SOCKET:
                routes = self._engine.routes
                self._engine.wait_for(lambda r: r is not routes, min(0.05, left))
            elif more == _NOBLOCK_MORE:
                full.poll(max(1, int(left * 1000)), zmq.POLLOUT)

    def recv(self, timeout: float | None = None) -> Message:
        """The next message; raise ``TimeoutError`` after ``timeout`` seconds (None: wait forever).

        Threads that call ``recv`` at once take turns (each message goes to one of them); a thread's
        ``timeout`` also bounds its wait for its turn."""
        lock, asked = self._rx_lock, timeout
        if not lock.acquire(blocking=False):
            started = time.monotonic()
            self._rx_queued.append(None)  # whoever holds the lock to read for itself gives way
            try:
                self._nudge()
                got = lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout))
            finally:
                self._rx_queued.pop()
            if not got:
                raise TimeoutError(f"no message within {asked}s (another thread was receiving)")
            if timeout is not None:
                timeout = max(0.0, timeout - (time.monotonic() - started))
        try:
            if self._flowing and not self._ready and not self._closed:  # a stream: straight to its socket
                hot = self._hot
                message = self._read_link() if hot is self._link_in else self._read_relay(hot)  # (inlined _read_socket)
                if message is not None:
                    return message
            deadline = None
            while True:
                if self._closed:
                    raise ZbusError(f"{self.id} is closed")
                message = self._try_recv()
                if message is not None:
                    return message
                if deadline is None and timeout is not None:
                    deadline = time.monotonic() + timeout
                left_ms = _SLICE_MS if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000)
                message = self._read_ready(min(left_ms, _SLICE_MS))
                if message is not None:
                    return message
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no message within {asked}s")
        finally:
            lock.release()

    def _nudge(self) -> None:
        """Ask whoever holds the receive lock to read for itself to let go of it (``_wait_held``)."""
        try:
            self._nudge_out.send(b"\0")
        except OSError:  # full (a nudge is pending anyway) or closed
            pass

    def _wait_held(self, timeout_ms: int) -> bool:
        """Holding the receive lock without being ``recv``: wait up to ``timeout_ms`` for a data
        socket to turn readable, or for a ``recv`` on another thread to ask for the lock (a byte from
        ``_nudge``, then found in ``_rx_queued``). True if either came."""
        nudge = self._nudge_fd
        ready = zmq.backend.zmq_poll([*self._poll_items(), (nudge, zmq.POLLIN)], timeout_ms)
        if ready and ready[-1][0] == nudge:
            try:
                while self._nudge_in.recv(4096):  # drain
                    pass
            except OSError:  # empty
                pass
        return bool(ready)

    def request(self, dst: str, data: bytes, timeout: float | None = None) -> bytes:
        """Send ``data`` to the request handler of the client ``dst`` (an Id); return its reply.

        Repeated until the reply comes (paths may change, servers die); the handler runs once.
        Raises ``TimeoutError`` after ``timeout`` seconds (default 10), ``Unreachable`` /
        ``Disconnected`` at once if ``dst`` has no path, ``RemoteError`` if the handler raised or
        ``dst`` has none. Thread-safe: many threads may wait for replies at once.
        """
        pending, header = self._request_start(dst, data, timeout)
        try:
            while not self._request_step(pending, header, _ACK_LOCK_WAIT_S):
                pause = pending.next_pause()
                if self._read_for_ourselves(lambda: pending.reply is not None, pause):  # no one reads
                    continue
                with self._reply_changed:  # a recv (or another requester) reads for us and wakes us
                    if pending.reply is None:
                        self._reply_changed.wait(pause)
            return self._request_result(pending)
        finally:
            self._calls.pop(pending.rid, None)

    def on_request(self, handler: Callable[[str, bytes], bytes] | None) -> None:
        """Serve requests with ``handler(src, data) -> bytes`` (None: stop; requests are then answered
        with a RemoteError). It runs on a thread of the client, one request at a time; that thread
        also reads the sockets while no one is in ``recv`` (keeping plain messages for ``recv``)."""
        if handler is not None and not callable(handler):
            raise TypeError(f"on_request needs a callable or None, not {type(handler).__name__}")
        if self._closed:
            raise ZbusError(f"{self.id} is closed")
        self._handler = handler
        if handler is not None and self._server_thread is None:
            self._server_thread = threading.Thread(target=self._serve, name=f"zbus-requests-{self.id[:10]}",
                                                   daemon=True)
            self._server_thread.start()

    def _serve(self) -> None:
        """The request server: runs the handler on queued requests; reads the sockets when no one does."""
        idle_ms = 1
        while not self._closed:
            item = self._take_request()
            if item is not None:
                src, rid, data = item
                handler = self._handler
                try:
                    if handler is None:
                        raise ZbusError("no request handler (on_request(None) was called)")
                    result, error = handler(src, data), ""
                except Exception as exc:  # reported to the requester, which raises RemoteError
                    result, error = None, handler_error(exc)
                self._finish_request(src, rid, result, error)
                idle_ms = 1
                continue
            if len(self._ready) < BACKLOG_MAX and not self._rx_queued and self._rx_lock.acquire(blocking=False):
                try:  # no one is in recv: read for ourselves, then wait for the sockets (or a recv) a little
                    if self._closed:
                        return
                    self._read_into_backlog()
                    if not self._requests_in and len(self._ready) < BACKLOG_MAX:
                        idle_ms = 1 if self._wait_held(idle_ms) else min(idle_ms * 2, int(_SERVE_SLICE_S * 1000))
                finally:
                    self._rx_lock.release()
            else:
                # Someone reads (a recv queues requests for us and wakes us; so does anyone reading
                # for itself), or the backlog is full. (A blocking wait for the lock here missed that
                # wake-up: requests waited out the whole slice, ~20 ms, while a recv was waiting.)
                with self._serve_wake:
                    if not self._requests_in and not self._serve_wake.wait(_SERVE_SLICE_S) and self._requests_in:
                        self._serve_late += 1  # queued, and no one woke us: never, if every reader does

    def _wake_server(self) -> None:
        with self._serve_wake:
            self._serve_wake.notify()

    def peers(self) -> dict[str, Peer]:
        return self._peers()

    def set_max_links(self, max_links: int) -> None:
        """Change how many direct links this client keeps (0: relay only, closing every link)."""
        if max_links < 0:
            raise ValueError(f"max_links must be >= 0, not {max_links}")
        self._engine.set_max_links(max_links)

    def wait_link(self, name_or_id: str, timeout: float = 5.0) -> bool:
        """Wait until a direct link to ``name_or_id`` is up (one that was sent to, or a prelink)."""
        return self._engine.wait_for(lambda r: self._knows(name_or_id) and self._resolve(name_or_id) in r.links,
                                     timeout)

    def status(self) -> ClientStatus:
        return self._status()

    def resolve(self, name: str) -> str:
        """The Id of the client called ``name`` (an Id is returned as is if known)."""
        return self._resolve(name)

    def wait_connected(self, timeout: float = 5.0) -> bool:
        return self._engine.wait_for(lambda r: bool(r.registered), timeout)

    def wait_disconnected(self, timeout: float = 5.0) -> bool:
        return self._engine.wait_for(lambda r: not r.registered, timeout)

    def wait_peer(self, name_or_id: str, timeout: float = 5.0) -> str:
        """Wait until ``name_or_id`` is reachable; return its Id or raise ``Unreachable``."""
        self._engine.wait_for(lambda r: self._knows(name_or_id), timeout)
        return self._resolve(name_or_id)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        server = self._server_thread
        if server is not None and server is not threading.current_thread():
            self._wake_server()
            server.join(_CLOSE_LINGER_MS / 1000)  # a handler still running is left to finish on its own
        self._nudge()  # a thread reading for itself lets go of the receive lock
        with self._tx_lock, self._rx_lock:
            self._close_sockets_and_engine()
            self._nudge_out.close()
            self._nudge_in.close()

    def _close_sockets_and_engine(self) -> None:
        routes_before = self._engine.routes
        self._engine.stop(self._ctl)
        self._engine.routes = routes_before  # Bye goes only to servers we were registered with
        self._close_sockets()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """The asyncio client: ``async with zbus.AsyncClient(...) as c``; the same methods, awaitable.

    Data moves with non-blocking calls on the same sockets as the sync client; only the waiting is
    asyncio (``zmq.asyncio`` shadows of those sockets), so a busy stream costs no loop round-trip.
    """

    def __init__(self, servers: list[str] | None = None, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(servers, name, **kwargs)
        self._poller = zmq.asyncio.Poller()
        self._receivers = 0  # recv calls waiting on the sockets (the request server then does not read)
        self._serve_task: asyncio.Task | None = None
        self._serve_event: asyncio.Event | None = None
        self._acks_moved: asyncio.Event | None = None  # set (from the engine thread) when acks move
        self._acks_loop: asyncio.AbstractEventLoop | None = None
        self._window_waiters = 0  # sends waiting for acks: only then does an ack wake the loop
        self._replies_moved: asyncio.Event | None = None  # set (on the loop) when a Reply comes in
        self._replies_loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> "AsyncClient":
        if not self._engine._started:
            self._engine.start()
            await asyncio.to_thread(self._engine.wait_for, self._settled, self.config.connect_timeout)
            try:
                self._raise_if_refused()
            except Refused:
                await self.close()
                raise
        return self

    async def send(self, dst: str, data: bytes, ack: bool = False, timeout: float | None = None) -> None:
        """As :meth:`Client.send` (``Backpressure`` after ``timeout`` without room); ``ack=True`` waits
        for the acknowledgement on the loop."""
        call = None
        deadline = None if timeout is None and not ack else \
            time.monotonic() + (self.config.send_timeout if timeout is None else timeout)
        while True:
            if self._closed:
                raise ZbusError(f"{self.id} is closed")
            with self._tx_lock:  # held only between awaits, never across one
                if call is None:
                    call = _Call(self._sender.streams.get(dst) or self._sender.stream(dst))
                full = self._attempt(dst, data, call, _NOBLOCK_MORE)
                if full is None and self._upkeep_missed:  # as in Client._send_one
                    self._upkeep_missed = False
                    self._sender_upkeep(time.monotonic())
                if full is not None:
                    if deadline is None:  # the clock starts at the first full pipe (the hot path reads none)
                        deadline = time.monotonic() + self.config.send_timeout
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._give_back(call)
                        raise _backpressure(dst, self.config.send_timeout if timeout is None else timeout, full)
                    heard = self._engine.acked.get(dst, 0)
            if full is None:
                if ack:
                    await self._await_ack_async(dst, call.seq, max(0.0, deadline - time.monotonic()))
                return
            wait_ms = max(1, min(_SLICE_MS, int(left * 1000)))
            if full is _WINDOW:  # acks come on the engine thread, which wakes us when they move
                await self._wait_for_acks(dst, heard, min(left, _WINDOW_WAIT_S))
                continue
            if full is _NO_SOCKET or not any(full is data.out for data in self._engine.data):
                # A link's socket may be closed by the engine once we let go of the lock, so it is
                # never waited on outside it: retry shortly instead.
                await asyncio.sleep(min(0.002, left))
                continue
            try:
                await zmq.asyncio.Socket.shadow(full.underlying).poll(wait_ms, zmq.POLLOUT)
            except zmq.Again:  # zmq.asyncio reports a poll that timed out on a shadow this way
                pass

    async def _wait_for_acks(self, dst: str, heard: int, seconds: float) -> None:
        """Wait until ``dst``'s acks move past ``heard``, or ``seconds`` pass (a send whose window is
        full, or one with ``ack=True`` while a ``recv`` reads the sockets).

        The engine thread calls ``on_ack`` whenever an ack moves; while a send waits here, that hands
        ``_acks_moved.set`` to this loop (``call_soon_threadsafe``), so the send looks at its window
        again once per ack instead of polling it. An ack for another destination wakes it too: it
        looks, finds its window still full and waits again."""
        loop = asyncio.get_running_loop()
        if self._acks_loop is not loop:  # the first wait, or a client driven from another loop now
            event = self._acks_moved = asyncio.Event()
            self._acks_loop = loop

            def moved() -> None:  # engine thread
                if self._window_waiters:
                    try:
                        loop.call_soon_threadsafe(event.set)
                    except RuntimeError:  # that loop is closed
                        pass

            self._engine.on_ack = moved
        event = self._acks_moved
        self._window_waiters += 1  # first: an ack that moves after the look below does wake us
        try:
            event.clear()
            if self._engine.acked.get(dst, 0) != heard or self._closed:  # it moved already
                return
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            pass
        finally:
            self._window_waiters -= 1

    async def _await_ack_async(self, dst: str, seq: int, timeout: float) -> None:
        """As ``_await_ack``, on the event loop (which is also where ``recv`` reads the sockets)."""
        waiting = _AckWait(dst, seq, timeout)
        while not self._ack_step(waiting, 0.0):
            pause = waiting.next_pause()
            if not await self._read_for_ourselves_async(lambda: self._engine.acked.get(dst, 0) >= seq, pause):
                await self._wait_for_acks(dst, self._engine.acked.get(dst, 0), pause)

    async def _read_for_ourselves_async(self, done: Callable[[], bool], pause: float) -> bool:
        """As ``_read_for_ourselves``, on the loop: unless a ``recv`` is waiting on the sockets (it
        reads for everyone), read them, and unless ``done()`` wait up to ``pause`` for one to turn
        readable (the loop's poller: the answer is read as it lands). False: wait elsewhere."""
        if self._receivers:
            return False
        self._read_into_backlog()
        if done():
            return True
        if len(self._ready) >= BACKLOG_MAX:
            return False
        self._read_wakes += bool(await self._data_poller().poll(max(1, round(pause * 1000))))
        return True

    async def recv(self, timeout: float | None = None) -> Message:
        message = self._try_recv() if not self._closed else None
        if message is not None:
            return message
        self._receivers += 1
        try:
            return await self._recv_waiting(timeout)
        finally:
            self._receivers -= 1

    async def _recv_waiting(self, timeout: float | None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise ZbusError(f"{self.id} is closed")
            message = self._try_recv()
            if message is not None:
                return message
            left_ms = _SLICE_MS if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000)
            if not await self._data_poller().poll(min(left_ms, _SLICE_MS)) and deadline is not None \
                    and time.monotonic() >= deadline:
                raise TimeoutError(f"no message within {timeout}s")

    def _data_poller(self) -> zmq.asyncio.Poller:
        """The poller over the data sockets we read (one set of shadows, shared by every waiter on
        this loop: pyzmq queues several waits on one shadow, while two shadows of one socket would
        each claim its file descriptor)."""
        if self._poll_set_changed():
            self._poller = zmq.asyncio.Poller()
            self._poller.register(zmq.asyncio.Socket.shadow(self._engine.link_in.underlying), zmq.POLLIN)
            for data in self._polled:
                self._poller.register(zmq.asyncio.Socket.shadow(data.inn.underlying), zmq.POLLIN)
        return self._poller

    async def request(self, dst: str, data: bytes, timeout: float | None = None) -> bytes:
        """As :meth:`Client.request`, awaitable; many may wait at once."""
        pending, header = self._request_start(dst, data, timeout)
        try:
            while not self._request_step(pending, header, 0.0):
                pause = pending.next_pause()
                if not await self._read_for_ourselves_async(lambda: pending.reply is not None, pause):
                    await self._wait_for_reply(pending, pause)  # a recv waiting on the sockets reads for us
            return self._request_result(pending)
        finally:
            self._calls.pop(pending.rid, None)

    async def _wait_for_reply(self, pending: Any, seconds: float) -> None:
        """Wait until a Reply comes in (``_on_reply``, on this loop: the recv that reads it sets the
        event; every waiting request wakes and looks at its own), or ``seconds`` pass, at least
        _SERVE_SLICE_S: a Reply that lands wakes us anyway, and a short timeout only races the recv
        task reading it (the loop runs an expired timer before the task the same readiness wakes)."""
        seconds = max(seconds, _SERVE_SLICE_S)
        loop = asyncio.get_running_loop()
        if self._replies_loop is not loop:  # the first wait, or a client driven from another loop now
            self._replies_moved, self._replies_loop = asyncio.Event(), loop
        event = self._replies_moved
        event.clear()
        if pending.reply is not None or self._closed:
            return
        try:
            await asyncio.wait_for(event.wait(), seconds)
            self._read_wakes += 1
        except TimeoutError:
            pass

    def _on_reply(self, src: str, reply: Any) -> None:
        super()._on_reply(src, reply)
        if self._replies_moved is not None:
            self._replies_moved.set()

    def on_request(self, handler: Callable[[str, bytes], Any] | None) -> None:
        """As :meth:`Client.on_request`; ``handler`` may be ``async def``. Call it on the client's loop:
        requests are served by a task there, one at a time (a plain function blocks the loop while it runs)."""
        if handler is not None and not callable(handler):
            raise TypeError(f"on_request needs a callable or None, not {type(handler).__name__}")
        if self._closed:
            raise ZbusError(f"{self.id} is closed")
        self._handler = handler
        if handler is not None and self._serve_task is None:
            self._serve_event = asyncio.Event()
            self._serve_task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        """The request server task: runs the handler on queued requests; reads the sockets (on the loop)
        while no recv waits on them, waiting on them in slices that grow to _SERVE_SLICE_S while idle."""
        pause = 0.001
        while not self._closed:
            item = self._take_request()
            if item is not None:
                src, rid, data = item
                handler = self._handler
                try:
                    if handler is None:
                        raise ZbusError("no request handler (on_request(None) was called)")
                    result, error = handler(src, data), ""
                    if inspect.isawaitable(result):
                        result = await result
                except Exception as exc:  # reported to the requester, which raises RemoteError
                    result, error = None, handler_error(exc)
                if self._closed:
                    return
                self._finish_request(src, rid, result, error)
                pause = 0.001
                continue
            if not self._receivers and len(self._ready) < BACKLOG_MAX:
                before = len(self._ready)
                self._read_into_backlog()
                if self._requests_in or len(self._ready) != before:
                    pause = 0.001
                    continue
                # Wait on the sockets, where requests land (a recv that starts meanwhile polls them
                # too, reads, and queues requests for us): each is read as it comes, not after
                # ``pause`` (waiting on _serve_event here took ~1.2 ms per request to an idle client).
                if await self._data_poller().poll(max(1, round(pause * 1000))):
                    self._read_wakes += 1
                    pause = 0.001
                else:
                    pause = min(pause * 2, _SERVE_SLICE_S)
                continue
            try:
                await asyncio.wait_for(self._serve_event.wait(), pause)
            except TimeoutError:
                pause = min(pause * 2, _SERVE_SLICE_S)
            self._serve_event.clear()

    def _wake_server(self) -> None:
        if self._serve_event is not None:
            self._serve_event.set()

    async def peers(self) -> dict[str, Peer]:
        return self._peers()

    def set_max_links(self, max_links: int) -> None:
        """Change how many direct links this client keeps (0: relay only, closing every link)."""
        if max_links < 0:
            raise ValueError(f"max_links must be >= 0, not {max_links}")
        self._engine.set_max_links(max_links)

    async def wait_link(self, name_or_id: str, timeout: float = 5.0) -> bool:
        """Wait until a direct link to ``name_or_id`` is up (one that was sent to, or a prelink)."""
        return await asyncio.to_thread(
            self._engine.wait_for, lambda r: self._knows(name_or_id) and self._resolve(name_or_id) in r.links, timeout)

    async def status(self) -> ClientStatus:
        return self._status()

    async def resolve(self, name: str) -> str:
        return self._resolve(name)

    async def wait_connected(self, timeout: float = 5.0) -> bool:
        return await asyncio.to_thread(self._engine.wait_for, lambda r: bool(r.registered), timeout)

    async def wait_peer(self, name_or_id: str, timeout: float = 5.0) -> str:
        await asyncio.to_thread(self._engine.wait_for, lambda r: self._knows(name_or_id), timeout)
        return self._resolve(name_or_id)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._acks_moved is not None and self._acks_loop is asyncio.get_running_loop():
            self._acks_moved.set()  # sends waiting for acks see the client closed
        if self._replies_moved is not None and self._replies_loop is asyncio.get_running_loop():
            self._replies_moved.set()  # and so do requests waiting for replies
        task = self._serve_task
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        routes_before = self._engine.routes
        if self._engine._started:
            await asyncio.to_thread(self._engine.stop, self._ctl)
        else:
            self._engine.stop(self._ctl)
        self._engine.routes = routes_before
        self._close_sockets()

    async def __aenter__(self) -> "AsyncClient":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
