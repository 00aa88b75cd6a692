"""T5: 100,000 held orders whose deadlines fall at one instant, all returned by the reaper.

The holds are made through the engine (coalesced reservations, 1,000 callers) with a long
hold; then every deadline is moved to one instant T a few seconds ahead (the packed record's
deadline field and the deadline index, as ``testkit/helpers.py age_order`` does, here in one
Lua call per chunk). The reaper's own loop (``Reaper.run``, the production interval of
0.2 s) is already running when T arrives. Measured, on the Redis clock: from T until the
last hold is expired and every unit is back on sale. Checked: every order expired exactly
once (one ``order.expired`` event each), the stock buckets add up. Progress lines count the
holds made, then the holds returned.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from bench.harness import drive, fresh_engine, progress_line, run
from bench.report import report
from engine import Engine
from engine.audit import audit_campaign
from engine.keys import keys_of
from engine.local.redis_server import RedisServer
from engine.models import OrderState, to_ms
from engine.settings import Settings
from testkit.factories import flash_campaign

HOLDS = 100_000
CALLERS = 1_000
CHUNK = 5_000
MARGIN_MS = 4_000  # T is this far ahead of the start of the deadline move
CID = "expiry"
SKU = "sku-1"

# Set the deadline of held orders (ARGV[2..]) to ARGV[1] ms, in the record and the index.
MOVE_DEADLINES = """
for i = 2, #ARGV do
  local id = ARGV[i]
  local raw = redis.call('HGET', KEYS[1], id)
  local f = {}
  for part in string.gmatch(raw .. '|', '([^|]*)|') do f[#f + 1] = part end
  f[7] = ARGV[1]
  redis.call('HSET', KEYS[1], id, table.concat(f, '|'))
  redis.call('ZADD', KEYS[2], ARGV[1], id)
end
return #ARGV - 1
"""


async def _redis_ms(engine: Engine) -> int:
    return to_ms(await engine.runtime.now())


async def _hold_all(engine: Engine) -> None:
    async def reserve(n: int) -> bool:
        await engine.flash.reserve(CID, f"u{n}", SKU, 1, "k")
        return True

    m = await drive(
        reserve, CALLERS, seconds=3600, warmup=0, limit=HOLDS, progress=f"T5 {HOLDS:,} holds"
    )
    assert m.completed == HOLDS and m.rejected == 0


async def _move_deadlines(engine: Engine, instant: int) -> None:
    keys = keys_of(CID)
    redis: Any = engine.runtime.redis
    ids: list[str] = await redis.zrange(keys.deadlines, 0, -1)
    assert len(ids) == HOLDS
    for i in range(0, len(ids), CHUNK):
        chunk = ids[i : i + CHUNK]
        moved = await redis.eval(MOVE_DEADLINES, 2, keys.orders, keys.deadlines, instant, *chunk)
        assert moved == len(chunk)


async def _expire(url: str, tmp: Path) -> dict[str, Any]:
    interval = Settings().reaper_interval  # the production default
    async with fresh_engine(url, tmp, "t5", coalesce=True, reaper_interval=interval) as engine:
        now = await engine.runtime.now()
        await engine.campaigns.create(
            flash_campaign(now, CID, stock=HOLDS, limit=1, hold_seconds=3600)
        )
        await _hold_all(engine)
        keys = keys_of(CID)
        redis: Any = engine.runtime.redis
        instant = await _redis_ms(engine) + MARGIN_MS
        await _move_deadlines(engine, instant)
        assert await _redis_ms(engine) < instant, "moving the deadlines took past T: raise MARGIN"

        stop = asyncio.Event()
        reaper = asyncio.create_task(engine.reaper.run(stop))
        returned = progress_line("T5 holds returned by the reaper", HOLDS, "holds")
        try:
            first = last = 0
            while True:
                left = int(await redis.zcard(keys.deadlines))
                now_ms = await _redis_ms(engine)
                # at most a few lines a second, whatever the polling
                returned.update(HOLDS - left, "expiring" if now_ms >= instant else "waiting for T")
                if left < HOLDS and not first:
                    first = now_ms  # the reaper's first expiry seen
                if left == 0:
                    last = now_ms
                    break
                assert now_ms < instant + 120_000, f"{left} holds still held 2 minutes after T"
                await asyncio.sleep(0.005)
        finally:
            returned.close()
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper

        audit = await audit_campaign(engine.runtime, CID)
        assert audit.ok, audit.violations[:10]
        assert audit.orders == {OrderState.EXPIRED: HOLDS}
        view = await engine.campaigns.get(CID)
        assert view.stock[0].available == HOLDS and view.stock[0].held == 0
        entries = int(await redis.xlen(keys.events))
        assert entries == 2 * HOLDS, f"{entries} events: not one reserve + one expiry per order"
        return {
            "holds": HOLDS,
            "reaper_interval_s": interval,
            "reaper_batch": engine.runtime.settings.reaper_batch,
            "first_return_after_s": (first - instant) / 1000,
            "all_returned_after_s": (last - instant) / 1000,
            "returned_per_s": HOLDS / max((last - first) / 1000, 1e-3),
        }


@pytest.mark.benchmark
@pytest.mark.timeout(900)
def test_t5_mass_expiry(redis_server: RedisServer, tmp_path: Path) -> None:
    row = run(_expire(redis_server.url, tmp_path))
    report("t5-reaper", f"T5 {HOLDS:,} holds expiring at one instant", [row])
