"""Benchmark orchestration: start each role in its own process, collect reports, print one table.

    python benchmarks/run.py [--quick] [--sizes 64,4096,65536] [--cases raw-relay,zbus-relay] [--json FILE]

Public: `run_benchmarks()`, `format_table()`, `main()`; `CASES` is the registry of what can run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import multiprocessing
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from typing import Callable, Sequence

from zbus.bench import Aborted, Case, CaseUnavailable, Control, Job, RoleFn, wait_until_accepting

#: Case name -> "module:attribute" of its `Case`, imported only when that case runs, so a case whose
#: dependencies are missing is skipped with the import error as the reason.
CASES: dict[str, str] = {
    "raw-dealer-router": "zbus.bench.raw:DEALER_ROUTER",
    "raw-relay": "zbus.bench.raw:RELAY",
    "nats": "zbus.bench.nats_roles:NATS",
    "zbus-relay": "zbus.bench.zbus_roles:ZBUS_RELAY",
    "raw-relay-multipart": "zbus.bench.raw:RELAY_MULTIPART",
}
DEFAULT_CASES = ("raw-dealer-router", "raw-relay", "nats", "zbus-relay")
DEFAULT_SIZES = (64, 4096, 65536)
#: Rows of cases named "zbus-*" get their throughput divided by these cases' at the same size.
BASELINES = ("raw-relay", "raw-dealer-router", "nats")

READY_TIMEOUT_S = 30.0  # spawn + imports + connect + handshake of one role
REPORT_MARGIN_S = 15.0  # beyond a job's own time bounds, before a role is declared stuck
STOP_GRACE_S = 3.0  # between "stop" and SIGTERM, and between SIGTERM and SIGKILL


@dataclass
class Result:
    """One case at one payload size: throughput and round-trip latency."""

    case: str
    size: int
    msgs_per_s: float | None = None
    mb_per_s: float | None = None  # payload bytes, 1 MB = 10**6 B
    sent: int | None = None
    received: int | None = None
    sender_msgs_per_s: float | None = None  # sent / sender's loop time: a cross-check, not in the table
    rtt_p50_ms: float | None = None
    rtt_p99_ms: float | None = None
    rtt_samples: int = 0
    skipped: str | None = None
    notes: list[str] = field(default_factory=list)


# -- statistics (pure) --------------------------------------------------------------------------------

def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear between closest ranks."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    pos = (len(sorted_values) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def rtt_percentiles_ms(samples_ns: Sequence[int]) -> tuple[float, float] | None:
    """(p50, p99) in milliseconds, or None without samples."""
    if not samples_ns:
        return None
    ordered = sorted(samples_ns)
    return percentile(ordered, 50) / 1e6, percentile(ordered, 99) / 1e6


def throughput(received: int, first_ns: int, last_ns: int, size: int) -> tuple[float, float] | None:
    """(msg/s, MB/s) over the intervals between the first and the last message received."""
    if received < 2 or last_ns <= first_ns:
        return None
    msgs_per_s = (received - 1) / ((last_ns - first_ns) / 1e9)
    return msgs_per_s, msgs_per_s * size / 1e6


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline


# -- table (pure) -------------------------------------------------------------------------------------

def size_label(size: int) -> str:
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size} B"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(results: Sequence[Result]) -> str:
    """A markdown table, one row per case and size; skipped cases are listed below it."""
    by_key = {(r.case, r.size): r for r in results if r.skipped is None}
    header = ["case", "size", "msg/s", "MB/s", "RTT p50 ms", "RTT p99 ms"]
    header += [f"x {b}" for b in BASELINES] + ["notes"]
    right = [False, True, True, True, True, True] + [True] * len(BASELINES) + [False]
    rows = []
    for r in results:
        if r.skipped is not None:
            continue
        ratios = []
        for baseline in BASELINES:
            base = by_key.get((baseline, r.size))
            x = ratio(r.msgs_per_s, base.msgs_per_s) if base and r.case.startswith("zbus-") else None
            ratios.append("" if x is None else f"{x:.2f}x")
        rows.append([r.case, size_label(r.size), _fmt(r.msgs_per_s, ",.0f"), _fmt(r.mb_per_s, ",.1f"),
                     _fmt(r.rtt_p50_ms, ".3f"), _fmt(r.rtt_p99_ms, ".3f"), *ratios, "; ".join(r.notes)])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right)) + "|"
    out = [line(header), rule, *(line(row) for row in rows)]
    skipped: dict[str, str] = {}
    for r in results:
        if r.skipped is not None:
            skipped.setdefault(r.case, r.skipped)
    if skipped:
        out.append("")
        out += [f"- {case} skipped: {reason}" for case, reason in skipped.items()]
    return "\n".join(out)


# -- processes ----------------------------------------------------------------------------------------

class RoleFailed(Exception):
    """A role process reported an error, died, or said nothing in time."""


def _role_main(fn: RoleFn, conn: Connection, job: Job) -> None:
    """Entry point of every role process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the harness's to handle; it ends us
    try:
        fn(Control(conn), job)
    except Aborted:
        pass
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
    finally:
        conn.close()


