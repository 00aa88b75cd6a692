"""SIGKILL of an engine process at random moments while it moves stock between the buckets of
a sharded campaign (engine/shards.py), on the suite's 3-master Redis Cluster: after every kill
the stock is conserved exactly (each bucket's stock buckets add up to its share, and the
shares plus the units of transfers not yet credited equal the initial stock: the audit), and
once a new process has finished the pending transfers nothing is in transit and every unit is
on sale or held."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import sys
from pathlib import Path

import pytest

from engine import Engine
from engine.keys import keys_of
from engine.shards import finish_pending, in_transit
from testkit.factories import flash_campaign, make_settings
from testkit.helpers import assert_invariants, reap

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[1]
STOCK = 300


async def _run_until_killed(env: dict[str, str], rng: random.Random) -> int:
    """Start the mover, let it make some steps, SIGKILL it at a random moment; its steps."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.shard_mover",
        "crash",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    steps = 0
    try:
        while steps < 20:  # warmed up: it moves stock now
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line, (await process.stderr.read()).decode() if process.stderr else ""
            steps += 1
        await asyncio.sleep(rng.uniform(0.0, 0.3))
    finally:
        await reap(process)
    return steps


async def test_sigkill_during_transfers_conserves_stock(
    cluster_engine: Engine, tmp_path: Path
) -> None:
    engine = cluster_engine
    now = await engine.runtime.now()
    campaign = dataclasses.replace(flash_campaign(now, "crash", stock=STOCK, limit=1), shards=3)
    await engine.campaigns.create(campaign)
    layout = await engine.runtime.layout("crash")
    settings = make_settings(engine.runtime.settings.redis_url or "", tmp_path, redis_cluster=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "FLASHTEAM_REDIS_URL": settings.redis_url or "",
        "FLASHTEAM_REDIS_CLUSTER": "1",
        "FLASHTEAM_DATA_DIR": str(tmp_path),
        "FLASHTEAM_RATE_LIMIT": "0",
        "FLASHTEAM_SOLD_OUT_TTL": "0",
    }
    redis = engine.runtime.redis
    rng = random.Random(5)
    kills = in_flight = credited = 0
    while kills < 12 or (not in_flight and kills < 40):
        await _run_until_killed(env, rng)
        kills += 1
        records = sum([int(await redis.hlen(keys_of(s).transfers)) for s in layout.shards])
        moving = sum((await in_transit(engine.runtime, layout)).values())
        in_flight += moving > 0  # killed between a debit and its credit
        credited += records > 0 and moving == 0  # between a credit and its settle
        await assert_invariants(engine, "crash")  # conserved exactly, mid-transfer or not
    assert in_flight, f"no kill of {kills} landed between a debit and its credit ({credited} "
    "between a credit and its settle)"

    await finish_pending(engine.runtime, layout)
    assert await in_transit(engine.runtime, layout) == {}
    await assert_invariants(engine, "crash")
    (stock,) = (await engine.campaigns.get("crash")).stock
    assert stock.available + stock.held == STOCK and stock.paid == stock.gone == 0
    shares = [int(await redis.hget(keys_of(s).inv, "i:sku-1") or 0) for s in layout.shards]
    assert sum(shares) == STOCK, shares
