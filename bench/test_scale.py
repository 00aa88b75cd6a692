"""T7: 1,000,000 shoppers against 100,000 units sell out exactly, with zero oversell.

Every shopper reserves one unit once (per-user limit 1), 1,000 at a time, through the engine
with its defaults: request coalescing on, the sold-out fast path at 0.5 s. Asserted: exactly
100,000 reservations succeed and 900,000 are rejected ``sold_out``; the audit finds the stock
buckets whole (available 0 + held 100,000 == stock) and one held unit per successful user.
Reported: the time to sell out (Redis' own sold-out mark, from the first request), the time
for all 1,000,000 answers, and this process's RSS along the way. A progress line counts the
answers twice a second (from the event loop, not the shoppers).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from bench.harness import fresh_engine, progress_line, rss_bytes, run
from bench.progress import ticking
from bench.report import report
from engine.audit import audit_campaign
from engine.errors import SoldOut
from engine.local.redis_server import RedisServer
from engine.models import OrderState, to_ms
from testkit.factories import flash_campaign

USERS = 1_000_000
STOCK = 100_000
CALLERS = 1_000
CID = "scale"
SKU = "sku-1"


async def _sell_out(url: str, tmp: Path) -> dict[str, Any]:
    async with fresh_engine(url, tmp, "t7", coalesce=True, sold_out_ttl=0.5) as engine:
        now = await engine.runtime.now()
        await engine.campaigns.create(flash_campaign(now, CID, stock=STOCK, limit=1))
        numbers = itertools.count()
        sold = rejected = 0
        peak_rss = rss_bytes()

        async def shopper() -> None:
            nonlocal sold, rejected, peak_rss
            while (n := next(numbers)) < USERS:
                try:
                    await engine.flash.reserve(CID, f"u{n}", SKU, 1, "k")
                    sold += 1
                except SoldOut:
                    rejected += 1
                if n % 100_000 == 0:
                    peak_rss = max(peak_rss, rss_bytes())

        bar = progress_line(f"T7 {USERS:,} users", USERS, "answers")
        async with ticking(bar, lambda: sold + rejected):
            first_ms = to_ms(await engine.runtime.now())
            started = time.perf_counter()
            await asyncio.gather(*(shopper() for _ in range(CALLERS)))
            elapsed = time.perf_counter() - started
        view = await engine.campaigns.get(CID)
        item = view.stock[0]
        audit = await audit_campaign(engine.runtime, CID)
        assert audit.ok, audit.violations[:10]
        assert sold == STOCK and rejected == USERS - STOCK, (sold, rejected)
        assert item.available == 0 and item.held == STOCK and item.paid == 0
        assert audit.orders == {OrderState.HELD: STOCK}
        assert audit.units == {OrderState.HELD: STOCK}
        assert item.sold_out_at is not None
        return {
            "users": USERS,
            "stock": STOCK,
            "sold": sold,
            "rejected": rejected,
            "oversold": max(0, -item.available) + max(0, sold - STOCK),
            "sold_out_after_s": (to_ms(item.sold_out_at) - first_ms) / 1000,
            "all_answered_after_s": elapsed,
            "requests_per_s": USERS / elapsed,
            "peak_rss_mib": peak_rss / 2**20,
        }


@pytest.mark.benchmark
@pytest.mark.timeout(1200)
def test_t7_one_million_users(redis_server: RedisServer, tmp_path: Path) -> None:
    row = run(_sell_out(redis_server.url, tmp_path))
    report("t7-scale", f"T7 {USERS:,} users against {STOCK:,} units (coalesced engine)", [row])
