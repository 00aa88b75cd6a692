"""The verdict of a load run: SPEC section 6 invariants, SQL against Redis, durability of every
acknowledged payment, and the section 10 KPIs, for campaigns that have gone quiet.

No Locust here (it monkey-patches the process): the test suite calls ``judge`` directly on a
state it has broken on purpose, and ``python -m loadtests.run`` calls it after the run.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.audit import audit_campaign
from engine.core import Engine
from engine.keys import DEAD_LETTERS
from engine.reconcile import reconcile
from engine.scripts import guarded
from engine.stats import CampaignStats, campaign_stats
from engine.worker import FlushWorker

#: Order states whose orders were paid once: a refunded order was paid before.
PAID_ONCE = ("paid", "refunded")


@dataclass(slots=True)
class Check:
    """One verdict line: what was checked, whether it held, and what differed."""

    name: str
    ok: bool
    details: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Verdict:
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    def lines(self) -> list[str]:
        out = []
        for check in self.checks:
            out.append(f"  [{'PASS' if check.ok else 'FAIL'}] {check.name}")
            out += [f"         {line}" for line in check.details[:20]]
            if len(check.details) > 20:
                out.append(f"         ... and {len(check.details) - 20} more")
        out.append(f"verdict: {'PASS' if self.ok else 'FAIL'}")
        return out


@dataclass(frozen=True, slots=True)
class LocustCounts:
    """From Locust's final stats: acknowledged payments and unexpected answers."""

    acknowledged_paid: int
    failures: int
    requests: int


async def wait_flushed(engine: Engine, within: float) -> float | None:
    """Seconds until the flush worker has nothing left to flush; None if ``within`` passes."""
    worker = FlushWorker(engine.runtime)
    loop = asyncio.get_running_loop()
    start = loop.time()
    while (await worker.lag()).unflushed:
        if loop.time() - start > within:
            return None
        await asyncio.sleep(0.1)
    return loop.time() - start


async def judge(
    engine: Engine, campaign_ids: Sequence[str], counts: LocustCounts | None = None
) -> Verdict:
    """Check every invariant on quiet campaigns (after the load, with the outbox flushed)."""
    checks: list[Check] = []
    durable_paid = 0
    for campaign_id in campaign_ids:
        audit = await audit_campaign(engine.runtime, campaign_id)
        checks.append(
            Check(
                f"{campaign_id}: no oversell, no stock leak, per-user limits, no over-filled "
                "team (SPEC 6.1-6.3)",
                audit.ok,
                audit.violations,
            )
        )
        rec = await reconcile(engine.runtime, campaign_id)
        details = list(rec.differences)
        if rec.unflushed:
            details.append(f"{rec.unflushed} events still unflushed")
        checks.append(
            Check(
                f"{campaign_id}: SQL equals Redis, orders and teams per state (SPEC 6.4, 6.5)",
                rec.ok and not rec.unflushed,
                details,
            )
        )
        totals = await engine.runtime.store.order_totals(campaign_id)
        durable_paid += sum(t.orders for t in totals if t.state in PAID_ONCE)
    dead = int(await guarded(engine.runtime.redis.xlen(DEAD_LETTERS)))
    checks.append(
        Check(
            "no outbox event dead-lettered", dead == 0, [f"{dead} in {DEAD_LETTERS}"] * bool(dead)
        )
    )
    if counts is not None:
        checks.append(
            Check(
                f"every acknowledged payment is durable: {durable_paid} paid orders in SQL, "
                f"{counts.acknowledged_paid} payments acknowledged",
                durable_paid >= counts.acknowledged_paid,
            )
        )
        checks.append(
            Check(
                f"no unexpected answer (5xx, rejected request, transport error): {counts.failures} "
                f"of {counts.requests} requests",
                counts.failures == 0,
            )
        )
    return Verdict(checks)


@dataclass(frozen=True, slots=True)
class RequestStats:
    """One request name of a Locust run: counts and latency percentiles (ms)."""

    method: str
    name: str
    count: int
    failures: int
    p50: float
    p95: float
    p99: float
    max: float


