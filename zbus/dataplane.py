"""A client's data plane: the send and receive paths on the data sockets, and delivery upkeep.

Mixed into the clients (:mod:`zbus.client`). ``send`` chooses a path (:func:`~zbus.routing.choose_path`),
numbers the message and writes it onto the relay's ``data_out`` or the link's data DEALER; ``recv``
reads the link data ROUTER and the servers' ``data_in`` sockets and hands every arrival to the
delivery layer (:mod:`zbus.delivery`), which puts them back in order. ``_upkeep`` runs on the engine
thread: acks for what we delivered, repeats for what peers did not acknowledge. Whoever writes on a
data socket holds the send lock; whoever reads holds the receive lock.
"""

from __future__ import annotations

import collections
import struct
import time
from typing import Any, NamedTuple

import zmq
import zmq.backend

from . import wire
from .delivery import RTO_MIN_RELAY, SendStream
from .errors import RemoteError, ZbusError
from .routing import choose_path
from .sockets import ZERO_COPY_MIN, recv_frames_rest
from .wire import CONTROL_SEQ, LINK_CONTROL_SEQ, LINK_INLINE_MAX, LINK_SEQ, DropReason, data_header_prefix

_HEADER_CACHE_MAX = 4096
_MORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: pyzmq's IntFlag arithmetic costs more than a small send
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_UPKEEP_S = 0.05  # acks and retransmission checks run this often while a stream is active
_RELAY_ACK_S = 0.2  # acks through a relay (RelayAcks on the control connection) go at most this often...
_RELAY_ACK_SOON_S = 0.03  # ...or this often while a stream delivers fast (under the servers' control_rate)
# A stream asks for its ack early (Engine.upkeep_soon) every this many messages delivered in order (a
# mask on the sequence number), so that a fast sender's window (its retention) reopens well before it
# fills; every _ACK_EVERY_BIG for payloads of _BIG bytes or more (the window is also bounded in bytes).
_ACK_EVERY = 0x3FF
_ACK_EVERY_BIG = 0x7F
_BIG = 16384
_RESEND = "resend"  # SendStream.path marker: every retained message must go again
_NO_SOCKET = object()  # the chosen link's socket is being replaced: wait for the next Routes
_WINDOW = object()  # the destination's window (its retention) is full: wait for its acks
_WINDOW_WAIT_S = 0.2  # a send waiting for acks checks the time and the client this often
_SEQ_PACK = struct.Struct(">BQ").pack  # wire.data_header's tail, inlined on the hot path
_LINK_SEQ_PACK = LINK_SEQ.pack
_LINK_SEQ_UNPACK = LINK_SEQ.unpack_from
_U64_AT = struct.Struct(">Q").unpack_from
# pyzmq's Socket.send wrapper (copy thresholds, routing ids) costs ~0.7 us; small copied frames
# (headers, a link's seq + small payload) go straight to the backend's send.
_SEND_COPY = zmq.backend.Socket.send
_RECV = zmq.backend.Socket.recv  # the same for receives: (socket, flags, copy)
_ZMQ_POLL = zmq.backend.zmq_poll  # zmq.Poller.poll without its Python wrapper: [(socket, events)], ms
_RCVMORE = int(zmq.RCVMORE)
_POLLIN = int(zmq.POLLIN)
ACK_REQUEST_RETRY_S = 0.5  # a waiting sender asks again this often
_ACK_LOCK_WAIT_S = 0.05  # how long a user thread waits for the send lock to pass a control message
_BACKLOG_READ_MAX = 1000  # messages read per wake-up while waiting for an ack
BACKLOG_MAX = 10_000  # messages read for recv by someone else (ack or reply waiters, the request server)
REQUEST_TIMEOUT_S = 10.0  # request() default
REQUEST_RETRY_S = 0.5  # a waiting requester repeats its Request after this, doubling...
REQUEST_RETRY_MAX_S = 2.0  # ...up to this
SERVED_MAX = 4096  # replies kept per client to answer repeated requests (and their bytes, below)
SERVED_BYTES_MAX = 64 * 1024 * 1024
REQUESTS_QUEUED_MAX = 256  # requests waiting for the handler; more are dropped (their requesters repeat them)
_REQUEST_OVERHEAD = 64  # bytes of a Request/Reply header around its data


