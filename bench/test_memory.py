"""T6: Redis memory per held order, and this process's memory over 1,000,000 requests.

Redis: ``INFO memory`` ``used_memory`` on an otherwise empty Redis before and after
100,000 holds (coalesced engine reservations), divided by the holds; measured with the
outbox stream still full (``with_outbox``) and after the flush worker moved it to SQLite and
trimmed it (``steady``: what a held order costs while it waits for payment, the number the
target is judged by). ``MEMORY USAGE`` of each of the campaign's keys (the idempotency
records are one hash) gives the breakdown; keyspace overhead is the rest. The engine's
connections are closed before each reading, so client buffers do not count.

Process: 1,000,000 successful reservations (1,000 coalesced callers, one item with enough
stock, a new user each), RSS sampled every 100,000 requests. Flat means: RSS grows by less
than FLAT_BYTES between the 200,000th request (pools, caches and the allocator warmed up)
and the last. Progress lines count the holds, and the requests at each RSS sample.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.harness import drive, fresh_engine, progress_line, redis_info, rss_bytes, run
from bench.report import report
from engine import Engine
from engine.keys import keys_of
from engine.local.redis_server import RedisServer
from engine.worker import FlushWorker
from testkit.factories import flash_campaign
from testkit.helpers import assert_invariants

HOLDS = 100_000
REQUESTS = 1_000_000
SAMPLE_EVERY = 100_000
CALLERS = 1_000
FLAT_BYTES = 16 * 1024 * 1024  # < 17 bytes per request over 800,000 requests
CID = "memory"
SKU = "sku-1"


def _used_memory(url: str) -> int:
    return int(redis_info(url, "memory")["used_memory"])


def _key_usage(url: str) -> dict[str, int]:
    """MEMORY USAGE (all samples) of each of the campaign's keys."""
    keys = keys_of(CID)
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        usage = {
            name: int(client.memory_usage(key, samples=0) or 0)
            for name, key in (
                ("orders", keys.orders),
                ("deadlines", keys.deadlines),
                ("users", keys.users),
                ("idempotency", keys.idem),
                ("outbox", keys.events),
            )
        }
        return usage
    finally:
        client.close()


async def _reserve_all(engine: Engine, count: int) -> None:
    async def reserve(n: int) -> bool:
        await engine.flash.reserve(CID, f"u{n}", SKU, 1, "k")
        return True

    m = await drive(
        reserve, CALLERS, seconds=3600, warmup=0, limit=count, progress=f"T6 {count:,} holds"
    )
    assert m.completed == count and m.rejected == 0


async def _redis_bytes(url: str, tmp: Path) -> list[dict[str, Any]]:
    async with fresh_engine(url, tmp, "t6-redis") as engine:
        now = await engine.runtime.now()
        await engine.campaigns.create(flash_campaign(now, CID, stock=HOLDS, limit=1))
        settings = engine.runtime.settings
    before = _used_memory(url)
    async with await Engine.open(settings) as engine:
        await _reserve_all(engine, HOLDS)
        await assert_invariants(engine, CID)
    await asyncio.sleep(0.2)
    with_outbox, full_usage = _used_memory(url), _key_usage(url)
    async with await Engine.open(settings) as engine:
        flushed = await FlushWorker(engine.runtime, name="bench").drain()
        assert flushed == HOLDS
        totals = await engine.runtime.store.order_totals(CID)
        assert [(t.state, t.orders) for t in totals] == [("held", HOLDS)]
    await asyncio.sleep(0.2)
    steady, usage = _used_memory(url), _key_usage(url)
    rows = []
    for phase, after, keys in (("with_outbox", with_outbox, full_usage), ("steady", steady, usage)):
        per_order = {name: size / HOLDS for name, size in keys.items()}
        named = sum(per_order.values())
        total = (after - before) / HOLDS
        rows.append(
            {
                "phase": phase,
                "holds": HOLDS,
                "bytes_per_hold": total,
                "orders_hash": per_order["orders"],
                "deadline_index": per_order["deadlines"],
                "user_counter": per_order["users"],
                "idempotency": per_order["idempotency"],
                "outbox": per_order["outbox"],
                "keyspace": total - named,
            }
        )
    return rows


@pytest.mark.benchmark
@pytest.mark.timeout(900)
def test_t6_redis_bytes_per_hold(redis_server: RedisServer, tmp_path: Path) -> None:
    rows = run(_redis_bytes(redis_server.url, tmp_path))
    report("t6-redis-memory", f"T6 Redis bytes per held order ({HOLDS:,} holds)", rows)


async def _process_memory(url: str, tmp: Path) -> list[dict[str, Any]]:
    samples: list[dict[str, Any]] = []
    async with fresh_engine(url, tmp, "t6-rss", coalesce=True, sold_out_ttl=0.5) as engine:
        now = await engine.runtime.now()
        await engine.campaigns.create(flash_campaign(now, CID, stock=REQUESTS, limit=1))
        numbers = itertools.count()
        bar = progress_line(f"T6 RSS over {REQUESTS:,} requests", REQUESTS, "requests")
        started = time.perf_counter()

        def sample(n: int) -> None:
            samples.append(
                {
                    "requests": n,
                    "rss_mib": rss_bytes() / 2**20,
                    "seconds": time.perf_counter() - started,
                }
            )
            bar.update(n, f"RSS {samples[-1]['rss_mib']:,.0f} MiB")

        sample(0)

        async def caller() -> None:
            while (n := next(numbers)) < REQUESTS:
                await engine.flash.reserve(CID, f"u{n}", SKU, 1, "k")
                if (n + 1) % SAMPLE_EVERY == 0:
                    sample(n + 1)

        await asyncio.gather(*(caller() for _ in range(CALLERS)))
        bar.close()
        view = await engine.campaigns.get(CID)
        assert view.stock[0].held == REQUESTS and view.stock[0].available == 0
    return samples


@pytest.mark.benchmark
@pytest.mark.timeout(1200)
def test_t6_process_memory_flat(redis_server: RedisServer, tmp_path: Path) -> None:
    samples = run(_process_memory(redis_server.url, tmp_path))
    samples.sort(key=lambda s: int(s["requests"]))
    base = next(s for s in samples if s["requests"] == 2 * SAMPLE_EVERY)
    growth = (samples[-1]["rss_mib"] - base["rss_mib"]) * 2**20
    for s in samples:
        s["growth_since_200k_mib"] = s["rss_mib"] - base["rss_mib"]
        s["flat"] = growth < FLAT_BYTES
    report("t6-process-memory", f"T6 process RSS over {REQUESTS:,} engine reservations", samples)
