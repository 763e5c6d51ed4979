"""Raw pyzmq baselines: DEALER -> ROUTER direct, and through a minimal Python ROUTER relay.

Everything here is synchronous pyzmq with `copy=False` and one pre-built payload, so the numbers
are what plain Python + libzmq can do on this machine. zbus is judged against them.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from typing import Iterator

import zmq

from zbus.bench import (
    HELLO,
    IDLE_POLL_S,
    Case,
    Control,
    EchoReport,
    Job,
    PingReport,
    QuietTimer,
    ReceiveReport,
    SendReport,
)

_CHECK_EVERY = 1024  # loop iterations between time-cap checks in the hot loops


@contextmanager
def _socket(kind: int, identity: bytes | None = None) -> Iterator[zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


def _copy_on_recv(size: int) -> bool:
    """Copy small payloads on receive, as pyzmq's send(copy=False) itself does below copy_threshold:
    making a zero-copy Frame costs more than copying a few bytes."""
    return size < zmq.COPY_THRESHOLD


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _count_messages(sock: zmq.Socket, job: Job, ctl: Control) -> ReceiveReport:
    """Receive [peer identity, payload] messages until job.count, everything the sender sent (once it
    has reported), an idle timeout or the time cap; time first..last. The first message may take
    first_timeout_s (the sender waits for go).

    Both frames are read with plain recv(): the framing is known (our own senders), and
    recv_multipart() asks getsockopt(RCVMORE) in Python after each frame, which at 64 B made the
    receiver, not the sender, the bottleneck.
    """
    clock = time.perf_counter_ns
    recv_frame, copy = sock.recv, _copy_on_recv(job.size)

    def recv() -> None:
        recv_frame()
        recv_frame(copy=copy)

    sock.RCVTIMEO = _ms(job.first_timeout_s)
    try:
        recv()
    except zmq.Again:
        return ReceiveReport(0, 0, 0, ("no message arrived",))
    first = last = clock()
    sock.RCVTIMEO = _ms(IDLE_POLL_S)
    quiet = QuietTimer(ctl, job.idle_timeout_s)
    received = 1
    stop_at = first + int((job.time_cap_s + 5.0) * 1e9)
    count = job.count
    while received < count:
        try:
            while received < count:
                recv()
                last = clock()
                received += 1
                if not received % _CHECK_EVERY and last > stop_at:
                    return ReceiveReport(received, first, last)
        except zmq.Again:
            if quiet.done(received):
                break
    return ReceiveReport(received, first, last)


def _send_messages(send, job: Job) -> SendReport:
    """Call send() job.count times as fast as it returns, or until the time cap."""
    start = time.perf_counter()
    stop_at = start + job.time_cap_s
    sent = 0
    for sent in range(1, job.count + 1):
        send()
        if not sent % _CHECK_EVERY and time.perf_counter() > stop_at:
            break
    return SendReport(sent, time.perf_counter() - start)


def _ping_loop(sock: zmq.Socket, frames: list, job: Job) -> PingReport:
    """Send frames, wait for the echo, job.warmup + job.count times; keep timings after warm-up."""
    clock = time.perf_counter_ns
    samples: list[int] = []
    stop_at = clock() + int(job.time_cap_s * 1e9)
    send, recv = sock.send_multipart, sock.recv_multipart
    copy = _copy_on_recv(job.size)
    for i in range(job.warmup + job.count):
        t0 = clock()
        send(frames, copy=False)
        try:
            recv(copy=copy)
        except zmq.Again:
            return PingReport(samples, 1, (f"no echo within {job.idle_timeout_s} s at ping {i}",))
        t1 = clock()
        if i >= job.warmup:
            samples.append(t1 - t0)
        if t1 > stop_at:
            return PingReport(samples, 0, (f"time cap: {len(samples)} of {job.count} samples",))
    return PingReport(samples)


def _echo_loop(sock: zmq.Socket, job: Job, expected: int, ctl: Control) -> int:
    """Echo every multipart message back as is, `expected` times, until the pinger has reported, or
    until idle."""
    send, recv = sock.send_multipart, sock.recv_multipart
    copy = _copy_on_recv(job.size)
    try:
        send(recv(copy=copy), copy=False)  # the first may wait first_timeout_s
    except zmq.Again:
        return 0
    echoed = 1
    sock.RCVTIMEO = _ms(IDLE_POLL_S)
    quiet = QuietTimer(ctl, job.idle_timeout_s)
    while echoed < expected:
        try:
            while echoed < expected:
                send(recv(copy=copy), copy=False)
                echoed += 1
        except zmq.Again:
            if quiet.done(echoed):
                break
    return echoed


# -- (a) raw-dealer-router: DEALER connects straight to the receiver's ROUTER ------------------------

def dr_throughput_receiver(ctl: Control, job: Job) -> None:
    with _socket(zmq.ROUTER) as sock:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        sock.RCVTIMEO = _ms(job.first_timeout_s)
        ctl.ready(f"tcp://127.0.0.1:{port}")
        sender_id, _ = sock.recv_multipart()  # the sender's hello
        sock.send_multipart([sender_id, HELLO])
        report = _count_messages(sock, job, ctl)
        ctl.report(report)


def dr_throughput_sender(ctl: Control, job: Job) -> None:
    with _socket(zmq.DEALER) as sock:
        sock.RCVTIMEO = _ms(job.first_timeout_s)
        sock.connect(job.peer)
        sock.send(HELLO)
        sock.recv()
        ctl.ready()
        payload = job.payload()
        ctl.wait_go()
        ctl.report(_send_messages(partial(sock.send, payload, copy=False), job))
        ctl.wait_stop()


def dr_rtt_echo(ctl: Control, job: Job) -> None:
    with _socket(zmq.ROUTER) as sock:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        sock.RCVTIMEO = _ms(job.first_timeout_s)
        ctl.ready(f"tcp://127.0.0.1:{port}")
        ctl.report(EchoReport(_echo_loop(sock, job, 1 + job.warmup + job.count, ctl)))
        ctl.wait_stop()


def dr_rtt_ping(ctl: Control, job: Job) -> None:
    with _socket(zmq.DEALER) as sock:
        sock.RCVTIMEO = _ms(job.first_timeout_s)
        sock.connect(job.peer)
        sock.send(HELLO)
        sock.recv()
        sock.RCVTIMEO = _ms(job.idle_timeout_s)
        ctl.ready()
        ctl.wait_go()
        ctl.report(_ping_loop(sock, [job.payload()], job))


DEALER_ROUTER = Case(
    name="raw-dealer-router",
    summary="sync pyzmq DEALER -> ROUTER, no relay (RTT: the ROUTER echoes)",
    throughput_receiver=dr_throughput_receiver,
    throughput_sender=dr_throughput_sender,
    rtt_echo=dr_rtt_echo,
    rtt_ping=dr_rtt_ping,
)


# -- (b) raw-relay: two DEALERs through a minimal sync Python ROUTER relay ----------------------------

def _relay_socket(ctl: Control):
    """The relay's ROUTER. ROUTER_MANDATORY: a full destination queue blocks the relay instead of
    dropping silently, and an unknown destination raises (the relay drops that message)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    ctl.ready(f"tcp://127.0.0.1:{port}")
    return sock


