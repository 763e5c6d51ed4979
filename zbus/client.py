"""The public clients: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Per server a client has three connections. The engine thread (:mod:`zbus.engine`) owns the control
connection. The user's threads own the two data connections: ``send`` writes the Data header and
the payload straight onto the ``data_out`` DEALER, ``recv`` reads them straight off the ``data_in``
DEALER, so a message crosses no thread inside a client. Their routing ids are random per client and
announced to the server in the Hello, which is how the server stamps the source Id.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import zmq
import zmq.asyncio

from . import sockets, wire
from .config import ClientConfig, load_client_config
from .engine import Engine
from .errors import Disconnected, IdInUse, Unreachable, ZbusError
from .ids import new_client_id
from .relay import TOKEN_BYTES
from .routing import Routes, choose_path
from .sockets import recv_frames_rest
from .wire import DropReason

_HEADER_CACHE_MAX = 4096
_SLICE_MS = 200  # blocking calls wake this often so Ctrl-C, close() and lost servers get through
_CLOSE_LINGER_MS = 2000  # how long close() lets already-sent messages drain to the servers
_BYE = wire.encode(wire.Bye())
_MORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: pyzmq's IntFlag arithmetic costs more than a small send
_NOBLOCK_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)


class Message(NamedTuple):
    src: str  # the sender's Id, as stamped by the path it came over
    data: bytes
    via: str  # "direct" | "punched" | "relay"


class Peer(NamedTuple):
    name: str
    via: str  # how we would reach it now: "direct" | "punched" | "relay"
    address: str  # the link's address, or the relaying server's endpoint
    rtt: float | None  # seconds, for links that measure it


def _token() -> bytes:
    token = os.urandom(TOKEN_BYTES)
    return bytes([token[0] | 1]) + token[1:]  # never a leading zero byte (libzmq reserves those)


@dataclass(frozen=True)
class ServerLink:
    endpoint: str
    state: str  # "down" | "hello-sent" | "registered" | "refused"
    server_id: str | None
    clients: int  # entries in that server's client list as we hold it


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


class _ClientBase:
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
    ) -> None:
        self.config: ClientConfig = load_client_config(
            config, servers=servers, name=name, listen=listen, max_links=max_links, id=id,
            connect_timeout=connect_timeout, max_frame=max_frame,
        )
        self.id: str = self.config.id or new_client_id()
        self.name: str = self.config.name
        data_in, data_out = _token(), _token()
        self._engine = Engine(self.id, self.config, data_in, data_out)
        self._rng = random.Random()
        self._headers: dict[str, bytes] = {}
        self._closed = False
        self.dropped: dict[str, int] = {}
        self._ctl = sockets.context().socket(zmq.PAIR)
        self._ctl.connect(self._engine.ctl_endpoint)
        self._polled: tuple = ()  # the engine's data sockets our poller was built for

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} name={self.name!r}>"

    # -- data plane (user threads) ----------------------------------------------------------
    def _route(self, dst: str) -> tuple[zmq.Socket, int, bytes]:
        if self._closed:
            raise ZbusError(f"{self.id} is closed")
        index = choose_path(dst, self._engine.routes, self._rng)
        header = self._headers.get(dst)
        if header is None:
            if len(self._headers) >= _HEADER_CACHE_MAX:
                self._headers.clear()
            header = self._headers[dst] = wire.encode(wire.Data(dst))
        return self._engine.data[index].out, index, header

    def _still_routed(self, index: int) -> None:
        """After a send timed out: raise if the server went away, else it is backpressure."""
        if self._closed:
            raise ZbusError(f"{self.id} is closed")
        if index not in self._engine.routes.registered:
            raise Disconnected(f"lost server {self._engine.routes.endpoints[index]} while sending")

    def _try_recv(self) -> Message | None:
        """A message if one is waiting on any data socket, without blocking.

        The hot path of every receive: two frame reads, one header decode, no thread hop.
        """
        for data in self._engine.data:
            sock = data.inn
            while True:
                try:
                    head = sock.recv(_NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if not head.more:
                    self._drop(DropReason.MALFORMED)
                    continue
                payload = sock.recv(_NOBLOCK, copy=False)
                if payload.more:
                    recv_frames_rest(sock)
                    self._drop(DropReason.MALFORMED)
                    continue
                if len(payload) > self.config.max_frame:
                    self._drop(DropReason.OVERSIZED)
                    continue
                try:
                    header = wire.decode(head.buffer)
                except wire.WireError as exc:
                    self._drop(exc.reason)
                    continue
                if header.__class__ is not wire.Data:
                    self._drop(DropReason.MALFORMED)
                    continue
                return Message(header.src, payload.bytes, "relay")
        return None

    def _drop(self, reason: DropReason) -> None:
        self.dropped[reason.value] = self.dropped.get(reason.value, 0) + 1

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
        return ClientStatus(self.id, self.name, engine.core.master, links, dict(engine.control_msgs),
                            engine.control_bytes, dropped)

    def _peers(self) -> dict[str, Peer]:
        routes = self._engine.routes
        return {
            client_id: Peer(info.name, "relay", routes.endpoints[routes.holders[client_id][0]], None)
            for client_id, info in routes.clients.items()
        }

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
            raise IdInUse("; ".join(routes.refusals))

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
    It raises :class:`~zbus.IdInUse` if every server refused the Id.
    """

    def __init__(self, servers: list[str] | None = None, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(servers, name, **kwargs)
        self._tx_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._poller = zmq.Poller()
        self._engine.start()
        self._engine.wait_for(self._settled, self.config.connect_timeout)
        try:
            self._raise_if_refused()
        except IdInUse:
            self.close()
            raise

    def send(self, dst: str, data: bytes) -> None:
        """Send ``data`` to the client ``dst`` by the best path. Blocks only under backpressure.

        Raises ``Unreachable`` if no path to ``dst`` is known, ``Disconnected`` if no server is.
        """
        sock, index, header = self._route(dst)
        with self._tx_lock:
            while True:
                try:
                    sock.send(header, _MORE)  # blocks up to SNDTIMEO on a full pipe
                    break
                except zmq.Again:
                    self._still_routed(index)
            sock.send(data, 0, copy=False)  # the rest of a message never blocks

    def recv(self, timeout: float | None = None) -> Message:
        """The next message; raise ``TimeoutError`` after ``timeout`` seconds (None: wait forever)."""
        with self._rx_lock:
            if not self._closed:
                message = self._try_recv()
                if message is not None:
                    return message
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._closed:
                    raise ZbusError(f"{self.id} is closed")
                message = self._try_recv()
                if message is not None:
                    return message
                if self._poll_set_changed():
                    self._poller = zmq.Poller()
                    for data in self._polled:
                        self._poller.register(data.inn, zmq.POLLIN)
                left_ms = _SLICE_MS if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000)
                if not self._poller.poll(min(left_ms, _SLICE_MS)) and deadline is not None \
                        and time.monotonic() >= deadline:
                    raise TimeoutError(f"no message within {timeout}s")

    def peers(self) -> dict[str, Peer]:
        return self._peers()

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
        with self._tx_lock, self._rx_lock:
            self._close_sockets_and_engine()

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
        self._tx_lock = asyncio.Lock()

    async def start(self) -> "AsyncClient":
        if not self._engine._started:
            self._engine.start()
            await asyncio.to_thread(self._engine.wait_for, self._settled, self.config.connect_timeout)
            try:
                self._raise_if_refused()
            except IdInUse:
                await self.close()
                raise
        return self

    async def send(self, dst: str, data: bytes) -> None:
        sock, index, header = self._route(dst)
        async with self._tx_lock:
            while True:
                try:
                    sock.send(header, _NOBLOCK_MORE)
                    break
                except zmq.Again:
                    self._still_routed(index)
                await zmq.asyncio.Socket.shadow(sock.underlying).poll(_SLICE_MS, zmq.POLLOUT)
            sock.send(data, 0, copy=False)

    async def recv(self, timeout: float | None = None) -> Message:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._closed:
                raise ZbusError(f"{self.id} is closed")
            message = self._try_recv()
            if message is not None:
                return message
            if self._poll_set_changed():
                self._poller = zmq.asyncio.Poller()
                for data in self._polled:
                    self._poller.register(zmq.asyncio.Socket.shadow(data.inn.underlying), zmq.POLLIN)
            left_ms = _SLICE_MS if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000)
            if not await self._poller.poll(min(left_ms, _SLICE_MS)) and deadline is not None \
                    and time.monotonic() >= deadline:
                raise TimeoutError(f"no message within {timeout}s")

    async def peers(self) -> dict[str, Peer]:
        return self._peers()

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