class RoleProcess:
    """A spawned role and the parent end of its control pipe."""

    def __init__(self, mp_context, fn: RoleFn, job: Job, name: str) -> None:
        self.name = name
        self._conn, child_conn = mp_context.Pipe()
        self._proc = mp_context.Process(target=_role_main, args=(fn, child_conn, job), name=name, daemon=True)
        self._proc.start()
        child_conn.close()

    def expect(self, kind: str, timeout_s: float):
        """Wait for the role's next message, which must be `kind`; return its value."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._conn.poll(0.1):
                try:
                    got, value = self._conn.recv()
                except EOFError:
                    code = self._proc.exitcode
                    raise RoleFailed(f"{self.name} exited (code {code}) before {kind}") from None
                if got == kind:
                    return value
                if got == "error":
                    raise RoleFailed(f"{self.name} failed: {value.strip().splitlines()[-1]}\n{value}")
                raise RoleFailed(f"{self.name} sent {got!r} while {kind!r} was expected")
            if time.monotonic() > deadline:
                raise RoleFailed(f"{self.name}: no {kind} within {timeout_s:.0f} s")

    def send(self, *message: object) -> None:
        try:
            self._conn.send(message)
        except OSError:  # it is gone already
            pass

    def stop(self, polite: bool = True) -> None:
        """Say stop (if polite), then terminate, then kill; each step waits at most STOP_GRACE_S."""
        if polite:
            self.send("stop")
            self._proc.join(STOP_GRACE_S)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(STOP_GRACE_S)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(STOP_GRACE_S)
        self._conn.close()


class Launcher:
    """Starts role processes and commands for one case, and ends every one of them on close()."""

    def __init__(self) -> None:
        self._mp = multiprocessing.get_context("spawn")
        self._roles: list[RoleProcess] = []
        self._services: list[RoleProcess] = []  # run until close(); they do not read "stop"
        self._commands: list[tuple[subprocess.Popen, object]] = []

    def role(self, fn: RoleFn, job: Job, name: str) -> RoleProcess:
        role = RoleProcess(self._mp, fn, job, name)
        self._roles.append(role)
        return role

    def stop(self, role: RoleProcess) -> None:
        role.stop()
        self._roles.remove(role)

    def start_service(self, fn: RoleFn, name: str) -> str:
        """Start a long-lived role (e.g. a relay) that runs until close(); return its ready() info."""
        service = RoleProcess(self._mp, fn, Job(0, 0, 0, 0.0, 0.0, 0.0), name)
        self._services.append(service)
        return service.expect("ready", READY_TIMEOUT_S)

    def start_command(self, argv: list[str], port: int, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Run argv (output to a temporary log) and wait until it accepts on 127.0.0.1:port."""
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # Ctrl-C is ours; we end it in close()
        self._commands.append((proc, log))
        try:
            wait_until_accepting(port, proc, timeout_s)
        except (RuntimeError, TimeoutError) as exc:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-5:]
            raise RoleFailed(f"{shlex.join(argv)}: {exc}" + "".join(f"\n    {t}" for t in tail)) from None

    def close(self) -> None:
        for role in reversed(self._roles):
            role.stop()
        self._roles.clear()
        for service in reversed(self._services):
            service.stop(polite=False)
        self._services.clear()
        for proc, log in reversed(self._commands):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(STOP_GRACE_S)
            log.close()
        self._commands.clear()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- orchestration ------------------------------------------------------------------------------------

