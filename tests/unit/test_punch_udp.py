"""The UDP driver and the reflector's rendezvous on 127.0.0.1: real sockets, no namespaces."""

from __future__ import annotations

import socket
import threading

import pytest

from zbus.punch import State
from zbus.punch_udp import PunchFailed, open_punch_socket, punch, register, run_punch, wait_go
from zbus.reflector import Reflector

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def reflector():
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    server = Reflector("127.0.0.1", port).start()
    try:
        yield ("127.0.0.1", port), server
    finally:
        server.stop()


def test_two_sockets_rendezvous_at_the_reflector_punch_and_exchange_datagrams(reflector):
    server, node = reflector
    a_sock, b_sock = open_punch_socket("127.0.0.1"), open_punch_socket("127.0.0.1")
    try:
        assert register(b_sock, server, "C-b") == b_sock.getsockname()
        passive: dict = {}

        def invited() -> None:
            try:
                passive["path"] = run_punch(b_sock, "C-b", wait_go(b_sock, server, "C-b", timeout=10.0))
            except Exception as exc:  # reported by the assertion below
                passive["error"] = exc

        thread = threading.Thread(target=invited)
        thread.start()
        a_path = punch(a_sock, server, "C-a", "C-b", timeout=10.0)
        thread.join(10.0)
        assert not thread.is_alive() and "error" not in passive, passive
        b_path = passive["path"]
        assert a_path.peer_addr == b_sock.getsockname() and b_path.peer_addr == a_sock.getsockname()
        assert a_path.state is State.PUNCHED and b_path.state is State.PUNCHED
        assert node.rendezvous.introduced == 1
        a_path.send(b"\0hello")
        assert b_path.poll(2.0) == [b"\0hello"]
    finally:
        a_sock.close()
        b_sock.close()


def test_asking_for_an_unregistered_peer_is_refused_at_once(reflector):
    server, _ = reflector
    sock = open_punch_socket("127.0.0.1")
    try:
        with pytest.raises(PunchFailed, match="not registered"):
            punch(sock, server, "C-a", "C-nobody", timeout=5.0)
    finally:
        sock.close()


def test_a_punch_and_a_pipe_stage_in_progress_end_soon_after_cancellation(reflector):
    """close() of a client must not wait out a punch (5 s) or the TCP pipe stage (8 s)."""
    import time

    from zbus.punchlink import open_pipe

    server, _ = reflector
    a_sock = open_punch_socket("127.0.0.1")
    silent = open_punch_socket("127.0.0.1")  # registered as C-b, never answers punch packets
    try:
        register(silent, server, "C-b")
        cancel_at = time.monotonic() + 0.3
        with pytest.raises(PunchFailed, match="cancelled"):
            punch_go = wait_go(a_sock, server, "C-a", timeout=5.0, peer_id="C-b")
            run_punch(a_sock, "C-a", punch_go, cancelled=lambda: time.monotonic() >= cancel_at)
        assert time.monotonic() - cancel_at < 1.0  # the punch deadline is 5 s
        cancel_at = time.monotonic() + 0.3
        with pytest.raises(TimeoutError):  # nobody listens there: the stage would take PIPE_OPEN_S
            open_pipe(a_sock.getsockname()[1], silent.getsockname(), b"s" * 16,
                      cancelled=lambda: time.monotonic() >= cancel_at)
        assert time.monotonic() - cancel_at < 1.0
    finally:
        for sock in (a_sock, silent):
            sock.close()
