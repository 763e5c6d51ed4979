"""Benchmark orchestration: run every case at every size N times, interleaved, and print one table.

    python benchmarks/run.py [--quick] [--repeat N] [--sizes 64,4096,65536] [--cases a,b] [--json FILE]

Repetition r runs every case (in order) at every size before repetition r+1 starts, so a slow
period of the machine hurts all cases alike; the table shows per case and size the median of the
runs (`zbus.bench.stats`). Each case gets fresh processes (roles, relay, server) in every repetition.

Public: `run_benchmarks()`, `main()`; `CASES` is the registry of what can run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import shlex
import signal
import sys
import time
import traceback
from dataclasses import replace
from typing import Callable, Sequence

from zbus.bench import Case, CaseUnavailable, Job, RoleFn, SendReport
from zbus.bench.processes import READY_TIMEOUT_S, Launcher, RoleFailed
from zbus.bench.stats import (
    Result,
    format_table,
    format_value,
    rtt_percentiles_ms,
    size_label,
    summarize,
    throughput,
)

#: Case name -> "module:attribute" of its `Case`, imported only when that case runs, so a case whose
#: dependencies are missing is skipped with the import error as the reason.
CASES: dict[str, str] = {
    "raw-dealer-router": "zbus.bench.raw:DEALER_ROUTER",
    "raw-relay": "zbus.bench.raw:RELAY",
    "nats": "zbus.bench.nats_roles:NATS",
    "zbus-relay": "zbus.bench.zbus_roles:ZBUS_RELAY",
    "zbus-direct": "zbus.bench.zbus_roles:ZBUS_DIRECT",
    "zbus-relay-curve": "zbus.bench.zbus_roles:ZBUS_RELAY_CURVE",
    "raw-relay-multipart": "zbus.bench.raw:RELAY_MULTIPART",
}
DEFAULT_CASES = ("raw-dealer-router", "raw-relay", "nats", "zbus-relay", "zbus-direct")
DEFAULT_SIZES = (64, 4096, 65536)
DEFAULT_REPEAT, DEFAULT_REPEAT_QUICK = 3, 1

REPORT_MARGIN_S = 15.0  # beyond a job's own time bounds, before a role is declared stuck


# -- orchestration ------------------------------------------------------------------------------------

def throughput_count(size: int) -> int:
    """Most messages one throughput run sends: 1M small, 500k mid-size, ~6.5 GB of large ones. More
    than any case here moves in its time cap, so every case is measured over about the same time."""
    if size <= 1024:
        return 1_000_000
    if size <= 16 * 1024:
        return 500_000
    return max(5_000, min(100_000, 6_500_000_000 // size))


def plan_jobs(size: int, quick: bool) -> tuple[Job, Job]:
    """(throughput job, latency job) for one run at one payload size: a throughput sender sends for
    1.5 s (quick: 0.5 s) or throughput_count() messages; 1500 timed pings after 150 warm-up ones
    (quick: 300 after 30), at most 2.5 s (quick: 1 s)."""
    scale = 5 if quick else 1
    bounds = dict(idle_timeout_s=2.0, first_timeout_s=20.0)
    tput = Job(size, throughput_count(size) // scale, 0, time_cap_s=0.5 if quick else 1.5, **bounds)
    rtt = Job(size, 1500 // scale, 150 // scale, time_cap_s=1.0 if quick else 2.5, **bounds)
    return tput, rtt


def _run_pair(launcher: Launcher, first_fn: RoleFn, second_fn: RoleFn, job: Job, label: str):
    """Start `first` (receiver/echo), then `second` with first's ready() info as Job.peer; say go to
    second; once second reports, tell first how much to expect (`peer_done`); return both reports.
    `first` reports after second, bounded by its own timeouts."""
    first = launcher.role(first_fn, job, f"{label} {first_fn.__name__}")
    second = None
    try:
        peer = first.expect("ready", READY_TIMEOUT_S)
        second = launcher.role(second_fn, replace(job, peer=peer), f"{label} {second_fn.__name__}")
        second.expect("ready", READY_TIMEOUT_S)
        second.send("go")
        second_report = second.expect("report", job.time_cap_s + REPORT_MARGIN_S)
        first.send("peer_done", second_report.sent if isinstance(second_report, SendReport) else 0)
        first_report = first.expect("report", job.time_cap_s + job.idle_timeout_s + REPORT_MARGIN_S)
        return first_report, second_report
    finally:
        for role in (second, first):
            if role is not None:
                launcher.stop(role)


def _measure(launcher: Launcher, case: Case, endpoint: str, size: int, quick: bool, run: int,
             log: Callable[[str], None]) -> Result:
    started = time.monotonic()
    result = Result(case.name, size, run)
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
    log(f"  {label:>26}: {format_value(result.msgs_per_s, ',.0f')} msg/s, "
        f"{format_value(result.mb_per_s, ',.1f')} MB/s, RTT p50 {format_value(result.rtt_p50_ms, '.3f')} ms "
        f"p99 {format_value(result.rtt_p99_ms, '.3f')} ms ({time.monotonic() - started:.1f} s)"
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


def _run_case(name: str, sizes: Sequence[int], quick: bool, run: int, log: Callable[[str], None],
              unavailable: dict[str, str], pin: bool = False) -> list[Result]:
    """One run of one case at every size, with its own infrastructure. A case that cannot load is
    recorded in `unavailable` (not tried again); one that fails to start is skipped for this run."""
    if name in unavailable:
        return [Result(name, size, run, skipped=unavailable[name]) for size in sizes]
    results: list[Result] = []
    try:
        case = load_case(name)
        with Launcher(pin=pin) as launcher:
            endpoint = case.start_infra(launcher) if case.start_infra else ""
            about = f": {case.summary}" if run == 1 else ""
            log(f"{name}{about}" + (f" [{endpoint}]" if endpoint else ""))
            for size in sizes:
                results.append(_measure(launcher, case, endpoint, size, quick, run, log))
    except Exception as exc:  # whatever stops one case must not stop the others or lose their rows
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, CaseUnavailable):
            unavailable[name] = reason
        elif not isinstance(exc, RoleFailed):
            reason = f"{type(exc).__name__}: {reason}"
            log(traceback.format_exc().rstrip())
        log(f"{name}: skipped: {exc}")
        done = {r.size for r in results}
        results += [Result(name, size, run, skipped=reason) for size in sizes if size not in done]
    return results


def run_benchmarks(sizes: Sequence[int] = DEFAULT_SIZES, cases: Sequence[str] = DEFAULT_CASES,
                   quick: bool = False, repeat: int = 1, log: Callable[[str], None] = _stderr,
                   pin: bool = False) -> list[Result]:
    """Run every case at every size `repeat` times, one repetition of all cases after the other, each
    role in its own process (``pin``: each on a CPU of its own, see `Launcher`); return every run
    (`Result.run` says which). Progress goes to `log`."""
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    results: list[Result] = []
    unavailable: dict[str, str] = {}  # case -> why it cannot load; the same in every repetition
    for run in range(1, repeat + 1):
        if repeat > 1:
            log(f"-- run {run} of {repeat}")
        for name in cases:
            results += _run_case(name, sizes, quick, run, log, unavailable, pin)
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


def _parse_repeat(text: str) -> int:
    try:
        repeat = int(text)
    except ValueError:
        repeat = 0
    if repeat < 1:
        raise argparse.ArgumentTypeError(f"--repeat wants a whole number of runs, 1 or more, got {text!r}")
    return repeat


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark zbus next to raw pyzmq and NATS on 127.0.0.1 (each role in its own"
                    " process) and print a markdown table. See benchmarks/README.md.")
    parser.add_argument("--sizes", type=_parse_sizes, default=list(DEFAULT_SIZES),
                        help="payload sizes in bytes (default: 64,4096,65536)")
    parser.add_argument("--cases", type=_parse_cases, default=list(DEFAULT_CASES),
                        help=f"cases to run, from {', '.join(CASES)} (default: {','.join(DEFAULT_CASES)})")
    parser.add_argument("--quick", action="store_true",
                        help=f"5x fewer messages and samples, shorter time caps, --repeat {DEFAULT_REPEAT_QUICK}"
                             " unless given (~30 s)")
    parser.add_argument("--repeat", type=_parse_repeat, metavar="N",
                        help=f"run every case and size N times, interleaved; the table shows medians"
                             f" (default: {DEFAULT_REPEAT}, with --quick {DEFAULT_REPEAT_QUICK})")
    parser.add_argument("--pin", action="store_true",
                        help="run the two roles of every measurement on a CPU each (the receiver or echo on"
                             " the first, the sender or pinger on the second), as if on two hosts; servers"
                             " and relays are not pinned (default: the scheduler places everything)")
    parser.add_argument("--json", metavar="FILE", help="also write every run and the per-row medians as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        print(f"--pin needs at least 2 CPUs to run on; this process may use {len(os.sched_getaffinity(0))}",
              file=sys.stderr)
        return 2
    command = shlex.join(sys.orig_argv)
    facts = machine_facts()
    print(f"command: `{command}`")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()))
    busy = os.getloadavg()[0]
    if busy > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {busy:.1f} on {os.cpu_count()} cores before starting: other processes"
              " compete for the CPU, so numbers will be low and noisy;"
              " ratios within one table still compare.")
    print(flush=True)
    repeat = args.repeat or (DEFAULT_REPEAT_QUICK if args.quick else DEFAULT_REPEAT)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.monotonic()
    try:
        results = run_benchmarks(args.sizes, args.cases, args.quick, repeat, pin=args.pin)
    except KeyboardInterrupt:
        print("interrupted; every process started was ended", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    elapsed = time.monotonic() - started
    summaries = summarize(results)
    print(format_table(summaries))
    runs = "1 run" if repeat == 1 else f"{repeat} runs each, interleaved; medians, ratios of medians"
    if args.pin:
        runs += "; each role pinned to a CPU of its own"
    print(f"\n({'quick' if args.quick else 'full'}: {len(args.cases)} cases x {len(args.sizes)} sizes,"
          f" {runs}; total time {elapsed:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "machine": facts, "quick": args.quick, "repeat": repeat, "pin": args.pin,
                       "total_time_s": round(elapsed, 1),
                       "results": [dataclasses.asdict(r) for r in results],
                       "summary": [dataclasses.asdict(s) for s in summaries]}, f, indent=2)
    return 0


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
