"""The byte bridge of a punched link (see :mod:`zbus.punchlink`), standard library only.

Local TCP connections made to the bridge's two loopback ports (the link's control and data
connections) become streams multiplexed on the *pipe* (the punched TCP connection); streams the peer
opens become connections to our own link ROUTER / data ROUTER. Frames on the pipe: stream id (u32),
op (u8: OPEN / DATA / CLOSE / PING), payload length (u32), payload. An idle pipe carries a PING each
second; a pipe silent for 5 s is closed, which closes every stream (the link falls back to relay).

:class:`ProcessBridge` runs one :class:`Bridge` per pipe in a child process started as
``python -I -S .../punchbridge.py`` (stdlib only, so it starts fast), so the bytes it moves do not
compete with the client's threads for the GIL: in-process, a punched link reached 0.30-0.66x of a
direct link at 64 KiB on two shared cores; in its own process 0.51-0.53x (docs/performance.md).

A *birthday* path (one side behind a symmetric NAT, punched over UDP from one of many sockets) has
no TCP port to follow, so its pipe is a byte stream carried by KCP over the punched UDP socket
(:class:`KcpPump`, the ``siokcp`` binding of the C library, in the same child process: the bridge
talks to it through a socket pair, so it is the same :class:`Bridge`).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Callable

log = logging.getLogger("zbus.punchlink")

BRIDGE_PING_S = 1.0  # the bridge says something on an idle pipe this often
BRIDGE_DEAD_S = 5.0  # ... and closes a pipe that said nothing for this long
SOCKET_BUFFER = 4 << 20
HIGH_WATER = 8 << 20  # stop reading one side while the other side's buffer is above this
CHUNK = 1 << 20

# Pipe frames: stream id (u32), op (u8), payload length (u32), payload.
_HEAD = struct.Struct(">IBI")
OPEN, DATA, CLOSE, PING = 0, 1, 2, 3
TARGET_CTL, TARGET_DATA = b"c", b"d"


def big_buffers(sock: socket.socket) -> None:
    """Large kernel buffers: the bridge thread moves more per call, so it needs the GIL less often."""
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


class Bridge:
    """ZMQ <-> pipe: local TCP connections to ``ctl_endpoint``/``data_endpoint`` become streams on
    the pipe; streams the peer opens become connections to our own link ROUTERs (``targets``)."""

    def __init__(self, peer: str, pipe: socket.socket, targets: dict[bytes, tuple[str, int]],
                 odd: bool, on_close: Callable[["Bridge"], None]) -> None:
        self.peer = peer
        self.pipe = pipe
        self.targets = targets
        self.on_close = on_close
        self.listeners: dict[bytes, socket.socket] = {}
        for kind in (TARGET_CTL, TARGET_DATA):
            lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(8)
            lsock.setblocking(False)
            self.listeners[kind] = lsock
        self.ctl_endpoint = "tcp://127.0.0.1:%d" % self.listeners[TARGET_CTL].getsockname()[1]
        self.data_endpoint = "tcp://127.0.0.1:%d" % self.listeners[TARGET_DATA].getsockname()[1]
        self._next_id = 1 if odd else 2
        self.streams: dict[int, socket.socket] = {}
        self.outbuf: dict[int, bytearray] = {}
        self.pipe_out = bytearray()
        self.pipe_in = bytearray()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        self.closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"zbus-bridge-{peer[:10]}", daemon=True)

    def start(self) -> "Bridge":
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the bridge (from any thread); every stream and the pipe are closed."""
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def join(self, timeout: float = 2.0) -> None:
        self._thread.join(timeout)

    # -- the thread -----------------------------------------------------------------------------
    def _frame(self, sid: int, op: int, payload: bytes = b"") -> None:
        self.pipe_out += _HEAD.pack(sid, op, len(payload))
        self.pipe_out += payload

    def _run(self) -> None:
        heard = sent = time.monotonic()
        try:
            while not self._stop:
                now = time.monotonic()
                if now - heard > BRIDGE_DEAD_S:
                    log.info("punched pipe to %s: silent for %.0f s, closing", self.peer, BRIDGE_DEAD_S)
                    return
                if now - sent > BRIDGE_PING_S and not self.pipe_out:
                    self._frame(0, PING)
                pipe_full = len(self.pipe_out) > HIGH_WATER
                streams_full = any(len(b) > HIGH_WATER for b in self.outbuf.values())
                rlist = [self._wake_r]
                if not streams_full:
                    rlist.append(self.pipe)
                if not pipe_full:
                    rlist += list(self.listeners.values()) + list(self.streams.values())
                wlist = [self.pipe] if self.pipe_out else []
                wlist += [self.streams[s] for s, b in self.outbuf.items() if b and s in self.streams]
                readable, writable, _ = select.select(rlist, wlist, [], BRIDGE_PING_S / 2)
                if self.pipe in writable:
                    _send_some(self.pipe, self.pipe_out)
                    sent = time.monotonic()
                for sid, sock in list(self.streams.items()):
                    if sock in writable and self.outbuf.get(sid):
                        try:
                            _send_some(sock, self.outbuf[sid])
                        except OSError:
                            self._drop_stream(sid, tell=True)
                for sock in readable:
                    if sock is self._wake_r:
                        sock.recv(64)
                    elif sock is self.pipe:
                        data = self.pipe.recv(CHUNK)
                        if not data:
                            log.info("punched pipe to %s closed by the peer", self.peer)
                            return
                        heard = time.monotonic()
                        self.pipe_in += data
                        self._parse()
                        self._flush_streams()
                    elif sock in self.listeners.values():
                        self._accept(sock)
                    else:
                        self._read_stream(sock)
        except OSError as exc:
            log.info("punched pipe to %s failed: %s", self.peer, exc)
        finally:
            for sock in [*self.streams.values(), *self.listeners.values(), self.pipe, self._wake_r, self._wake_w]:
                sock.close()
            self.streams.clear()
            self.closed.set()
            self.on_close(self)

    def _accept(self, lsock: socket.socket) -> None:
        try:
            conn, _ = lsock.accept()
        except OSError:
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        big_buffers(conn)
        sid, self._next_id = self._next_id, self._next_id + 2
        self.streams[sid] = conn
        self.outbuf[sid] = bytearray()
        kind = next(k for k, s in self.listeners.items() if s is lsock)
        self._frame(sid, OPEN, kind)

    def _read_stream(self, sock: socket.socket) -> None:
        sid = next((s for s, c in self.streams.items() if c is sock), None)
        if sid is None:
            return
        try:
            data = sock.recv(CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self._frame(sid, DATA, data)
            try:  # straight on (saves a select round); what does not fit waits for writability
                _send_some(self.pipe, self.pipe_out)
            except (BlockingIOError, InterruptedError):
                pass
        else:
            self._drop_stream(sid, tell=True)

    def _drop_stream(self, sid: int, tell: bool) -> None:
        sock = self.streams.pop(sid, None)
        self.outbuf.pop(sid, None)
        if sock is not None:
            sock.close()
            if tell:
                self._frame(sid, CLOSE)

    def _parse(self) -> None:
        buf = self.pipe_in
        offset = 0
        while len(buf) - offset >= _HEAD.size:
            sid, op, size = _HEAD.unpack_from(buf, offset)
            end = offset + _HEAD.size + size
            if len(buf) < end:
                break
            start, offset = offset + _HEAD.size, end
            if op == DATA:
                out = self.outbuf.get(sid)
                if out is not None:
                    with memoryview(buf) as view:
                        out += view[start:end]
            elif op == OPEN:
                self._open_local(sid, bytes(buf[start:end]))
            elif op == CLOSE:
                self._drop_stream(sid, tell=False)
        del buf[:offset]

    def _flush_streams(self) -> None:
        for sid, out in list(self.outbuf.items()):
            if out:
                try:
                    _send_some(self.streams[sid], out)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    self._drop_stream(sid, tell=True)

    def _open_local(self, sid: int, kind: bytes) -> None:
        target = self.targets.get(kind)
        if target is None or sid in self.streams:
            self._frame(sid, CLOSE)
            return
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.connect(target)  # loopback: immediate
        except OSError:
            sock.close()
            self._frame(sid, CLOSE)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        big_buffers(sock)
        self.streams[sid] = sock
        self.outbuf[sid] = bytearray()


KCP_MTU = 1400  # UDP payload per datagram: under any path's MTU (IPv4 1500 minus headers)
KCP_WINDOW = 1024  # segments in flight each way (~1.4 MB)
KCP_QUEUED_MAX = 4 * KCP_WINDOW  # segments KCP may hold for sending before we stop reading the bridge
KCP_TICK_MS = 10  # KCP's update interval (its "fast" mode)
KCP_SEND_MAX = 64 * 1024  # bytes per ikcp_send (it refuses one message of 128 segments or more, whatever the window)


def kcp_conv(session: bytes) -> int:
    """The KCP conversation id of a punch session: both sides derive the same; its first byte on the
    wire (little-endian) is 0x32, never a zbus punch packet's (``wire.WIRE_VERSION``, 0x01)."""
    return (int.from_bytes(session[:4], "little") & 0xFFFFFF00) | 0x32


class KcpPump:
    """Carries a byte stream (``local``: one end of a socket pair, the bridge's pipe) over KCP on a
    punched UDP socket to ``peer``, both ways, until ``local`` closes (the bridge ended: its pipe was
    silent for BRIDGE_DEAD_S or it was told to stop). Stream mode, nodelay, fast resend after 2
    duplicate acks, no congestion window (KCP's "turbo" setting: the lab measured 70-119 MiB/s with
    it, 2 MiB/s with KCP's own congestion control). Datagrams from elsewhere, late punch packets and
    other conversations are ignored."""

    def __init__(self, udp: socket.socket, peer: tuple[str, int], conv: int, local: socket.socket) -> None:
        from siokcp import KCPConnection  # only here: the plain (TCP) bridge needs nothing outside stdlib

        self.udp, self.peer, self.local = udp, peer, local
        self.kcp = KCPConnection(conv, self._output, lambda _text: None)
        self.kcp.stream = 1
        self.kcp.setmtu(KCP_MTU)
        self.kcp.wndsize(KCP_WINDOW, KCP_WINDOW)
        self.kcp.nodelay(1, KCP_TICK_MS, 2, 1)
        udp.setblocking(False)
        local.setblocking(False)
        self.to_local = bytearray()
        self.dropped = 0  # datagrams not for this conversation
        self._origin = time.monotonic()

    def _output(self, data: bytes) -> int:
        """KCP's output callback (from C: it must return an int and never raise)."""
        try:
            self.udp.sendto(data, self.peer)
        except OSError:
            pass  # a full socket buffer or a route hiccup: KCP repeats what is not acknowledged
        return 0

    def _ms(self) -> int:
        return int((time.monotonic() - self._origin) * 1000)

    def run(self) -> None:
        kcp, udp, local = self.kcp, self.udp, self.local
        try:
            while True:
                now = self._ms()
                kcp.update(now)
                wait = max(0, min(kcp.check(now) - now, 50)) / 1000
                rlist = [udp]
                if kcp.waitsnd() < KCP_QUEUED_MAX:
                    rlist.append(local)
                wlist = [local] if self.to_local else []
                readable, writable, _ = select.select(rlist, wlist, [], wait)
                if udp in readable:
                    self._read_udp()
                if local in readable:
                    try:
                        data = local.recv(KCP_SEND_MAX)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    if data == b"":
                        return  # the bridge is gone
                    if data:
                        kcp.send(data)
                        kcp.flush()
                if self.to_local:
                    try:
                        _send_some(local, self.to_local)
                    except (BlockingIOError, InterruptedError):
                        pass
        except OSError as exc:
            log.info("KCP pump to %s:%d failed: %s", self.peer[0], self.peer[1], exc)
        finally:
            local.close()
            udp.close()

    def _read_udp(self) -> None:
        kcp = self.kcp
        for _ in range(KCP_WINDOW):
            try:
                data, addr = self.udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            if addr != self.peer or data[:1] == b"\x01" or kcp.receive_data(data) < 0:
                self.dropped += 1
        while len(self.to_local) < HIGH_WATER:  # else KCP's receive window closes: the peer waits
            chunk = kcp.next_event()
            if not chunk:
                break
            self.to_local += chunk


class ProcessBridge:
    """A :class:`Bridge` in its own process (``python -m zbus.punchlink``), so that the bytes it moves
    do not compete for the client's GIL with the user's send/recv threads (measured: an in-process
    bridge reached 0.3-0.66x of a direct link at 64 KiB on two shared cores). Same interface."""

    def __init__(self, peer: str, pipe: socket.socket, targets: dict[bytes, tuple[str, int]],
                 odd: bool, on_close: Callable[["ProcessBridge"], None],
                 kcp: tuple[tuple[str, int], int] | None = None) -> None:
        """``pipe``: the punched TCP connection; or, with ``kcp`` = (peer address, conversation id),
        the punched UDP socket, which then carries the pipe by KCP (:class:`KcpPump`)."""
        self.peer = peer
        self.on_close = on_close
        # -S (no site-packages) starts faster; the KCP pump needs siokcp from them.
        argv = [sys.executable, "-I", *(() if kcp else ("-S",)), __file__, str(pipe.fileno()), "1" if odd else "0",
                peer, "%s:%d" % targets[TARGET_CTL], "%s:%d" % targets[TARGET_DATA]]
        if kcp is not None:
            (host, port), conv = kcp
            argv += ["%s:%d" % (host, port), str(conv)]
        try:
            self.proc = subprocess.Popen(argv, pass_fds=[pipe.fileno()], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE)
        finally:
            pipe.close()  # the child has its own copy
        assert self.proc.stdout is not None
        ready = select.select([self.proc.stdout], [], [], 10.0)[0]
        line = self.proc.stdout.readline().decode().split() if ready else []
        if len(line) != 2:
            self._kill()
            raise OSError(f"the bridge process for {peer} did not start")
        self.ctl_endpoint, self.data_endpoint = line
        self._watcher = threading.Thread(target=self._watch, name=f"zbus-bridge-{peer[:10]}", daemon=True)

    def start(self) -> "ProcessBridge":
        self._watcher.start()
        return self

    def _watch(self) -> None:
        assert self.proc.stdout is not None
        self.proc.stdout.read()  # until the child exits (pipe closed or told to stop)
        self.proc.wait()
        self.on_close(self)

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the child stops when its stdin closes
        except OSError:
            pass

    def join(self, timeout: float = 2.0) -> None:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
        if self._watcher.is_alive():
            self._watcher.join(timeout)

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _child(argv: list[str]) -> None:
    """``python -I -S punchbridge.py FD ODD PEER CTL_HOST:PORT DATA_HOST:PORT [UDP_PEER CONV]``: run
    one bridge on the TCP pipe FD, or (with UDP_PEER and CONV) on KCP over the UDP socket FD."""
    fd, odd, peer, ctl, data, *udp_peer = argv
    targets = {}
    for kind, address in ((TARGET_CTL, ctl), (TARGET_DATA, data)):
        host, _, port = address.rpartition(":")
        targets[kind] = (host, int(port))
    pipe = socket.socket(fileno=int(fd))
    if udp_peer:
        host, _, port = udp_peer[0].rpartition(":")
        udp, (pipe, far) = pipe, socket.socketpair()
        pipe.setblocking(False)
        big_buffers(pipe)
        big_buffers(far)
        pump = KcpPump(udp, (host, int(port)), int(udp_peer[1]), far)
        threading.Thread(target=pump.run, name="zbus-kcp", daemon=True).start()
    bridge = Bridge(peer, pipe, targets, odd == "1", lambda _: None)
    print(bridge.ctl_endpoint, bridge.data_endpoint, flush=True)

    def stop_on_eof() -> None:
        sys.stdin.buffer.read()
        bridge.close()

    threading.Thread(target=stop_on_eof, daemon=True).start()
    bridge._run()
    sys.stdout.flush()
    os._exit(0)  # not sys.exit: the stdin reader thread is blocked in read(), which would abort shutdown


def _send_some(sock: socket.socket, buf: bytearray) -> None:
    """Send what the socket takes from the front of ``buf`` (no copy of the rest)."""
    with memoryview(buf) as view:
        n = sock.send(view[:CHUNK * 4])
    del buf[:n]


if __name__ == "__main__":
    _child(sys.argv[1:])