def throughput_count(size: int) -> int:
    """Messages per throughput run: ~200k small, ~100k mid-size, ~1.3 GB worth of large ones."""
    if size <= 1024:
        return 200_000
    if size <= 16 * 1024:
        return 100_000
    return max(1_000, min(20_000, 1_300_000_000 // size))


def plan_jobs(size: int, quick: bool) -> tuple[Job, Job]:
    """(throughput job, latency job) for one payload size."""
    scale = 5 if quick else 1
    bounds = dict(idle_timeout_s=2.0, first_timeout_s=20.0)
    tput = Job(size, throughput_count(size) // scale, 0, time_cap_s=2.5 if quick else 8.0, **bounds)
    rtt = Job(size, 3000 // scale, 300 // scale, time_cap_s=2.0 if quick else 6.0, **bounds)
    return tput, rtt


def _run_pair(launcher: Launcher, first_fn: RoleFn, second_fn: RoleFn, job: Job, label: str):
    """Start `first` (receiver/echo), then `second` with first's ready() info as Job.peer; say go to
    second; return both reports. `first` reports after second, bounded by its own timeouts."""
    first = launcher.role(first_fn, job, f"{label} {first_fn.__name__}")
    second = None
    try:
        peer = first.expect("ready", READY_TIMEOUT_S)
        second = launcher.role(second_fn, replace(job, peer=peer), f"{label} {second_fn.__name__}")
        second.expect("ready", READY_TIMEOUT_S)
        second.send("go")
        second_report = second.expect("report", job.time_cap_s + REPORT_MARGIN_S)
        first_report = first.expect("report", job.time_cap_s + job.idle_timeout_s + REPORT_MARGIN_S)
        return first_report, second_report
    finally:
        for role in (second, first):
            if role is not None:
                launcher.stop(role)


def _measure(launcher: Launcher, case: Case, endpoint: str, size: int, quick: bool,
             log: Callable[[str], None]) -> Result:
    result = Result(case.name, size)
    label = f"{case.name} {size_label(size)}"
    tput_job, rtt_job = (replace(job, endpoint=endpoint) for job in plan_jobs(size, quick))
    try:
        rx, tx = _run_pair(launcher, case.throughput_receiver, case.throughput_sender, tput_job, label)
        result.sent, result.received = tx.sent, rx.received
        result.sender_msgs_per_s = tx.sent / tx.elapsed_s if tx.elapsed_s > 0 else None
        result.notes += rx.notes
        rates = throughput(rx.received, rx.first_ns, rx.last_ns, size)
        if rates:
            result.msgs_per_s, result.mb_per_s = rates
        if tx.sent < tput_job.count:
            result.notes.append(f"time cap: sent {tx.sent} of {tput_job.count}")
        if rx.received < tx.sent:
            result.notes.append(f"LOST {tx.sent - rx.received} of {tx.sent}")
    except RoleFailed as exc:
        result.notes.append(f"throughput failed: {str(exc).splitlines()[0]}")
        log(str(exc))
    try:
        _, ping = _run_pair(launcher, case.rtt_echo, case.rtt_ping, rtt_job, label)
        result.notes += [f"rtt {note}" for note in ping.notes]
        result.rtt_samples = len(ping.samples_ns)
        percentiles = rtt_percentiles_ms(ping.samples_ns)
        if percentiles:
            result.rtt_p50_ms, result.rtt_p99_ms = percentiles
    except RoleFailed as exc:
        result.notes.append(f"rtt failed: {str(exc).splitlines()[0]}")
        log(str(exc))
    log(f"  {label:>26}: {_fmt(result.msgs_per_s, ',.0f')} msg/s, {_fmt(result.mb_per_s, ',.1f')} MB/s, "
        f"RTT p50 {_fmt(result.rtt_p50_ms, '.3f')} ms p99 {_fmt(result.rtt_p99_ms, '.3f')} ms"
        + (f"  [{'; '.join(result.notes)}]" if result.notes else ""))
    return result


def load_case(name: str) -> Case:
    """Import a registered case; raises CaseUnavailable with the reason if it cannot load."""
    module_name, attr = CASES[name].split(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except CaseUnavailable:
        raise
    except Exception as exc:  # an import error of any kind means: skip, and say why
        raise CaseUnavailable(f"{type(exc).__name__}: {exc}") from exc


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_benchmarks(sizes: Sequence[int] = DEFAULT_SIZES, cases: Sequence[str] = DEFAULT_CASES,
                   quick: bool = False, log: Callable[[str], None] = _stderr) -> list[Result]:
    """Run every case at every size, each role in its own process; progress goes to `log`."""
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    results: list[Result] = []
    for name in cases:
        try:
            case = load_case(name)
            with Launcher() as launcher:
                endpoint = case.start_infra(launcher) if case.start_infra else ""
                log(f"{name}: {case.summary}" + (f" [{endpoint}]" if endpoint else ""))
                for size in sizes:
                    results.append(_measure(launcher, case, endpoint, size, quick, log))
        except (CaseUnavailable, RoleFailed) as exc:
            log(f"{name}: skipped: {exc}")
            reason = str(exc).splitlines()[0]
            done = {r.size for r in results if r.case == name}
            results += [Result(name, size, skipped=reason) for size in sizes if size not in done]
    return results


# -- report -------------------------------------------------------------------------------------------

def machine_facts() -> dict[str, str]:
    import zmq

    facts = {
        "cores": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "load": "%.2f %.2f %.2f" % os.getloadavg(),
    }
    try:
        from importlib.metadata import version

        facts["nats-py"] = version("nats-py")
    except Exception:
        facts["nats-py"] = "not installed"
    try:
        from zbus.bench.nats_roles import nats_server_version

        facts["nats-server"] = nats_server_version()
    except Exception as exc:
        facts["nats-server"] = f"unavailable ({exc})"
    return facts


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for row in f:
                if row.startswith("model name"):
                    return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes wants comma-separated byte counts, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes wants positive byte counts, got {text!r}")
    return sizes


def _parse_cases(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown or not cases:
        raise argparse.ArgumentTypeError(f"unknown case(s) {unknown or text!r}; known: {', '.join(CASES)}")
    return cases


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark zbus next to raw pyzmq and NATS on 127.0.0.1 (each role in its own"
                    " process) and print a markdown table. See benchmarks/README.md.")
    parser.add_argument("--sizes", type=_parse_sizes, default=list(DEFAULT_SIZES),
                        help="payload sizes in bytes (default: 64,4096,65536)")
    parser.add_argument("--cases", type=_parse_cases, default=list(DEFAULT_CASES),
                        help=f"cases to run, from {', '.join(CASES)} (default: {','.join(DEFAULT_CASES)})")
    parser.add_argument("--quick", action="store_true", help="5x fewer messages and samples (~40 s)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = shlex.join(sys.orig_argv)
    facts = machine_facts()
    print(f"command: `{command}`")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()))
    busy = os.getloadavg()[0]
    if busy > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {busy:.1f} on {os.cpu_count()} cores before starting: other processes"
              " compete for the CPU, so numbers will be low and noisy;"
              " ratios from the same run still compare.")
    print(flush=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    try:
        results = run_benchmarks(args.sizes, args.cases, args.quick)
    except KeyboardInterrupt:
        print("interrupted; every process started was ended", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(format_table(results))
    print(f"\n({'quick' if args.quick else 'full'} run, {time.monotonic() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "machine": facts, "quick": args.quick,
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=2)
    return 0


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
