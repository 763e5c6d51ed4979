"""The benchmark's pure arithmetic: percentiles, rates, ratios, medians over repeated runs, the table.

No processes, sockets or clocks here: `Result`s (one per run of a case at a size) come in, and
`summarize()` turns them into one `Summary` per case and size, which `format_table()` prints.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Sequence

#: Rows of cases named "zbus-*" get their median throughput divided by these cases' at the same size.
BASELINES = ("raw-relay", "raw-dealer-router", "nats")
RTT_BASELINE = "raw-dealer-router"  # the RTT p50 ratio column (lower is better)


@dataclass
class Result:
    """One run of one case at one payload size: throughput and round-trip latency."""

    case: str
    size: int
    run: int = 1  # which repetition (1-based); every case runs once per repetition, interleaved
    msgs_per_s: float | None = None
    mb_per_s: float | None = None  # payload bytes, 1 MB = 10**6 B
    sent: int | None = None
    received: int | None = None
    sender_msgs_per_s: float | None = None  # sent / sender's loop time: a cross-check, not in the table
    rtt_p50_ms: float | None = None
    rtt_p99_ms: float | None = None
    rtt_samples: int = 0
    skipped: str | None = None  # why this run did not happen (the case could not start)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Summary:
    """All runs of one case at one size: medians, the throughput spread, and what went wrong."""

    case: str
    size: int
    runs: int  # runs that happened (not skipped)
    msgs_per_s: float | None = None  # median over the runs that measured throughput
    msgs_per_s_min: float | None = None
    msgs_per_s_max: float | None = None
    throughput_runs: int = 0  # how many runs the three numbers above come from
    mb_per_s: float | None = None  # from the median msg/s
    rtt_p50_ms: float | None = None  # median of the runs' p50
    rtt_p99_ms: float | None = None  # median of the runs' p99
    rtt_runs: int = 0
    skipped: str | None = None  # set when every run was skipped: the first reason
    notes: tuple[str, ...] = ()


# -- statistics ---------------------------------------------------------------------------------------

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


def median_or_none(values: Sequence[float | None]) -> float | None:
    """The median of the values that are not None (the mean of the middle two for an even count)."""
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(results: Sequence[Result]) -> list[Summary]:
    """One Summary per (case, size), in the order each first appears in `results`."""
    groups: dict[tuple[str, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.case, r.size), []).append(r)
    return [_summarize_group(case, size, runs) for (case, size), runs in groups.items()]


def _summarize_group(case: str, size: int, runs: list[Result]) -> Summary:
    done = [r for r in runs if r.skipped is None]
    if not done:
        return Summary(case, size, runs=0, skipped=runs[0].skipped)
    rates = [r.msgs_per_s for r in done if r.msgs_per_s is not None]
    rtts = [r for r in done if r.rtt_p50_ms is not None]
    median_rate = median_or_none(rates)
    notes = _merge_notes(runs)
    if 0 < len(rates) < len(done):
        notes.append(f"msg/s from {len(rates)} of {len(done)} runs")
    if 0 < len(rtts) < len(done):
        notes.append(f"RTT from {len(rtts)} of {len(done)} runs")
    return Summary(
        case, size, runs=len(done),
        msgs_per_s=median_rate,
        msgs_per_s_min=min(rates, default=None),
        msgs_per_s_max=max(rates, default=None),
        throughput_runs=len(rates),
        mb_per_s=None if median_rate is None else median_rate * size / 1e6,
        rtt_p50_ms=median_or_none([r.rtt_p50_ms for r in rtts]),
        rtt_p99_ms=median_or_none([r.rtt_p99_ms for r in rtts]),
        rtt_runs=len(rtts),
        notes=tuple(notes),
    )


def _merge_notes(runs: list[Result]) -> list[str]:
    """Each distinct note once; a note that not every run has says which runs (`(run 2)`)."""
    seen: dict[str, list[int]] = {}
    for r in runs:
        texts = [f"skipped: {r.skipped}"] if r.skipped is not None else r.notes
        for text in texts:
            if r.run not in seen.setdefault(text, []):
                seen[text].append(r.run)
    every_run = {r.run for r in runs}
    merged = []
    for text, where in seen.items():
        if set(where) == every_run:
            merged.append(text)
        else:
            label = "run" if len(where) == 1 else "runs"
            merged.append(f"{text} ({label} {', '.join(map(str, where))})")
    return merged


# -- table --------------------------------------------------------------------------------------------

def size_label(size: int) -> str:
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size} B"


def format_value(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`, or "-" when there is no value."""
    return "-" if value is None else format(value, spec)


def spread_label(summary: Summary) -> str:
    """"min–max (r%)", r = (max - min) / median; empty with fewer than two throughput runs."""
    if summary.throughput_runs < 2 or not summary.msgs_per_s:
        return ""
    low, high = summary.msgs_per_s_min, summary.msgs_per_s_max
    return f"{low:,.0f}–{high:,.0f} ({(high - low) / summary.msgs_per_s:.0%})"


def format_table(summaries: Sequence[Summary]) -> str:
    """A markdown table, one row per case and size (medians); the `x <baseline>` columns divide a
    zbus-* row's median msg/s by the baseline's at the same size. The spread column appears when
    some row has two or more runs. Cases skipped in every run are listed below the table instead."""
    shown = [s for s in summaries if s.skipped is None]
    by_key = {(s.case, s.size): s for s in shown}
    with_spread = any(s.throughput_runs > 1 for s in shown)
    header = ["case", "size", "msg/s"] + (["msg/s min–max (spread)"] if with_spread else [])
    header += ["MB/s", "RTT p50 ms", "RTT p99 ms"] + [f"x {b}" for b in BASELINES]
    header += [f"RTT p50 x {RTT_BASELINE}", "notes"]
    right = [False] + [True] * (len(header) - 2) + [False]
    rows = []
    for s in shown:
        ratios = []
        for baseline in BASELINES:
            base = by_key.get((baseline, s.size))
            x = ratio(s.msgs_per_s, base.msgs_per_s) if base and s.case.startswith("zbus-") else None
            ratios.append("" if x is None else f"{x:.2f}x")
        base = by_key.get((RTT_BASELINE, s.size))
        x = ratio(s.rtt_p50_ms, base.rtt_p50_ms) if base and s.case.startswith("zbus-") else None
        ratios.append("" if x is None else f"{x:.2f}x")
        spread = [spread_label(s)] if with_spread else []
        rows.append([s.case, size_label(s.size), format_value(s.msgs_per_s, ",.0f"), *spread,
                     format_value(s.mb_per_s, ",.1f"), format_value(s.rtt_p50_ms, ".3f"),
                     format_value(s.rtt_p99_ms, ".3f"), *ratios, "; ".join(s.notes)])
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right)) + "|"
    out = [line(header), rule, *(line(row) for row in rows)]
    skipped: dict[str, str] = {}
    for s in summaries:
        if s.skipped is not None:
            skipped.setdefault(s.case, s.skipped)
    if skipped:
        out.append("")
        out += [f"- {case} skipped: {reason}" for case, reason in skipped.items()]
    return "\n".join(out)
