"""The benchmark report (``python -m bench.make_report``) from a folder of benchmark results.

The rows are shaped like those the ``bench/test_*.py`` benchmarks write with
``bench.report.report``; the numbers are chosen so that some targets are met, some are not,
and some are not measured (a result file missing, or no benchmark yet).
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench.charts import Charts
from bench.make_report import main
from bench.results import Result
from bench.sections import t2_section
from bench.targets import MET, NOT_MET, TARGETS, UNMEASURED, Verdict, judge, target

DAY = "2026-12-02"
LEVELS = (10, 1_000)
LEVELS_T8 = (10, 100, 1_000)


def _latency(impl: str, level: int, per_s: float, **extra: Any) -> dict[str, Any]:
    return {
        "impl": impl,
        "concurrency": level,
        "per_s": per_s,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
        **extra,
    }


def _t1(level: int) -> list[dict[str, Any]]:
    rates = {
        "engine": 40_000.0,
        "engine-uncoalesced": 7_000.0,
        "bare-batched": 54_000.0,
        "redis-watch": 2.0,
        "postgres": 1_100.0,
    }
    return [_latency(impl, level, rate, requests=1_000, rejected=0) for impl, rate in rates.items()]


# T8 per backend: repair seconds (<= 10 s), the sql mode's pay rates at 10, 100 and 1,000
# callers (the fast mode runs 3,000/s at each), and the p99 at 70% of peak (<= 25 ms).
T8_REPAIR = (("sqlite", 4.2), ("postgresql", 6.3))
T8_PAY = (("sqlite", (900.0, 2_100.0, 2_700.0)), ("postgresql", (600.0, 1_200.0, 1_400.0)))
T8_P99 = (("sqlite", 18.0), ("postgresql", 24.0))
T8_FAST = 3_000.0


def _t8_repair(backend: str, seconds: float) -> list[dict[str, Any]]:
    checks = {"audit_ok": True, "redis_equals_sql": True, "reconcile_ok": True, "trusted": True}
    return [
        {"backend": backend, "campaign": campaign, "orders": orders, "repair_s": seconds * share}
        | {"orders_per_s": orders / (seconds * share), "baseline_read_s": 1.5 * share}
        | {"vs_baseline": seconds / 1.5, **checks}
        for campaign, orders, share in (("flash", 100_000, 1.0), ("team", 10_000, 0.2))
    ]


def _t8_pay(backend: str, sql: tuple[float, ...]) -> list[dict[str, Any]]:
    rows = []
    for level, rate in zip(LEVELS_T8, sql, strict=True):
        for mode, per_s in (("sql", rate), ("outbox", T8_FAST)):
            rows.append(
                {"backend": backend, "mode": mode, "concurrency": level, "per_s": per_s}
                | {"vs_outbox": per_s / T8_FAST}
            )
    return rows


def _http(config: str, route: str, per_s: float, **extra: Any) -> dict[str, Any]:
    """A T2 row as bench/test_http.py writes it (the columns a judge does not read left out)."""
    reserves = per_s * 64 if route == "batch64" else per_s if route.startswith("reserve") else ""
    return {"config": config, "route": route, "requests_per_s": per_s} | {
        "reservations_per_s": reserves,
        "p50_ms": 4.0,
        "p99_ms": 6.0,
        "of_peak": 1.0,
        **extra,
    }


# T2: the default stack's reserve is 0.36x its echo (NOT met), 3.19x the naive reference
# (met) and 0.91x the stripped configuration (met); its sold-out 0.92x echo (met); the batch
# endpoint 9.6x the naive reference (NOT met) and 0.65x T1's engine at 1,000 callers (met).
HTTP = [
    _http("stripped", "echo", 25_000.0),
    _http("stripped", "reserve", 9_500.0, ratio_to_echo=0.38, vs_stripped=1.0),
    _http("default", "echo", 24_000.0, ratio_to_echo=1.0),
    _http("default", "reserve", 8_600.0, ratio_to_echo=0.358, vs_stripped=0.905, p99_ms=35.0)
    | {"vs_naive": 8_600 / 2_700},
    _http("default", "sold_out", 22_000.0, ratio_to_echo=0.917, vs_stripped=0.95),
    _http("default", "batch64", 26_000.0 / 64, vs_naive=26_000 / 2_700, unflushed_at_end=900),
    _http("naive", "reserve", 2_700.0, vs_naive=1.0),
    _http("default", "reserve@70%", 6_000.0, p99_ms=22.8, of_peak=0.7),
]

RESULTS: dict[str, list[dict[str, Any]]] = {
    "t1-reserve": [row for level in LEVELS for row in _t1(level)],
    "t1-ratios": [
        {
            "concurrency": level,
            "engine_per_s": 40_000.0,
            "vs_bare_batched": 0.74,  # below the 0.8x floor: NOT met
            "vs_uncoalesced": 5.71,
            "vs_redis_watch": 20_000.0,
            "vs_postgres": 36.4,
        }
        for level in LEVELS
    ],
    "t1-sold-out": [_latency("engine", level, 90_000.0, rejected=1_000) for level in LEVELS],
    "t3-teams": [
        _latency(impl, level, per_s, vs_reserve=per_s / 40_000)
        for level in LEVELS
        for impl, per_s in (("reserve", 40_000.0), ("join", 28_000.0), ("quick_join", 24_000.0))
    ],
    "http": HTTP,
    "flush-sqlite": [
        {"backend": "sqlite", "batch": batch, "events_per_s": rate, "baseline_per_s": 60_000.0}
        for batch, rate in ((100, 19_000.0), (1_000, 39_000.0), (5_000, 43_000.0))
    ],
    "flush-lag-sqlite": [
        {
            "backend": "sqlite",
            "reserved_per_s": 14_900.0,
            "seconds": 20.0,
            "max_lag_s": 0.48,
            "p99_lag_s": 0.35,
            "mean_lag_s": 0.1,
        }
    ],
    "t5-reaper": [
        {
            "holds": 100_000,
            "reaper_interval_s": 0.2,
            "reaper_batch": 500,
            "all_returned_after_s": 2.02,
            "returned_per_s": 52_000.0,
        }
    ],
    "t6-redis-memory": [
        {"phase": phase, "holds": 100_000, "bytes_per_hold": total, "outbox": outbox, **parts}
        for phase, total, outbox in (("with_outbox", 476.0, 129.0), ("steady", 359.0, 0.01))
        for parts in [
            {
                "orders_hash": 114.0,
                "deadline_index": 104.0,
                "user_counter": 50.0,
                "idempotency": 58.0,
                "keyspace": 32.0,
            }
        ]
    ],
    "t6-process-memory": [
        {"requests": n, "rss_mib": 178.0, "growth_since_200k_mib": 0.0, "flat": True}
        for n in (0, 500_000, 1_000_000)
    ],
    "t6-archival": [
        {
            "campaign": n,
            "kind": "flash" if n % 2 else "team",
            "orders": 10_000,
            "peak_used_memory_mib": 12.0,
            "used_memory_after_archival": 2_000_000 + 10_000 * n,
            "vs_baseline": (2_000_000 + 10_000 * n) / 2_000_000,
            "baseline": 2_000_000,
            "cold_baseline": 1_400_000,
            "archive_s": 0.4,
            "keys_deleted": 7,
            "longest_command_ms": 1.5 * n,
        }
        for n in (1, 2, 3)
    ],
    "scripts": [
        {"script": "reserve_stock", "median_us": 264.0, "redis_us_per_request": 105.0},
        {"script": "batch64", "median_us": 1_480.0, "redis_us_per_request": 17.8},
    ],
    "sold_out_resell": [
        {"process": 1, "resellable_after_s": 0.51},
        {"process": 2, "resellable_after_s": 0.49},
    ],
    **{f"t8-repair-{backend}": _t8_repair(backend, seconds) for backend, seconds in T8_REPAIR},
    **{f"t8-pay-{backend}": _t8_pay(backend, sql) for backend, sql in T8_PAY},
    **{
        f"t8-pay-paced-{backend}": [
            {"backend": backend, "mode": "sql", "peak_per_s": 2_500.0, "offered_per_s": 1_750.0}
            | {"of_peak": 0.7, "p50_ms": 9.0, "p99_ms": p99},
            {"backend": backend, "mode": "outbox", "peak_per_s": 2_500.0, "p99_ms": 8.0},
        ]
        for backend, p99 in T8_P99
    },
    **{
        f"t8-pay-sale-{backend}": [
            {"backend": backend, "sale_per_s": sale, "peak_per_s": 2_000.0}
            | {"offered_per_s": 1_400.0, "p50_ms": 6.0, "p99_ms": p99}
            | {"queue_p99_ms": 4.0, "commit_p99_ms": 3.0, "lag_max_s": 0.6, "lag_p99_s": 0.4}
        ]
        for backend, sale, p99 in (("sqlite", 9_000.0, 20.0), ("postgresql", 7_000.0, 30.0))
    },
}
# Not written, so not measured: flush-postgresql, flush-lag-postgresql, t7-scale.


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    results, out = tmp_path_factory.mktemp("results"), tmp_path_factory.mktemp("reports")
    for name, rows in RESULTS.items():
        (results / f"{name}.json").write_text(json.dumps({"title": name, "rows": rows}))
    (results / "broken.json").write_text("{not json")
    assert main(["--results", str(results), "--out", str(out), "--date", DAY]) == 0
    return (out / f"{DAY}.md").read_text(), out


def _verdicts(text: str) -> dict[str, list[str]]:
    """The targets table's cells (requirement, measured, baseline, verdict) by target name."""
    section = text.split("## Targets (docs/performance.md)", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_every_target_has_one_row_stating_its_requirement(report: tuple[str, Path]) -> None:
    found = _verdicts(report[0])
    assert list(found) == [t.name for t in TARGETS]
    for defined in TARGETS:
        assert found[defined.name][0] == defined.stated
    counts = [sum(cells[3] == v for cells in found.values()) for v in (MET, NOT_MET, UNMEASURED)]
    assert f"{counts[0]} met, {counts[1]} not met, {counts[2]} not measured." in report[0]


def test_verdicts_follow_the_bounds(report: tuple[str, Path]) -> None:
    found = _verdicts(report[0])
    assert found["T1 vs bare batched"][1:] == [
        "0.74x (engine 40,000/s)",
        "bare batch.lua loop, 64 per EVALSHA (Redis ceiling): 54,000/s",
        NOT_MET,
    ]
    assert target("T1 vs bare batched").stated == ">= 0.8x, 1,000 callers, one hot item"
    assert found["T1 vs PostgreSQL"][3] == MET
    assert found["T2 reserve vs echo"][1:] == [
        "0.36x (8,600/s)",
        "echo route of the default stack 24,000/s",
        NOT_MET,
    ]
    assert target("T2 reserve vs echo").stated == (
        ">= 0.6x the echo route of the same server, on the default `flashteam run` stack"
    )
    assert found["T2 sold-out vs echo"][3] == MET
    assert found["T2 p99 at 70% of peak"][1:] == [
        "p99 22.8 ms (p50 4.0) at 6,000/s, 70% of peak",
        "default stack reserve peak 8,600/s",
        MET,
    ]
    assert found["T2 reserve vs naive reference"][1:] == [
        "3.19x (8,600 reservations/s)",
        "naive reference, same run: 2,700/s",
        MET,
    ]
    assert found["T2 batch endpoint vs naive reference"][1:] == [
        "9.63x (26,000 reservations/s)",
        "naive reference, same run: 2,700/s",
        NOT_MET,
    ]
    assert found["T2 batch endpoint vs T1"][1:] == [
        "0.65x (26,000 reservations/s)",
        "T1 engine reserve, 1,000 callers: 40,000/s",
        MET,
    ]
    assert found["T2 default stack vs stripped"][1:] == [
        "0.91x (8,600/s)",
        "stripped reserve: 9,500/s",
        MET,
    ]
    assert found["T3 quick-join vs reserve"][1:] == [
        "0.60x (24,000/s)",
        "coalesced flash reserve 40,000/s",
        MET,
    ]
    assert found["T4 flush into sqlite"][1].startswith("39,000 events/s at batch 1,000")
    assert found["T4 flush lag at the T2 rate (sqlite)"][3] == MET
    assert found["T5 mass expiry"][3] == MET
    assert found["T6 Redis bytes per hold"][3] == MET
    assert found["T6 Redis memory after archival"][1:] == [
        "1.015x at worst after 3 campaigns of 10,000 orders (each peaked at up to 12 MiB); "
        "slowest archival command 4.5 ms",
        "Redis used_memory before the campaigns: 1.91 MiB",
        MET,
    ]
    assert found["T8 repair after Redis lost data"][1:] == [
        "sqlite 4.2 s for 100,000 orders (23,810/s, 2.8x the read); "
        "postgresql 6.3 s for 100,000 orders (15,873/s, 4.2x the read)",
        "reading its durable orders and teams alone: sqlite 1.5 s, postgresql 1.5 s",
        MET,
    ]
    # The best rates compared: 2,700 / 3,000 on SQLite, but 1,400 / 3,000 on PostgreSQL.
    assert found["T8 pay with the durability default"][1:] == [
        "sqlite 0.90x (2,700/s; per level down to 0.30x); "
        "postgresql 0.47x (1,400/s; per level down to 0.20x)",
        "pay in the fast mode, same run: sqlite 3,000/s, postgresql 3,000/s",
        NOT_MET,
    ]
    assert found["T8 pay p99 beside the sale"][1:] == [
        "sqlite p99 20.0 ms (p50 6.0; queue p99 4.0, commit p99 3.0) at 1,400/s beside 9,000 "
        "reservations/s; postgresql p99 30.0 ms (p50 6.0; queue p99 4.0, commit p99 3.0) at "
        "1,400/s beside 7,000 reservations/s",
        "pay's own peak beside the sale: sqlite 2,000/s, postgresql 2,000/s",
        NOT_MET,
    ]
    assert found["T10 flush into sqlite vs the sale"][1:] == [
        "4.53x (39,000 events/s at batch 1,000)",
        "T2 HTTP reserve: 8,600/s",
        MET,
    ]
    assert found["T10 flush into postgresql vs the sale"][3] == UNMEASURED
    assert found["T10 flush lag at the T2 rate (sqlite)"][1:] == [
        "max 0.60 s, p99 0.40 s at 9,000 reservations/s and 1,400 payments/s",
        "T2 HTTP reserve: 8,600/s",
        MET,
    ]
    assert found["T10 flush lag at the T2 rate (postgresql)"][1:] == [
        "the sale reached 7,000/s, below T2's 8,600/s",
        "T2 HTTP reserve",
        UNMEASURED,
    ]
    assert found["T10 flush lag at the T1 rate (sqlite)"][1:] == [
        "max lag 0.48 s at 14,900 reservations/s: below T1's 40,000/s",
        "T1 engine reserve, 1,000 callers",
        UNMEASURED,
    ]
    assert found["T8 pay p99 at 70% of peak"][1:] == [
        "sqlite p99 18.0 ms (p50 9.0) at 1,750/s, 70% of peak; "
        "postgresql p99 24.0 ms (p50 9.0) at 1,750/s, 70% of peak",
        "pay's own peak: sqlite 2,500/s, postgresql 2,500/s",
        MET,
    ]


def _judge_t2(name: str, rows: list[dict[str, Any]], **more: list[dict[str, Any]]) -> Verdict:
    day = dt.datetime(2026, 12, 2)
    results = {"http": Result("http", "http", rows, day)}
    results |= {key.replace("_", "-"): Result(key, key, found, day) for key, found in more.items()}
    return judge(target(name), results)


def _changed(route: str, config: str = "default", **changes: Any) -> list[dict[str, Any]]:
    """T2's rows with one row's cells changed."""
    return [
        row | changes if (row["config"], row["route"]) == (config, route) else row for row in HTTP
    ]


def test_t2_judges_the_default_stack() -> None:
    """Each T2 target reads the default stack's row, is met or not by its bound, and is not
    measured when what it compares with is missing."""
    t1 = RESULTS["t1-reserve"]
    assert _judge_t2("T2 batch endpoint vs T1", HTTP, t1_reserve=t1).verdict == MET
    slow = _changed("batch64", reservations_per_s=20_000.0)  # 0.5x T1
    found = _judge_t2("T2 batch endpoint vs T1", slow, t1_reserve=t1)
    assert found.verdict == NOT_MET and found.measured == "0.50x (20,000 reservations/s)"
    found = _judge_t2("T2 batch endpoint vs T1", HTTP)
    assert found.verdict == UNMEASURED and "no t1-reserve.json" in found.measured
    low_levels = [row for row in t1 if row["concurrency"] != 1_000]
    found = _judge_t2("T2 batch endpoint vs T1", HTTP, t1_reserve=low_levels)
    assert found.verdict == UNMEASURED and "no engine row at 1,000 callers" in found.measured

    faster = _changed("batch64", vs_naive=10.4)
    assert _judge_t2("T2 batch endpoint vs naive reference", faster).verdict == MET
    slower = _changed("reserve", vs_naive=2.9)
    assert _judge_t2("T2 reserve vs naive reference", slower).verdict == NOT_MET
    no_naive = [row for row in HTTP if row["config"] != "naive"]
    found = _judge_t2("T2 reserve vs naive reference", no_naive)
    assert found.verdict == UNMEASURED and found.measured == "no `naive` `reserve` row in http.json"

    costly = _changed("reserve", vs_stripped=0.84)
    found = _judge_t2("T2 default stack vs stripped", costly)
    assert found.verdict == NOT_MET and found.measured == "0.84x (8,600/s)"
    assert _judge_t2("T2 sold-out vs echo", _changed("sold_out", ratio_to_echo=0.89)).verdict == (
        NOT_MET
    )
    # A stripped configuration's reserve at 0.7x its echo says nothing of the default stack's.
    assert (
        _judge_t2("T2 reserve vs echo", _changed("reserve", "stripped", ratio_to_echo=0.7)).verdict
        == NOT_MET
    )


def test_t2_p99_counts_only_near_70_percent_of_peak() -> None:
    """A p99 within the bound at a much lighter load than 70% of the peak proves nothing; one
    over the bound fails at any load."""
    name = "T2 p99 at 70% of peak"
    assert _judge_t2(name, HTTP).verdict == MET
    light = _changed("reserve@70%", of_peak=0.48)
    found = _judge_t2(name, light)
    assert found.verdict == UNMEASURED and "got to 48% of peak only" in found.measured
    slow = _changed("reserve@70%", of_peak=0.48, p99_ms=104.9)
    assert _judge_t2(name, slow).verdict == NOT_MET


def test_t2_results_before_the_stacks_are_not_judged_as_the_default(tmp_path: Path) -> None:
    """An http.json of the stripped server alone (rows without a config) judges no default-stack
    target, and the report shows its table as it is."""
    old = [
        {k: v for k, v in row.items() if k != "config"}
        for row in HTTP
        if row["config"] == "stripped"
    ]
    for name in ("T2 reserve vs echo", "T2 default stack vs stripped"):
        found = _judge_t2(name, old)
        assert found.verdict == UNMEASURED and "no `default` `reserve` row" in found.measured
    lag = target("T4 flush lag at the T2 rate (sqlite)")
    day = dt.datetime(2026, 12, 2)
    results = {
        "http": Result("http", "http", old, day),
        "flush-lag-sqlite": Result("f", "f", RESULTS["flush-lag-sqlite"], day),
    }
    assert judge(lag, results).baseline == "T2 not measured: rate as set"
    section = t2_section({"http": results["http"]}, Charts(tmp_path, DAY))
    assert section[:4] == ["## T2 HTTP reserve", "", "http:", ""]
    assert section[4].startswith("| route | requests_per_s | reservations_per_s |")


def test_t2_section(report: tuple[str, Path]) -> None:
    """The T2 section: what each configuration is, one line per configuration, every row."""
    text = report[0]
    section = text.split("## T2 HTTP reserve", 1)[1].split("\n## ", 1)[0]
    assert "`default` is `flashteam run` with its default settings" in section
    assert "`naive` is the naive reference (bench/naive.py" in section
    assert (
        "| config | echo_per_s | reserve_per_s | reserve_vs_echo | sold_out_vs_echo | "
        "batch64_reservations_per_s | reserve_vs_stripped | reserve_p99_ms |"
    ) in section
    assert "| default | 24,000 | 8,600 | 0.358 | 0.917 | 26,000 | 0.905 | 35.00 |" in section
    assert "| naive |  | 2,700 |  |  |  |  | 6.00 |" in section
    assert "| default | batch64 | 406 | 26,000 |" in section
    assert "![T2 reservations](2026-12-02-t2-reservations.png)" in section


def test_t6_archival_needs_every_campaign_within_the_bound() -> None:
    """One campaign left above 1.05x of the baseline after its archival is enough to fail."""
    rows = [dict(row) for row in RESULTS["t6-archival"]]
    archival = target("T6 Redis memory after archival")
    day = dt.datetime(2026, 12, 2)
    assert judge(archival, {"t6-archival": Result("t6", "t6", rows, day)}).verdict == MET
    rows[1]["vs_baseline"] = 1.06
    found = judge(archival, {"t6-archival": Result("t6", "t6", rows, day)})
    assert found.verdict == NOT_MET and found.measured.startswith("1.060x at worst")


def test_t8_needs_both_backends_and_every_check() -> None:
    """A T8 repair is met only with both backends measured and every check passed."""
    results = {
        name: Result(name, name, rows, dt.datetime(2026, 12, 2))
        for name, rows in RESULTS.items()
        if name.startswith("t8-")
    }
    repair = target("T8 repair after Redis lost data")
    assert judge(repair, results).verdict == MET
    failed = _t8_repair("postgresql", 6.3)
    failed[0]["reconcile_ok"] = False
    results["t8-repair-postgresql"] = Result("t8", "t8", failed, dt.datetime(2026, 12, 2))
    found = judge(repair, results)
    assert found.verdict == NOT_MET and found.measured.endswith("failed: reconcile_ok")
    slow = Result("t8", "t8", _t8_repair("postgresql", 10.5), dt.datetime(2026, 12, 2))
    assert judge(repair, {**results, "t8-repair-postgresql": slow}).verdict == NOT_MET
    del results["t8-repair-postgresql"]
    assert judge(repair, results).verdict == UNMEASURED
    no_sql = [row for row in RESULTS["t8-pay-paced-sqlite"] if row["mode"] != "sql"]
    results["t8-pay-paced-sqlite"] = Result("t8", "t8", no_sql, dt.datetime(2026, 12, 2))
    found = judge(target("T8 pay p99 at 70% of peak"), results)
    assert found.verdict == UNMEASURED and "no `sql` row" in found.measured


def test_missing_results_and_missing_benchmarks_are_not_measured(
    report: tuple[str, Path],
) -> None:
    found = _verdicts(report[0])
    for name in ("T4 flush into postgresql", "T7 1M users, 100k stock"):
        assert found[name][1] == "" and found[name][3] == UNMEASURED
    name = "T7 1M users, 100k stock, 3 shards"
    assert found[name][1] == "" and found[name][3] == UNMEASURED
    assert "## T7 one million users\n\nNot measured." in report[0]


def test_sections_and_charts(report: tuple[str, Path]) -> None:
    text, out = report
    headings = re.findall(r"^## (.+)$", text, re.MULTILINE)
    assert headings == [
        "Machine",
        "Targets (docs/performance.md)",
        "T1 reserve, one hot item",
        "T2 HTTP reserve",
        "T3 team join and quick-join vs flash reserve",
        "T4 flush worker",
        "T5 mass expiry",
        "T6 memory",
        "T7 one million users",
        "T8 repair after Redis data loss",
        "T8/T10 durable pay beside the sale and the flush",
        "T9 overload",
        "Lua scripts (micro benchmarks)",
        "Sold-out resell",
        "Result files",
    ]
    assert "| process | resellable_after_s |" in text
    charts = re.findall(r"!\[[^]]*\]\(([^)]+)\)", text)
    assert sorted(charts) == sorted(
        f"{DAY}-{name}.png"
        for name in (
            "t1-throughput",
            "t1-latency",
            "t1-ratios",
            "t1-sold-out",
            "t2-reservations",
            "t3-teams",
            "t6-redis-bytes",
            "t6-rss",
            "t6-archival",
            "t8-pay",
            "scripts",
        )
    )
    assert all((out / chart).stat().st_size > 0 for chart in charts)
    assert "docs/performance.md" in text


def test_t7_on_3_shards_needs_every_unit_sold_and_none_oversold() -> None:
    shards = target("T7 1M users, 100k stock, 3 shards")
    row: dict[str, Any] = {"users": 1_000_000, "stock": 100_000, "sold": 100_000, "oversold": 0}
    row["unsold"] = 0
    row |= {"sold_out_after_s": 9.5, "all_answered_after_s": 41.0}
    day = dt.datetime(2026, 12, 2)
    found = judge(shards, {"t7-scale-shards": Result("t7", "t7", [row], day)})
    assert found.verdict == MET and found.measured.startswith("100,000 sold, 0 oversold")
    for change in ({"unsold": 1, "sold": 99_999}, {"oversold": 1}):
        bad = Result("t7", "t7", [row | change], day)
        assert judge(shards, {"t7-scale-shards": bad}).verdict == NOT_MET
    assert judge(shards, {}).verdict == UNMEASURED


def test_t9_judges_the_overload_row_against_the_peak() -> None:
    day = dt.datetime(2026, 12, 2)
    peak = {"phase": "peak", "reserved_per_s": 9_500.0, "reserve_p99_ms": 16.0}
    over = {"phase": "overload", "reserved_per_s": 8_000.0, "shed_per_s": 20_000.0}
    over |= {"vs_peak": 8_000 / 9_500, "reserve_p99_ms": 80.0, "shed_p99_ms": 7.5}
    over |= {"pay_p99_ms": 20.0}
    results = {"t9-overload": Result("t9", "t9", [peak, over], day)}
    found = {name: judge(target(name), results) for name in (
        "T9 goodput under overload", "T9 reserve p99 under overload", "T9 shed answer p99",
        "T9 pay p99 while shedding",
    )}  # fmt: skip
    assert [v.verdict for v in found.values()] == [MET, MET, NOT_MET, MET]
    assert found["T9 goodput under overload"].measured.startswith("0.84x: 8,000 reserved/s")
    assert "peak 9,500/s at 64 connections" in found["T9 shed answer p99"].baseline
    nothing_shed = Result("t9", "t9", [peak, over | {"shed_p99_ms": ""}], day)
    shed = judge(target("T9 shed answer p99"), {"t9-overload": nothing_shed})
    assert shed.verdict == UNMEASURED and "nothing was shed" in shed.measured
    assert judge(target("T9 goodput under overload"), {}).verdict == UNMEASURED