def relay_main(ctl: Control, job: Job) -> None:
    """The minimal relay: [src, dst, payload] in -> [dst, src, payload] out, payload frame untouched.

    Frames are received one by one with copy=False and framing is read from Frame.more: pyzmq's
    recv_multipart() asks getsockopt(RCVMORE) in Python after every frame, which makes the loop
    markedly slower for small messages (compare: --cases raw-relay,raw-relay-multipart).
    Runs until terminated.
    """
    relay_loop(_relay_socket(ctl))


def relay_loop(sock: zmq.Socket) -> None:
    """relay_main's loop on a bound ROUTER (also benchmarks/relay_cpu.py's raw relay)."""
    recv, send, more = sock.recv, sock.send, zmq.SNDMORE
    while True:
        src = recv(copy=False)
        if not src.more:
            continue
        dst = recv(copy=False)
        if not dst.more:
            continue
        payload = recv(copy=False)
        if payload.more:  # more than [dst, payload]: drop the rest of it
            while recv(copy=False).more:
                pass
            continue
        try:
            send(dst, more, copy=False)
            send(src, more, copy=False)
            send(payload, copy=False)
        except zmq.ZMQError:  # EHOSTUNREACH: destination not connected
            pass


def relay_multipart_main(ctl: Control, job: Job) -> None:
    """The same relay written with recv_multipart(copy=False) / send_multipart, for comparison."""
    sock = _relay_socket(ctl)
    recv, send = sock.recv_multipart, sock.send_multipart
    while True:
        frames = recv(copy=False)
        if len(frames) != 3:
            continue
        src, dst, payload = frames
        try:
            send([dst, src, payload], copy=False)
        except zmq.ZMQError:
            pass


