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

from pathlib import Path
from typing import Any

import pytest

from bench.harness import fresh_engine, run, rush
from bench.report import report
from engine.audit import audit_campaign
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
        sale = await rush(engine, CID, SKU, USERS, CALLERS, f"T7 {USERS:,} users")
        view = await engine.campaigns.get(CID)
        item = view.stock[0]
        audit = await audit_campaign(engine.runtime, CID)
        assert audit.ok, audit.violations[:10]
        assert (sale.sold, sale.rejected) == (STOCK, USERS - STOCK)
        assert item.available == 0 and item.held == STOCK and item.paid == 0
        assert audit.orders == {OrderState.HELD: STOCK}
        assert audit.units == {OrderState.HELD: STOCK}
        assert item.sold_out_at is not None
        return {
            "users": USERS,
            "stock": STOCK,
            "sold": sale.sold,
            "rejected": sale.rejected,
            "oversold": max(0, -item.available) + max(0, sale.sold - STOCK),
            "sold_out_after_s": (to_ms(item.sold_out_at) - sale.first_ms) / 1000,
            "all_answered_after_s": sale.elapsed,
            "requests_per_s": USERS / sale.elapsed,
            "peak_rss_mib": sale.peak_rss / 2**20,
        }


@pytest.mark.benchmark
@pytest.mark.timeout(1200)
def test_t7_one_million_users(redis_server: RedisServer, tmp_path: Path) -> None:
    row = run(_sell_out(redis_server.url, tmp_path))
    report("t7-scale", f"T7 {USERS:,} users against {STOCK:,} units (coalesced engine)", [row])
