"""Shared pyzmq settings: one context per process, and the options every zbus socket uses."""

from __future__ import annotations

import ctypes
import threading

import zmq

HEARTBEAT_IVL_MS = 500  # libzmq pings an idle connection this often...
HEARTBEAT_TIMEOUT_MS = 1500  # ...and drops it when no traffic came back for this long
KEEPALIVE_IDLE_S = 5  # data connections (no ZMTP heartbeat): TCP keepalive after 5 s idle,
KEEPALIVE_INTVL_S = 1  # ...probing every second,
KEEPALIVE_CNT = 5  # ...and dead after 5 unanswered probes
RECONNECT_IVL_MS = 100
RECONNECT_IVL_MAX_MS = 1000
MAX_SOCKETS = 16384  # per process (the open-files limit applies too)

_context: zmq.Context | None = None
_context_lock = threading.Lock()


# glibc returns freed memory at the top of its heap to the kernel once more than 128 KiB is free
# there, so a process that receives 64 KiB messages one by one gives each one's pages back and
# faults them in again for the next (~20 us of kernel time per 64 KiB message here, on the
# receiving client, the sending client's copy and the server). glibc raises that limit itself the
# first time it frees a block it had to map on its own (over 128 KiB): to twice that block's size,
# up to 64 MiB. Allocating and freeing one such block (untouched: no page is faulted in) when a
# process starts its zbus context puts the allocator in that state up front: it keeps up to 64 MiB
# of freed heap for reuse, as it would after one large message. Elsewhere (other allocators, or
# MALLOC_TRIM_THRESHOLD_ and friends set in the environment, which switch glibc's adjustment off)
# it does nothing. docs/performance.md has the measurements.
ALLOCATOR_WARMUP = 32 * 1024 * 1024 - 65536  # under glibc's largest adjusting size (32 MiB, header and flags included)


def _warm_allocator() -> None:
    try:
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
    except (OSError, AttributeError):  # no C library to load by that name: not glibc's, nothing to do
        return
    libc.free(libc.malloc(ALLOCATOR_WARMUP))


def context() -> zmq.Context:
    """The process-wide zbus context (inproc endpoints need a shared one). Never terminated early."""
    global _context
    with _context_lock:
        if _context is None or _context.closed:
            if _context is None:
                _warm_allocator()
            _context = zmq.Context()
            # libzmq's default of 1023 sockets per context is ~100 clients in one process (each has
            # ~10: per server 3 connections and a monitor, plus its two link ROUTERs and an inproc pair).
            _context.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
        return _context


# pyzmq sends a buffer of copy_threshold bytes or more (default 64 KiB) without copying it, but
# then every send hands the buffer to pyzmq's garbage-collector thread, which wakes once per
# message to release it: at 64 KiB that costs more (GIL hand-offs, ~20 us per message here) than
# the copy it saves. Measured on this machine, copying costs the same as zero-copy up to ~1 MiB.
ZERO_COPY_MIN = 1024 * 1024


def tune(sock: zmq.Socket, *, max_frame: int, heartbeat: bool = True,
         heartbeat_timeout_ms: int = HEARTBEAT_TIMEOUT_MS) -> zmq.Socket:
    """Options for a TCP-facing socket: heartbeats, fast reconnect, a hard size cap, no linger.

    ``heartbeat=False`` is for data connections, where a stalled reader is normal (backpressure):
    libzmq stops reading a connection whose receive pipe is full, so it misses the peer's ZMTP
    PONGs too and a heartbeat timeout would cut the connection, losing everything queued in its
    pipes. Those connections use TCP keepalive instead (answered by the kernel, reading or not);
    their liveness is the control connection's business (ZMTP heartbeats, link pings).
    """
    if heartbeat:
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, heartbeat_timeout_ms)  # when we drop a silent peer
        sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)  # when the peer drops us, silent
    else:
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTVL_S)
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_CNT)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    # Frames over max_frame are dropped and counted by zbus; libzmq cuts a connection only past
    # twice that, so a hostile peer cannot make us buffer without bound.
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * max_frame)
    sock.setsockopt(zmq.LINGER, 0)
    sock.copy_threshold = ZERO_COPY_MIN
    return sock


def recv_frames(sock: zmq.Socket, flags: int = zmq.NOBLOCK) -> list[zmq.Frame]:
    """One multipart message, frame by frame (cheaper in pyzmq than ``recv_multipart``)."""
    frames = [sock.recv(flags, copy=False)]
    while frames[-1].more:
        frames.append(sock.recv(copy=False))
    return frames


def recv_frames_rest(sock: zmq.Socket) -> None:
    """Read and discard the remaining frames of a message that is being dropped."""
    while sock.getsockopt(zmq.RCVMORE):
        sock.recv(copy=False)


def ask(endpoint: str, request: object, expected: type, timeout: float, name: str = "", hint: str = "",
        security: object = None, server_id: str | None = None) -> object:
    """One request/answer on a fresh DEALER: ``request`` (a wire message) to ``endpoint``, an answer of
    type ``expected`` back within ``timeout`` s. Raises Disconnected (no answer) or ProtocolError.

    ``security`` (a :class:`zbus.security.Security`): dial over CURVE, expecting the key the trust list
    binds to ``server_id``; a server that refuses our key is reported as such, not as silence."""
    from . import wire
    from .errors import ConfigError, Disconnected, ProtocolError, Refused

    sock = tune(context().socket(zmq.DEALER), max_frame=wire.DEFAULT_MAX_FRAME)
    monitor = None
    try:
        if security is not None:
            if not security.dial(sock, server_id):
                raise ConfigError(f"{endpoint}: no trusted key for {server_id or 'its server (no Id given)'}; "
                                  "expected S-<uuid4>@tcp://host:port with that server's .pub in the trust directory")
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        sock.connect(endpoint)
        sock.send(wire.encode(request))
        if not sock.poll(int(timeout * 1000)):
            if monitor is not None and monitor.poll(0):
                raise Refused(f"{name or endpoint} refused our key ({security.id} is not in its trust list)")
            raise Disconnected(f"no answer from {name or endpoint} within {timeout}s{hint}")
        frames = sock.recv_multipart()
        try:
            reply = wire.decode(frames[0])
        except wire.WireError as exc:
            raise ProtocolError(f"{endpoint} answered something that is not a zbus {expected.__name__}: {exc}") from None
        if not isinstance(reply, expected):
            raise ProtocolError(f"{endpoint} answered {type(reply).__name__}, expected {expected.__name__}")
        return reply
    finally:
        if monitor is not None:
            sock.disable_monitor()
            monitor.close(linger=0)
        sock.close(linger=0)
