"""The verdict of a load run: the invariants (docs/invariants.md), SQL against Redis, durability
of every acknowledged payment, the health of the run itself, and the KPIs (docs/kpis.md).

No Locust here (it monkey-patches the process): the test suite calls ``judge`` directly on a
state it has broken on purpose, and ``python -m loadtests.run`` calls it after the run, once
the holds and teams of the sale have ended and the outbox is flushed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.audit import audit_campaign
from engine.core import Engine
from engine.keys import DEAD_LETTERS
from engine.models import OrderState
from engine.reconcile import reconcile
from engine.scripts import guarded
from engine.stats import CampaignStats, campaign_stats
from loadtests.plan import CATEGORIES

#: What an acknowledged payment may have become since: paid, or refunded (a failed team).
PAID_ONCE = (OrderState.PAID, OrderState.REFUNDED)


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


@dataclass(slots=True)
class LoadTally:
    """What the load generator saw (the locustfile's tally): answers counted as
    ``request|category|detail``, and every order whose payment was acknowledged."""

    outcomes: Counter[str] = field(default_factory=Counter)
    acknowledged: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> LoadTally:
        data = json.loads(path.read_text())
        return cls(Counter(data["outcomes"]), list(data["acknowledged"]))

    def rows(self) -> list[tuple[str, str, str, int]]:
        """(request, category, detail, count) of every outcome, sorted."""
        rows = []
        for key, n in self.outcomes.items():
            request, category, detail = key.split("|", 2)
            rows.append((request, category, detail, n))
        return sorted(rows)

    def count(self, category: str, request: str | None = None) -> int:
        return sum(n for r, c, _, n in self.rows() if c == category and request in (None, r))

    def of(self, *categories: str) -> list[str]:
        """``"<request> <detail>: <n>"`` for every outcome in one of ``categories``."""
        return [f"{r} {d}: {n}" for r, c, d, n in self.rows() if c in categories]

    def lines(self) -> list[str]:
        """Answers per request by category, business codes spelled out."""
        by_request: dict[str, dict[str, list[tuple[str, int]]]] = {}
        for r, c, d, n in self.rows():
            by_request.setdefault(r, {}).setdefault(c, []).append((d, n))
        out = []
        for request, found in by_request.items():
            parts = []
            for c in (c for c in CATEGORIES if c in found):
                if c == "business":
                    parts += [f"{d} {n:,}" for d, n in found[c]]
                else:
                    parts.append(f"{c} {sum(n for _, n in found[c]):,}")
            out.append(f"  {request:<12} " + ", ".join(parts))
        return out


async def dead_letters(engine: Engine) -> int:
    return int(await guarded(engine.runtime.redis.xlen(DEAD_LETTERS)))


async def judge(
    engine: Engine,
    campaign_ids: Sequence[str],
    tally: LoadTally | None = None,
    dead_before: int = 0,
) -> Verdict:
    """Check every invariant on quiet campaigns (holds and teams ended, outbox flushed), and,
    given the load generator's ``tally``, the durability of each acknowledged payment and the
    health of the run. ``dead_before``: dead letters already there when the run began."""
    checks: list[Check] = []
    for campaign_id in campaign_ids:
        audit = await audit_campaign(engine.runtime, campaign_id)
        checks.append(
            Check(
                f"{campaign_id}: no oversell, no stock leak, per-user limits, no over-filled "
                "team (invariants I1-I3)",
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
                f"{campaign_id}: SQL equals Redis, orders and teams per state (invariants I4, I5)",
                rec.ok and not rec.unflushed,
                details,
            )
        )
    dead = await dead_letters(engine) - dead_before
    checks.append(
        Check(
            f"no outbox event dead-lettered during the run ({dead} new in {DEAD_LETTERS})", not dead
        )
    )
    if tally is not None:
        checks += await _load_checks(engine, tally)
    return Verdict(checks)


async def _load_checks(engine: Engine, tally: LoadTally) -> list[Check]:
    store = engine.runtime.store
    lost = []
    for order_id in tally.acknowledged:
        order = await store.get_order(order_id)
        if order is None or order.state not in PAID_ONCE:
            lost.append(f"{order_id}: {'missing' if order is None else order.state.value} in SQL")
    held = tally.count("ok", "reserve")
    wrong = tally.count("unexpected") + tally.count("server_error")
    transport = tally.count("transport")
    shed = tally.count("shed")
    return [
        Check(
            f"every acknowledged payment is a paid (or refunded) order in SQL: "
            f"{len(tally.acknowledged) - len(lost)} of {len(tally.acknowledged)}",
            not lost,
            lost,
        ),
        Check(
            f"the load reached the engine: {held} reservations held, "
            f"{len(tally.acknowledged)} payments acknowledged",
            held > 0 and bool(tally.acknowledged),
        ),
        Check(
            f"no server error, no unexpected or malformed answer, no task exception: {wrong}"
            + (f" (shed under overload, a capacity finding: {shed})" if shed else "")
            + (f" (transport errors, a capacity finding: {transport})" if transport else ""),
            wrong == 0,
            tally.of("unexpected", "server_error"),
        ),
    ]


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


def read_locust_json(path: Path) -> list[RequestStats]:
    """Locust's final stats (``--json-file``): one row per request name, then all requests."""
    entries: list[dict[str, Any]] = json.loads(path.read_text())
    rows = [_request_stats(e["method"], e["name"], [e]) for e in entries]
    rows.sort(key=lambda r: (r.name, r.method))
    rows.append(_request_stats("", "all requests", entries))
    return rows


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
    """The KPIs of one campaign (docs/kpis.md), as printed after a load run."""
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
            f"    teams: created {t.created}, opened {t.opened}, succeeded {t.succeeded} "
            f"(full {t.filled}, automatically {t.auto_succeeded} lacking "
            f"{t.auto_unfilled_seats} seats), failed {t.failed}, dissolved {t.dissolved}, "
            f"still open {t.open}, success rate {_pct(t.success_rate)}, mean time to fill "
            f"{_num(t.mean_time_to_fill_s, ' s')}, joins per opened team "
            f"{_num(t.joins_per_opened_team)}"
        )
    return out


async def campaign_kpis(engine: Engine, campaign_id: str) -> list[str]:
    view = await engine.campaigns.get(campaign_id)
    return kpi_lines(await campaign_stats(engine.runtime, view))
