"""The load run's timeline (loadtests/timeline.py) and the progress line (bench/progress.py):
Prometheus text parsed into series, rates by outcome and quantiles from the increase of the
buckets between two scrapes (checked against hand-computed figures), a counter reset between
samples, the raw samples' JSON, the four charts, a run without matplotlib, and the progress
line on a terminal and in a log."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path

import pytest

from bench.progress import Progress, ticking
from loadtests import run
from loadtests.timeline import (
    CHARTS,
    INF,
    Sample,
    Scrape,
    Timeline,
    alert_thresholds,
    draw,
    increase,
    interval_deltas,
    merged,
    parse_metrics,
    quantile,
    rates_by_outcome,
    stock_of,
)

PNG = b"\x89PNG\r\n\x1a\n"
RESERVE = "POST /v1/campaigns/{campaign_id}/orders"
PAY = "POST /v1/orders/{order_id}/pay"
BOUNDS = (0.01, 0.025, INF)


def exposition(series: dict[tuple[str, str], tuple[float, float, float]], lag: float = 0.0) -> str:
    """/metrics as the engine writes it (engine/api/metrics.py): the request histogram with
    buckets 0.01, 0.025 and +Inf per (route, outcome), a script histogram and the gauges."""
    lines = [
        "# HELP flashteam_http_request_seconds HTTP requests by route and outcome",
        "# TYPE flashteam_http_request_seconds histogram",
    ]
    for (route, outcome), counts in series.items():
        labels = f'outcome="{outcome}",route="{route}"'
        for le, n in zip(("0.01", "0.025", "+Inf"), counts, strict=True):
            lines.append(f'flashteam_http_request_seconds_bucket{{le="{le}",{labels}}} {n}')
        lines.append(f"flashteam_http_request_seconds_count{{{labels}}} {counts[-1]}")
        lines.append(f"flashteam_http_request_seconds_sum{{{labels}}} 0.5")
    lines += [
        "# TYPE flashteam_script_seconds histogram",
        'flashteam_script_seconds_bucket{le="+Inf",script="reserve_stock"} 7.0',
        'flashteam_script_seconds_count{script="reserve_stock"} 7.0',
        'flashteam_script_seconds_sum{script="reserve_stock"} 0.1',
        "# TYPE flashteam_stream_lag_seconds gauge",
        f"flashteam_stream_lag_seconds {lag}",
        "# TYPE flashteam_reaper_lag_seconds gauge",
        "flashteam_reaper_lag_seconds 0.2",
        "# TYPE flashteam_recoveries_total counter",
        "flashteam_recoveries_total 3",
    ]
    return "\n".join(lines) + "\n"


def scrape(series: dict[tuple[str, str], tuple[float, float, float]]) -> Scrape:
    return Scrape({key: dict(zip(BOUNDS, counts, strict=True)) for key, counts in series.items()})


# --------------------------------------------------------------------------- pure parts


def test_parse_metrics_reads_the_request_histogram_and_the_gauges() -> None:
    text = exposition(
        {
            (RESERVE, "ok"): (3, 5, 6),
            (RESERVE, "sold_out"): (9, 9, 9),
            ("GET /metrics", "ok"): (1, 1, 1),
        },
        lag=0.75,
    )
    parsed = parse_metrics(text)
    assert parsed.histograms == {
        (RESERVE, "ok"): {0.01: 3.0, 0.025: 5.0, INF: 6.0},  # braces inside a label value
        (RESERVE, "sold_out"): {0.01: 9.0, 0.025: 9.0, INF: 9.0},
        ("GET /metrics", "ok"): {0.01: 1.0, 0.025: 1.0, INF: 1.0},
    }
    assert parsed.gauges == {
        "flashteam_stream_lag_seconds": 0.75,
        "flashteam_reaper_lag_seconds": 0.2,
    }
    with pytest.raises(ValueError):
        parse_metrics('flashteam_http_request_seconds_bucket{le="0.01" 3\n')


def test_rates_by_outcome_from_two_samples() -> None:
    before = scrape(
        {(RESERVE, "ok"): (10, 20, 20), (PAY, "ok"): (5, 5, 5), ("GET /metrics", "ok"): (4, 4, 4)}
    )
    after = scrape(
        {
            (RESERVE, "ok"): (30, 50, 60),  # +40
            (PAY, "ok"): (9, 10, 11),  # +6
            (RESERVE, "sold_out"): (8, 8, 8),  # first seen: counts from 0, +8
            (PAY, "hold_expired"): (0, 0, 0),  # seen, idle
            ("GET /metrics", "ok"): (6, 6, 6),  # the sampler's own: left out
        }
    )
    rates = rates_by_outcome(before, after, 2.0)
    assert rates == {"ok": 23.0, "sold_out": 4.0, "hold_expired": 0.0}
    assert rates_by_outcome(before, after, 0.0) == {}


def test_quantiles_from_bucket_deltas_match_a_hand_computed_case() -> None:
    # Between the two scrapes, reserve and pay answered 100 requests together: 20 within
    # 10 ms, 60 more within 25 ms, 20 slower (+Inf).
    before = scrape({(RESERVE, "ok"): (5, 10, 12), (PAY, "ok"): (0, 0, 0)})
    after = scrape({(RESERVE, "ok"): (20, 70, 82), (PAY, "ok"): (5, 20, 30)})
    buckets = merged(interval_deltas(before, after))
    assert buckets == {0.01: 20.0, 0.025: 80.0, INF: 100.0}
    # p50: rank 50 falls in (10 ms, 25 ms], which holds requests 21..80: 10 + 15 * 30/60 ms
    assert quantile(0.5, buckets) == pytest.approx(0.0175)
    # p10: rank 10 in the first bucket, from 0: 10 ms * 10/20
    assert quantile(0.1, buckets) == pytest.approx(0.005)
    # p99: rank 99 falls in +Inf: the largest finite bound, as histogram_quantile says
    assert quantile(0.99, buckets) == pytest.approx(0.025)
    # only pay: 5 within 10 ms, 15 more within 25 ms, 10 slower; p50 = rank 15: 10 + 15 * 10/15
    assert quantile(0.5, merged(interval_deltas(before, after), [PAY])) == pytest.approx(0.02)
    assert quantile(0.5, {0.01: 0.0, INF: 0.0}) is None


def test_a_counter_reset_between_samples_counts_from_zero() -> None:
    assert increase(10.0, 25.0) == 15.0
    assert increase(10.0, 4.0) == 4.0  # went back: restarted, 4 since
    assert increase(None, 7.0) == 7.0
    before = scrape({(RESERVE, "ok"): (80, 90, 100), (PAY, "ok"): (1, 2, 3)})
    after = scrape({(RESERVE, "ok"): (2, 6, 6), (PAY, "ok"): (1, 3, 5)})  # reserve restarted
    deltas = interval_deltas(before, after)
    assert deltas[(RESERVE, "ok")] == {0.01: 2.0, 0.025: 6.0, INF: 6.0}
    assert deltas[(PAY, "ok")] == {0.01: 0.0, 0.025: 1.0, INF: 2.0}
    assert rates_by_outcome(before, after, 1.0) == {"ok": 8.0}
    # The count went back though the fastest bucket grew (1 -> 5): the whole series restarted,
    # so its 5 fast requests are new, not 4.
    grown = interval_deltas(scrape({(PAY, "ok"): (1, 50, 100)}), scrape({(PAY, "ok"): (5, 6, 6)}))
    assert grown[(PAY, "ok")] == {0.01: 5.0, 0.025: 6.0, INF: 6.0}
    timeline = Timeline("reset", [])
    timeline.add(exposition({(RESERVE, "ok"): (80, 90, 100)}), {})
    timeline.add(exposition({(RESERVE, "ok"): (2, 6, 6)}), {})
    assert timeline.requests_seen == 6.0  # 6 since the reset, never negative
    timeline.samples[:] = [
        Sample(0.0, parse_metrics(exposition({(RESERVE, "ok"): (80, 90, 100)})), {}),
        Sample(2.0, parse_metrics(exposition({(RESERVE, "ok"): (2, 6, 6)})), {}),
    ]
    assert timeline.requests() == {"ok": [(2.0, 3.0)]}
    assert timeline.latency(0.5) == [(2.0, 10 + 15 * (3 - 2) / (6 - 2))]  # ms


# --------------------------------------------------------------------------- the timeline


def _timeline(seconds: int = 6) -> Timeline:
    """A made-up run sampled at whole seconds: reserve answers 50 requests a second, ok until
    the item sells out at second 3, sold_out after; the stock drains as it goes."""
    timeline = Timeline("made-up", ["lt-flash"], marks={"sale opens": 0.0, "load ends": 4.0})
    for t in range(seconds):
        ok = 50 * min(t, 3)
        sold_out = 50 * max(0, t - 3)
        series: dict[tuple[str, str], tuple[float, float, float]] = {
            (RESERVE, "ok"): (ok * 0.8, ok, ok)
        }
        if sold_out:
            series[(RESERVE, "sold_out")] = (sold_out, sold_out, sold_out)
        item = {"sku": "flash-1", "available": 150 - ok, "held": ok // 3, "paid": ok - ok // 3}
        stock = {"lt-flash": stock_of({"stock": [{**item, "gone": 0}]})}
        timeline.samples.append(Sample(float(t), parse_metrics(exposition(series, t / 10)), stock))
    return timeline


def test_the_timeline_gives_rates_latency_stock_and_lag_over_time() -> None:
    timeline = _timeline()
    requests = timeline.requests()
    assert list(requests) == ["ok", "sold_out"]  # most requests first
    assert requests["ok"] == [(1.0, 50.0), (2.0, 50.0), (3.0, 50.0), (4.0, 0.0), (5.0, 0.0)]
    assert requests["sold_out"] == [(4.0, 50.0), (5.0, 50.0)]
    # seconds 1-3: 40 of 50 within 10 ms, all within 25 ms: p50 = 10 ms * 25/40
    t, p50 = timeline.latency(0.5)[0]
    assert t == 1.0 and p50 == pytest.approx(6.25)
    assert timeline.latency(0.5, [PAY]) == []  # pay answered nothing
    assert timeline.busiest_routes() == [RESERVE]
    assert timeline.stock("lt-flash", "flash-1", "available")[-1] == (5.0, 0)
    assert timeline.gauge("flashteam_stream_lag_seconds")[3] == (3.0, 0.3)
    assert timeline.skus("lt-flash") == ["flash-1"]


def test_the_raw_samples_survive_their_json() -> None:
    timeline = _timeline()
    timeline.samples.append(Sample(6.0, None, {}))  # /metrics did not answer that second
    text = timeline.to_json()
    data = json.loads(text)
    assert data["le"] == ["0.01", "0.025", "+Inf"]
    assert len(data["samples"]) == 7 and data["samples"][-1]["requests"] is None
    again = Timeline.from_json(text)
    assert again.marks == timeline.marks and again.campaigns == ["lt-flash"]
    assert again.requests() == timeline.requests()
    assert again.latency(0.99) == timeline.latency(0.99)
    assert again.stock("lt-flash", "flash-1", "paid") == timeline.stock(
        "lt-flash", "flash-1", "paid"
    )


def test_draw_writes_the_four_charts(tmp_path: Path) -> None:
    charts = draw(_timeline(), tmp_path / "made-up")
    assert charts is not None and set(charts) == set(CHARTS)
    for kind, path in charts.items():
        assert path == tmp_path / f"made-up-timeline-{kind}.png"
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, kind


def test_without_matplotlib_the_charts_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    assert draw(_timeline(), tmp_path / "made-up") is None
    lines = run.timeline_report(_timeline(), tmp_path / "made-up", tmp_path / "made-up")
    assert any("charts skipped: matplotlib is not installed" in line for line in lines)
    assert not list(tmp_path.glob("*.png"))
    assert json.loads((tmp_path / "made-up-timeline.json").read_text())["name"] == "made-up"


def test_alert_thresholds_come_from_the_alerting_rules(tmp_path: Path) -> None:
    rules = tmp_path / "alerts.yml"
    rules.write_text(
        "expr: max without (instance) (flashteam_stream_lag_seconds) > 7.5\n"
        "expr: max without (instance) (flashteam_reaper_lag_seconds) > 0.5\n"
    )
    assert alert_thresholds(rules) == {
        "flashteam_stream_lag_seconds": 7.5,
        "flashteam_reaper_lag_seconds": 0.5,
    }
    assert set(alert_thresholds()) == {
        "flashteam_stream_lag_seconds",
        "flashteam_reaper_lag_seconds",
    }
    assert alert_thresholds(tmp_path / "missing.yml") == {}


# --------------------------------------------------------------------------- progress


def test_progress_in_a_log_prints_a_line_every_ten_percent() -> None:
    out = io.StringIO()
    bar = Progress("T7 users", 1_000_000, unit="users", stream=out)
    assert not bar.tty  # a StringIO is no terminal
    bar.started -= 100  # as if it had begun 100 s ago
    for n in range(0, 1_000_001, 10_000):  # 101 updates
        bar.update(n, "selling")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 11, lines  # 0%, 10%, ..., 100%; close adds nothing new
    assert lines[0].startswith("T7 users:   0% 0/1,000,000 users")
    assert (
        lines[5]
        == "T7 users:  50% 500,000/1,000,000 users, 1 min 40 s, about 1 min 40 s left, selling"
    )
    assert lines[-1].startswith("T7 users: 100% 1,000,000/1,000,000 users")
    assert "\r" not in out.getvalue()


def test_progress_on_a_terminal_redraws_one_line_a_few_times_a_second() -> None:
    out = io.StringIO()
    bar = Progress("settling", 30, unit="s", stream=out, tty=True, clock=True, interval=3600)
    for second in range(31):
        bar.update(second, "holds expiring")
    assert out.getvalue().count("\r") == 1  # throttled: one redraw within the interval
    assert "\n" not in out.getvalue()
    bar.close("settled")
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n")
    assert text.rstrip().endswith("settling [########################] 100% 30/30 s, settled")
    assert "left" not in text  # a clock: no estimate of the time left


async def test_ticking_updates_from_the_event_loop_and_closes() -> None:
    out = io.StringIO()
    done = 0
    async with ticking(Progress("T6 requests", 10, stream=out), lambda: done, every=0.01):
        for _ in range(10):
            done += 1
            await asyncio.sleep(0.02)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("T6 requests: 100% 10/10")
    shares = [int(line.split("%")[0].split()[-1]) for line in lines]
    assert shares == sorted(shares)
    assert any(0 < share < 100 for share in shares), lines  # ticked while the block ran
