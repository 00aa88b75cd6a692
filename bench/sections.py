"""The report's sections: the machine, the targets, then one per benchmark with its charts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.charts import Charts, Series, series
from bench.markdown import fmt, image, table, tabled
from bench.results import IMPLEMENTATIONS, Result, Results, Row
from bench.targets import (
    BATCH_ROUTE,
    DEFAULT_STACK,
    MET,
    NAIVE_SYSTEM,
    NOT_MET,
    STRIPPED,
    TARGETS,
    UNMEASURED,
    Verdict,
)

NOT_RUN = "Not measured."
# The parts of a held order's Redis bytes, as the T6 rows name them.
MEMORY_PARTS = (
    "orders_hash",
    "deadline_index",
    "user_counter",
    "idempotency",
    "outbox",
    "keyspace",
)


def machine_section(facts: Sequence[tuple[str, str]]) -> list[str]:
    """The machine table."""
    return ["## Machine", "", "| | |", "|---|---|", *(f"| {k} | {fmt(v)} |" for k, v in facts), ""]


def targets_section(found: Sequence[Verdict]) -> list[str]:
    """Every target's verdict, with how many were met, missed and not measured."""
    counts = {v: sum(f.verdict == v for f in found) for v in (MET, NOT_MET, UNMEASURED)}
    return [
        "## Targets (docs/performance.md)",
        "",
        f"{counts[MET]} met, {counts[NOT_MET]} not met, {counts[UNMEASURED]} not measured.",
        "",
        "| target | requirement | measured | baseline | verdict |",
        "|---|---|---|---|---|",
        *(
            f"| {f.target.name} | {f.target.stated} | {f.measured} | {f.baseline} | {f.verdict} |"
            for f in found
        ),
        "",
    ]


def t1_section(results: Results, charts: Charts) -> list[str]:
    """T1: throughput, latency and ratios per concurrency, then the sold-out storm."""
    out = ["## T1 reserve, one hot item", ""]
    reserve, ratios = results.get("t1-reserve"), results.get("t1-ratios")
    if reserve is None or ratios is None:
        return [*out, "Not measured (bench/test_engine.py did not run).", ""]
    out += [
        "Every request of each measured window succeeded (enough stock). Implementations:",
        "",
        *(f"- `{k}`: {v}" for k, v in IMPLEMENTATIONS.items()),
        "",
        table(reserve.rows),
        "",
        *tabled("Engine (coalesced) divided by each baseline:", ratios),
    ]
    out += image(
        charts.lines(
            "t1-throughput",
            "T1 reserves/s, one hot item",
            series(reserve.rows, "impl", "per_s"),
            "reserves per second (log)",
        ),
        "T1 throughput",
    )
    out += image(
        charts.latency("t1-latency", "T1 latency: p99 (solid), p50 (dashed)", reserve.rows),
        "T1 latency",
    )
    out += _t1_ratios_chart(ratios, charts)
    storm = results.get("t1-sold-out")
    return out if storm is None else [*out, *_sold_out_storm(storm, charts)]


def _sold_out_storm(storm: Result, charts: Charts) -> list[str]:
    """T1's sold-out storm: rejections per second once the item is gone."""
    chart = charts.lines(
        "t1-sold-out",
        "Sold-out rejections/s",
        series(storm.rows, "impl", "per_s"),
        "rejections per second (log)",
    )
    return [
        "### Sold-out storm",
        "",
        *tabled(
            "Every request of the window rejected `sold_out` (the item sold out in the warm-up).",
            storm,
        ),
        *image(chart, "sold-out storm"),
    ]


def _t1_ratios_chart(ratios: Result, charts: Charts) -> list[str]:
    """Each T1 ratio over concurrency, with its target's floor drawn (WATCH/MULTI has none)."""
    judged = [t for t in TARGETS if t.id == "T1" and t.bound is not None]
    labels = {t.column: f"{t.name.removeprefix('T1 ')} (target {t.bound})" for t in judged}
    labels["vs_redis_watch"] = "vs WATCH/MULTI"
    lines = {
        label: [(float(r["concurrency"]), float(r[column])) for r in ratios.rows]
        for column, label in labels.items()
    }
    floors = [(t.bound.limit, t.bound.limit_text) for t in judged if t.bound is not None]
    chart = charts.lines("t1-ratios", "T1 engine / baseline", lines, "ratio (log)", floors=floors)
    return image(chart, "T1 ratios")


