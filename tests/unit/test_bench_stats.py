"""The benchmark harness's pure parts: percentiles, rates, ratios, job sizing and the table."""

import pytest

from zbus.bench.harness import (
    BASELINES,
    Result,
    format_table,
    percentile,
    plan_jobs,
    ratio,
    rtt_percentiles_ms,
    size_label,
    throughput,
    throughput_count,
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


def test_size_labels_use_kib_for_whole_kibibytes():
    assert size_label(64) == "64 B"
    assert size_label(4096) == "4 KiB"
    assert size_label(65536) == "64 KiB"
    assert size_label(1500) == "1500 B"


def test_job_counts_scale_with_size_and_quick_is_smaller():
    assert [throughput_count(s) for s in (64, 4096, 65536)] == [200_000, 100_000, 19_836]
    assert throughput_count(16 << 20) == 1_000
    full_tput, full_rtt = plan_jobs(64, quick=False)
    quick_tput, quick_rtt = plan_jobs(64, quick=True)
    assert quick_tput.count < full_tput.count and quick_rtt.count < full_rtt.count
    assert quick_tput.time_cap_s < full_tput.time_cap_s
    assert full_rtt.warmup > 0


def _rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_table_is_markdown_with_a_rule_and_one_row_per_case_and_size():
    results = [
        Result("raw-relay", 64, msgs_per_s=40_000, mb_per_s=2.56, rtt_p50_ms=0.5, rtt_p99_ms=0.9),
        Result("raw-relay", 4096, msgs_per_s=30_000, mb_per_s=122.88, rtt_p50_ms=0.6, rtt_p99_ms=1.1),
    ]
    rows = _rows(format_table(results))
    assert rows[0][:6] == ["case", "size", "msg/s", "MB/s", "RTT p50 ms", "RTT p99 ms"]
    assert set(rows[1][1]) <= set("-:")
    assert rows[2][:6] == ["raw-relay", "64 B", "40,000", "2.6", "0.500", "0.900"]
    assert rows[3][:2] == ["raw-relay", "4 KiB"]
    assert len({len(r) for r in rows}) == 1
    assert len({len(line) for line in format_table(results).splitlines()}) == 1  # aligned


def test_table_gives_zbus_rows_throughput_ratios_against_each_baseline_at_the_same_size():
    results = [
        Result("raw-dealer-router", 64, msgs_per_s=200_000),
        Result("raw-relay", 64, msgs_per_s=40_000),
        Result("nats", 64, msgs_per_s=100_000),
        Result("zbus-relay", 64, msgs_per_s=20_000),
        Result("zbus-relay", 4096, msgs_per_s=10_000),  # no baselines at this size
    ]
    rows = _rows(format_table(results))
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
    row = _rows(format_table(results))[2]
    assert row[2:6] == ["-", "-", "-", "-"]
    assert row[-1] == "LOST 10 of 100"


def test_skipped_cases_are_listed_once_below_the_table_not_as_rows():
    results = [
        Result("raw-relay", 64, msgs_per_s=1.0),
        Result("zbus-relay", 64, skipped="ImportError: no zbus.Client"),
        Result("zbus-relay", 4096, skipped="ImportError: no zbus.Client"),
    ]
    table = format_table(results)
    assert len(_rows(table)) == 3
    assert table.count("zbus-relay skipped: ImportError: no zbus.Client") == 1


def test_default_cases_are_registered_and_baselines_among_them():
    from zbus.bench.harness import CASES, DEFAULT_CASES

    assert set(DEFAULT_CASES) <= set(CASES)
    assert set(BASELINES) <= set(DEFAULT_CASES)
