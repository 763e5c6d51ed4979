"""Punched links: a client's punch service, the TCP pipe through both NATs, and the ZMQ bridge.

The link machinery (:mod:`zbus.links`) only knows how to dial a ZMQ endpoint. A punched link gives
it one on loopback: a :class:`Bridge` listens on ``127.0.0.1`` (one port for the link's control
connection, one for its data connection) and carries every TCP connection made there, multiplexed,
over one *pipe* to the peer's bridge, which opens the matching connection to the peer's own link
ROUTER / data ROUTER. Hello/Welcome then prove the peer's Id over the punched path exactly as for a
direct link, and RTT, pings, sequence numbers, fallback and ``max_links`` are the direct link's.

The pipe is a TCP connection made by **simultaneous open** from the punch socket's port number to the
peer's punched UDP endpoint (docs/nat.md: a cone NAT keeps the port for TCP as for UDP, so the UDP
rendezvous predicts the TCP endpoint). Each side also *listens* on that port, so a peer without NAT
is reached by the NATed side's plain connect. Both sides send the punch session id first; a pipe
whose first 16 bytes differ is dropped.

:class:`PunchService` is one thread per client that owns the punch socket: it keeps it registered at
the rendezvous of every server the client is registered with (each with that server's key), serves
invitations (``PunchGo``, from whichever server) and runs punches the engine asks for, each at a
server that lists the peer (so two clients configured with different first servers still meet).
The blocking driver of :mod:`zbus.punch_udp` runs here, never in the engine thread. Results go to
the engine as events (a queue plus a wake-up byte on a socket pair).

A *birthday* path (one side behind a symmetric NAT: found by many sockets on the hard side probing
the easy side, :mod:`zbus.punch`) has no TCP port to follow; its pipe is KCP over the punched UDP
socket itself, in the same bridge process (:class:`~zbus.punchbridge.KcpPump`).

Limits: one punch at a time per client; symmetric <-> symmetric stays on the relay.
"""

from __future__ import annotations

import collections
import errno
import importlib.util
import logging
import select
import socket
import threading
import time
from typing import Callable

from . import wire
from .punch import birthday_mode
from .punch_udp import CANCEL_CHECK_S, PunchFailed, open_punch_socket, register, renewer, run_punch, wait_go
from .punchbridge import TARGET_CTL, TARGET_DATA, ProcessBridge, big_buffers, kcp_conv
from .rendezvous import open_go

log = logging.getLogger("zbus.punchlink")

KCP_AVAILABLE = importlib.util.find_spec("siokcp") is not None  # the pipe of birthday paths (KcpPump)

PIPE_OPEN_S = 8.0  # how long both sides try to make the TCP pipe after punching (SYNs lost, starved threads late)
CONNECT_TRY_S = 1.5  # one connect() attempt (covers one SYN retransmission at 1 s)
PUNCH_TIMEOUT_S = 3.0  # waiting for the rendezvous answer (PunchGo)
REGISTER_RETRY_S = 2.0
BIRTHDAY_ANSWER_S = 1.0  # the controlled side answers NOMINATEs on a birthday path at most this long
KEY_CHECK_S = 0.25  # the loop notices a new rendezvous key (a Welcome) this fast, and re-registers with it


def _reuse(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)


def open_pipe(local_port: int, peer: tuple[str, int], session: bytes, timeout: float = PIPE_OPEN_S,
              cancelled: Callable[[], bool] = lambda: False) -> socket.socket:
    """A TCP connection with the peer: simultaneous open from ``local_port`` to ``peer``, or the
    peer's connect accepted on ``local_port``; both ends prove the punch ``session`` first.
    Raises TimeoutError after ``timeout`` (at once once ``cancelled()``, checked every CANCEL_CHECK_S)."""
    deadline = time.monotonic() + timeout
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _reuse(listener)
    listener.bind(("0.0.0.0", local_port))
    listener.listen(4)
    listener.setblocking(False)
    conn: socket.socket | None = None
    try:
        while conn is None and time.monotonic() < deadline and not cancelled():
            conn = _one_attempt(listener, local_port, peer, min(deadline, time.monotonic() + CONNECT_TRY_S),
                                cancelled)
            if conn is not None and not _same_session(conn, session, deadline):
                conn.close()
                conn = None
        if conn is None:
            raise TimeoutError(f"no TCP pipe with {peer[0]}:{peer[1]} within {timeout:g} s")
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        big_buffers(conn)
        return conn
    finally:
        listener.close()


