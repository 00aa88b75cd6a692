"""T6: Redis memory stays flat however many sales run, because finished campaigns are archived.

30 campaigns of 10,000 orders each run one after another on one Redis and one SQLite file
(the `flashteam run` defaults), alternately flash and team, with orders in every state:

- flash: 10,000 shoppers hold one unit each; 70% pay (one in ten of those refunded after,
  half with restock), 15% cancel, 15% let the hold expire (the reaper ends them); the
  campaign then ends on its own;
- team (teams of 4): 2,500 leaders open a team, 2,250 of them pay (the other teams dissolve
  when their leader's hold expires); 7,500 shoppers quick-join the open teams and 80% pay;
  the merchant then invalidates the campaign (full teams have succeeded, the others fail and
  refund their paid seats).

Each campaign is flushed to SQL and archived (``Archiver.archive``: sealed, compared record by
record, recorded, its keys UNLINKed one by one). ``INFO memory`` ``used_memory`` is read with
the engine's connections closed and Redis's lazy frees done, before the first campaign (the
baseline) and after each archival; the target is each reading within 5% of the baseline.

Redis keeps about 0.7 MB it allocates the first time scripts run a sale (whatever its size:
seen the same after a campaign of 10 orders and of 1,000; buffers that stay with the server,
not keys), so the baseline is read after a warm-up campaign of 1,000 orders that lived and was
archived the same way; the reading before it (``cold_baseline``) is reported too, so the
one-time step shows. Redis's slow log (a bounded buffer of its slowest commands) is emptied
before each reading. Reported per campaign: the reading, its ratio to the baseline, what the
campaign held at its peak (before archival), the archival's time and its slowest command (the
longest pause an UNLINK caused, measured as the command's round trip).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.harness import drive, flush_redis, redis_info, run
from bench.report import report
from engine import Engine
from engine.keys import keys_of
from engine.local.redis_server import RedisServer
from engine.scripts import guarded
from engine.worker import FlushWorker
from testkit.factories import flash_campaign, make_settings, team_campaign
from testkit.helpers import age_order, until

CAMPAIGNS = 30
ORDERS = 10_000
TEAM_SIZE = 4
CALLERS = 500
FLASH_LASTS = 8.0  # seconds a flash campaign sells; it ends on its own
HOUR_MS = 3_600_000


def _used_memory(url: str) -> int:
    """``used_memory`` once Redis has no lazy free left to do, without the slow log.

    The slow log keeps Redis's 128 slowest recent commands with their arguments (up to ~5 KB
    each, the reaper's 500-hold expiry steps among them): a diagnostic buffer that fills up to
    its bound whatever the data, so it is emptied before each reading."""
    client = redis.Redis.from_url(url)
    try:
        client.slowlog_reset()
    finally:
        client.close()
    deadline = time.monotonic() + 30
    while True:
        info = redis_info(url, "memory")
        if not int(info.get("lazyfree_pending_objects", 0)) or time.monotonic() > deadline:
            return int(info["used_memory"])
        time.sleep(0.05)


async def _each(concurrency: int, items: list[Any], op: Any) -> None:
    """``op(item)`` for every item, ``concurrency`` at a time."""
    queue = iter(items)

    async def worker() -> None:
        for item in queue:
            await op(item)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _flash(engine: Engine, cid: str, orders: int = ORDERS) -> None:
    now = await engine.runtime.now()
    campaign = flash_campaign(now, cid, stock=orders, limit=1, hold_seconds=3600, lasts=FLASH_LASTS)
    await engine.campaigns.create(campaign)

    async def reserve(n: int) -> bool:
        await engine.flash.reserve(cid, f"u{n}", "sku-1", 1, "k")
        return True

    held = await drive(reserve, CALLERS, seconds=3600, warmup=0, limit=orders)
    assert held.completed == orders and held.rejected == 0
    records: dict[str, str] = await guarded(engine.runtime.redis.hgetall(keys_of(cid).orders))
    owners = {i: r.split("|", 1)[0] for i, r in records.items()}  # the record's first field
    order = sorted(owners)
    paying, cancelling = order[: orders * 7 // 10], order[orders * 7 // 10 : orders * 17 // 20]
    expiring = order[orders * 17 // 20 :]

    async def pay(order_id: str) -> None:
        await engine.orders.pay(order_id, owners[order_id], f"p-{order_id}")

    await _each(CALLERS, paying, pay)
    await _each(CALLERS, cancelling, lambda o: engine.orders.cancel(o, owners[o]))
    for n, order_id in enumerate(paying[::10]):
        await engine.orders.refund(order_id, restock=n % 2 == 0)
    for order_id in expiring:
        await age_order(engine, order_id, HOUR_MS)
    await engine.reaper.run_once()
    await until(engine.runtime.now, campaign.ends_at, within=60)


async def _team(engine: Engine, cid: str) -> None:
    now = await engine.runtime.now()
    campaign = team_campaign(
        now, cid, stock=ORDERS, limit=1, hold_seconds=3600, team_size=TEAM_SIZE
    )
    await engine.campaigns.create(campaign)
    leaders = ORDERS // TEAM_SIZE
    opened: list[tuple[str, str]] = []

    async def open_team(n: int) -> None:
        seat = await engine.teams.open(cid, f"l{n}", "sku-1", 1, "k")
        opened.append((seat.order.order_id, f"l{n}"))

    await _each(CALLERS, list(range(leaders)), open_team)
    paying = opened[: leaders * 9 // 10]
    await _each(CALLERS, paying, lambda o: engine.orders.pay(o[0], o[1], f"p-{o[0]}"))
    for order_id, _ in opened[len(paying) :]:
        await age_order(engine, order_id, HOUR_MS)
    await engine.reaper.run_once()
    joined: list[tuple[str, str]] = []

    async def quick(n: int) -> None:
        seat = await engine.teams.quick_join(cid, f"j{n}", "sku-1", "k")
        joined.append((seat.order.order_id, f"j{n}"))

    await _each(CALLERS, list(range(ORDERS - leaders)), quick)
    members = joined[: len(joined) * 8 // 10]
    await _each(CALLERS, members, lambda o: engine.orders.pay(o[0], o[1], f"p-{o[0]}"))
    await engine.campaigns.invalidate(cid)


async def _campaigns(url: str, tmp: Path) -> list[dict[str, Any]]:
    flush_redis(url)
    settings = make_settings(url, tmp)  # SQLite in tmp; the test suite's quick reaper
    async with await Engine.open(settings):
        pass  # schema created, scripts loaded
    cold_baseline = _used_memory(url)
    async with await Engine.open(settings) as engine:
        await _flash(engine, "t6-warm-up", orders=1_000)
        await FlushWorker(engine.runtime, name="bench").drain()
        assert (await engine.archiver.archive("t6-warm-up")).archived
    baseline = _used_memory(url)
    rows: list[dict[str, Any]] = []
    for n in range(1, CAMPAIGNS + 1):
        kind = "flash" if n % 2 else "team"
        cid = f"t6-{n}"
        async with await Engine.open(settings) as engine:
            if kind == "flash":
                await _flash(engine, cid)
            else:
                await _team(engine, cid)
            await FlushWorker(engine.runtime, name="bench").drain()
            peak = int(redis_info(url, "memory")["used_memory"])
            orders = len(await engine.runtime.store.campaign_orders(cid))
            done = await engine.archiver.archive(cid)
            assert done.archived, (done.reason, done.differences[:10])
            assert not await engine.runtime.redis.exists(*keys_of(cid).order_keys)
        used = _used_memory(url)
        rows.append(
            {
                "campaign": n,
                "kind": kind,
                "orders": orders,
                "peak_used_memory_mib": peak / 2**20,
                "used_memory_after_archival": used,
                "vs_baseline": used / baseline,
                "baseline": baseline,
                "cold_baseline": cold_baseline,
                "archive_s": done.seconds,
                "keys_deleted": done.keys,
                "longest_command_ms": done.longest_ms,
            }
        )
        print(f"  campaign {n}/{CAMPAIGNS} ({kind}) archived: used_memory {used / baseline:.3f}x")
    return rows


@pytest.mark.benchmark
@pytest.mark.timeout(1800)
def test_t6_redis_memory_after_archival(redis_server: RedisServer, tmp_path: Path) -> None:
    rows = run(_campaigns(redis_server.url, tmp_path))
    report(
        "t6-archival",
        f"T6 Redis memory over {CAMPAIGNS} campaigns of {ORDERS:,} orders, each archived",
        rows,
    )
