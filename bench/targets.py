"""The performance targets T1 to T10 of docs/performance.md, each defined once, and their verdicts.

A target's floor or bound is written only here: the verdicts are judged with it, and every
sentence of the report that states it (the requirement cells, the target lines of the T1
ratio chart) is written from it. A target whose benchmark does not exist yet is defined too,
without a judge, so that the report lists it as "not measured".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from bench.results import IMPLEMENTATIONS, Results, Row, by, top_level

MET, NOT_MET, UNMEASURED = "met", "**NOT met**", "not measured"
NO_BENCHMARK = "no benchmark yet"
# The flush worker's default batch (FLASHTEAM_FLUSH_BATCH): T4 is judged at it.
FLUSH_BATCH = 1_000
# The campaign T8 repairs: this many orders at least.
REPAIR_ORDERS = 100_000
# T2 (bench/test_http.py): the systems and routes its rows name; its targets are judged on
# the default stack, the batch endpoint with 64 reservations per request, against T1's
# engine at 1,000 callers.
DEFAULT_STACK, STRIPPED, NAIVE_SYSTEM = "default", "stripped", "naive"
BATCH_SIZE = 64
BATCH_ROUTE, PACED_ROUTE = f"batch{BATCH_SIZE}", "reserve@70%"
# The paced run aims at 70% of the reserve peak; a p99 within the bound counts only if the run
# got to at least 90% of that (a p99 over the bound at a lighter load fails anyway).
PACED_SHARE = 0.7
PACED_MIN_SHARE = 0.9 * PACED_SHARE
T1_CALLERS = 1_000
# What a T8 repair row must say was checked after the repair (bench/test_recovery.py).
REPAIR_CHECKS = ("audit_ok", "redis_equals_sql", "reconcile_ok", "trusted")
# T9 (bench/test_overload.py): reserve at the peak's connections, then at the overload's.
PEAK_CONNECTIONS, OVERLOAD_CONNECTIONS = 64, 4_000


@dataclass(frozen=True, slots=True)
class Bound:
    """What a measured number must be: at least (``>=``), at most (``<=``) or below ``limit``."""

    op: Literal[">=", "<=", "<"]
    limit: float
    unit: str = ""

    def holds(self, value: float) -> bool:
        """Whether ``value`` meets the bound."""
        if self.op == ">=":
            return value >= self.limit
        if self.op == "<=":
            return value <= self.limit
        return value < self.limit

    @property
    def limit_text(self) -> str:
        """The limit with its unit: ``0.8x``, ``20,000 events/s``."""
        return f"{self.limit:,g}{self.unit}"

    def __str__(self) -> str:
        return f"{self.op} {self.limit_text}"


@dataclass(frozen=True, slots=True)
class Reading:
    """What a judge read from the results: the measured and baseline cells, and the verdict."""

    measured: str
    baseline: str
    ok: bool


class NotMeasured(Exception):
    """A judge found the results lack what the target needs (the message says what)."""


Judge = Callable[[Results, "Target"], Reading]


@dataclass(frozen=True, slots=True)
class Target:
    """One performance target, one row of the report's targets table.

    ``name`` says what is measured (its first word is the target's id, ``T1``);
    ``requirement`` is its sentence with ``{bound}`` where the bound goes; ``baseline`` what
    it is a ratio of or compared with. ``judge`` reads it from the ``needs`` result files at
    the row ``key`` and the ``column`` the bound applies to; no judge: no benchmark yet.
    """

    name: str
    requirement: str
    bound: Bound | None = None
    baseline: str = ""
    judge: Judge | None = None
    needs: tuple[str, ...] = ()
    key: str = ""
    column: str = ""

    @property
    def id(self) -> str:
        """``T1`` to ``T10``: the section of docs/performance.md."""
        return self.name.split()[0]

    @property
    def stated(self) -> str:
        """The requirement with its bound written in."""
        return self.requirement.format(bound=self.bound)

    def holds(self, value: float) -> bool:
        """Whether ``value`` meets this target's bound."""
        if self.bound is None:
            raise TypeError(f"{self.name} has no numeric bound")
        return self.bound.holds(value)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A target as judged from one run's results."""

    target: Target
    measured: str
    baseline: str
    verdict: str


# --------------------------------------------------------------------------- judges


def _t1(results: Results, target: Target) -> Reading:
    ratio = top_level(results["t1-ratios"].rows)[0]
    rates = by(top_level(results["t1-reserve"].rows), "impl")
    value = float(ratio[target.column])
    return Reading(
        f"{value:.2f}x (engine {ratio['engine_per_s']:,.0f}/s)",
        f"{target.baseline}: {rates[target.key]['per_s']:,.0f}/s",
        target.holds(value),
    )


def _http_rows(results: Results) -> dict[tuple[str, str], Row]:
    """T2's rows by (system, route); rows of a run before the stacks were measured name no
    system: they are the stripped configuration's."""
    return {(str(r.get("config", STRIPPED)), str(r.get("route"))): r for r in results["http"].rows}


def _http_row(results: Results, system: str, route: str) -> Row:
    row = _http_rows(results).get((system, route))
    if row is None:
        raise NotMeasured(f"no `{system}` `{route}` row in http.json")
    return row


def _http_route(results: Results, target: Target) -> tuple[Row, str]:
    """The default stack's row of ``target`` and the cell of its echo baseline."""
    echo = _http_rows(results).get((DEFAULT_STACK, "echo"))
    baseline = (
        f"echo route of the default stack {float(echo['requests_per_s']):,.0f}/s"
        if echo
        else "echo: missing"
    )
    return _http_row(results, DEFAULT_STACK, target.key), baseline


def _t2_vs_echo(results: Results, target: Target) -> Reading:
    row, baseline = _http_route(results, target)
    ratio = float(row[target.column])
    rate = float(row["requests_per_s"])
    return Reading(f"{ratio:.2f}x ({rate:,.0f}/s)", baseline, target.holds(ratio))


def _t2_p99(results: Results, target: Target) -> Reading:
    row = _http_row(results, DEFAULT_STACK, target.key)
    peak = _http_row(results, DEFAULT_STACK, "reserve")
    p99 = float(row[target.column])
    share = float(row["of_peak"])
    if target.holds(p99) and share < PACED_MIN_SHARE:
        raise NotMeasured(
            f"p99 {p99:.1f} ms, but the paced run got to {share:.0%} of peak only (at least "
            f"{PACED_MIN_SHARE:.0%} needed)"
        )
    return Reading(
        f"p99 {p99:.1f} ms (p50 {float(row['p50_ms']):.1f}) at {float(row['requests_per_s']):,.0f}"
        f"/s, {share:.0%} of peak",
        f"default stack reserve peak {float(peak['requests_per_s']):,.0f}/s",
        target.holds(p99),
    )


def _t2_vs_naive(results: Results, target: Target) -> Reading:
    """Reservations/s of a default-stack route over the naive reference's, same run."""
    row = _http_row(results, DEFAULT_STACK, target.key)
    naive = _http_row(results, NAIVE_SYSTEM, "reserve")
    ratio = float(row[target.column])
    return Reading(
        f"{ratio:.2f}x ({float(row['reservations_per_s']):,.0f} reservations/s)",
        f"{target.baseline}: {float(naive['reservations_per_s']):,.0f}/s",
        target.holds(ratio),
    )


def _t1_engine_rate(results: Results) -> float:
    """T1's engine reservations/s at 1,000 callers; NotMeasured without it."""
    if "t1-reserve" not in results:
        raise NotMeasured("no t1-reserve.json: T1 (bench/test_engine.py) did not run")
    engine = [
        r
        for r in results["t1-reserve"].rows
        if r.get("impl") == "engine" and int(r.get("concurrency", 0)) == T1_CALLERS
    ]
    if not engine:
        raise NotMeasured(f"no engine row at {T1_CALLERS:,} callers in t1-reserve.json")
    return float(engine[-1]["per_s"])


def _t2_vs_t1(results: Results, target: Target) -> Reading:
    """The default stack's batch reservations/s over T1's engine at 1,000 callers."""
    row = _http_row(results, DEFAULT_STACK, target.key)
    rate, t1 = float(row[target.column]), _t1_engine_rate(results)
    return Reading(
        f"{rate / t1:.2f}x ({rate:,.0f} reservations/s)",
        f"{target.baseline}: {t1:,.0f}/s",
        target.holds(rate / t1),
    )


def _t2_vs_stripped(results: Results, target: Target) -> Reading:
    row = _http_row(results, DEFAULT_STACK, target.key)
    stripped = _http_row(results, STRIPPED, target.key)
    ratio = float(row[target.column])
    return Reading(
        f"{ratio:.2f}x ({float(row['requests_per_s']):,.0f}/s)",
        f"{target.baseline}: {float(stripped['requests_per_s']):,.0f}/s",
        target.holds(ratio),
    )


def _t3(results: Results, target: Target) -> Reading:
    rows = by(top_level(results["t3-teams"].rows), "impl")
    if target.key not in rows:
        raise NotMeasured(f"no `{target.key}` rows in t3-teams.json")
    row, reserve = rows[target.key], rows["reserve"]
    value = float(row[target.column])
    return Reading(
        f"{value:.2f}x ({row['per_s']:,.0f}/s)",
        f"{target.baseline} {reserve['per_s']:,.0f}/s",
        target.holds(value),
    )


def _t4_flush(results: Results, target: Target) -> Reading:
    rows = results[f"flush-{target.key}"].rows
    row = max(
        [r for r in rows if int(r["batch"]) == FLUSH_BATCH] or rows,
        key=lambda r: float(r[target.column]),
    )
    rate = float(row[target.column])
    best = max(float(r[target.column]) for r in rows)
    return Reading(
        f"{rate:,.0f} events/s at batch {int(row['batch']):,} (best {best:,.0f})",
        f"{target.baseline}: {float(row['baseline_per_s']):,.0f}/s",
        target.holds(rate),
    )


def _t4_lag(results: Results, target: Target) -> Reading:
    """Max lag, while reserving at least as fast as T2's HTTP reserve of the same run."""
    row = results[f"flush-lag-{target.key}"].rows[0]
    rate, worst = float(row["reserved_per_s"]), float(row[target.column])
    http = _http_rows(results) if "http" in results else {}
    t2 = float(http.get((DEFAULT_STACK, "reserve"), {}).get("requests_per_s", 0.0))
    return Reading(
        f"max {worst:.2f} s, p99 {float(row['p99_lag_s']):.2f} s, mean "
        f"{float(row['mean_lag_s']):.2f} s at {rate:,.0f} reservations/s for "
        f"{float(row['seconds']):.0f} s",
        f"T2 HTTP reserve {t2:,.0f}/s" if t2 else "T2 not measured: rate as set",
        target.holds(worst) and rate >= t2,
    )


def _t5(results: Results, target: Target) -> Reading:
    row = results["t5-reaper"].rows[0]
    seconds = float(row[target.column])
    return Reading(
        f"{int(row['holds']):,} back {seconds:.2f} s after the instant "
        f"({float(row['returned_per_s']):,.0f}/s)",
        f"reaper interval {row['reaper_interval_s']} s, batch {row['reaper_batch']}",
        target.holds(seconds),
    )


def _t6_redis(results: Results, target: Target) -> Reading:
    rows = results["t6-redis-memory"].rows
    phases = by(rows, "phase")
    steady = phases.get("steady", rows[-1])
    outbox = phases.get("with_outbox", steady)
    value = float(steady[target.column])
    return Reading(
        f"{value:,.0f} B (outbox flushed); {float(outbox[target.column]):,.0f} B before the flush",
        f"{target.baseline}, {int(steady['holds']):,} holds",
        target.holds(value),
    )


def _t6_process(results: Results, target: Target) -> Reading:
    last = max(results["t6-process-memory"].rows, key=lambda r: int(r["requests"]))
    growth = float(last[target.column])
    return Reading(
        f"{growth:+.2f} MiB from 200k to {int(last['requests']):,} "
        f"(RSS {float(last['rss_mib']):,.1f} MiB)",
        target.baseline,
        target.holds(growth),
    )


def _t6_archival(results: Results, target: Target) -> Reading:
    rows = results["t6-archival"].rows
    worst = max(rows, key=lambda r: abs(float(r[target.column]) - 1))
    value = float(worst[target.column])
    longest = max(float(r["longest_command_ms"]) for r in rows)
    peak = max(float(r["peak_used_memory_mib"]) for r in rows)
    return Reading(
        f"{value:.3f}x at worst after {len(rows)} campaigns of {int(rows[0]['orders']):,} "
        f"orders (each peaked at up to {peak:,.0f} MiB); slowest archival command "
        f"{longest:.1f} ms",
        f"{target.baseline}: {int(rows[0]['baseline']) / 2**20:,.2f} MiB",
        all(target.holds(float(r[target.column])) for r in rows),
    )


def _t7(results: Results, target: Target) -> Reading:
    """Exactly the stock sold, none oversold (and, sharded, none left unsold)."""
    row = results[target.needs[0]].rows[0]
    exact = int(row["sold"]) == int(row["stock"]) and int(row["oversold"]) == 0
    exact = exact and int(row.get("unsold", 0)) == 0
    return Reading(
        f"{int(row['sold']):,} sold, {int(row['oversold'])} oversold; sold out after "
        f"{float(row['sold_out_after_s']):.1f} s, all {int(row['users']):,} answered in "
        f"{float(row['all_answered_after_s']):.1f} s",
        f"{int(row['stock']):,} units, {target.baseline}",
        exact,
    )


def _t8_repair(results: Results, target: Target) -> Reading:
    """Both backends: the repair's seconds, and every check after it passed."""
    measured, baselines, ok = [], [], True
    for backend in _BACKENDS:
        rows = by(results[f"t8-repair-{backend}"].rows, "campaign")
        if target.key not in rows:
            raise NotMeasured(f"no `{target.key}` campaign in t8-repair-{backend}.json")
        row = rows[target.key]
        seconds, orders = float(row[target.column]), int(row["orders"])
        failed = [check for check in REPAIR_CHECKS if row.get(check) is not True]
        ok = ok and target.holds(seconds) and orders >= REPAIR_ORDERS and not failed
        measured.append(
            f"{backend} {seconds:.1f} s for {orders:,} orders "
            f"({float(row['orders_per_s']):,.0f}/s, {float(row['vs_baseline']):.1f}x the read)"
            + (f", failed: {', '.join(failed)}" if failed else "")
        )
        baselines.append(f"{backend} {float(row['baseline_read_s']):.1f} s")
    return Reading("; ".join(measured), f"{target.baseline}: {', '.join(baselines)}", ok)


def _t8_pay(results: Results, target: Target) -> Reading:
    """Both backends: the default's best rate over the fast mode's best, closed loop."""
    measured, baselines, ok = [], [], True
    for backend in _BACKENDS:
        rows = results[f"t8-pay-{backend}"].rows
        best = {
            mode: max(float(r[target.column]) for r in rows if r["mode"] == mode)
            for mode in (target.key, "outbox")
        }
        ratio = best[target.key] / best["outbox"]
        lowest = min(float(r["vs_outbox"]) for r in rows if r["mode"] == target.key)
        ok = ok and target.holds(ratio)
        measured.append(
            f"{backend} {ratio:.2f}x ({best[target.key]:,.0f}/s; per level down to {lowest:.2f}x)"
        )
        baselines.append(f"{backend} {best['outbox']:,.0f}/s")
    return Reading("; ".join(measured), f"{target.baseline}: {', '.join(baselines)}", ok)


def _t8_p99(results: Results, target: Target) -> Reading:
    """Both backends: pay's p99 open loop at a share of its own peak."""
    measured, baselines, ok = [], [], True
    for backend in _BACKENDS:
        modes = by(results[f"t8-pay-paced-{backend}"].rows, "mode")
        if target.key not in modes:
            raise NotMeasured(f"no `{target.key}` row in t8-pay-paced-{backend}.json")
        row = modes[target.key]
        p99 = float(row[target.column])
        ok = ok and target.holds(p99)
        measured.append(
            f"{backend} p99 {p99:,.1f} ms (p50 {float(row['p50_ms']):,.1f}) at "
            f"{float(row['offered_per_s']):,.0f}/s, {float(row['of_peak']):.0%} of peak"
        )
        baselines.append(f"{backend} {float(row['peak_per_s']):,.0f}/s")
    return Reading("; ".join(measured), f"{target.baseline}: {', '.join(baselines)}", ok)


def _t8_beside_the_sale(results: Results, target: Target) -> Reading:
    """Both backends: pay's p99 open loop at 70% of its peak, beside a sale and the flush
    (bench/test_money_path.py), with where the payments' time went."""
    measured, baselines, ok = [], [], True
    for backend in _BACKENDS:
        row = results[f"t8-pay-sale-{backend}"].rows[0]
        p99 = float(row[target.column])
        ok = ok and target.holds(p99)
        measured.append(
            f"{backend} p99 {p99:,.1f} ms (p50 {float(row['p50_ms']):,.1f}; queue p99 "
            f"{float(row['queue_p99_ms']):,.1f}, commit p99 {float(row['commit_p99_ms']):,.1f}) "
            f"at {float(row['offered_per_s']):,.0f}/s beside {float(row['sale_per_s']):,.0f} "
            "reservations/s"
        )
        baselines.append(f"{backend} {float(row['peak_per_s']):,.0f}/s")
    return Reading("; ".join(measured), f"{target.baseline}: {', '.join(baselines)}", ok)


def _t2_reserve_rate(results: Results) -> float:
    """T2's reservations/s on the default stack; NotMeasured without it."""
    if "http" not in results:
        raise NotMeasured("no http.json: T2 (bench/test_http.py) did not run")
    return float(_http_row(results, DEFAULT_STACK, "reserve")["requests_per_s"])


def _t10_flush(results: Results, target: Target) -> Reading:
    """Flush events/s into one store at the default batch over T2's reservations/s."""
    rows = [r for r in results[f"flush-{target.key}"].rows if int(r["batch"]) == FLUSH_BATCH]
    if not rows:
        raise NotMeasured(f"no batch {FLUSH_BATCH:,} row in flush-{target.key}.json")
    rate, t2 = float(rows[0]["events_per_s"]), _t2_reserve_rate(results)
    return Reading(
        f"{rate / t2:.2f}x ({rate:,.0f} events/s at batch {FLUSH_BATCH:,})",
        f"{target.baseline}: {t2:,.0f}/s",
        target.holds(rate / t2),
    )


def _t10_lag_t2(results: Results, target: Target) -> Reading:
    """Max flush lag into one store beside the sale and the payments, the sale at least as
    fast as T2's HTTP reserve."""
    row = results[f"t8-pay-sale-{target.key}"].rows[0]
    rate, worst, t2 = float(row["sale_per_s"]), float(row[target.column]), _t2_reserve_rate(results)
    if rate < t2:
        raise NotMeasured(f"the sale reached {rate:,.0f}/s, below T2's {t2:,.0f}/s")
    return Reading(
        f"max {worst:.2f} s, p99 {float(row['lag_p99_s']):.2f} s at {rate:,.0f} "
        f"reservations/s and {float(row['offered_per_s']):,.0f} payments/s",
        f"{target.baseline}: {t2:,.0f}/s",
        target.holds(worst),
    )


def _t10_lag_t1(results: Results, target: Target) -> Reading:
    """Max flush lag into one store while reserving at T1's engine rate (1,000 callers)."""
    row = results[f"flush-lag-{target.key}"].rows[0]
    rate, worst, t1 = (
        float(row["reserved_per_s"]),
        float(row[target.column]),
        _t1_engine_rate(results),
    )
    if rate < t1:
        raise NotMeasured(
            f"max lag {worst:.2f} s at {rate:,.0f} reservations/s: below T1's {t1:,.0f}/s"
        )
    return Reading(
        f"max {worst:.2f} s, p99 {float(row['p99_lag_s']):.2f} s at {rate:,.0f} reservations/s",
        f"{target.baseline}: {t1:,.0f}/s",
        target.holds(worst),
    )


def _t9(results: Results, target: Target) -> Reading:
    """One figure of the overload row (bench/test_overload.py), with the peak as baseline."""
    phases = by(results["t9-overload"].rows, "phase")
    if "overload" not in phases or "peak" not in phases:
        raise NotMeasured("no peak and overload rows in t9-overload.json")
    row, peak = phases["overload"], phases["peak"]
    cell = row[target.column]
    if cell == "":
        raise NotMeasured(f"no {target.column} in the overload row (nothing was shed?)")
    value = float(cell)
    unit = "x" if target.column == "vs_peak" else " ms"
    return Reading(
        f"{value:,.2f}{unit}: {float(row['reserved_per_s']):,.0f} reserved/s, "
        f"{float(row['shed_per_s']):,.0f} shed/s at {OVERLOAD_CONNECTIONS:,} connections",
        f"peak {float(peak['reserved_per_s']):,.0f}/s at {PEAK_CONNECTIONS} connections, "
        f"p99 {float(peak['reserve_p99_ms']):,.1f} ms",
        target.holds(value),
    )


def _t9_target(name: str, requirement: str, bound: Bound, column: str) -> Target:
    return Target(
        name,
        f"{requirement} at {OVERLOAD_CONNECTIONS:,} connections, {_ON_DEFAULT}",
        bound,
        f"reserve at {PEAK_CONNECTIONS} connections",
        _t9,
        ("t9-overload",),
        "overload",
        column,
    )


# --------------------------------------------------------------------------- the targets

_NAIVE = "naive reference endpoint (FastAPI, one Lua DECR per request)"
_BATCH = f"{BATCH_SIZE} reservations per request"
_ON_DEFAULT = "on the default `flashteam run` stack"
_BACKENDS = ("sqlite", "postgresql")


def _t1_target(name: str, bound: Bound, impl: str, column: str) -> Target:
    """A T1 ratio: the coalesced engine over ``impl``, 1,000 callers reserving one item."""
    return Target(
        name,
        "{bound}, 1,000 callers, one hot item",
        bound,
        IMPLEMENTATIONS[impl],
        _t1,
        ("t1-ratios", "t1-reserve"),
        impl,
        column,
    )


def _t2_target(name: str, bound: Bound, route: str) -> Target:
    """A T2 ratio: one route's rate over the echo route of the same server, default stack."""
    return Target(
        name,
        f"{{bound}} the echo route of the same server, {_ON_DEFAULT}",
        bound,
        "echo route",
        _t2_vs_echo,
        ("http",),
        route,
        "ratio_to_echo",
    )


def _t2_naive_target(name: str, bound: Bound, route: str, per_request: str = "") -> Target:
    """A T2 ratio: a default-stack route's reservations/s over the naive reference's."""
    return Target(
        name,
        f"{{bound}} the {_NAIVE} in reservations/s{per_request}, {_ON_DEFAULT}",
        bound,
        "naive reference, same run",
        _t2_vs_naive,
        ("http",),
        route,
        "vs_naive",
    )


def _t3_target(name: str, bound: Bound, operation: str) -> Target:
    """A T3 ratio: a team operation over flash reserve, 1,000 callers."""
    return Target(
        name,
        "{bound} flash reserve, 1,000 callers",
        bound,
        "coalesced flash reserve",
        _t3,
        ("t3-teams",),
        operation,
        "vs_reserve",
    )


def _t4_flush_target(backend: str, bound: Bound) -> Target:
    """T4 flush throughput into one store, at the worker's default batch."""
    return Target(
        f"T4 flush into {backend}",
        f"{{bound}} (default batch {FLUSH_BATCH:,})",
        bound,
        "same worker, discarding store",
        _t4_flush,
        (f"flush-{backend}",),
        backend,
        "events_per_s",
    )


def _t4_lag_target(backend: str, bound: Bound) -> Target:
    """T4 flush lag into one store while reserving at the T2 rate."""
    return Target(
        f"T4 flush lag at the T2 rate ({backend})",
        "{bound}",
        bound,
        "T2 HTTP reserve rate",
        _t4_lag,
        (f"flush-lag-{backend}",),
        backend,
        "max_lag_s",
    )


TARGETS: tuple[Target, ...] = (
    _t1_target("T1 vs bare batched", Bound(">=", 0.8, "x"), "bare-batched", "vs_bare_batched"),
    _t1_target(
        "T1 vs one EVALSHA/request", Bound(">=", 4, "x"), "engine-uncoalesced", "vs_uncoalesced"
    ),
    _t1_target("T1 vs PostgreSQL", Bound(">=", 30, "x"), "postgres", "vs_postgres"),
    _t2_target("T2 reserve vs echo", Bound(">=", 0.6, "x"), "reserve"),
    Target(
        "T2 p99 at 70% of peak",
        f"reserve p99 {{bound}} at 70% of its peak, {_ON_DEFAULT}",
        Bound("<=", 25, " ms"),
        baseline="default stack reserve peak",
        judge=_t2_p99,
        needs=("http",),
        key=PACED_ROUTE,
        column="p99_ms",
    ),
    _t2_target("T2 sold-out vs echo", Bound(">=", 0.9, "x"), "sold_out"),
    _t2_naive_target("T2 reserve vs naive reference", Bound(">=", 3, "x"), "reserve"),
    _t2_naive_target(
        "T2 batch endpoint vs naive reference", Bound(">=", 10, "x"), BATCH_ROUTE, f", {_BATCH}"
    ),
    Target(
        "T2 batch endpoint vs T1",
        f"{{bound}} T1's engine reserve at {T1_CALLERS:,} callers in reservations/s, {_BATCH}, "
        f"{_ON_DEFAULT}",
        Bound(">=", 0.6, "x"),
        f"T1 engine reserve, {T1_CALLERS:,} callers",
        _t2_vs_t1,
        ("http",),
        BATCH_ROUTE,
        "reservations_per_s",
    ),
    Target(
        "T2 default stack vs stripped",
        "reserve {bound} the stripped configuration's (`flashteam serve`, rate limit off, no "
        "flush worker, no reaper), same run",
        Bound(">=", 0.85, "x"),
        "stripped reserve",
        _t2_vs_stripped,
        ("http",),
        "reserve",
        "vs_stripped",
    ),
    _t3_target("T3 join vs reserve", Bound(">=", 0.5, "x"), "join"),
    _t3_target("T3 quick-join vs reserve", Bound(">=", 0.5, "x"), "quick_join"),
    *(_t4_flush_target(backend, Bound(">=", 20_000, " events/s")) for backend in _BACKENDS),
    *(_t4_lag_target(backend, Bound("<", 2, " s")) for backend in _BACKENDS),
    Target(
        "T5 mass expiry",
        "100,000 holds at one instant, all back {bound}",
        Bound("<=", 10, " s"),
        baseline="the reaper's interval and batch",
        judge=_t5,
        needs=("t5-reaper",),
        column="all_returned_after_s",
    ),
    Target(
        "T6 Redis bytes per hold",
        "{bound} per held order",
        Bound("<=", 400, " B"),
        baseline="INFO used_memory, empty Redis",
        judge=_t6_redis,
        needs=("t6-redis-memory",),
        column="bytes_per_hold",
    ),
    Target(
        "T6 process memory flat",
        "flat RSS over 1,000,000 requests ({bound} growth after 200k)",
        Bound("<", 16, " MiB"),
        baseline="RSS sampled every 100,000 reservations",
        judge=_t6_process,
        needs=("t6-process-memory",),
        column="growth_since_200k_mib",
    ),
    Target(
        "T6 Redis memory after archival",
        "back {bound} of its baseline after each finished campaign is archived",
        Bound("<=", 1.05, "x"),
        baseline="Redis used_memory before the campaigns",
        judge=_t6_archival,
        needs=("t6-archival",),
        column="vs_baseline",
    ),
    Target(
        "T7 1M users, 100k stock",
        "sells out exactly, zero oversell",
        baseline="engine defaults (coalesced)",
        judge=_t7,
        needs=("t7-scale",),
    ),
    Target(
        "T7 1M users, 100k stock, 3 shards",
        "sells out exactly, zero oversell",
        baseline="engine defaults (coalesced), 3 buckets on 3 Redis Cluster masters",
        judge=_t7,
        needs=("t7-scale-shards",),
    ),
    Target(
        "T8 repair after Redis lost data",
        # docs/performance.md says "seconds"; read as at most 10 s, the scale of T5.
        f"a campaign of {REPAIR_ORDERS:,} orders repaired in seconds ({{bound}}), then Redis "
        "equals SQL",
        Bound("<=", 10, " s"),
        "reading its durable orders and teams alone",
        _t8_repair,
        tuple(f"t8-repair-{backend}" for backend in _BACKENDS),
        "flash",
        "repair_s",
    ),
    Target(
        "T8 pay with the durability default",
        "{bound} the fast mode (each mode's best rate, 10 to 1,000 callers)",
        Bound(">=", 0.7, "x"),
        "pay in the fast mode, same run",
        _t8_pay,
        tuple(f"t8-pay-{backend}" for backend in _BACKENDS),
        "sql",
        "per_s",
    ),
    Target(
        "T8 pay p99 at 70% of peak",
        "p99 {bound}, open loop at 70% of its peak",
        Bound("<=", 25, " ms"),
        "pay's own peak",
        _t8_p99,
        tuple(f"t8-pay-paced-{backend}" for backend in _BACKENDS),
        "sql",
        "p99_ms",
    ),
    Target(
        "T8 pay p99 beside the sale",
        "p99 {bound}, open loop at 70% of its peak, beside a sale and the flush worker",
        Bound("<=", 25, " ms"),
        "pay's own peak beside the sale",
        _t8_beside_the_sale,
        tuple(f"t8-pay-sale-{backend}" for backend in _BACKENDS),
        "",
        "p99_ms",
    ),
    _t9_target(
        "T9 goodput under overload",
        "reservations/s {bound} the peak's",
        Bound(">=", 0.8, "x"),
        "vs_peak",
    ),
    _t9_target(
        "T9 reserve p99 under overload",
        "reserve p99 {bound}",
        Bound("<=", 100, " ms"),
        "reserve_p99_ms",
    ),
    _t9_target(
        "T9 shed answer p99", "503 overloaded p99 {bound}", Bound("<=", 5, " ms"), "shed_p99_ms"
    ),
    _t9_target(
        "T9 pay p99 while shedding",
        "pay p99 {bound} while reservations are shed",
        Bound("<=", 50, " ms"),
        "pay_p99_ms",
    ),
    *(
        Target(
            f"T10 flush into {backend} vs the sale",
            f"{{bound}} T2's reservations/s {_ON_DEFAULT} (default batch {FLUSH_BATCH:,})",
            Bound(">=", 2, "x"),
            "T2 HTTP reserve",
            _t10_flush,
            (f"flush-{backend}", "http"),
            backend,
        )
        for backend in _BACKENDS
    ),
    Target(
        "T10 flush into postgresql",
        f"{{bound}} (default batch {FLUSH_BATCH:,})",
        Bound(">=", 30_000, " events/s"),
        "same worker, discarding store",
        _t4_flush,
        ("flush-postgresql",),
        "postgresql",
        "events_per_s",
    ),
    *(
        Target(
            f"T10 flush lag at the T2 rate ({backend})",
            "{bound}, beside durable payments",
            Bound("<", 1, " s"),
            "T2 HTTP reserve",
            _t10_lag_t2,
            (f"t8-pay-sale-{backend}", "http"),
            backend,
            "lag_max_s",
        )
        for backend in _BACKENDS
    ),
    *(
        Target(
            f"T10 flush lag at the T1 rate ({backend})",
            "{bound}",
            Bound("<", 2, " s"),
            "T1 engine reserve, 1,000 callers",
            _t10_lag_t1,
            (f"flush-lag-{backend}", "t1-reserve"),
            backend,
            "max_lag_s",
        )
        for backend in _BACKENDS
    ),
)


def target(name: str) -> Target:
    """The target of that row name (``"T2 reserve vs echo"``)."""
    for found in TARGETS:
        if found.name == name:
            return found
    raise KeyError(name)


def judge(target: Target, results: Results) -> Verdict:
    """``target`` judged from ``results``: met, NOT met, or not measured (with the reason)."""
    if target.judge is None:
        return Verdict(target, NO_BENCHMARK, target.baseline, UNMEASURED)
    if any(name not in results for name in target.needs):
        return Verdict(target, "", target.baseline, UNMEASURED)
    try:
        reading = target.judge(results, target)
    except NotMeasured as exc:
        return Verdict(target, str(exc), target.baseline, UNMEASURED)
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        return Verdict(target, f"unreadable result: {exc!r}", target.baseline, UNMEASURED)
    return Verdict(target, reading.measured, reading.baseline, MET if reading.ok else NOT_MET)


def verdicts(results: Results) -> list[Verdict]:
    """Every target, in order, judged from ``results``."""
    return [judge(t, results) for t in TARGETS]
