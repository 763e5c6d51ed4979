"""The public clients: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both drive the same :class:`~zbus.engine.Engine` thread; they differ only in the user-side inproc
sockets (plain pyzmq vs ``zmq.asyncio``).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from typing import Any, NamedTuple

import zmq
import zmq.asyncio

from . import sockets, wire
from .config import ClientConfig, load_client_config
from .engine import Engine, index_frame
from .errors import IdInUse, Unreachable, ZbusError
from .ids import new_client_id
from .routing import Routes, choose_path

_HEADER_CACHE_MAX = 4096
_POLL_SLICE_MS = 200  # a blocking recv() wakes this often so Ctrl-C and close() get through


class Message(NamedTuple):
    src: str  # the sender's Id, as stamped by the path it came over
    data: bytes
    via: str  # "direct" | "punched" | "relay"


class Peer(NamedTuple):
    name: str
    via: str  # how we would reach it now: "direct" | "punched" | "relay"
    address: str  # the link's address, or the relaying server's endpoint
    rtt: float | None  # seconds, for links that measure it


class _ClientBase:
    """What both clients share: config, Id, engine, path choice and table lookups."""

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
        self._engine = Engine(self.id, self.config)
        self._rng = random.Random()
        self._headers: dict[str, bytes] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} name={self.name!r}>"

    # -- path choice (user thread) ----------------------------------------------------------
    def _frames(self, dst: str, data: Any) -> list:
        if self._closed:
            raise ZbusError(f"{self.id} is closed")
        index = choose_path(dst, self._engine.routes, self._rng)
        header = self._headers.get(dst)
        if header is None:
            if len(self._headers) >= _HEADER_CACHE_MAX:
                self._headers.clear()
            header = self._headers[dst] = wire.encode(wire.Data(dst))
        return [index_frame(index), header, data]

    # -- lookups ----------------------------------------------------------------------------
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

    @staticmethod
    def _message(frames: list[bytes]) -> Message:
        return Message(frames[0].decode(), frames[2], frames[1].decode())


class Client(_ClientBase):
    """A blocking zbus client. Thread-safe; all socket I/O happens in one owned engine thread.

    The constructor returns once a server has registered the client and sent its client list, or
    after ``connect_timeout`` seconds (then ``send`` raises ``Disconnected`` until a server is up).
    It raises :class:`~zbus.IdInUse` if every server refused the Id.
    """

    def __init__(self, servers: list[str] | None = None, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(servers, name, **kwargs)
        ctx = sockets.context()
        self._tx = ctx.socket(zmq.PUSH)
        self._rx = ctx.socket(zmq.PULL)
        self._ctl = ctx.socket(zmq.PAIR)
        self._tx.connect(self._engine.tx_endpoint)
        self._rx.connect(self._engine.rx_endpoint)
        self._ctl.connect(self._engine.ctl_endpoint)
        self._tx_lock = threading.Lock()
        self._rx_lock = threading.Lock()
        self._engine.start()
        self._engine.wait_for(self._settled, self.config.connect_timeout)
        try:
            self._raise_if_refused()
        except IdInUse:
            self.close()
            raise

    def send(self, dst: str, data: bytes) -> None:
        """Send ``data`` to the client ``dst`` by the best path. Blocks only under backpressure."""
        frames = self._frames(dst, data)
        with self._tx_lock:
            self._tx.send_multipart(frames, copy=False)

    def recv(self, timeout: float | None = None) -> Message:
        """The next message; raise ``TimeoutError`` after ``timeout`` seconds (None: wait forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._rx_lock:
            while True:
                if self._closed:
                    raise ZbusError(f"{self.id} is closed")
                left_ms = _POLL_SLICE_MS if deadline is None else int(max(0.0, deadline - time.monotonic()) * 1000)
                if self._rx.poll(min(left_ms, _POLL_SLICE_MS)):
                    return self._message(self._rx.recv_multipart())
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no message within {timeout}s")

    def peers(self) -> dict[str, Peer]:
        return self._peers()

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
        self._ctl.send(b"stop")
        self._engine.join()
        with self._tx_lock, self._rx_lock:
            for sock in (self._tx, self._rx, self._ctl):
                sock.close(linger=0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """The asyncio client: ``async with zbus.AsyncClient(...) as c``; the same methods, awaitable."""

    def __init__(self, servers: list[str] | None = None, name: str | None = None, **kwargs: Any) -> None:
        super().__init__(servers, name, **kwargs)
        ctx = zmq.asyncio.Context.shadow(sockets.context())
        self._tx = ctx.socket(zmq.PUSH)
        self._rx = ctx.socket(zmq.PULL)
        self._ctl = ctx.socket(zmq.PAIR)
        self._tx.connect(self._engine.tx_endpoint)
        self._rx.connect(self._engine.rx_endpoint)
        self._ctl.connect(self._engine.ctl_endpoint)
        self._started = False

    async def start(self) -> "AsyncClient":
        if not self._started:
            self._started = True
            self._engine.start()
            await asyncio.to_thread(self._engine.wait_for, self._settled, self.config.connect_timeout)
            try:
                self._raise_if_refused()
            except IdInUse:
                await self.close()
                raise
        return self

    async def send(self, dst: str, data: bytes) -> None:
        await self._tx.send_multipart(self._frames(dst, data), copy=False)

    async def recv(self, timeout: float | None = None) -> Message:
        if self._closed:
            raise ZbusError(f"{self.id} is closed")
        try:
            frames = await asyncio.wait_for(self._rx.recv_multipart(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no message within {timeout}s") from None
        return self._message(frames)

    async def peers(self) -> dict[str, Peer]:
        return self._peers()

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
        if self._started:
            await self._ctl.send(b"stop")
            await asyncio.to_thread(self._engine.join)
        else:
            self._engine.close_unstarted()
        for sock in (self._tx, self._rx, self._ctl):
            sock.close(linger=0)

    async def __aenter__(self) -> "AsyncClient":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
