"""The benchmark harness's pure parts: percentiles, rates, ratios, medians over repeated runs, the
table, job sizing; and how the orchestration treats cases that cannot run (no processes started)."""

from multiprocessing import Pipe

import pytest

from zbus.bench import Aborted, Case, CaseUnavailable, Control, QuietTimer, harness
from zbus.bench.harness import CASES, DEFAULT_CASES, build_parser, plan_jobs, run_benchmarks, throughput_count
from zbus.bench.stats import (
    BASELINES,
    Result,
    format_table,
    median_or_none,
    percentile,
    ratio,
    rtt_percentiles_ms,
    size_label,
    summarize,
    throughput,
)


def test_percentile_interpolates_between_closest_ranks():
    values = [10, 20, 30, 40, 50]
    assert percentile(values, 0) == 10
    assert percentile(values, 50) == 30
    assert percentile(values, 100) == 50
    assert percentile(values, 25) == 20
    assert percentile(values, 90) == pytest.approx(46)


def test_percentile_of_one_value_is_that_value():
    assert percentile([7], 99) == 7


def test_percentile_refuses_empty_input_and_out_of_range_q():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1, 2], 101)


def test_rtt_percentiles_sort_samples_and_convert_ns_to_ms():
    samples = [3_000_000] + [1_000_000] * 98 + [2_000_000]  # unsorted on purpose
    p50, p99 = rtt_percentiles_ms(samples)
    assert p50 == pytest.approx(1.0)
    assert p99 == pytest.approx(2.01)
    assert rtt_percentiles_ms([]) is None


def test_throughput_counts_intervals_between_first_and_last_message():
    # 1001 messages, the last one 1 s after the first: 1000 intervals in 1 s.
    msgs, mb = throughput(1001, 5_000_000_000, 6_000_000_000, 4096)
    assert msgs == pytest.approx(1000)
    assert mb == pytest.approx(4.096)


def test_throughput_needs_two_messages_and_elapsed_time():
    assert throughput(1, 10, 10, 64) is None
    assert throughput(0, 0, 0, 64) is None
    assert throughput(5, 10, 10, 64) is None


def test_ratio_is_none_without_a_baseline():
    assert ratio(50.0, 100.0) == 0.5
    assert ratio(None, 100.0) is None
    assert ratio(50.0, None) is None
    assert ratio(50.0, 0.0) is None


