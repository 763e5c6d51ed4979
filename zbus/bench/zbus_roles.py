"""zbus through one server: two `zbus.Client`s with `max_links=0` (relay only) and a `zbus-node server`;
and the same two clients over a direct link (`zbus-direct`: the server only introduces them).

Uses the public client contract: Client(servers, name, listen, max_links), .id, .resolve(name),
.send(dst, bytes), .recv(timeout) -> Message(src, data, via), .wait_link(id), .close().
The process's role name selects the path: roles of the direct case run with `ZBUS_BENCH_DIRECT=1`
semantics through their own module-level functions below (they must be picklable by name).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import zbus
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
    free_tcp_port,
    retry_until,
)

if not hasattr(zbus, "Client") or importlib.util.find_spec("zbus.cli") is None:
    raise ImportError("zbus.Client or zbus.cli is not available yet")

_CHECK_EVERY = 1024


def _start_server(launcher) -> str:
    port = free_tcp_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    launcher.start_command([sys.executable, "-m", "zbus.cli", "server", "--listen", endpoint,
                            "--name", "bench-server"], port)
    return endpoint


def _name(role: str) -> str:
    return f"bench-{role}-{os.getpid()}"


_DIRECT = {"direct": False}  # set by the zbus-direct role wrappers, per process
_CURVE = {"curve": False}  # set by the zbus-relay-curve role wrappers, per process
_CURVE_ENV = "ZBUS_BENCH_CURVE_DIR"  # keys/ and trust/ of the curve case, made by its start_infra


def _new_key(root: Path, server: bool) -> tuple[str, Path]:
    """A fresh key pair in root/keys, its .pub trusted in root/trust; returns (Id, .key path)."""
    from zbus.ids import new_client_id, new_server_id
    from zbus.security import keygen

    node = new_server_id() if server else new_client_id()
    pub, key = keygen(root / "keys", node)
    (root / "trust").mkdir(exist_ok=True)
    shutil.copy(pub, root / "trust" / pub.name)  # the server re-reads its trust directory on a new key
    return node, key


def _start_curve_server(launcher) -> str:
    """The zbus server with security on (docs/security.md); returns its pinned endpoint S-…@tcp://…."""
    root = Path(tempfile.mkdtemp(prefix="zbus-bench-curve-"))  # a few hundred bytes of keys, left in the tmp dir
    os.environ[_CURVE_ENV] = str(root)  # inherited by the role processes spawned after this
    server_id, key = _new_key(root, server=True)
    port = free_tcp_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    launcher.start_command([sys.executable, "-m", "zbus.cli", "server", "--listen", endpoint, "--name",
                            "bench-server", "--key", str(key), "--trust", str(root / "trust")], port)
    return f"{server_id}@{endpoint}"


def _client(job: Job, role: str) -> zbus.Client:
    if _CURVE["curve"]:
        root = Path(os.environ[_CURVE_ENV])
        _, key = _new_key(root, server=False)
        return zbus.Client(servers=[job.endpoint], name=_name(role), max_links=0, key_file=str(key),
                           trust_dir=str(root / "trust"))
    if _DIRECT["direct"]:
        return zbus.Client(servers=[job.endpoint], name=_name(role), listen="tcp://127.0.0.1:0")
    return zbus.Client(servers=[job.endpoint], name=_name(role), max_links=0)


def _await_link(client: zbus.Client, peer: str, job: Job) -> None:
    """Direct case: timing starts only once our link to the peer is up (the HELLO asked for it)."""
    if _DIRECT["direct"] and not client.wait_link(peer, job.first_timeout_s):
        raise RuntimeError(f"no direct link to {peer} within {job.first_timeout_s}s")


def _connect_to_peer(client: zbus.Client, job: Job) -> str:
    """Resolve the peer's name, send it HELLO and wait for its HELLO back; return its Id."""
    dst = retry_until(lambda: client.resolve(job.peer), zbus.Unreachable, job.first_timeout_s)
    retry_until(lambda: client.send(dst, HELLO), zbus.Unreachable, job.first_timeout_s)
    client.recv(timeout=job.first_timeout_s)
    _await_link(client, dst, job)
    return dst


def _answer_hello(client: zbus.Client, job: Job) -> str:
    """Wait for the peer's HELLO and answer it; return the peer's Id."""
    hello = client.recv(timeout=job.first_timeout_s)
    retry_until(lambda: client.send(hello.src, HELLO), zbus.Unreachable, job.first_timeout_s)
    _await_link(client, hello.src, job)
    return hello.src


def throughput_receiver(ctl: Control, job: Job) -> None:
    with _client(job, "rx") as client:
        ctl.ready(_name("rx"))
        _answer_hello(client, job)
        clock, recv = time.perf_counter_ns, client.recv
        vias: set[str] = set()
        try:
            message = recv(timeout=job.first_timeout_s)
        except TimeoutError:
            ctl.report(ReceiveReport(0, 0, 0, ("no message arrived",)))
            return
        first = last = clock()
        vias.add(message.via)
        received, count, quiet = 1, job.count, QuietTimer(ctl, job.idle_timeout_s)
        stop_at = first + int((job.time_cap_s + 5.0) * 1e9)
        while received < count and last <= stop_at:
            try:
                while received < count:
                    recv(timeout=IDLE_POLL_S)
                    last = clock()
                    received += 1
                    if not received % _CHECK_EVERY and last > stop_at:
                        break
            except TimeoutError:
                if quiet.done(received):
                    break
        expected = {"direct"} if _DIRECT["direct"] else {"relay"}
        notes = () if vias == expected else (f"first message via {', '.join(sorted(vias))}",)
        ctl.report(ReceiveReport(received, first, last, notes))


