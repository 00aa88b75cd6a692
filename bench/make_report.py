"""The benchmark report: ``python -m bench.make_report`` (the last step of ``make bench``).

Reads every ``var/bench/*.json`` the benchmarks wrote (``bench.report.report``) and writes
``bench/reports/<YYYY-MM-DD>.md`` with PNG charts next to it: the machine it ran on, every
performance target of SPEC section 9 (T1 to T7) with its measured value, its baseline and a
plain verdict (met, NOT met, or not measured), then each benchmark's table and charts.

Options: ``--results DIR`` (default ``var/bench``), ``--out DIR`` (default ``bench/reports``),
``--date YYYY-MM-DD`` (default today).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

Rows = list[dict[str, Any]]

MET, NOT_MET, UNMEASURED = "met", "**NOT met**", "not measured"
IMPLEMENTATIONS = {
    "engine": "engine, coalesced (default)",
    "engine-uncoalesced": "engine, one EVALSHA per request",
    "bare-batched": "bare batch.lua loop, 64 per EVALSHA (Redis ceiling)",
    "redis-watch": "WATCH/MULTI optimistic reserve (Python)",
    "postgres": "PostgreSQL conditional UPDATE + INSERT (asyncpg)",
}


@dataclass(frozen=True, slots=True)
class Result:
    """One benchmark's JSON: its title, rows and when it was written."""

    name: str
    title: str
    rows: Rows
    written: dt.datetime


@dataclass(frozen=True, slots=True)
class Target:
    """One line of the targets table."""

    target: str
    requirement: str
    measured: str
    baseline: str
    verdict: str


# --------------------------------------------------------------------------- loading


def load_results(folder: Path) -> dict[str, Result]:
    """Every ``<name>.json`` of ``folder`` with at least one row, by name."""
    results: dict[str, Result] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        rows = data.get("rows") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
            continue
        written = dt.datetime.fromtimestamp(path.stat().st_mtime)
        results[path.stem] = Result(path.stem, str(data.get("title", path.stem)), rows, written)
    return results


# --------------------------------------------------------------------------- machine


