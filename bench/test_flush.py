"""T4: flush throughput per backend, in outbox events per second, per batch size.

One template stream of real events (reservations, then their payments) is produced once by
the engine; each measurement restores a copy of it (DUMP/RESTORE) and times a fresh flush
worker draining it into a fresh database. The baseline, run side by side, is the same worker
with a store that writes nothing: what reading, decoding and acknowledging costs on their own.
``sql_share`` is the part of the flush time spent in the SQL write.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bench.report import report
from engine import Engine
from engine.keys import keys_of
from engine.local.postgres import PostgresServer
from engine.local.redis_server import RedisServer
from engine.store import Batch, open_store
from engine.worker import FlushWorker
from testkit.factories import create_database, flash_campaign, make_settings

ORDERS = 10_000  # -> 20,000 events: order.reserved + order.paid
BATCHES = (100, 1_000, 5_000)


class DiscardStore:
    """The baseline's store: accepts every batch and keeps nothing."""

    async def apply(self, batch: Batch) -> None:
        return None

    async def close(self) -> None:
        return None


async def _produce(engine: Engine) -> int:
    now = await engine.runtime.now()
    await engine.campaigns.create(flash_campaign(now, "bench", stock=ORDERS, limit=1))
    sem = asyncio.Semaphore(200)

    async def shopper(n: int) -> None:
        async with sem:
            held = await engine.flash.reserve("bench", f"u{n}", "sku-1", 1, "k")
            await engine.orders.pay(held.order.order_id, f"u{n}", f"p-{held.order.order_id}")

    await asyncio.gather(*(shopper(n) for n in range(ORDERS)))
    return int(await engine.runtime.redis.xlen(keys_of("bench").events))


async def _flush_once(engine: Engine, template: bytes, store: Any, batch: int) -> float:
    stream = keys_of("bench").events
    raw: Any = engine.runtime.redis
    await raw.execute_command("RESTORE", stream, 0, template, "REPLACE")
    rt = dataclasses.replace(
        engine.runtime, store=store, settings=engine.runtime.settings.with_(flush_batch=batch)
    )
    worker = FlushWorker(rt, name=f"bench-{batch}")
    started = time.perf_counter()
    await worker.drain()
    return time.perf_counter() - started


async def _fresh_url(request: pytest.FixtureRequest, database_url: str, tmp: Path, n: int) -> str:
    """An empty database of the same backend for each measurement."""
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp / f'flush-{n}.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.url_for(await create_database(server))


async def _dump(url: str, key: str) -> bytes:
    raw = aioredis.Redis.from_url(url)  # DUMP's payload is binary: no decoding
    try:
        payload: bytes | None = await raw.dump(key)
        assert payload is not None, f"{key} is missing"
        return payload
    finally:
        await raw.aclose()


@pytest.mark.benchmark
@pytest.mark.timeout(900)
async def test_flush_throughput(
    request: pytest.FixtureRequest,
    redis_server: RedisServer,
    redis: aioredis.Redis,
    database_url: str,
    tmp_path: Path,
) -> None:
    settings = make_settings(redis_server.url, tmp_path, database_url=database_url)
    backend = database_url.split(":")[0]
    rows: list[dict[str, Any]] = []
    async with await Engine.open(settings) as engine:
        events = await _produce(engine)
        template = await _dump(redis_server.url, keys_of("bench").events)
        for batch in BATCHES:
            url = await _fresh_url(request, database_url, tmp_path, batch)
            store = await open_store(settings.with_(database_url=url))
            try:
                sql = await _flush_once(engine, template, store, batch)
                # Every order landed once, in its final state.
                totals = await store.order_totals("bench")
                assert [(t.state, t.orders) for t in totals] == [("paid", ORDERS)]
            finally:
                await store.close()
            baseline = await _flush_once(engine, template, DiscardStore(), batch)
            rows.append(
                {
                    "backend": backend,
                    "batch": batch,
                    "events": events,
                    "events_per_s": events / sql,
                    "baseline_per_s": events / baseline,
                    "sql_share": 1 - baseline / sql,
                }
            )
    report(f"flush-{backend}", f"T4 flush throughput ({backend}, {events:,} events)", rows)