def throughput_sender(ctl: Control, job: Job) -> None:
    with _client(job, "tx") as client:
        dst = _connect_to_peer(client, job)
        payload, send = job.payload(), client.send
        ctl.ready()
        ctl.wait_go()
        start = time.perf_counter()
        stop_at = start + job.time_cap_s
        sent = 0
        for sent in range(1, job.count + 1):
            send(dst, payload)
            if not sent % _CHECK_EVERY and time.perf_counter() > stop_at:
                break
        ctl.report(SendReport(sent, time.perf_counter() - start))
        ctl.wait_stop()


def rtt_echo(ctl: Control, job: Job) -> None:
    with _client(job, "echo") as client:
        ctl.ready(_name("echo"))
        peer = _answer_hello(client, job)
        recv, send = client.recv, client.send
        expected, echoed, quiet = job.warmup + job.count, 0, QuietTimer(ctl, job.idle_timeout_s)
        try:
            send(peer, recv(timeout=job.first_timeout_s).data)  # the first may wait for go
            echoed = 1
        except TimeoutError:
            expected = 0
        while echoed < expected:
            try:
                while echoed < expected:
                    send(peer, recv(timeout=IDLE_POLL_S).data)
                    echoed += 1
            except TimeoutError:
                if quiet.done(echoed):
                    break
        ctl.report(EchoReport(echoed))
        ctl.wait_stop()


def rtt_ping(ctl: Control, job: Job) -> None:
    with _client(job, "ping") as client:
        dst = _connect_to_peer(client, job)
        payload, send, recv, clock = job.payload(), client.send, client.recv, time.perf_counter_ns
        ctl.ready()
        ctl.wait_go()
        samples: list[int] = []
        stop_at = clock() + int(job.time_cap_s * 1e9)
        report = None
        for i in range(job.warmup + job.count):
            t0 = clock()
            send(dst, payload)
            try:
                recv(timeout=job.idle_timeout_s)
            except TimeoutError:
                report = PingReport(samples, 1, (f"no echo within {job.idle_timeout_s} s at ping {i}",))
                break
            t1 = clock()
            if i >= job.warmup:
                samples.append(t1 - t0)
            if t1 > stop_at:
                report = PingReport(samples, 0, (f"time cap: {len(samples)} of {job.count} samples",))
                break
        ctl.report(report or PingReport(samples))


ZBUS_RELAY = Case(
    name="zbus-relay",
    summary="two zbus.Clients (max_links=0) through one zbus server",
    throughput_receiver=throughput_receiver,
    throughput_sender=throughput_sender,
    rtt_echo=rtt_echo,
    rtt_ping=rtt_ping,
    start_infra=_start_server,
)


def direct_throughput_receiver(ctl: Control, job: Job) -> None:
    _DIRECT["direct"] = True
    throughput_receiver(ctl, job)


def direct_throughput_sender(ctl: Control, job: Job) -> None:
    _DIRECT["direct"] = True
    throughput_sender(ctl, job)


def direct_rtt_echo(ctl: Control, job: Job) -> None:
    _DIRECT["direct"] = True
    rtt_echo(ctl, job)


def direct_rtt_ping(ctl: Control, job: Job) -> None:
    _DIRECT["direct"] = True
    rtt_ping(ctl, job)


ZBUS_DIRECT = Case(
    name="zbus-direct",
    summary="two zbus.Clients over a direct link (the zbus server only introduces them)",
    throughput_receiver=direct_throughput_receiver,
    throughput_sender=direct_throughput_sender,
    rtt_echo=direct_rtt_echo,
    rtt_ping=direct_rtt_ping,
    start_infra=_start_server,
)


def curve_throughput_receiver(ctl: Control, job: Job) -> None:
    _CURVE["curve"] = True
    throughput_receiver(ctl, job)


def curve_throughput_sender(ctl: Control, job: Job) -> None:
    _CURVE["curve"] = True
    throughput_sender(ctl, job)


def curve_rtt_echo(ctl: Control, job: Job) -> None:
    _CURVE["curve"] = True
    rtt_echo(ctl, job)


def curve_rtt_ping(ctl: Control, job: Job) -> None:
    _CURVE["curve"] = True
    rtt_ping(ctl, job)


ZBUS_RELAY_CURVE = Case(
    name="zbus-relay-curve",
    summary="zbus-relay with security on: CurveZMQ on every link, keys bound to Ids (docs/security.md)",
    throughput_receiver=curve_throughput_receiver,
    throughput_sender=curve_throughput_sender,
    rtt_echo=curve_rtt_echo,
    rtt_ping=curve_rtt_ping,
    start_infra=_start_curve_server,
)
