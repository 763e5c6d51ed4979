"""The KCP pump of birthday-path punched links (zbus.punchbridge.KcpPump), on real UDP sockets on
127.0.0.1 with a forwarder in the middle that drops a share of the datagrams both ways: a byte stream
written into one pump's socket pair comes out of the other's complete and in order, both ways at
once, and each pump ends when its bridge side closes."""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import time

import pytest

from tests.helpers import wait_until
from zbus.punchbridge import KcpPump, kcp_conv

pytestmark = pytest.mark.timeout(60)


class LossyForwarder:
    """Two UDP sockets; what arrives on one goes out of the other to the far end, ``loss`` dropped."""

    def __init__(self, loss: float, seed: int) -> None:
        self.left, self.right = (self._udp() for _ in range(2))
        self.ends: dict[socket.socket, tuple[str, int]] = {}
        self.rng = random.Random(seed)
        self.loss = loss
        self.dropped = self.forwarded = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _udp() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        return sock

    def _run(self) -> None:
        while not self._stop.is_set():
            for sock in select.select([self.left, self.right], [], [], 0.05)[0]:
                data, _ = sock.recvfrom(65535)
                other = self.right if sock is self.left else self.left
                if self.rng.random() < self.loss:
                    self.dropped += 1
                    continue
                self.forwarded += 1
                other.sendto(data, self.ends[other])

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5.0)
        self.left.close()
        self.right.close()


def pump_pair(forwarder: LossyForwarder, conv: int) -> tuple[list, list[socket.socket]]:
    """Two pumps talking through ``forwarder``; returns (pump threads, the two bridge-side ends)."""
    ua, ub = LossyForwarder._udp(), LossyForwarder._udp()
    forwarder.ends[forwarder.left] = ua.getsockname()
    forwarder.ends[forwarder.right] = ub.getsockname()
    threads, ends = [], []
    for udp, peer in ((ua, forwarder.left.getsockname()), (ub, forwarder.right.getsockname())):
        mine, far = socket.socketpair()
        pump = KcpPump(udp, peer, conv, far)
        thread = threading.Thread(target=pump.run, daemon=True)
        thread.start()
        threads.append(thread)
        ends.append(mine)
    return threads, ends


def transfer(src: socket.socket, dst: socket.socket, data: bytes, deadline: float) -> bytes:
    """Write ``data`` into ``src`` on a thread while reading len(data) bytes from ``dst``."""
    writer = threading.Thread(target=src.sendall, args=(data,), daemon=True)
    writer.start()
    got = bytearray()
    dst.settimeout(1.0)
    while len(got) < len(data) and time.monotonic() < deadline:
        try:
            chunk = dst.recv(1 << 20)
        except TimeoutError:
            continue
        assert chunk, "the stream closed early"
        got += chunk
    writer.join(max(0.0, deadline - time.monotonic()))
    return bytes(got)


@pytest.mark.parametrize("loss", [0.0, 0.1])
def test_a_byte_stream_crosses_a_lossy_udp_path_complete_and_in_order_both_ways(loss):
    forwarder = LossyForwarder(loss, seed=7)
    forwarder.thread.start()
    threads, (a, b) = pump_pair(forwarder, kcp_conv(os.urandom(16)))
    try:
        deadline = time.monotonic() + 40.0
        forth, back = os.urandom(4 << 20), os.urandom(256 << 10)
        results = {}
        reverse = threading.Thread(target=lambda: results.setdefault("back", transfer(b, a, back, deadline)))
        reverse.start()
        results["forth"] = transfer(a, b, forth, deadline)
        reverse.join(max(0.0, deadline - time.monotonic()))
        assert results["forth"] == forth
        assert results.get("back") == back
        if loss:
            assert forwarder.dropped > 0
        print(f"\n{len(forth) >> 20} MiB + {len(back) >> 10} KiB through KCP, {loss:.0%} loss: "
              f"{forwarder.forwarded} datagrams forwarded, {forwarder.dropped} dropped")
    finally:
        a.close()
        b.close()
        for thread in threads:
            thread.join(5.0)
        forwarder.close()
    assert not any(thread.is_alive() for thread in threads), "a pump did not end when its bridge side closed"


def test_datagrams_of_another_conversation_or_stray_punch_packets_are_ignored():
    udp, stray = LossyForwarder._udp(), LossyForwarder._udp()
    mine, far = socket.socketpair()
    pump = KcpPump(udp, stray.getsockname(), kcp_conv(b"\x00" * 16), far)
    thread = threading.Thread(target=pump.run, daemon=True)
    thread.start()
    try:
        for payload in (b"\x01punch", os.urandom(64), b"\x32" + os.urandom(40)):
            stray.sendto(payload, udp.getsockname())
        wait_until(lambda: pump.dropped >= 3, 5.0, "the pump to drop the three stray datagrams")
        assert pump.dropped == 3
        mine.settimeout(0.2)
        with pytest.raises(TimeoutError):
            mine.recv(10)
    finally:
        mine.close()
        thread.join(5.0)
        stray.close()
    assert not thread.is_alive()
