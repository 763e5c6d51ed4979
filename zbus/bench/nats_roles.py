"""NATS baseline: nats-server (Go) on 127.0.0.1 and nats-py clients (asyncio).

Throughput is publisher -> subscriber on one subject (the publisher flushes at the end); latency is
nats-py request/reply against a subscriber that publishes each message back to its reply subject.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from typing import Callable

import nats

from zbus.bench import (
    Case,
    CaseUnavailable,
    Control,
    EchoReport,
    Job,
    PingReport,
    ReceiveReport,
    SendReport,
    free_tcp_port,
)

_CHECK_EVERY = 1024
_POLL_S = 0.05  # how often a waiting coroutine looks at its deadlines


def find_nats_server() -> str:
    path = shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.access(p, os.X_OK)), None)
    if path is None:
        raise CaseUnavailable("nats-server binary not found (Debian: apt-get install nats-server)")
    return path


def nats_server_version() -> str:
    out = subprocess.run([find_nats_server(), "--version"], capture_output=True, text=True, timeout=5)
    return out.stdout.strip().removeprefix("nats-server: ")


def _start_nats_server(launcher) -> str:
    port = free_tcp_port()
    launcher.start_command([find_nats_server(), "-a", "127.0.0.1", "-p", str(port)], port)
    return f"nats://127.0.0.1:{port}"


async def _connect(job: Job, errors: list[str]) -> nats.NATS:
    async def on_error(exc: Exception) -> None:
        if len(errors) < 5:
            errors.append(f"{type(exc).__name__}: {exc}")

    return await nats.connect(job.endpoint, name=f"bench-{os.getpid()}", allow_reconnect=False,
                              connect_timeout=job.first_timeout_s, error_cb=on_error)


async def _wait_until(done: asyncio.Event, job: Job, last_ns: list[int], started: float, ctl: Control,
                      count: Callable[[], int]) -> None:
    """Wait for `done`, or until the peer has reported and `count()` reached what it sent, or
    first_timeout_s without a first message, or idle/time cap after it."""
    while not done.is_set():
        await asyncio.sleep(_POLL_S)
        total = ctl.peer_total()
        if total is not None and count() >= total:
            return
        now = time.perf_counter_ns()
        if last_ns[0] == 0:
            if time.monotonic() - started > job.first_timeout_s:
                return
        elif now - last_ns[0] > job.idle_timeout_s * 1e9 or now - last_ns[1] > (job.time_cap_s + 5) * 1e9:
            return


def throughput_receiver(ctl: Control, job: Job) -> None:
    asyncio.run(_throughput_receiver(ctl, job))


async def _throughput_receiver(ctl: Control, job: Job) -> None:
    errors: list[str] = []
    nc = await _connect(job, errors)
    received = 0
    times = [0, 0]  # [last, first] perf_counter_ns
    done = asyncio.Event()
    clock = time.perf_counter_ns
    count = job.count

    async def on_message(msg) -> None:
        nonlocal received
        times[0] = clock()
        if not received:
            times[1] = times[0]
        received += 1
        if received >= count:
            done.set()

    subject = f"bench.tput.{os.getpid()}"
    # The publisher outruns this callback (2-3x at 64 B): let the backlog hold a whole run, so nats-py
    # never drops messages as a slow consumer.
    await nc.subscribe(subject, cb=on_message, pending_msgs_limit=max(512 * 1024, job.count),
                       pending_bytes_limit=max(256 << 20, 4 * job.size))
    await nc.flush()
    ctl.ready(subject)
    await _wait_until(done, job, times, time.monotonic(), ctl, lambda: received)
    ctl.report(ReceiveReport(received, times[1], times[0], tuple(errors)))
    await nc.close()


def throughput_sender(ctl: Control, job: Job) -> None:
    asyncio.run(_throughput_sender(ctl, job))


async def _throughput_sender(ctl: Control, job: Job) -> None:
    nc = await _connect(job, [])
    await nc.flush()
    payload, subject, publish = job.payload(), job.peer, nc.publish
    ctl.ready()
    await asyncio.to_thread(ctl.wait_go)
    start = time.perf_counter()
    stop_at = start + job.time_cap_s
    sent = 0
    for sent in range(1, job.count + 1):
        await publish(subject, payload)
        if not sent % _CHECK_EVERY and time.perf_counter() > stop_at:
            break
    await nc.flush(timeout=int(job.time_cap_s) + 10)
    ctl.report(SendReport(sent, time.perf_counter() - start))
    await asyncio.to_thread(ctl.wait_stop)
    await nc.close()


def rtt_echo(ctl: Control, job: Job) -> None:
    asyncio.run(_rtt_echo(ctl, job))


async def _rtt_echo(ctl: Control, job: Job) -> None:
    nc = await _connect(job, [])
    echoed = 0
    times = [0, 0]
    done = asyncio.Event()
    expected = 1 + job.warmup + job.count  # the pinger's handshake request, then its pings

    async def on_request(msg) -> None:
        nonlocal echoed
        await nc.publish(msg.reply, msg.data)
        times[0] = time.perf_counter_ns()
        if not echoed:
            times[1] = times[0]
        echoed += 1
        if echoed >= expected:
            done.set()

    subject = f"bench.rtt.{os.getpid()}"
    await nc.subscribe(subject, cb=on_request)
    await nc.flush()
    ctl.ready(subject)
    await _wait_until(done, job, times, time.monotonic(), ctl, lambda: echoed)
    await nc.flush()
    ctl.report(EchoReport(echoed))
    await asyncio.to_thread(ctl.wait_stop)
    await nc.close()


def rtt_ping(ctl: Control, job: Job) -> None:
    asyncio.run(_rtt_ping(ctl, job))


async def _rtt_ping(ctl: Control, job: Job) -> None:
    nc = await _connect(job, [])
    payload, subject = job.payload(), job.peer
    await nc.request(subject, payload, timeout=job.first_timeout_s)  # the echo is there and routed
    ctl.ready()
    await asyncio.to_thread(ctl.wait_go)
    clock = time.perf_counter_ns
    samples: list[int] = []
    stop_at = clock() + int(job.time_cap_s * 1e9)
    report = None
    for i in range(job.warmup + job.count):
        t0 = clock()
        try:
            await nc.request(subject, payload, timeout=job.idle_timeout_s)
        except nats.errors.TimeoutError:
            report = PingReport(samples, 1, (f"no reply within {job.idle_timeout_s} s at request {i}",))
            break
        t1 = clock()
        if i >= job.warmup:
            samples.append(t1 - t0)
        if t1 > stop_at:
            report = PingReport(samples, 0, (f"time cap: {len(samples)} of {job.count} samples",))
            break
    ctl.report(report or PingReport(samples))
    await nc.close()


NATS = Case(
    name="nats",
    summary="nats-server (Go) + nats-py (asyncio): pub -> sub throughput, request/reply RTT",
    throughput_receiver=throughput_receiver,
    throughput_sender=throughput_sender,
    rtt_echo=rtt_echo,
    rtt_ping=rtt_ping,
    start_infra=_start_nats_server,
)