class Message(NamedTuple):
    src: str  # the sender's Id, as stamped by the path it came over
    data: bytes
    via: str  # "direct" | "punched" | "relay"


class _Call:
    """One message on its way through ``send`` (several attempts if sockets are full)."""

    __slots__ = ("stream", "seq", "transmitted", "waited")

    def __init__(self, stream: SendStream) -> None:
        self.stream = stream
        self.seq: int | None = None
        self.transmitted = False
        self.waited = False  # found the window full (counted once per send)


class _AckWait:
    """One ``send(..., ack=True)`` waiting for its acknowledgement."""

    def __init__(self, dst: str, seq: int, timeout: float) -> None:
        self.dst, self.seq, self.timeout = dst, seq, timeout
        self.request = wire.encode(wire.AckRequest(seq))
        self.deadline = time.monotonic() + timeout
        self.next_request = 0.0
        self._pause = 0.00025

    def next_pause(self) -> float:
        self._pause = min(self._pause * 2, 0.01)
        return self._pause


class _Pending:
    """One ``request`` waiting for its Reply."""

    def __init__(self, dst: str, rid: int, timeout: float) -> None:
        self.dst, self.rid, self.timeout = dst, rid, timeout
        self.deadline = time.monotonic() + timeout
        self.reply: wire.Reply | None = None
        self.next_send = 0.0
        self.retry = REQUEST_RETRY_S
        self._pause = 0.00025

    def next_pause(self) -> float:
        self._pause = min(self._pause * 2, 0.01)
        return self._pause


def handler_error(exc: BaseException) -> str:
    """What a requester's RemoteError says about an exception its responder's handler raised."""
    return f"the request handler raised {type(exc).__name__}: {exc}"