def _one_attempt(listener: socket.socket, local_port: int, peer: tuple[str, int], until: float,
                 cancelled: Callable[[], bool]) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _reuse(sock)
    sock.bind(("0.0.0.0", local_port))
    sock.setblocking(False)
    err = sock.connect_ex(peer)
    connecting = err in (0, errno.EINPROGRESS)
    try:
        while (left := until - time.monotonic()) > 0 and not cancelled():
            readable, writable, _ = select.select([listener], [sock] if connecting else [], [],
                                                  min(left, CANCEL_CHECK_S))
            if listener in readable:
                try:
                    conn, addr = listener.accept()
                except OSError:
                    continue
                if addr[0] == peer[0]:
                    return conn
                conn.close()  # a stranger: the session check would fail anyway
            if sock in writable:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    result, sock = sock, None
                    return result
                connecting = False  # refused (peer not in SYN_SENT yet): wait on the listener a bit
                until = min(until, time.monotonic() + 0.1)
        return None
    finally:
        if sock is not None:
            sock.close()


def _same_session(conn: socket.socket, session: bytes, deadline: float) -> bool:
    conn.setblocking(True)
    try:
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        conn.sendall(session)
        got = b""
        while len(got) < len(session):
            chunk = conn.recv(len(session) - len(got))
            if not chunk:
                return False
            got += chunk
        return got == session
    except OSError:
        return False


