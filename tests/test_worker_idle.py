"""What idle flush workers cost and leave behind (engine/worker.py): an idle stream is
skipped with one XLEN (no read, no claim, on a Cluster no COMMAND GETKEYS), a dead consumer
is removed from the group once its entries are claimed, and `drain` leaves nothing behind."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from engine import Engine
from engine.keys import keys_of
from engine.worker import GROUP, FlushWorker
from testkit.factories import flash_campaign


async def _calls(redis: aioredis.Redis, *commands: str) -> dict[str, int]:
    stats: dict[str, Any] = await redis.info("commandstats")
    return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands}


async def _consumers(redis: aioredis.Redis, stream: str) -> set[str]:
    return {str(c["name"]) for c in await redis.xinfo_consumers(stream, GROUP)}


async def test_idle_streams_cost_no_read_and_no_claim(
    engine: Engine, redis: aioredis.Redis
) -> None:
    """Two workers over 10 streams emptied by a flush, for as many passes as they make in a
    second: not one XREADGROUP, XAUTOCLAIM or COMMAND GETKEYS, and one XLEN per stream per
    pass at most."""
    now = await engine.runtime.now()
    for n in range(10):
        await engine.campaigns.create(flash_campaign(now, f"idle{n}"))
        await engine.flash.reserve(f"idle{n}", "u", "sku-1", 1, "k")
    await FlushWorker(engine.runtime).drain()
    watched = ("xreadgroup", "xautoclaim", "command|getkeys", "xlen")
    before = await _calls(redis, *watched)
    stop = asyncio.Event()
    workers = [FlushWorker(engine.runtime, name=f"idle-{n}") for n in range(2)]
    running = [asyncio.create_task(w.run(stop)) for w in workers]
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*running)
    after = await _calls(redis, *watched)
    spent = {c: after[c] - before[c] for c in watched}
    assert spent["xreadgroup"] == spent["xautoclaim"] == spent["command|getkeys"] == 0, spent
    # Passes at 50, 100, 200, 400 ms and then every 500 ms: at most 6 in a second per worker.
    assert 0 < spent["xlen"] <= 2 * 6 * 10, spent


async def test_a_dead_consumer_is_removed_once_its_entries_are_claimed(
    engine: Engine, redis: aioredis.Redis
) -> None:
    """A consumer read entries and died before acknowledging them; a worker (claim_idle
    0.2 s) claims and flushes them, then removes the dead consumer, and its own drain leaves
    the group too: no consumer is left."""
    settings = engine.runtime.settings.with_(claim_idle=0.2)
    async with await Engine.open(settings) as patient:
        await patient.campaigns.create(flash_campaign(await patient.runtime.now(), "dead"))
        held = await patient.flash.reserve("dead", "u", "sku-1", 1, "k")
        stream = keys_of("dead").events
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
        await redis.xreadgroup(GROUP, "dead-worker", {stream: ">"})
        pending = await redis.xpending(stream, GROUP)
        assert pending["pending"] == 1, "the dead consumer holds the entry"
        assert await _consumers(redis, stream) == {"dead-worker"}
        await FlushWorker(patient.runtime, name="survivor").drain()
        assert await patient.runtime.store.get_order(held.order.order_id) == held.order
        assert await _consumers(redis, stream) == set()


async def test_drain_leaves_its_consumer_behind_nowhere(
    engine: Engine, redis: aioredis.Redis
) -> None:
    now = await engine.runtime.now()
    streams = []
    for n in range(3):
        await engine.campaigns.create(flash_campaign(now, f"drained{n}"))
        await engine.flash.reserve(f"drained{n}", "u", "sku-1", 1, "k")
        streams.append(keys_of(f"drained{n}").events)
    await FlushWorker(engine.runtime, name="one-shot").drain()
    for stream in streams:
        assert await _consumers(redis, stream) == set()