def _percentile(histogram: Counter[float], q: float) -> float:
    """The q-quantile of Locust's rounded response-time histogram."""
    total = sum(histogram.values())
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= q * total:
            return value
    return 0.0


def _request_stats(method: str, name: str, entries: list[dict[str, Any]]) -> RequestStats:
    histogram: Counter[float] = Counter()
    for entry in entries:
        for value, n in entry["response_times"].items():
            histogram[float(value)] += n
    return RequestStats(
        method=method,
        name=name,
        count=sum(e["num_requests"] for e in entries),
        failures=sum(e["num_failures"] for e in entries),
        p50=_percentile(histogram, 0.5),
        p95=_percentile(histogram, 0.95),
        p99=_percentile(histogram, 0.99),
        max=max((float(e["max_response_time"] or 0) for e in entries), default=0.0),
    )


def read_locust_json(path: Path) -> tuple[list[RequestStats], LocustCounts]:
    """Locust's final stats (``--json-file``): per request name, then all requests, and the
    counts the verdict needs. Zero-time ``ACK`` entries count acknowledged payments."""
    entries: list[dict[str, Any]] = json.loads(path.read_text())
    real = [e for e in entries if e["method"] != "ACK"]
    rows = [_request_stats(e["method"], e["name"], [e]) for e in real]
    rows.sort(key=lambda r: (r.name, r.method))
    rows.append(_request_stats("", "all requests", real))
    counts = LocustCounts(
        acknowledged_paid=sum(e["num_requests"] for e in entries if e["method"] == "ACK"),
        failures=rows[-1].failures,
        requests=rows[-1].count,
    )
    return rows, counts


def request_table(rows: list[RequestStats], seconds: float) -> list[str]:
    """Per request: count, failures, rate, latency percentiles in ms."""
    head = f"  {'request':<22} {'count':>8} {'fails':>6} {'req/s':>8} {'p50':>6} {'p95':>6} "
    out = [head + f"{'p99':>6} {'max':>7}"]
    for r in rows:
        name = f"{r.method} {r.name}".strip()
        rate = r.count / seconds if seconds else 0.0
        out.append(
            f"  {name:<22} {r.count:>8} {r.failures:>6} {rate:>8.0f} {r.p50:>6.0f} "
            f"{r.p95:>6.0f} {r.p99:>6.0f} {r.max:>7.0f}"
        )
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:,.2f}{unit}"


def kpi_lines(stats: CampaignStats) -> list[str]:
    """SPEC section 10 KPIs of one campaign, as printed after a load run."""
    out = [f"  campaign {stats.campaign_id} ({stats.status})"]
    out.append(
        f"    {'item':<14} {'stock':>7} {'paid':>7} {'GMV':>12} {'AOV':>9} {'sold':>7} "
        f"{'sold out':>9} {'hold>paid':>9} {'expired':>8} {'cancel':>7}"
    )
    for item in stats.items:
        out.append(
            f"    {item.sku:<14} {item.initial:>7} {item.paid_orders:>7} {item.gmv:>12,} "
            f"{_num(item.average_order_value):>9} {_pct(item.sell_through):>7} "
            f"{_num(item.time_to_sell_out_s, ' s'):>9} {_pct(item.hold_to_paid):>9} "
            f"{_pct(item.hold_expiry_rate):>8} {item.cancellations:>7}"
        )
    rejections = ", ".join(f"{code} {n:,}" for code, n in stats.rejections.items()) or "none"
    out.append(f"    rejections by reason: {rejections}")
    if stats.teams is not None:
        t = stats.teams
        out.append(
            f"    teams: created {t.created}, opened {t.opened}, succeeded {t.succeeded}, "
            f"failed {t.failed}, dissolved {t.dissolved}, still open {t.open}, "
            f"success rate {_pct(t.success_rate)}, mean time to fill "
            f"{_num(t.mean_time_to_fill_s, ' s')}, joins per opened team "
            f"{_num(t.joins_per_opened_team)}"
        )
    return out


async def campaign_kpis(engine: Engine, campaign_id: str) -> list[str]:
    view = await engine.campaigns.get(campaign_id)
    return kpi_lines(await campaign_stats(engine.runtime, view))