def _target(endpoint: str) -> tuple[str, int]:
    """A ZMQ tcp endpoint of ours, as an address to connect to on this host."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "*", "::", ""):
        host = "127.0.0.1"
    return host, int(port)


class PunchService:
    """One thread per client: keeps the punch socket registered, punches, builds bridges.

    ``post(event)`` is called (from this thread or a bridge's) with ``("up", peer, bridge, elapsed)``,
    ``("failed", peer, reason)`` or ``("down", peer, bridge)``; the engine applies them.
    """

    def __init__(self, client_id: str, servers: Callable[[], dict[int, tuple[str, int]]], ctl_endpoint: str,
                 data_endpoint: str, hard: Callable[[], bool], post: Callable[[tuple], None],
                 key: Callable[[int], bytes] = lambda index: b"") -> None:
        """``servers()``: the rendezvous (UDP) address of every server we are registered with, by
        server index; ``key(index)``: our rendezvous key at that server (its Welcome), which MACs our
        requests there and opens its PunchGos. Both are asked again at every use (from this thread)."""
        self.client_id = client_id
        self.servers = servers
        self.key = key
        self.targets = {TARGET_CTL: _target(ctl_endpoint), TARGET_DATA: _target(data_endpoint)}
        self.hard = hard
        self.post = post
        self.sock = open_punch_socket()
        self.public: tuple[str, int] | None = None
        self.requests: collections.deque[tuple[str, tuple[int, ...]]] = collections.deque()
        self.bridges: dict[str, ProcessBridge] = {}
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop = False
        # Per server index: (when to register again, the key and the NAT kind the last one told).
        self._registered: dict[int, tuple[float, bytes, bool]] = {}
        self._ok: set[int] = set()  # the servers whose last registration was answered
        self._thread = threading.Thread(target=self._run, name=f"zbus-punch-{client_id[:10]}", daemon=True)

    def start(self) -> "PunchService":
        self._thread.start()
        return self

    def request(self, peer: str, holders: tuple[int, ...] = ()) -> None:
        """Ask for a punched link to ``peer`` (any thread), at one of the servers ``holders`` (the
        indexes of those that list it; empty: any); answered by an "up" or "failed" event."""
        self.requests.append((peer, tuple(holders)))
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def close_bridge(self, peer: str) -> None:
        with self._lock:
            bridge = self.bridges.get(peer)
        if bridge is not None:
            bridge.close()

    def _stopping(self) -> bool:
        return self._stop

    def stop(self) -> None:
        self._stop = True
        self._wake()
        # A punch in progress stops within CANCEL_CHECK_S; waiting for the rendezvous answer or a
        # registration (PUNCH_TIMEOUT_S, 2 s) does not look, so that bounds the wait.
        self._thread.join(PUNCH_TIMEOUT_S + 2.0)
        with self._lock:
            bridges = list(self.bridges.values())
        for bridge in bridges:
            bridge.close()
        for bridge in bridges:
            bridge.join()
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()

    # -- the thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop:
            now = time.monotonic()
            servers = self.servers()
            due = [index for index in servers if self._registration_due(index, now)]
            if due:
                for index in due:  # (each a short UDP exchange: answered in milliseconds, or 2 s)
                    self._register(index, servers[index])
                continue
            if self.requests:
                peer, holders = self.requests.popleft()
                index = next((i for i in holders if i in self._ok and i in servers), None)
                if index is None:
                    index = min(set(servers) & self._ok, default=None)
                if index is None:
                    self.post(("failed", peer, "not registered at any rendezvous yet"))
                else:
                    self._punch(peer, None, index, servers[index])
                continue
            # (only servers we are connected to: the entry of one that went away stays behind, overdue)
            next_register = min((self._registered[i][0] for i in servers if i in self._registered),
                                default=now + KEY_CHECK_S)
            readable = select.select([self.sock, self._wake_r], [], [],
                                     max(0.0, min(KEY_CHECK_S, next_register - now)))[0]
            if self._wake_r in readable:
                self._wake_r.recv(64)
            if self.sock in readable:
                try:
                    datagram, source = self.sock.recvfrom(65535)
                    message = wire.decode(datagram)
                except (OSError, wire.WireError):
                    continue
                if isinstance(message, wire.PunchGo) and not message.refused:
                    # Whose is it? The server it came from first (an endpoint given by name cannot
                    # be matched by address), then any other: its MAC says (open_go).
                    for index in sorted(servers, key=lambda i: servers[i] != source):
                        go = open_go(self.key(index), message)
                        if go is not None:  # (None from all: not from one of our servers, ignored)
                            self._punch(go.peer, go, index, servers[index])
                            break

    def _registration_due(self, index: int, now: float) -> bool:
        """Register at server ``index`` now? Every 20 s; at once when its key changed (a new Welcome:
        the server drops what is not MACed with it) or we learnt that our NAT is symmetric (the
        reflector's alternate port answers after the main one: the server gives the punch roles from it)."""
        at, key, hard = self._registered.get(index, (0.0, b"", False))
        return now >= at or self.key(index) != key or self.hard() != hard

    def _register(self, index: int, server: tuple[str, int]) -> None:
        hard = self.hard()
        key = self.key(index)
        try:
            self.public = register(self.sock, server, self.client_id, hard, timeout=2.0, key=lambda: self.key(index))
            self._registered[index] = (time.monotonic() + 20.0, key, hard)
            self._ok.add(index)
        except (TimeoutError, OSError) as exc:
            log.debug("punch registration at %s failed: %s", server, exc)
            self._registered[index] = (time.monotonic() + REGISTER_RETRY_S, key, hard)
            self._ok.discard(index)

    def _punch(self, peer: str, go: wire.PunchGo | None, index: int, server: tuple[str, int]) -> None:
        """Punch towards ``peer`` (requester when ``go`` is None) with the rendezvous of server
        ``index`` at ``server``, then make the pipe and bridge."""
        start = time.monotonic()
        hard = self.hard()
        requester = go is None
        piping = False
        try:
            renew = None
            if go is None:
                key = self.key(index)
                go = wait_go(self.sock, server, self.client_id, hard, PUNCH_TIMEOUT_S, peer_id=peer, key=key)
                renew = renewer(self.sock, server, self.client_id, peer, hard, key)
            path = run_punch(self.sock, self.client_id, go, renew=renew, cancelled=self._stopping)
            kcp = None
            if birthday_mode(go.role, go.peer_role):
                # One side behind a symmetric NAT: the path is a UDP 4-tuple found by birthday probing,
                # which no TCP connection can follow (its port is another mapping). The pipe is KCP
                # over that very UDP socket, in the bridge process.
                if not KCP_AVAILABLE:
                    raise PunchFailed(None, "punched a birthday path (symmetric NAT), but siokcp (KCP) is "
                                            "not installed; use the relay")
                if not go.controlling:
                    self._answer_until_peer_speaks(path)
                pipe, kcp = path.sock, (path.peer_addr, kcp_conv(go.session))
            else:
                piping = True
                pipe = self._open_pipe_answering(path, go.session)
        except (PunchFailed, TimeoutError, OSError) as exc:
            log.info("client %s: punch with %s failed: %s", self.client_id, peer, exc)
            if piping:
                # The failed SYNs left conntrack entries for this 4-tuple on both routers (SYN_SENT:
                # 2 min); retrying from the same port met them every time under loss. Next try: new port.
                self._rotate()
            if requester:  # (an invited side that fails has nothing to back off from)
                self.post(("failed", peer, str(exc)))
            return
        try:
            bridge = ProcessBridge(peer, pipe, self.targets, go.controlling, self._bridge_closed, kcp=kcp)
        except OSError as exc:
            log.warning("client %s: %s", self.client_id, exc)
            if requester:
                self.post(("failed", peer, str(exc)))
            return
        with self._lock:
            old = self.bridges.get(peer)
            self.bridges[peer] = bridge
        if old is not None:
            old.close()
        address = f"{path.peer_addr[0]}:{path.peer_addr[1]}"
        self._rotate()
        log.info("client %s: punched pipe to %s at %s in %.3f s", self.client_id, peer, address,
                 time.monotonic() - start)
        self.post(("up", peer, bridge, address))
        bridge.start()

    @staticmethod
    def _answer_until_peer_speaks(path) -> None:
        """The controlled side of a birthday path, before its socket goes to the KCP pump (which
        ignores punch packets): keep answering the controlling side's NOMINATE, whose ACK may have
        been lost, until that side's first KCP datagram shows it has the path (KCP repeats the
        datagram read here), at most BIRTHDAY_ANSWER_S."""
        end = time.monotonic() + BIRTHDAY_ANSWER_S
        while (left := end - time.monotonic()) > 0:
            try:
                if path.poll(left):
                    return
            except OSError:
                return

    def _open_pipe_answering(self, path, session: bytes) -> socket.socket:
        """:func:`open_pipe`, while a helper thread keeps answering the peer's punch packets.

        The controlled side is punched when a NOMINATE arrives and answers it once; if that
        NOMINATE_ACK is lost (20 % loss on each router loses a third of them), the controlling side
        repeats its NOMINATE. Without this nobody read the punch socket any more: the controlling
        side failed, the controlled side waited for a TCP pipe that never came (the NAT lab's 20 %
        loss test failed about half the time)."""
        done = threading.Event()

        def answer() -> None:
            while not done.is_set():
                try:
                    path.poll(0.05)  # answers NOMINATE / PING; anything else is not ours to read
                except OSError:
                    return

        helper = threading.Thread(target=answer, name="zbus-punch-answer", daemon=True)
        helper.start()
        try:
            return open_pipe(self.sock.getsockname()[1], path.peer_addr, session, cancelled=self._stopping)
        finally:
            done.set()
            helper.join(1.0)

    def _rotate(self) -> None:
        """A fresh punch socket (new port) after each pipe: a later punch with the same peer from the
        same port would reuse the old TCP 4-tuple, which the hosts (TIME_WAIT) and the routers'
        conntrack (CLOSE, TIME_WAIT: up to 2 min) still hold, and the pipe could not be made."""
        old, self.sock = self.sock, open_punch_socket()
        old.close()
        self._registered.clear()  # register the new socket now, everywhere
        self._ok.clear()

    def _bridge_closed(self, bridge: ProcessBridge) -> None:
        with self._lock:
            if self.bridges.get(bridge.peer) is bridge:
                del self.bridges[bridge.peer]
        self.post(("down", bridge.peer, bridge))


def server_udp(endpoint: str) -> tuple[str, int]:
    """A server's rendezvous address: the host and port number of its ``tcp://`` endpoint."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


def hard_from_public(public: list[str]) -> bool:
    """Endpoint-dependent mapping: servers saw our one UDP socket at different ports."""
    return len({p.rpartition(":")[2] for p in public}) > 1