def _start_relay(launcher) -> str:
    return launcher.start_service(relay_main, "raw relay")


def _start_relay_multipart(launcher) -> str:
    return launcher.start_service(relay_multipart_main, "raw relay (recv_multipart)")


def _relay_client(sock: zmq.Socket, job: Job) -> None:
    """Connect to the relay and prove it routes to us (message to self), so peers can reach us."""
    sock.RCVTIMEO = _ms(job.first_timeout_s)
    sock.connect(job.endpoint)
    sock.send_multipart([sock.getsockopt(zmq.IDENTITY), HELLO])
    sock.recv_multipart()


def _identity(role: str) -> bytes:
    return f"{role}-{os.getpid()}".encode()


def relay_throughput_receiver(ctl: Control, job: Job) -> None:
    identity = _identity("rx")
    with _socket(zmq.DEALER, identity) as sock:
        _relay_client(sock, job)
        ctl.ready(identity.decode())
        sender_id, _ = sock.recv_multipart()  # the sender's hello
        sock.send_multipart([sender_id, HELLO])
        ctl.report(_count_messages(sock, job, ctl))


def relay_throughput_sender(ctl: Control, job: Job) -> None:
    with _socket(zmq.DEALER, _identity("tx")) as sock:
        _relay_client(sock, job)
        dst = job.peer.encode()
        sock.send_multipart([dst, HELLO])
        sock.recv_multipart()
        frames = [dst, job.payload()]
        ctl.ready()
        ctl.wait_go()
        ctl.report(_send_messages(partial(sock.send_multipart, frames, copy=False), job))
        ctl.wait_stop()


def relay_rtt_echo(ctl: Control, job: Job) -> None:
    identity = _identity("echo")
    with _socket(zmq.DEALER, identity) as sock:
        _relay_client(sock, job)
        ctl.ready(identity.decode())
        # A DEALER receives [src, payload] and sends [dst, payload]: echoing the frames as they are
        # sends the payload back to its source.
        ctl.report(EchoReport(_echo_loop(sock, job, 1 + job.warmup + job.count, ctl)))
        ctl.wait_stop()


def relay_rtt_ping(ctl: Control, job: Job) -> None:
    with _socket(zmq.DEALER, _identity("ping")) as sock:
        _relay_client(sock, job)
        dst = job.peer.encode()
        sock.send_multipart([dst, HELLO])
        sock.recv_multipart()
        sock.RCVTIMEO = _ms(job.idle_timeout_s)
        ctl.ready()
        ctl.wait_go()
        ctl.report(_ping_loop(sock, [dst, job.payload()], job))


RELAY = Case(
    name="raw-relay",
    summary="two sync DEALERs through a minimal Python ROUTER relay ([dst, payload] -> [dst, src, payload])",
    throughput_receiver=relay_throughput_receiver,
    throughput_sender=relay_throughput_sender,
    rtt_echo=relay_rtt_echo,
    rtt_ping=relay_rtt_ping,
    start_infra=_start_relay,
)

RELAY_MULTIPART = replace(
    RELAY,
    name="raw-relay-multipart",
    summary="raw-relay with a relay loop on recv_multipart(copy=False) (not run by default)",
    start_infra=_start_relay_multipart,
)