def test_median_ignores_missing_values_and_averages_the_middle_two():
    assert median_or_none([3.0, None, 1.0, 2.0]) == 2.0
    assert median_or_none([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert median_or_none([None, None]) is None
    assert median_or_none([]) is None


def test_size_labels_use_kib_for_whole_kibibytes():
    assert size_label(64) == "64 B"
    assert size_label(4096) == "4 KiB"
    assert size_label(65536) == "64 KiB"
    assert size_label(1500) == "1500 B"


def test_job_counts_scale_with_size_and_quick_is_smaller():
    assert [throughput_count(s) for s in (64, 4096, 65536)] == [1_000_000, 500_000, 99_182]
    assert throughput_count(16 << 20) == 5_000
    full_tput, full_rtt = plan_jobs(64, quick=False)
    quick_tput, quick_rtt = plan_jobs(64, quick=True)
    assert quick_tput.count < full_tput.count and quick_rtt.count < full_rtt.count
    assert quick_tput.time_cap_s < full_tput.time_cap_s
    assert full_rtt.warmup > 0


def test_a_full_run_stays_within_its_time_budget():
    # 4 cases x 3 sizes x 3 runs must fit in ~4 minutes with ~1-2 s of process start-up per run.
    for size in (64, 4096, 65536):
        tput, rtt = plan_jobs(size, quick=False)
        assert tput.time_cap_s <= 2.0 and rtt.time_cap_s <= 3.0


# -- summarize: medians over repeated runs ------------------------------------------------------------

def test_summary_takes_medians_of_runs_and_keeps_the_throughput_spread():
    runs = [
        Result("raw-relay", 64, run=1, msgs_per_s=40_000, rtt_p50_ms=0.5, rtt_p99_ms=2.0),
        Result("raw-relay", 64, run=2, msgs_per_s=20_000, rtt_p50_ms=0.9, rtt_p99_ms=9.0),  # slow period
        Result("raw-relay", 64, run=3, msgs_per_s=44_000, rtt_p50_ms=0.4, rtt_p99_ms=1.0),
    ]
    (s,) = summarize(runs)
    assert (s.case, s.size, s.runs, s.throughput_runs, s.rtt_runs) == ("raw-relay", 64, 3, 3, 3)
    assert s.msgs_per_s == 40_000
    assert (s.msgs_per_s_min, s.msgs_per_s_max) == (20_000, 44_000)
    assert s.mb_per_s == pytest.approx(40_000 * 64 / 1e6)
    assert (s.rtt_p50_ms, s.rtt_p99_ms) == (0.5, 2.0)
    assert s.notes == ()


def test_summary_keeps_the_order_cases_first_ran_in_even_when_runs_interleave():
    runs = [Result(case, size, run=run, msgs_per_s=1.0)
            for run in (1, 2) for case in ("b-case", "a-case") for size in (64, 4096)]
    assert [(s.case, s.size, s.runs) for s in summarize(runs)] == [
        ("b-case", 64, 2), ("b-case", 4096, 2), ("a-case", 64, 2), ("a-case", 4096, 2)]


def test_summary_says_which_runs_a_note_came_from_and_how_many_runs_measured():
    runs = [
        Result("zbus-relay", 64, run=1, msgs_per_s=10.0, rtt_p50_ms=1.0, rtt_p99_ms=1.0),
        Result("zbus-relay", 64, run=2, notes=["throughput failed: boom"], rtt_p50_ms=3.0, rtt_p99_ms=3.0),
        Result("zbus-relay", 64, run=3, msgs_per_s=30.0, notes=["LOST 5 of 100"]),
    ]
    (s,) = summarize(runs)
    assert s.msgs_per_s == 20.0 and s.throughput_runs == 2
    assert s.rtt_p50_ms == 2.0 and s.rtt_runs == 2
    assert s.notes == ("throughput failed: boom (run 2)", "LOST 5 of 100 (run 3)",
                       "msg/s from 2 of 3 runs", "RTT from 2 of 3 runs")


def test_a_note_every_run_has_is_shown_once_without_run_numbers():
    runs = [Result("nats", 64, run=r, msgs_per_s=1.0, notes=["rtt time cap: 9 of 10 samples"]) for r in (1, 2)]
    assert summarize(runs)[0].notes == ("rtt time cap: 9 of 10 samples",)


def test_a_run_skipped_in_one_repetition_is_a_note_and_the_others_still_count():
    runs = [
        Result("zbus-relay", 64, run=1, msgs_per_s=10.0),
        Result("zbus-relay", 64, run=2, skipped="RoleFailed: server exited"),
        Result("zbus-relay", 64, run=3, msgs_per_s=20.0),
    ]
    (s,) = summarize(runs)
    assert s.skipped is None and s.runs == 2 and s.msgs_per_s == 15.0
    assert s.notes == ("skipped: RoleFailed: server exited (run 2)",)


def test_a_case_skipped_in_every_run_is_skipped_with_its_first_reason():
    runs = [Result("nats", 64, run=r, skipped="nats-server binary not found") for r in (1, 2, 3)]
    (s,) = summarize(runs)
    assert s.skipped == "nats-server binary not found" and s.runs == 0 and s.msgs_per_s is None


# -- the table ----------------------------------------------------------------------------------------

def _rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_table_of_single_runs_is_markdown_with_a_rule_one_row_per_case_and_size_and_no_spread():
    results = [
        Result("raw-relay", 64, msgs_per_s=40_000, mb_per_s=2.56, rtt_p50_ms=0.5, rtt_p99_ms=0.9),
        Result("raw-relay", 4096, msgs_per_s=30_000, mb_per_s=122.88, rtt_p50_ms=0.6, rtt_p99_ms=1.1),
    ]
    table = format_table(summarize(results))
    rows = _rows(table)
    assert rows[0][:6] == ["case", "size", "msg/s", "MB/s", "RTT p50 ms", "RTT p99 ms"]
    assert set(rows[1][1]) <= set("-:")
    assert rows[2][:6] == ["raw-relay", "64 B", "40,000", "2.6", "0.500", "0.900"]
    assert rows[3][:2] == ["raw-relay", "4 KiB"]
    assert len({len(r) for r in rows}) == 1
    assert len({len(line) for line in table.splitlines()}) == 1  # aligned


def test_table_of_repeated_runs_shows_medians_and_the_min_max_spread():
    results = [Result("raw-relay", 64, run=r, msgs_per_s=v) for r, v in ((1, 40_000), (2, 20_000), (3, 44_000))]
    table = format_table(summarize(results))
    rows = _rows(table)
    assert rows[0][:4] == ["case", "size", "msg/s", "msg/s min–max (spread)"]
    assert rows[2][2:4] == ["40,000", "20,000–44,000 (60%)"]
    assert len({len(line) for line in table.splitlines()}) == 1  # aligned


def test_table_gives_zbus_rows_ratios_of_medians_against_each_baseline_at_the_same_size():
    medians = {"raw-dealer-router": 200_000, "raw-relay": 40_000, "nats": 100_000, "zbus-relay": 20_000}
    results = []
    for run, factor in ((1, 1.0), (2, 0.5), (3, 1.1)):  # run 2 was slow for everyone
        results += [Result(case, 64, run=run, msgs_per_s=m * factor) for case, m in medians.items()]
    results.append(Result("zbus-relay", 4096, msgs_per_s=10_000))  # no baselines at this size
    rows = _rows(format_table(summarize(results)))
    header = rows[0]
    zbus_64, zbus_4k = rows[5], rows[6]
    cell = {b: header.index(f"x {b}") for b in BASELINES}
    assert zbus_64[cell["raw-relay"]] == "0.50x"
    assert zbus_64[cell["raw-dealer-router"]] == "0.10x"
    assert zbus_64[cell["nats"]] == "0.20x"
    assert all(zbus_4k[i] == "" for i in cell.values())
    assert all(rows[2][i] == "" for i in cell.values())  # baselines get no ratio to themselves


def test_table_shows_missing_numbers_as_dashes_and_notes_loss():
    results = [Result("raw-relay", 64, sent=100, received=90, notes=["LOST 10 of 100"])]
    row = _rows(format_table(summarize(results)))[2]
    assert row[2:6] == ["-", "-", "-", "-"]
    assert row[-1] == "LOST 10 of 100"


def test_skipped_cases_are_listed_once_below_the_table_not_as_rows_and_leave_ratios_blank():
    results = []
    for run in (1, 2):
        results += [
            Result("raw-relay", 64, run=run, msgs_per_s=1.0),
            Result("nats", 64, run=run, skipped="nats-server binary not found"),
            Result("zbus-relay", 64, run=run, msgs_per_s=2.0),
        ]
    table = format_table(summarize(results))
    rows = _rows(table)
    assert [r[0] for r in rows[2:]] == ["raw-relay", "zbus-relay"]
    assert rows[3][rows[0].index("x raw-relay")] == "2.00x"
    assert rows[3][rows[0].index("x nats")] == ""
    assert table.count("- nats skipped: nats-server binary not found") == 1


def test_a_table_with_every_case_skipped_still_prints_its_header_and_the_reasons():
    table = format_table(summarize([Result("nats", 64, skipped="no binary")]))
    assert len(_rows(table)) == 2
    assert table.endswith("- nats skipped: no binary")


# -- cases that cannot run ----------------------------------------------------------------------------

def _never_called(ctl, job):
    raise AssertionError("no role should start")


def _crashing_infra(launcher):
    raise OSError("address already in use")


def test_a_case_that_cannot_load_or_start_is_skipped_with_its_reason_in_every_run(monkeypatch):
    loads: list[str] = []
    broken = Case("broken", "infra fails", *[_never_called] * 4, start_infra=_crashing_infra)

    def load_case(name):
        loads.append(name)
        if name == "missing":
            raise CaseUnavailable("nats-server binary not found")
        return broken

    monkeypatch.setitem(CASES, "missing", "nowhere:MISSING")
    monkeypatch.setitem(CASES, "broken", "nowhere:BROKEN")
    monkeypatch.setattr(harness, "load_case", load_case)
    log: list[str] = []
    results = run_benchmarks(sizes=(64, 4096), cases=("missing", "broken"), repeat=2, log=log.append)

    assert loads == ["missing", "broken", "broken"]  # unavailable is final; a failed start is retried
    assert [(r.case, r.size, r.run) for r in results] == [
        (case, size, run) for run in (1, 2) for case in ("missing", "broken") for size in (64, 4096)]
    table = format_table(summarize(results))
    assert "- missing skipped: nats-server binary not found" in table
    assert "- broken skipped: OSError: address already in use" in table


def test_repeat_defaults_to_three_and_to_one_with_quick_and_must_be_positive(capsys):
    parser = build_parser()
    assert parser.parse_args([]).repeat is None and harness.DEFAULT_REPEAT == 3
    assert harness.DEFAULT_REPEAT_QUICK == 1
    assert parser.parse_args(["--quick", "--repeat", "5"]).repeat == 5
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit):
            parser.parse_args(["--repeat", bad])
    assert "--repeat wants a whole number" in capsys.readouterr().err
    with pytest.raises(ValueError):
        run_benchmarks(cases=("raw-relay",), repeat=0)


def test_default_cases_are_registered_and_baselines_among_them():
    assert set(DEFAULT_CASES) <= set(CASES)
    assert set(BASELINES) <= set(DEFAULT_CASES)


# -- receiving roles stop when their peer is done ------------------------------------------------------

def test_control_passes_on_what_the_peer_sent_and_aborts_on_stop():
    harness_end, role_end = Pipe()
    ctl = Control(role_end)
    assert ctl.peer_total() is None
    harness_end.send(("peer_done", 1234))
    assert ctl.peer_total() == 1234
    assert ctl.peer_total() == 1234  # remembered

    harness_end2, role_end2 = Pipe()
    harness_end2.send(("stop",))
    with pytest.raises(Aborted):
        Control(role_end2).peer_total()


class _PeerTotal:
    def __init__(self, total):
        self.total = total

    def peer_total(self):
        return self.total


def test_quiet_timer_is_done_once_everything_the_peer_sent_arrived():
    peer = _PeerTotal(None)
    quiet = QuietTimer(peer, idle_timeout_s=60.0)
    assert not quiet.done(10)
    peer.total = 12
    assert not quiet.done(11)  # one still in flight
    assert quiet.done(12)


def test_quiet_timer_gives_up_when_nothing_new_arrives_for_the_idle_timeout():
    quiet = QuietTimer(_PeerTotal(100), idle_timeout_s=0.0)
    assert not quiet.done(5)  # progress since the last look
    assert quiet.done(5)  # no progress, idle timeout (0 s) passed: 95 lost