T2_INTRO = (
    "Each configuration is its own stack (a private redis-server with AOF, SQLite, 2 API "
    "workers), measured with wrk and a new shopper per request, in turn, in the same run: "
    f"`{STRIPPED}` is `flashteam serve` alone with the rate limit off (no flush worker, no "
    "reaper); `+rate_limit` adds the default rate limit; `+worker_reaper` adds the flush worker "
    f"and the reaper instead; `{DEFAULT_STACK}` is `flashteam run` with its default settings, "
    "the stack the targets are judged on. Every configuration also serves the echo route, the "
    f"baseline of its own server. `{NAIVE_SYSTEM}` is the naive reference (bench/naive.py: "
    "FastAPI, one Lua DECR per request; uvicorn, 2 workers, uvloop, httptools) on the default "
    f"stack's Redis. `{BATCH_ROUTE}` is `POST /v1/batch` with 64 reservations per request."
)


def t2_section(results: Results, charts: Charts) -> list[str]:
    """T2: each configuration's routes against its echo route, and the naive reference."""
    out = ["## T2 HTTP reserve", ""]
    http = results.get("http")
    if http is None:
        return [*out, NOT_RUN, ""]
    if not any("config" in row for row in http.rows):  # a run before the stacks were measured
        return [*out, *tabled(f"{http.title}:", http)]
    rows = {(str(r["config"]), str(r["route"])): r for r in http.rows}
    systems = list(dict.fromkeys(str(r["config"]) for r in http.rows))
    summary = [_t2_summary(system, rows) for system in systems]
    columns = [
        "config",
        "echo_per_s",
        "reserve_per_s",
        "reserve_vs_echo",
        "sold_out_vs_echo",
        f"{BATCH_ROUTE}_reservations_per_s",
        "reserve_vs_stripped",
        "reserve_p99_ms",
    ]
    out += [
        T2_INTRO,
        "",
        "Per configuration (rates of the median round; ratios the median of the rounds' ratios):",
        "",
    ]
    out += [table(summary, columns), ""]
    out += tabled(
        f"{http.title}. `unflushed_at_end`: events still in the outbox when a window closed "
        "(the most of any round), where a flush worker runs; the next window waited for it:",
        http,
    )
    bars = [
        (f"{system} {route}", float(value))
        for route in ("reserve", BATCH_ROUTE)
        for system in systems
        if isinstance(value := rows.get((system, route), {}).get("reservations_per_s"), int | float)
    ]
    chart = charts.bars(
        "t2-reservations",
        "T2 reservations/s by configuration and route",
        [label for label, _ in bars],
        [value for _, value in bars],
        "reservations per second",
    )
    return [*out, *image(chart, "T2 reservations")]


def _t2_summary(system: str, rows: dict[tuple[str, str], Row]) -> Row:
    """One configuration's line: its echo, reserve, sold-out and batch figures."""

    def cell(route: str, column: str) -> object:
        return rows.get((system, route), {}).get(column, "")

    return {
        "config": system,
        "echo_per_s": cell("echo", "requests_per_s"),
        "reserve_per_s": cell("reserve", "requests_per_s"),
        "reserve_vs_echo": cell("reserve", "ratio_to_echo"),
        "sold_out_vs_echo": cell("sold_out", "ratio_to_echo"),
        f"{BATCH_ROUTE}_reservations_per_s": cell(BATCH_ROUTE, "reservations_per_s"),
        "reserve_vs_stripped": cell("reserve", "vs_stripped"),
        "reserve_p99_ms": cell("reserve", "p99_ms"),
    }


def t3_section(results: Results, charts: Charts) -> list[str]:
    """T3: join and quick-join against flash reserve, per concurrency."""
    teams = results.get("t3-teams")
    out = ["## T3 team join and quick-join vs flash reserve", ""]
    if teams is None:
        return [*out, NOT_RUN, ""]
    out += tabled(
        "Coalesced engine, same driver. `join`: a given open team (teams of 5, leader paid); "
        "`quick_join`: seated in pre-opened teams; `reserve`: flash reserve. The three run in "
        "turn, three rounds per level; each row is the median round.",
        teams,
    )
    lines = series(teams.rows, "impl", "per_s")
    out += image(charts.lines("t3-teams", "T3 requests/s", lines, "per second", logy=False), "T3")
    return out