class DataPlane:
    """The data-plane half of a client; the client sets the attributes used here in __init__."""

    def _prefix(self, dst: str) -> bytes:
        prefix = self._prefixes.get(dst)
        if prefix is None:
            if len(self._prefixes) >= _HEADER_CACHE_MAX:
                self._prefixes.clear()
            prefix = self._prefixes[dst] = data_header_prefix(dst)
        return prefix

    def _attempt(self, dst: str, data: Any, call: _Call, more: int) -> Any:
        """Move one message forward; the caller holds the send lock. Returns None when the message
        is on its way, or the socket that was full (``_NO_SOCKET``: wait for new Routes; ``_WINDOW``:
        the destination has a window's worth unacknowledged, nothing of this message was taken).

        ``more`` is the header's send flags: SNDMORE (blocks up to SNDTIMEO) or NOBLOCK|SNDMORE.
        Raises Unreachable / Disconnected (taking the message back if it never left).
        """
        if len(data) > self._max_frame:
            raise ValueError(f"message of {len(data)} bytes: over max_frame ({self._max_frame}); nothing was sent")
        engine = self._engine
        stream = call.stream
        acked = engine.acked.get(dst)
        if acked is not None and acked > stream.acked:
            stream.ack(acked)
        self._fast.pop(dst, None)
        routes = engine.routes
        try:
            path = choose_path(dst, routes)
        except ZbusError:
            if call.seq is not None and not call.transmitted:
                stream.unpush(call.seq)
            raise
        limit = self._max_frame
        if path.__class__ is int:
            told = routes.max_frames[path] if len(routes.max_frames) > path else 0
            if told and len(data) > told:
                if call.seq is not None and not call.transmitted:
                    stream.unpush(call.seq)
                raise ValueError(f"message of {len(data)} bytes to {dst}: over the max_frame of the server that "
                                 f"relays it ({routes.endpoints[path]}: {told}); nothing was sent")
            if told:
                limit = min(limit, told)
            sock = engine.data[path].out
        else:
            sock = engine.link_out.get(path)
            if sock is None:
                return _NO_SOCKET
        if call.seq is None and not stream.room(len(data)):
            if not call.waited:
                call.waited = True
                stream.window_waits += 1
            return _WINDOW
        prefix = self._prefix(dst) if path.__class__ is int else None
        if path != stream.path or stream.resend_from:
            if dst not in self._wanted:
                # A peer we send to: the engine links to it (by relay now), or keeps its link ahead of
                # prelinked peers (a prelink already carries it).
                self._wanted.add(dst)
                engine.wanted.append(dst)
                if self.config.max_links:
                    try:
                        self._ctl.send(b"want", zmq.NOBLOCK)  # wake the engine (close() uses it under this lock)
                    except zmq.ZMQError:
                        pass
            repeats = self._repeats(stream, path)
            for seq, payload, _ in repeats:
                try:
                    self._put(sock, prefix, seq, payload, more)
                except zmq.Again:
                    stream.cut(seq, repeats)  # the rest goes next time, from here
                    return sock
                if seq == call.seq:
                    call.transmitted = True
        if call.seq is None:
            call.seq = stream.push(data, len(data))
        elif call.transmitted:
            return None
        try:
            self._put(sock, prefix, call.seq, data, more)
        except zmq.Again:
            return sock
        call.transmitted = True
        self._fast[dst] = (routes, sock, prefix, stream, limit)
        return None

    def _wait_for_window(self, dst: str, seconds: float) -> None:
        """``dst``'s window is full: wait until its acks move or ``seconds`` pass, without the send
        lock (the caller's, given back on return), so that sends to other destinations, and the
        engine's upkeep, go on meanwhile."""
        engine = self._engine
        heard = engine.acked.get(dst, 0)
        self._tx_lock.release()
        try:
            with engine.ack_changed:
                engine.ack_changed.wait_for(lambda: engine.acked.get(dst, 0) != heard or self._closed, seconds)
        finally:
            self._tx_lock.acquire()

    @staticmethod
    def _give_back(call: _Call) -> None:
        """A send gave up (Backpressure): take its message back unless some of it already left."""
        if call.seq is not None and not call.transmitted:
            call.stream.unpush(call.seq)
            call.seq = None

    @staticmethod
    def _put(sock: zmq.Socket, prefix: bytes | None, seq: int, payload: Any, more: int) -> None:
        """One message onto a relay (``prefix``: its Data header without seq) or link (None) socket.
        Raises zmq.Again, with nothing sent, if the socket is full; the last frame never blocks."""
        if prefix is None and 0 < len(payload) <= LINK_INLINE_MAX:
            _SEND_COPY(sock, _LINK_SEQ_PACK(seq) + payload, more & ~_MORE)
            return
        _SEND_COPY(sock, _LINK_SEQ_PACK(seq) if prefix is None else prefix + _SEQ_PACK(0xCF, seq), more)
        if len(payload) < ZERO_COPY_MIN:
            _SEND_COPY(sock, payload, 0)
        else:
            sock.send(payload, 0, copy=False)

    @staticmethod
    def _repeats(stream: SendStream, path: Any) -> list:
        """What must go (again) on ``path`` before anything new: everything retained after a path
        change (or a lost session: ``_RESEND``), else the rest of a repeat a full pipe cut short."""
        if path == stream.path:
            return stream.rest()
        if stream.path is not _RESEND:
            return stream.switch(path)
        return stream.repeat_all(path)

    def _upkeep(self, now: float) -> float | None:
        """Engine thread, on a timer: acknowledge what we delivered; repeat what peers did not ack."""
        engine = self._engine
        busy = False
        relay_acks: dict[int, list[tuple[str, int]]] = {}
        relay_now = now - self._relay_acked_at >= (_RELAY_ACK_SOON_S if self._acks_soon else _RELAY_ACK_S)
        if relay_now:
            self._acks_soon = False
        for src, upto in self._receiver.acks_due():
            busy = True
            if engine.ack_via_link(src, wire.encode(wire.Ack(upto))):
                continue
            # Through a relay: on the control connection of a server that lists the sender (RelayAcks),
            # which the sender's engine reads, recv or not. Batched per server, at most every
            # _RELAY_ACK_S, so they stay well under the servers' control rate limit.
            if relay_now:
                holders = engine.routes.holders.get(src)
                batch = relay_acks.setdefault(holders[0], []) if holders else None
                if batch is not None and len(batch) < wire.RELAY_ACKS_MAX:
                    batch.append((src, upto))
                    continue
            self._receiver.ack_again(src)  # due again at the next upkeep
        if relay_now and relay_acks:
            self._relay_acked_at = now
            for index, acks in relay_acks.items():
                if not engine.send_control(index, wire.encode(wire.RelayAcks(acks))):
                    for src, _ in acks:
                        self._receiver.ack_again(src)
        if self._sender.streams:
            if self._tx_lock.acquire(blocking=False):
                try:
                    if self._closed:
                        return None
                    self._upkeep_missed = False
                    busy = self._sender_upkeep(now) or busy
                finally:
                    self._tx_lock.release()
            else:
                # A thread sending in a tight loop holds the send lock nearly all the time: the next
                # send on the hot path does this upkeep itself (acks applied, stalls repaired).
                self._upkeep_missed = busy = True
        return now + _UPKEEP_S if busy else None

    def _sender_upkeep(self, now: float) -> bool:
        """Apply acks to every outgoing stream and repair what needs it (send lock held); True while
        something is still unacknowledged."""
        engine = self._engine
        busy = False
        for dst, stream in list(self._sender.streams.items()):
            acked = engine.acked.get(dst)
            if acked is not None and acked > stream.acked:
                stream.ack(acked)
            if stream.retained:
                busy = True
                self._repair(dst, stream, now)
        return busy

    def _repair(self, dst: str, stream: SendStream, now: float) -> None:
        """Send retained messages again if the path changed or acks stalled (send lock held)."""
        try:
            path = choose_path(dst, self._engine.routes)
        except ZbusError:
            if stream.path.__class__ is int:
                stream.path = _RESEND
                self._fast.pop(dst, None)  # its server went away: repeat everything on the next path
            return
        sock = self._engine.data[path].out if path.__class__ is int else self._engine.link_out.get(path)
        if sock is None:
            return
        if path != stream.path or stream.resend_from:
            self._fast.pop(dst, None)
            batch = self._repeats(stream, path)
        elif path.__class__ is int:
            if path not in self._engine.routes.registered:
                stream.path = _RESEND
                self._fast.pop(dst, None)  # that server's session dropped: repeat everything when it is back
                return
            # A live relay path can still lose what a data connection's pipe held when it reconnected,
            # or its server dropped for a receiver that did not keep up (max_queue): repeat on stalled
            # acks (they reach our engine on the control connections), even if none came yet.
            batch = stream.retransmit_due(now, RTO_MIN_RELAY)
        else:
            batch = stream.retransmit_due(now)
        prefix = self._prefix(dst) if path.__class__ is int else None
        for seq, payload, _ in batch:
            try:
                self._put(sock, prefix, seq, payload, _NOBLOCK_MORE)
            except zmq.Again:
                stream.cut(seq, batch)  # the rest goes at the next upkeep (or send), from here
                self._fast.pop(dst, None)
                return

    def _tunnel(self, dst: str, header: bytes, wait: float = 0.0) -> bool:
        """A delivery control message to ``dst`` inside a Data (seq = CONTROL_SEQ) on its current path.
        The engine thread never waits for the send lock; user threads may (``wait`` seconds)."""
        if not (self._tx_lock.acquire(timeout=wait) if wait else self._tx_lock.acquire(blocking=False)):
            return False
        try:
            if self._closed:
                return False
            path = choose_path(dst, self._engine.routes)
            sock = self._engine.data[path].out if path.__class__ is int else self._engine.link_out.get(path)
            if sock is None:
                return False
            if path.__class__ is int:
                sock.send(wire.encode(wire.Data(dst, "", CONTROL_SEQ)), _NOBLOCK_MORE)
                sock.send(header, 0)
            else:
                self._put(sock, None, LINK_CONTROL_SEQ, header, _NOBLOCK_MORE)
            return True
        except (ZbusError, zmq.Again):
            return False
        finally:
            self._tx_lock.release()

    def _try_recv(self) -> Message | None:
        """A message if one is waiting on any data socket, without blocking.

        The hot path of every receive: two or three frame reads, one header decode, no thread hop.
        An empty read raises zmq.Again, which costs more (~3 us here) than a whole message, so a
        socket is read blindly only while it is ``_flowing`` (its last read found a message and
        more may wait); otherwise one zmq_poll(0) over all data sockets says which to read.
        """
        if self._ready:
            return self._ready.popleft()
        if self._flowing:
            hot = self._hot
            message = self._read_link() if hot is self._link_in else self._read_relay(hot)
            if message is not None:
                return message
        for sock, _ in _ZMQ_POLL(self._poll_items(), 0):
            message = self._read_socket(sock)
            if message is not None:
                self._hot, self._flowing = sock, True
                return message
        if self._receiver.gapped:
            for src, released in self._receiver.skip_gaps(time.monotonic()):
                self._ready.extend(Message(src, bytes(frame), via) for frame, via in released)
            if self._ready:
                return self._ready.popleft()
        return None

    def _poll_items(self) -> list:
        """[(socket, POLLIN)] for every data socket we read (the link listener, each server's data_in)."""
        data = self._engine.data
        if self._items_for is not data:
            self._items_for = data
            self._items = [(self._link_in, _POLLIN), *[(d.inn, _POLLIN) for d in data]]
        return self._items

    def _read_ready(self, timeout_ms: int) -> Message | None:
        """Wait up to ``timeout_ms`` for a data socket to be readable, then read it (None: nothing came,
        or what came was not for ``recv``). The read is not marked ``_flowing``: after a wait, the
        next message is more likely not there yet, and an empty read costs more than asking."""
        for sock, _ in _ZMQ_POLL(self._poll_items(), timeout_ms):
            message = self._read_socket(sock)
            if message is not None:
                self._hot = sock
                return message
        return None

    def _read_socket(self, sock: zmq.Socket) -> Message | None:
        """The next message for ``recv`` from one data socket (the link listener or a server's data_in)."""
        return self._read_link() if sock is self._link_in else self._read_relay(sock)

    def _read_link(self, _new=tuple.__new__, _Message=Message) -> Message | None:
        """Direct links: [data token, seq + payload] or [data token, seq, payload] (see wire.py).

        Frames are read as bytes: for small frames that is less than half the cost of zmq.Frame
        objects, and asking RCVMORE costs as much as a read, so the one-frame form is read without
        it. A peer that sends extra frames (ours never do) only gets its own messages wrong: the
        next read takes one of its frames for a token, finds no link with it and skips the rest of
        that message, which puts the reader back on a message boundary.
        """
        engine = self._engine
        sock = engine.link_in
        recv = self._link_recv
        while True:
            try:
                token = recv(_NOBLOCK)
            except zmq.Again:
                self._flowing = False
                return None
            frame = recv(_NOBLOCK)  # the rest of a message is there once its first frame is
            if len(frame) == 8:
                if not sock.getsockopt(_RCVMORE):
                    self._drop(DropReason.MALFORMED)
                    continue
                payload = sock.recv(_NOBLOCK)
                if sock.getsockopt(_RCVMORE):
                    recv_frames_rest(sock)
                    self._drop(DropReason.MALFORMED)
                    continue
            elif len(frame) < 8:
                self._drop(DropReason.MALFORMED)
                continue
            else:
                payload = frame[8:]
            entry = engine.tokens.get(token)
            if entry is None:  # not (or no longer) an authenticated link
                recv_frames_rest(sock)
                self._drop(DropReason.UNREGISTERED)
                continue
            src, via = entry  # via: "direct" | "punched"
            seq = _LINK_SEQ_UNPACK(frame)[0]
            stream = self._receiver.streams.get(src)
            if stream is not None and seq == stream.expected and not stream.early \
                    and len(payload) <= self._max_frame:
                stream.expected = seq + 1  # Receiver.accept's in-order case, inlined (the hot path)
                if not seq & _ACK_EVERY_BIG and (not seq & _ACK_EVERY or len(payload) >= _BIG):
                    self._ack_soon()
                return _new(_Message, (src, payload, via))  # = Message(...), without its Python __new__
            message = self._accept(src, seq or CONTROL_SEQ, payload, via)
            if message is not None:
                return message

    def _read_relay(self, sock: zmq.Socket, _new=tuple.__new__, _Message=Message) -> Message | None:
        """A server's data_in: [Data header, payload]; the server stamped the source.

        A header seen before (the relay's hot path) is read as bytes and its payload after it, as
        bytes too (the one copy there has to be: Message.data is bytes), trusting our server's
        framing: two bytes reads cost 40% of two Frames, and asking RCVMORE costs as much as a read.
        Anything else is read as Frames, whose ``more`` flags give the framing: a lone frame, or a
        message of more than two, is dropped and counted once. (A server that broke the framing could
        only garble what it relays itself, which it could do anyway: it stamps the sources.)
        """
        recv = _RECV
        sources = self._relay_sources
        while True:
            try:
                raw = recv(sock, _NOBLOCK)
            except zmq.Again:
                self._flowing = False
                return None
            # A header seen before but for its seq (a server's remembered route ends in a 9-byte
            # uint64): the source is a function of those bytes, so no msgpack decode is needed.
            src = sources.get(raw[:-9]) if raw[-9:-8] == b"\xcf" else None
            if src is not None:
                payload = recv(sock, _NOBLOCK)  # the rest of a message is there once its first frame is
                seq = _U64_AT(raw, len(raw) - 8)[0]
                stream = self._receiver.streams.get(src)
                if stream is not None and seq == stream.expected and not stream.early \
                        and len(payload) <= self._max_frame:
                    stream.expected = seq + 1  # Receiver.accept's in-order case, inlined (the hot path)
                    if not seq & _ACK_EVERY_BIG and (not seq & _ACK_EVERY or len(payload) >= _BIG):
                        self._ack_soon()
                    return _new(_Message, (src, payload, "relay"))
            else:
                if not sock.getsockopt(_RCVMORE):
                    self._drop(DropReason.MALFORMED)
                    continue
                frame = recv(sock, _NOBLOCK, False)
                if frame.more:
                    recv_frames_rest(sock)
                    self._drop(DropReason.MALFORMED)
                    continue
                payload = frame.bytes
                try:
                    header = wire.decode(raw)
                except wire.WireError as exc:
                    self._drop(exc.reason)
                    continue
                if header.__class__ is not wire.Data:
                    self._drop(DropReason.MALFORMED)
                    continue
                src, seq = header.src, header.seq
                if seq > 0 and raw[-9:-8] == b"\xcf" and raw[:-9] == wire.data_header_prefix(header.dst, src):
                    if len(sources) >= _HEADER_CACHE_MAX:
                        sources.clear()
                    sources[raw[:-9]] = src
            message = self._accept(src, seq, payload, "relay")
            if message is not None:
                return message

    def _ack_soon(self) -> None:
        """A stream delivered a slice of its sender's window since its last ack: acknowledge soon."""
        self._acks_soon = True
        self._engine.upkeep_soon()

    def _accept(self, src: str, seq: int, payload: Any, via: str) -> Message | None:
        """Hand one arrival (a frame or a buffer) to the delivery layer; the next in-order message."""
        size = len(payload)
        if size > self.config.max_frame:
            self._drop(DropReason.OVERSIZED)
            return None
        if seq == CONTROL_SEQ:
            try:
                ack = wire.decode(payload)
            except wire.WireError as exc:
                self._drop(exc.reason)
                return None
            if ack.__class__ is wire.Ack:
                self._engine._note_ack(src, ack)
            elif ack.__class__ is wire.AckRequest:
                self._answer_ack_request(src)
            elif ack.__class__ is wire.Request:
                self._on_request(src, ack)
            elif ack.__class__ is wire.Reply:
                self._on_reply(src, ack)
            return None
        released = self._receiver.accept(src, seq, (payload, via), size)
        if not released:
            return None
        if len(released) > _ACK_EVERY_BIG or not seq & _ACK_EVERY_BIG:
            self._ack_soon()
        frame, via = released[0]
        if len(released) > 1:
            self._ready.extend(Message(src, bytes(f), v) for f, v in released[1:])
        return Message(src, bytes(frame), via)

    def _answer_ack_request(self, src: str) -> None:
        """A sender waits in ``send(..., ack=True)``: acknowledge what we delivered, now."""
        stream = self._receiver.streams.get(src)
        if stream is not None:
            self._tunnel(src, wire.encode(wire.Ack(stream.expected - 1)), wait=_ACK_LOCK_WAIT_S)

    def _await_ack(self, dst: str, seq: int, timeout: float) -> None:
        """Block until ``dst`` acknowledged ``seq`` (it has received the message), else TimeoutError.

        Asks the receiver to acknowledge at once (again every ACK_REQUEST_RETRY_S: a request can die
        with a path, the message itself is repeated by the delivery layer). The answer lands on our
        data sockets, so while waiting this thread reads them if no one else is, woken as they turn
        readable (``_read_for_ourselves``): user messages read on the way are kept, in order, for
        ``recv``.
        """
        engine = self._engine
        waiting = _AckWait(dst, seq, timeout)
        while not self._ack_step(waiting, _ACK_LOCK_WAIT_S):
            pause = waiting.next_pause()
            if self._read_for_ourselves(lambda: engine.acked.get(dst, 0) >= seq, pause):
                continue
            with engine.ack_changed:  # a recv in another thread reads for us and wakes us
                if engine.acked.get(dst, 0) < seq:
                    engine.ack_changed.wait(pause)

    def _read_for_ourselves(self, done: Any, pause: float) -> bool:
        """One turn of a thread waiting for an answer that lands on the data sockets (the Ack to an
        AckRequest, a Reply) while no ``recv`` reads them: take the receive lock unless someone
        holds it or waits for it, read what is there, and unless ``done()`` wait for a socket to turn
        readable, so the answer is read as it lands. The wait lasts ``pause`` at most (an answer the
        engine takes from a control connection is seen after it) and ends at once when a ``recv``
        asks for the lock (``_wait_held``). False if this thread must wait elsewhere (on its
        condition: the reader wakes it); ``_read_wakes`` counts the waits that something ended."""
        if self._rx_queued or not self._rx_lock.acquire(blocking=False):
            return False
        try:
            if self._closed:
                return True  # (the caller's next step raises)
            self._read_into_backlog()
            if done():
                return True
            if len(self._ready) >= BACKLOG_MAX:
                return False
            self._read_wakes += self._wait_held(max(1, round(pause * 1000)))
            return True
        finally:
            self._rx_lock.release()

    def _ack_step(self, waiting: "_AckWait", lock_wait: float) -> bool:
        """True once acknowledged; raises on timeout or close; (re)sends the AckRequest when due."""
        if self._engine.acked.get(waiting.dst, 0) >= waiting.seq:
            return True
        now = time.monotonic()
        if now >= waiting.deadline:
            raise TimeoutError(f"no acknowledgement from {waiting.dst} within {waiting.timeout}s "
                               "(the message may still arrive, once)")
        if self._closed:
            raise ZbusError(f"{self.id} is closed")
        if now >= waiting.next_request and self._tunnel(waiting.dst, waiting.request, wait=lock_wait):
            waiting.next_request = now + ACK_REQUEST_RETRY_S
        return False

    def _read_into_backlog(self) -> None:
        """Read what the data sockets hold so acks, requests and replies on them are seen; keep user
        messages, in order, for ``recv``. Bounded: once BACKLOG_MAX messages wait for ``recv``, the
        rest stays in the sockets (which pushes back on their senders) until ``recv`` takes some."""
        backlog, self._ready = self._ready, collections.deque()
        try:
            for _ in range(min(_BACKLOG_READ_MAX, BACKLOG_MAX - len(backlog))):
                message = self._try_recv()
                if message is None:
                    break
                backlog.append(message)
        finally:
            backlog.extend(self._ready)
            self._ready = backlog

    def _drop(self, reason: DropReason) -> None:
        self.dropped[reason.value] = self.dropped.get(reason.value, 0) + 1

    # -- request/reply (docs/delivery.md) ------------------------------------------------------
    # Requests and replies are delivery-layer control messages (like Ack): unsequenced, on the
    # current path, repeated by the requester until the reply or its timeout. The responder runs
    # its handler once per (requester, rid) and answers repeats from ``_served``.

    def _request_start(self, dst: str, data: bytes, timeout: float | None) -> tuple[_Pending, bytes]:
        if self._closed:
            raise ZbusError(f"{self.id} is closed")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"request data must be bytes, not {type(data).__name__}")
        if len(data) + _REQUEST_OVERHEAD > self._max_frame:
            raise ValueError(f"request of {len(data)} bytes: over max_frame ({self._max_frame}) with its header")
        choose_path(dst, self._engine.routes)  # Unreachable / Disconnected now, not after the timeout
        rid = self._rng.getrandbits(62) + 1
        while rid in self._calls:
            rid = self._rng.getrandbits(62) + 1
        pending = _Pending(dst, rid, REQUEST_TIMEOUT_S if timeout is None else timeout)
        self._calls[rid] = pending
        return pending, wire.encode(wire.Request(rid, bytes(data)))

    def _request_step(self, pending: _Pending, request: bytes, lock_wait: float) -> bool:
        """True once the reply is in; raises on timeout or close; (re)sends the Request when due."""
        if pending.reply is not None:
            return True
        now = time.monotonic()
        if now >= pending.deadline:
            raise TimeoutError(f"no reply from {pending.dst} within {pending.timeout}s "
                               "(the handler may still run, once)")
        if self._closed:
            raise ZbusError(f"{self.id} is closed")
        if now >= pending.next_send and self._tunnel(pending.dst, request, wait=lock_wait):
            pending.next_send = now + pending.retry
            pending.retry = min(pending.retry * 2, REQUEST_RETRY_MAX_S)
        return False

    @staticmethod
    def _request_result(pending: _Pending) -> bytes:
        reply = pending.reply
        if reply.error:
            raise RemoteError(f"{pending.dst}: {reply.error}")
        return reply.data

    def _on_reply(self, src: str, reply: wire.Reply) -> None:
        pending = self._calls.get(reply.rid)
        if pending is None or pending.dst != src or pending.reply is not None:
            return  # a repeat, or for a request that gave up
        pending.reply = reply
        with self._reply_changed:
            self._reply_changed.notify_all()

    def _on_request(self, src: str, request: wire.Request) -> None:
        """A Request arrived (whoever reads the sockets): queue it for the handler, or answer at once."""
        key = (src, request.rid)
        with self._serve_lock:
            done = self._served.get(key, False)
            if done is False:
                if self._handler is None:
                    done = wire.encode(wire.Reply(request.rid, b"", f"no request handler: {self.id} has not "
                                                                    "called on_request"))
                elif len(self._requests_in) >= REQUESTS_QUEUED_MAX:
                    self._drop(DropReason.CONGESTED)  # the requester repeats it
                    return
                else:
                    self._served[key] = None  # running: a repeat is ignored until the reply is in
                    self._requests_in.append((src, request.rid, request.data))
                    self._wake_server()
                    return
        if done is not None:  # a repeat of a request already answered (or no handler): answer again
            self._tunnel(src, done, wait=_ACK_LOCK_WAIT_S)

    def _take_request(self) -> tuple[str, int, bytes] | None:
        with self._serve_lock:
            return self._requests_in.popleft() if self._requests_in else None

    def _finish_request(self, src: str, rid: int, result: Any, error: str) -> None:
        """Keep the reply for repeats (bounded, oldest out first) and send it."""
        if not error and not isinstance(result, (bytes, bytearray, memoryview)):
            error = f"the request handler returned {type(result).__name__}, expected bytes"
        data = b"" if error else bytes(result)
        if len(data) + _REQUEST_OVERHEAD > self._max_frame:
            data, error = b"", f"the reply of {len(data)} bytes is over max_frame ({self._max_frame})"
        reply = wire.encode(wire.Reply(rid, data, error))
        with self._serve_lock:
            self._served[(src, rid)] = reply
            self._served_bytes += len(reply)
            while len(self._served) > SERVED_MAX or self._served_bytes > SERVED_BYTES_MAX:
                old = self._served.popitem(last=False)[1]
                self._served_bytes -= len(old) if old is not None else 0
        self._tunnel(src, reply, wait=_ACK_LOCK_WAIT_S)

    def _wake_server(self) -> None:
        """A request was queued for the handler (the clients say how to wake their server)."""