def _first_line(command: Sequence[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "not found"
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def _proc_field(path: str, key: str) -> str:
    try:
        with open(path) as lines:
            for line in lines:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _postgres_version() -> str:
    try:
        from engine.local.postgres import postgres_bin_dir

        return _first_line([str(postgres_bin_dir() / "postgres"), "--version"])
    except Exception:  # not installed: the report says so
        return "not found"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine() -> list[tuple[str, str]]:
    """What the numbers were measured on."""
    mem_kb = _proc_field("/proc/meminfo", "MemTotal").split()[0]
    ram = f"{int(mem_kb) / 2**20:.1f} GiB" if mem_kb.isdigit() else "?"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    libraries = ", ".join(
        f"{p} {_version(p)}" for p in ("redis", "hiredis", "uvloop", "asyncpg", "pytest-benchmark")
    )
    return [
        ("CPU", _proc_field("/proc/cpuinfo", "model name")),
        ("cores", str(os.cpu_count())),
        ("RAM", ram),
        ("OS", platform.platform()),
        ("Python", f"{platform.python_implementation()} {platform.python_version()}"),
        ("redis-server", _first_line(["redis-server", "--version"])),
        ("PostgreSQL", _postgres_version()),
        ("libraries", libraries),
        ("load average when the report was made (1, 5, 15 min)", load),
    ]


# --------------------------------------------------------------------------- formatting


def fmt(value: Any) -> str:
    """A table cell: thousands separators, precision by magnitude."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        size = abs(value)
        if size >= 100:
            return f"{value:,.0f}"
        if size >= 1:
            return f"{value:,.2f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def table(rows: Rows, columns: Sequence[str] | None = None) -> str:
    """A markdown table of ``rows`` (the first row's keys unless ``columns``)."""
    names = list(columns or rows[0])
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in names) + " |" for row in rows]
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return MET if ok else NOT_MET


# --------------------------------------------------------------------------- targets


def _top(rows: Rows, key: str = "concurrency") -> Rows:
    """The rows of the highest level measured (T1 and T3 are judged at 1,000 callers)."""
    level = max(int(r[key]) for r in rows)
    return [r for r in rows if int(r[key]) == level]


def t1_targets(results: dict[str, Result]) -> list[Target]:
    names = ("T1 vs bare batched", "T1 vs one EVALSHA/request", "T1 vs PostgreSQL")
    if "t1-ratios" not in results or "t1-reserve" not in results:
        return [Target(n, "", "", "", UNMEASURED) for n in names]
    ratio = _top(results["t1-ratios"].rows)[0]
    rates = {r["impl"]: r for r in _top(results["t1-reserve"].rows)}
    level = int(ratio["concurrency"])
    found = []
    for name, key, impl, floor in zip(
        names,
        ("vs_bare_batched", "vs_uncoalesced", "vs_postgres"),
        ("bare-batched", "engine-uncoalesced", "postgres"),
        (0.5, 4.0, 50.0),
        strict=True,
    ):
        found.append(
            Target(
                name,
                f">= {floor:g}x, {level:,} callers, one hot item",
                f"{ratio[key]:.2f}x (engine {ratio['engine_per_s']:,.0f}/s)",
                f"{IMPLEMENTATIONS[impl]}: {rates[impl]['per_s']:,.0f}/s",
                _verdict(float(ratio[key]) >= floor),
            )
        )
    return found


def t2_targets(results: dict[str, Result]) -> list[Target]:
    names = ("T2 reserve vs echo", "T2 p99 at 70% of peak", "T2 sold-out vs echo")
    http = results.get("http")
    if http is None:
        return [Target(n, "", "", "", UNMEASURED) for n in names]
    routes = {str(r.get("route")): r for r in http.rows}
    echo = routes.get("echo", {})
    baseline = f"echo route {echo.get('requests_per_s', 0):,.0f}/s" if echo else "echo: missing"
    specs: list[tuple[str, str, str, Callable[[dict[str, Any]], tuple[str, bool]]]] = [
        (names[0], "reserve", ">= 0.5x echo", lambda r: _echo_ratio(r, 0.5)),
        (names[1], "reserve@70%", "p99 <= 25 ms", _p99),
        (names[2], "sold_out", ">= 0.8x echo", lambda r: _echo_ratio(r, 0.8)),
    ]
    found = []
    for name, route, requirement, judge in specs:
        row = routes.get(route)
        if row is None:
            found.append(Target(name, requirement, "", baseline, UNMEASURED))
            continue
        measured, ok = judge(row)
        found.append(Target(name, requirement, measured, baseline, _verdict(ok)))
    return found


def _echo_ratio(row: dict[str, Any], floor: float) -> tuple[str, bool]:
    ratio = float(row.get("ratio_to_echo", 0.0))
    return f"{ratio:.2f}x ({float(row.get('requests_per_s', 0)):,.0f}/s)", ratio >= floor


def _p99(row: dict[str, Any]) -> tuple[str, bool]:
    p99 = float(row.get("p99_ms", 0.0))
    share = float(row.get("of_peak", 0.0))
    return f"p99 {p99:.1f} ms at {share:.0%} of peak", p99 <= 25.0


def t3_targets(results: dict[str, Result]) -> list[Target]:
    names = {"join": "T3 join vs reserve", "quick_join": "T3 quick-join vs reserve"}
    teams = results.get("t3-teams")
    if teams is None:
        return [Target(n, "", "", "", UNMEASURED) for n in names.values()]
    rows = {r["impl"]: r for r in _top(teams.rows)}
    reserve = rows["reserve"]
    return [
        Target(
            name,
            f">= 0.5x flash reserve, {int(reserve['concurrency']):,} callers",
            f"{rows[op]['vs_reserve']:.2f}x ({rows[op]['per_s']:,.0f}/s)",
            f"coalesced flash reserve {reserve['per_s']:,.0f}/s",
            _verdict(float(rows[op]["vs_reserve"]) >= 0.5),
        )
        for op, name in names.items()
        if op in rows
    ]


def t4_targets(results: dict[str, Result]) -> list[Target]:
    found = []
    for backend, name in (("sqlite", "flush-sqlite"), ("postgresql", "flush-postgresql")):
        result = results.get(name)
        label = f"T4 flush into {backend}"
        if result is None:
            found.append(Target(label, ">= 20,000 events/s", "", "", UNMEASURED))
            continue
        # Judged at the worker's default batch (FLASHTEAM_FLUSH_BATCH=1000) when measured.
        rows = [r for r in result.rows if int(r["batch"]) == 1000] or result.rows
        row = max(rows, key=lambda r: float(r["events_per_s"]))
        rate = float(row["events_per_s"])
        best = max(float(r["events_per_s"]) for r in result.rows)
        found.append(
            Target(
                label,
                ">= 20,000 events/s (default batch 1,000)",
                f"{rate:,.0f} events/s at batch {int(row['batch']):,} (best {best:,.0f})",
                f"same worker, discarding store: {float(row['baseline_per_s']):,.0f}/s",
                _verdict(rate >= 20_000),
            )
        )
    found += [_t4_lag(results, backend) for backend in ("sqlite", "postgresql")]
    return found


def _t4_lag(results: dict[str, Result], backend: str) -> Target:
    """Max lag while reserving at least as fast as T2's HTTP reserve rate of the same run."""
    label, requirement = f"T4 flush lag at the T2 rate ({backend})", "< 2 s"
    lag = results.get(f"flush-lag-{backend}")
    if lag is None:
        return Target(label, requirement, "", "", UNMEASURED)
    row = lag.rows[0]
    rate, worst = float(row["reserved_per_s"]), float(row["max_lag_s"])
    http = {str(r.get("route")): r for r in results["http"].rows} if "http" in results else {}
    t2 = float(http.get("reserve", {}).get("requests_per_s", 0.0))
    baseline = f"T2 HTTP reserve {t2:,.0f}/s" if t2 else "T2 not measured: rate as set"
    return Target(
        label,
        requirement,
        f"max {worst:.2f} s, p99 {float(row['p99_lag_s']):.2f} s, mean "
        f"{float(row['mean_lag_s']):.2f} s at {rate:,.0f} reservations/s for "
        f"{float(row['seconds']):.0f} s",
        baseline,
        _verdict(worst < 2.0 and rate >= t2),
    )


def t5_targets(results: dict[str, Result]) -> list[Target]:
    result = results.get("t5-reaper")
    name, requirement = "T5 mass expiry", "100,000 holds at one instant, all back <= 10 s"
    if result is None:
        return [Target(name, requirement, "", "", UNMEASURED)]
    row = result.rows[0]
    seconds = float(row["all_returned_after_s"])
    return [
        Target(
            name,
            requirement,
            f"{int(row['holds']):,} back {seconds:.2f} s after the instant "
            f"({float(row['returned_per_s']):,.0f}/s)",
            f"reaper interval {row['reaper_interval_s']} s, batch {row['reaper_batch']}",
            _verdict(seconds <= 10.0),
        )
    ]


def t6_targets(results: dict[str, Result]) -> list[Target]:
    found = []
    memory = results.get("t6-redis-memory")
    if memory is None:
        found.append(Target("T6 Redis bytes per hold", "<= 400 B", "", "", UNMEASURED))
    else:
        phases = {r["phase"]: r for r in memory.rows}
        steady = phases.get("steady", memory.rows[-1])
        outbox = phases.get("with_outbox", steady)
        found.append(
            Target(
                "T6 Redis bytes per hold",
                "<= 400 B per held order",
                f"{float(steady['bytes_per_hold']):,.0f} B (outbox flushed); "
                f"{float(outbox['bytes_per_hold']):,.0f} B before the flush",
                f"INFO used_memory, empty Redis, {int(steady['holds']):,} holds",
                _verdict(float(steady["bytes_per_hold"]) <= 400),
            )
        )
    rss = results.get("t6-process-memory")
    if rss is None:
        found.append(Target("T6 process memory flat", "flat over 1M", "", "", UNMEASURED))
    else:
        last = max(rss.rows, key=lambda r: int(r["requests"]))
        growth = float(last["growth_since_200k_mib"])
        found.append(
            Target(
                "T6 process memory flat",
                "flat RSS over 1,000,000 requests (< 16 MiB growth after 200k)",
                f"{growth:+.2f} MiB from 200k to {int(last['requests']):,} "
                f"(RSS {float(last['rss_mib']):,.1f} MiB)",
                "RSS sampled every 100,000 reservations",
                _verdict(bool(last["flat"])),
            )
        )
    return found


def t7_targets(results: dict[str, Result]) -> list[Target]:
    result = results.get("t7-scale")
    name, requirement = "T7 1M users, 100k stock", "sells out exactly, zero oversell"
    if result is None:
        return [Target(name, requirement, "", "", UNMEASURED)]
    row = result.rows[0]
    exact = int(row["sold"]) == int(row["stock"]) and int(row["oversold"]) == 0
    return [
        Target(
            name,
            requirement,
            f"{int(row['sold']):,} sold, {int(row['oversold'])} oversold; sold out after "
            f"{float(row['sold_out_after_s']):.1f} s, all {int(row['users']):,} answered in "
            f"{float(row['all_answered_after_s']):.1f} s",
            f"{int(row['stock']):,} units, engine defaults (coalesced)",
            _verdict(exact),
        )
    ]


REQUIREMENTS = {
    "T1 vs bare batched": ">= 0.5x, 1,000 callers, one hot item",
    "T1 vs one EVALSHA/request": ">= 4x, 1,000 callers, one hot item",
    "T1 vs PostgreSQL": ">= 50x, 1,000 callers, one hot item",
    "T2 reserve vs echo": ">= 0.5x echo",
    "T2 p99 at 70% of peak": "p99 <= 25 ms",
    "T2 sold-out vs echo": ">= 0.8x echo",
    "T3 join vs reserve": ">= 0.5x flash reserve",
    "T3 quick-join vs reserve": ">= 0.5x flash reserve",
}


def targets(results: dict[str, Result]) -> list[Target]:
    """Every SPEC 9 target, judged from the results (a result that cannot be read counts as
    not measured, with the reason)."""
    found: list[Target] = []
    for target, judge in (
        ("T1", t1_targets),
        ("T2", t2_targets),
        ("T3", t3_targets),
        ("T4", t4_targets),
        ("T5", t5_targets),
        ("T6", t6_targets),
        ("T7", t7_targets),
    ):
        try:
            found += judge(results)
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            found.append(Target(target, "", f"unreadable result: {exc!r}", "", UNMEASURED))
    return [
        t if t.requirement else dataclasses.replace(t, requirement=REQUIREMENTS.get(t.target, ""))
        for t in found
    ]


# --------------------------------------------------------------------------- charts


class Charts:
    """PNG charts next to the report (matplotlib, no display needed)."""

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder = folder
        self.prefix = prefix
        try:
            from matplotlib.figure import Figure
        except ImportError:
            self.available = False
        else:
            self.available = True
            self._figure = Figure

    def _save(self, fig: Any, name: str) -> str:
        fig.tight_layout()
        path = self.folder / f"{self.prefix}-{name}.png"
        fig.savefig(path, dpi=110)
        return path.name

    def lines(
        self,
        name: str,
        title: str,
        series: dict[str, list[tuple[float, float]]],
        ylabel: str,
        *,
        logy: bool = True,
        floors: Sequence[tuple[float, str]] = (),
    ) -> str | None:
        """One line per series over concurrency (log x); optional horizontal target lines."""
        if not self.available or not series:
            return None
        fig = self._figure(figsize=(7.5, 4.5))
        ax = fig.subplots()
        for label, points in series.items():
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        for value, label in floors:
            ax.axhline(value, linestyle="--", linewidth=1, color="grey")
            ax.text(
                0.99,
                value,
                f"target {label}",
                transform=ax.get_yaxis_transform(),
                ha="right",
                va="bottom",
                fontsize=7,
                color="grey",
            )
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        return self._save(fig, name)

    def latency(self, name: str, title: str, rows: Rows) -> str | None:
        """p99 (solid) and p50 (dashed) per implementation over concurrency, one color each."""
        if not self.available or not rows:
            return None
        fig = self._figure(figsize=(7.5, 4.5))
        ax = fig.subplots()
        p99, p50 = _series(rows, "impl", "p99_ms"), _series(rows, "impl", "p50_ms")
        for i, (label, points) in enumerate(p99.items()):
            color = f"C{i}"
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", color=color, label=f"{label} p99")
            xs, ys = zip(*sorted(p50[label]), strict=True)
            ax.plot(xs, ys, marker=".", linestyle="--", color=color, label=f"{label} p50")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent callers")
        ax.set_ylabel("ms (log)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncols=2)
        return self._save(fig, name)

    def bars(
        self, name: str, title: str, labels: list[str], values: list[float], ylabel: str
    ) -> str | None:
        if not self.available or not labels:
            return None
        fig = self._figure(figsize=(7.5, 4.0))
        ax = fig.subplots()
        ax.bar(labels, values, color="tab:blue")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        return self._save(fig, name)

    def xy(
        self, name: str, title: str, points: list[tuple[float, float]], xlabel: str, ylabel: str
    ) -> str | None:
        if not self.available or not points:
            return None
        fig = self._figure(figsize=(7.5, 4.0))
        ax = fig.subplots()
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o")
        ax.set_ylim(0, max(ys) * 1.2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        return self._save(fig, name)


def _series(rows: Rows, key: str, value: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        out.setdefault(str(row[key]), []).append((float(row["concurrency"]), float(row[value])))
    return out


def _image(path: str | None, alt: str) -> list[str]:
    return [f"![{alt}]({path})", ""] if path else []


# --------------------------------------------------------------------------- sections


def section_t1(results: dict[str, Result], charts: Charts) -> list[str]:
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
        "Engine (coalesced) divided by each baseline:",
        "",
        table(ratios.rows),
        "",
    ]
    out += _image(
        charts.lines(
            "t1-throughput",
            "T1 reserves/s, one hot item",
            _series(reserve.rows, "impl", "per_s"),
            "reserves per second (log)",
        ),
        "T1 throughput",
    )
    out += _image(
        charts.latency("t1-latency", "T1 latency: p99 (solid), p50 (dashed)", reserve.rows),
        "T1 latency",
    )
    ratio_series = {
        label: [(float(r["concurrency"]), float(r[key])) for r in ratios.rows]
        for key, label in (
            ("vs_bare_batched", "vs bare batched (target >= 0.5)"),
            ("vs_uncoalesced", "vs one EVALSHA per request (target >= 4)"),
            ("vs_postgres", "vs PostgreSQL (target >= 50)"),
            ("vs_redis_watch", "vs WATCH/MULTI"),
        )
    }
    floors = ((0.5, "0.5x"), (4.0, "4x"), (50.0, "50x"))
    out += _image(
        charts.lines(
            "t1-ratios", "T1 engine / baseline", ratio_series, "ratio (log)", floors=floors
        ),
        "T1 ratios",
    )
    storm = results.get("t1-sold-out")
    if storm is not None:
        out += [
            "### Sold-out storm",
            "",
            "Every request of the window rejected `sold_out` (the item sold out in the warm-up).",
            "",
            table(storm.rows),
            "",
        ]
        out += _image(
            charts.lines(
                "t1-sold-out",
                "Sold-out rejections/s",
                _series(storm.rows, "impl", "per_s"),
                "rejections per second (log)",
            ),
            "sold-out storm",
        )
    return out


def section_t3(results: dict[str, Result], charts: Charts) -> list[str]:
    teams = results.get("t3-teams")
    out = ["## T3 team join and quick-join vs flash reserve", ""]
    if teams is None:
        return [*out, "Not measured.", ""]
    out += [
        "Coalesced engine, same driver. `join`: a given open team (teams of 5, leader paid); "
        "`quick_join`: seated in pre-opened teams; `reserve`: flash reserve. The three run in "
        "turn, three rounds per level; each row is the median round.",
        "",
        table(teams.rows),
        "",
    ]
    series = _series(teams.rows, "impl", "per_s")
    out += _image(charts.lines("t3-teams", "T3 requests/s", series, "per second", logy=False), "T3")
    return out


def section_memory(results: dict[str, Result], charts: Charts) -> list[str]:
    out = ["## T6 memory", ""]
    redis_memory, rss = results.get("t6-redis-memory"), results.get("t6-process-memory")
    if redis_memory is not None:
        out += [
            "Redis bytes per held order: `used_memory` difference over the holds; the "
            "breakdown is `MEMORY USAGE` per key divided by the holds (keyspace overhead "
            "is the rest).",
            "",
            table(redis_memory.rows),
            "",
        ]
        steady = redis_memory.rows[-1]
        parts = ("orders_hash", "deadline_index", "user_counter", "idempotency", "outbox")
        labels = [*parts, "keyspace"]
        out += _image(
            charts.bars(
                "t6-redis-bytes",
                f"Redis bytes per held order ({steady['phase']})",
                labels,
                [float(steady[p]) for p in labels],
                "bytes per held order",
            ),
            "T6 Redis bytes",
        )
    if rss is not None:
        out += ["Process RSS over the requests:", "", table(rss.rows), ""]
        points = [(float(r["requests"]), float(r["rss_mib"])) for r in rss.rows]
        out += _image(charts.xy("t6-rss", "Process RSS", points, "requests", "RSS MiB"), "T6 RSS")
    if redis_memory is None and rss is None:
        out.append("Not measured.")
    return out


def section_scripts(results: dict[str, Result], charts: Charts) -> list[str]:
    scripts = results.get("scripts")
    out = ["## Lua scripts (micro benchmarks)", ""]
    if scripts is None:
        return [*out, "Not measured.", ""]
    out += [
        "One call at a time from a sync client (pytest-benchmark): `median_us` is the round "
        "trip; `redis_us` the time Redis spent in the script (INFO commandstats), "
        "`redis_us_per_request` per reservation for the batch: 1e6 / that is one Redis "
        "core's ceiling.",
        "",
        table(scripts.rows),
        "",
    ]
    out += _image(
        charts.bars(
            "scripts",
            "Redis time per request (INFO commandstats)",
            [str(r["script"]) for r in scripts.rows],
            [float(r["redis_us_per_request"]) for r in scripts.rows],
            "microseconds",
        ),
        "scripts",
    )
    return out


def section_plain(results: dict[str, Result], names: Sequence[str], heading: str) -> list[str]:
    out = [f"## {heading}", ""]
    shown = [results[n] for n in names if n in results]
    if not shown:
        return [*out, "Not measured.", ""]
    for result in shown:
        out += [f"{result.title}:", "", table(result.rows), ""]
    return out


KNOWN = {
    "t1-reserve",
    "t1-ratios",
    "t1-sold-out",
    "t3-teams",
    "http",
    "flush-sqlite",
    "flush-postgresql",
    "flush-lag-sqlite",
    "flush-lag-postgresql",
    "t5-reaper",
    "t6-redis-memory",
    "t6-process-memory",
    "t7-scale",
    "scripts",
}


def render(results: dict[str, Result], charts: Charts, day: str) -> str:
    found = targets(results)
    met = sum(t.verdict == MET for t in found)
    missed = sum(t.verdict == NOT_MET for t in found)
    unmeasured = sum(t.verdict == UNMEASURED for t in found)
    out = [
        f"# flashteam benchmark report, {day}",
        "",
        "Made by `python -m bench.make_report` from `var/bench/*.json` (`make bench`). "
        "Ratios are measured side by side in one run on one machine (SPEC section 9); "
        "absolute numbers depend on what else the machine ran (see the load average).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {fmt(v)} |" for k, v in machine()),
        "",
        "## SPEC section 9 targets",
        "",
        f"{met} met, {missed} not met, {unmeasured} not measured.",
        "",
        "| target | requirement | measured | baseline | verdict |",
        "|---|---|---|---|---|",
        *(
            f"| {t.target} | {t.requirement} | {t.measured} | {t.baseline} | {t.verdict} |"
            for t in found
        ),
        "",
    ]
    out += section_t1(results, charts)
    out += section_plain(results, ["http"], "T2 HTTP reserve")
    out += section_t3(results, charts)
    out += section_plain(
        results,
        ["flush-sqlite", "flush-postgresql", "flush-lag-sqlite", "flush-lag-postgresql"],
        "T4 flush worker",
    )
    out += section_plain(results, ["t5-reaper"], "T5 mass expiry")
    out += section_memory(results, charts)
    out += section_plain(results, ["t7-scale"], "T7 one million users")
    out += section_scripts(results, charts)
    others = sorted(set(results) - KNOWN)
    if others:
        out += section_plain(results, others, "Other results")
    out += [
        "## Result files",
        "",
        *(f"- `{r.name}.json`: {r.title} ({r.written:%Y-%m-%d %H:%M})" for r in results.values()),
        "",
    ]
    if not charts.available:
        out += ["(matplotlib is not installed: no charts.)", ""]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.make_report", description=__doc__)
    parser.add_argument("--results", type=Path, default=Path("var") / "bench")
    parser.add_argument("--out", type=Path, default=Path("bench") / "reports")
    parser.add_argument("--date", default=dt.date.today().isoformat())
    args = parser.parse_args(argv)
    results = load_results(args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    charts = Charts(args.out, args.date)
    path = args.out / f"{args.date}.md"
    path.write_text(render(results, charts, args.date))
    print(f"wrote {path} ({len(results)} result files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