def memory_section(results: Results, charts: Charts) -> list[str]:
    """T6: Redis bytes per held order and their breakdown, then the process RSS."""
    out = ["## T6 memory", ""]
    redis_memory, rss = results.get("t6-redis-memory"), results.get("t6-process-memory")
    if redis_memory is not None:
        out += tabled(
            "Redis bytes per held order: `used_memory` difference over the holds; the "
            "breakdown is `MEMORY USAGE` per key divided by the holds (keyspace overhead "
            "is the rest).",
            redis_memory,
        )
        steady = redis_memory.rows[-1]
        chart = charts.bars(
            "t6-redis-bytes",
            f"Redis bytes per held order ({steady['phase']})",
            list(MEMORY_PARTS),
            [float(steady[p]) for p in MEMORY_PARTS],
            "bytes per held order",
        )
        out += image(chart, "T6 Redis bytes")
    if rss is not None:
        out += tabled("Process RSS over the requests:", rss)
        points = [(float(r["requests"]), float(r["rss_mib"])) for r in rss.rows]
        out += image(charts.xy("t6-rss", "Process RSS", points, "requests", "RSS MiB"), "T6 RSS")
    archival = results.get("t6-archival")
    if archival is not None:
        out += tabled(
            "Redis `used_memory` after each campaign is archived (10,000 orders each, flash "
            "and team in turn), against the baseline read before the first; the peak is the "
            "campaign's own before its archival:",
            archival,
        )
        points = [(float(r["campaign"]), float(r["vs_baseline"])) for r in archival.rows]
        chart = charts.xy(
            "t6-archival", "Redis used_memory after each archival", points, "campaign", "x baseline"
        )
        out += image(chart, "T6 archival")
    if redis_memory is None and rss is None and archival is None:
        out.append(NOT_RUN)
    return out


T8_REPAIR = ("t8-repair-sqlite", "t8-repair-postgresql")
T8_PAY = ("t8-pay-sqlite", "t8-pay-postgresql")
T8_PACED = ("t8-pay-paced-sqlite", "t8-pay-paced-postgresql")


def t8_section(results: Results, charts: Charts) -> list[str]:
    """T8: the repair per backend, then pay per durability mode, closed and open loop."""
    out = ["## T8 repair after Redis data loss", ""]
    repairs = [results[n] for n in T8_REPAIR if n in results]
    pays = [results[n] for n in T8_PAY if n in results]
    paced = [results[n] for n in T8_PACED if n in results]
    if not repairs and not pays and not paced:
        return [*out, NOT_RUN, ""]
    for result in repairs:
        out += tabled(
            f"{result.title}: `repair_s` is `engine.recovery.repair` after FLUSHALL, "
            "`baseline_read_s` reading the campaign's orders and teams from SQL alone; "
            "the checks ran after the repair.",
            result,
        )
    for result in pays:
        out += tabled(f"{result.title}; `vs_outbox` is the rate over the fast mode's:", result)
    lines: Series = {}
    for result in pays:
        backend = result.rows[0].get("backend", result.name)
        for mode, points in series(result.rows, "mode", "per_s").items():
            lines[f"{backend} {mode}"] = points
    out += image(
        charts.lines("t8-pay", "T8 pays/s by durability mode", lines, "pays per second"),
        "T8 pay",
    )
    for result in paced:
        out += tabled(f"{result.title}:", result)
    return out


def scripts_section(results: Results, charts: Charts) -> list[str]:
    """The Lua scripts' micro benchmarks and the Redis time per request."""
    scripts = results.get("scripts")
    out = ["## Lua scripts (micro benchmarks)", ""]
    if scripts is None:
        return [*out, NOT_RUN, ""]
    out += tabled(
        "One call at a time from a sync client (pytest-benchmark): `median_us` is the round "
        "trip; `redis_us` the time Redis spent in the script (INFO commandstats), "
        "`redis_us_per_request` per reservation for the batch: 1e6 / that is one Redis "
        "core's ceiling.",
        scripts,
    )
    chart = charts.bars(
        "scripts",
        "Redis time per request (INFO commandstats)",
        [str(r["script"]) for r in scripts.rows],
        [float(r["redis_us_per_request"]) for r in scripts.rows],
        "microseconds",
    )
    return [*out, *image(chart, "scripts")]


