"""T4 lag: how far SQL trails Redis while reservations arrive at the T2 rate.

An open-loop producer in this process reserves at ``RATE`` per second for ``SECONDS`` (the
HTTP reserve rate T2 measures on this machine is 8,000-11,000/s, so 15,000/s is above it;
the report checks that against the T2 figure of the same run); a real ``flashteam worker``
process flushes into SQLite or PostgreSQL meanwhile. Every 100 ms the age of the oldest
unflushed outbox entry is sampled (``FlushWorker.lag``). Reported: the rate reached, the
maximum and 99th percentile lag, and how long the outbox took to empty after the last
reservation.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bench.harness import percentile
from bench.report import report
from engine import Engine
from engine.local.redis_server import RedisServer
from engine.worker import FlushWorker
from testkit.factories import flash_campaign, make_settings

RATE = 15_000  # reservations (outbox events) per second
SECONDS = 20.0
TICK = 0.01
MAX_IN_FLIGHT = 5_000


async def _produce(engine: Engine, stop_at: float) -> int:
    """Reserve at RATE until ``stop_at`` (open loop: requests are sent on schedule, not when
    the previous ones return, up to MAX_IN_FLIGHT outstanding). Returns those that succeeded."""
    issued = done = 0
    in_flight: set[asyncio.Task[Any]] = set()
    begin = time.perf_counter()

    def finished(task: asyncio.Task[Any]) -> None:
        nonlocal done
        in_flight.discard(task)
        done += task.exception() is None

    while (now := time.perf_counter()) < stop_at:
        due = int((now - begin) * RATE) - issued
        for _ in range(max(0, min(due, MAX_IN_FLIGHT - len(in_flight)))):
            task = asyncio.create_task(engine.flash.reserve("lag", f"u{issued}", "sku-1", 1, "k"))
            task.add_done_callback(finished)
            in_flight.add(task)
            issued += 1
        await asyncio.sleep(TICK)
    await asyncio.gather(*in_flight, return_exceptions=True)
    return done


@pytest.mark.benchmark
@pytest.mark.timeout(300)
async def test_flush_lag_at_t2_rate(
    redis_server: RedisServer, redis: aioredis.Redis, database_url: str, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, tmp_path, database_url=database_url)
    backend = database_url.split(":")[0]
    env = {
        **os.environ,
        "FLASHTEAM_REDIS_URL": redis_server.url,
        "FLASHTEAM_DATABASE_URL": database_url,
        "FLASHTEAM_DATA_DIR": str(tmp_path),
    }
    async with await Engine.open(settings) as engine:
        now = await engine.runtime.now()
        stock = int(RATE * SECONDS * 2)
        await engine.campaigns.create(flash_campaign(now, "lag", stock=stock, limit=1))
        worker = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "engine.cli", "worker"),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            probe = FlushWorker(engine.runtime)
            # The worker is up and flushing before the clock starts.
            await asyncio.gather(
                *(engine.flash.reserve("lag", f"warm{n}", "sku-1", 1, "k") for n in range(100))
            )
            assert await probe.wait_flushed(60) is not None
            samples: list[float] = []
            started = time.perf_counter()
            producer = asyncio.create_task(_produce(engine, started + SECONDS))
            while not producer.done():
                samples.append((await probe.lag()).oldest_ms / 1000)
                await asyncio.sleep(0.1)
            reserved = await producer
            produced_s = time.perf_counter() - started
            drained_after = await probe.wait_flushed(120)
            assert drained_after is not None, "the worker did not catch up within 120 s"
        finally:
            worker.terminate()
            await worker.wait()
        totals = await engine.runtime.store.order_totals("lag")
        assert sum(t.orders for t in totals) == reserved + 100  # every reservation reached SQL
    report(
        f"flush-lag-{backend}",
        f"T4 flush lag at {RATE:,}/s reservations ({backend})",
        [
            {
                "backend": backend,
                "target_per_s": RATE,
                "reserved_per_s": reserved / produced_s,
                "seconds": SECONDS,
                "max_lag_s": max(samples),
                "p99_lag_s": percentile(samples, 99),
                "mean_lag_s": sum(samples) / len(samples),
                "drained_after_s": drained_after,
            }
        ],
    )