def plain_section(
    results: Results, names: Sequence[str], heading: str, intro: str = "", *, optional: bool = False
) -> list[str]:
    """Each of ``names``' tables under its title; "Not measured." (or, if ``optional``,
    nothing at all) when none of them ran."""
    shown = [results[n] for n in names if n in results]
    if not shown and optional:
        return []
    out = [f"## {heading}", "", *([intro, ""] if intro else [])]
    if not shown:
        return [*out, NOT_RUN, ""]
    for result in shown:
        out += tabled(f"{result.title}:", result)
    return out


Write = Callable[[Results, Charts], list[str]]


@dataclass(frozen=True, slots=True)
class Section:
    """A benchmark's section: the result files it shows and how it writes them."""

    names: tuple[str, ...]
    write: Write


def _plain(*names: str, heading: str, intro: str = "", optional: bool = False) -> Section:
    def write(results: Results, charts: Charts) -> list[str]:
        return plain_section(results, names, heading, intro, optional=optional)

    return Section(names, write)


SECTIONS: tuple[Section, ...] = (
    Section(("t1-reserve", "t1-ratios", "t1-sold-out"), t1_section),
    Section(("http",), t2_section),
    # bench/test_http_servers.py; shown once measured.
    _plain(
        "http-servers",
        heading="T2 server candidates",
        intro="The same API (stripped configuration, 2 workers) on flashteam's own HTTP server "
        "(what `flashteam serve` runs), on uvicorn and on granian; each row a server's median "
        "round, `vs_flashteam` the median of the same rounds' ratios.",
        optional=True,
    ),
    Section(("t3-teams",), t3_section),
    _plain(
        "flush-sqlite",
        "flush-postgresql",
        "flush-lag-sqlite",
        "flush-lag-postgresql",
        heading="T4 flush worker",
    ),
    _plain("t5-reaper", heading="T5 mass expiry"),
    Section(("t6-redis-memory", "t6-process-memory", "t6-archival"), memory_section),
    _plain("t7-scale", "t7-scale-shards", heading="T7 one million users"),
    # bench/test_shards.py; shown once measured.
    _plain(
        "shards-scaling",
        heading="One hot item on 1, 2 and 3 masters",
        intro="Each master's Redis CPU per 1,000 reservations and the projected ceiling (the "
        "busiest master at one whole core); on a 2-core machine the measured rate cannot grow "
        "with the masters (docs/performance.md#t7-one-million-users).",
        optional=True,
    ),
    Section((*T8_REPAIR, *T8_PAY, *T8_PACED), t8_section),
    _plain(
        "t8-pay-sale-sqlite",
        "t8-pay-sale-postgresql",
        heading="T8/T10 durable pay beside the sale and the flush",
        intro="Pay with the durability default beside a sale of 7,000 reservations/s and a "
        "flush worker process: the peak there, then open loop at 70% of it, with where the "
        "payments' time went (queue for the group commit, the commit, the whole durable wait) "
        "and the flush lag meanwhile (docs/performance.md#t10-flush-vs-the-sale).",
    ),
    _plain(
        "t9-overload",
        heading="T9 overload",
        intro="Reserve at 64 connections (the peak) and at 4,000, closed loop, shed answers "
        "(503 overloaded) retried at once, with a stream of payments during the overload "
        "(docs/performance.md#t9-overload).",
    ),
    Section(("scripts",), scripts_section),
    # Shown once bench/ measures it: the report of a run without it stays as it was.
    _plain(
        "sold_out_resell",
        heading="Sold-out resell",
        intro="Seconds until stock cancelled after a sell-out is sellable again, per process.",
        optional=True,
    ),
)


def benchmark_sections(results: Results, charts: Charts) -> list[str]:
    """Every benchmark's section in order, then any result no section knows."""
    out = [line for section in SECTIONS for line in section.write(results, charts)]
    known = {name for section in SECTIONS for name in section.names}
    others = sorted(set(results) - known)
    if others:
        out += plain_section(results, others, "Other results")
    return out
