"""Attaching a replica is routine, not data loss (docs/faults.md).

A master creates its replication backlog for its first replica under a new replication id,
so the campaign's state sits on a server it was not verified on. The engine judges that
state by what the server holds, against SQL: nothing was lost, so every reservation of a
stream running across the attach is served (no 503 recovering) and nothing is repaired; the
verification is counted, not the repair. On a standalone Redis (REPLICAOF) and on the master
of a Redis Cluster that had no replica (CLUSTER REPLICATE).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot

from engine.core import Engine
from engine.keys import keys_of
from engine.local.redis_server import RedisClusterServers, RedisServer
from engine.recovery import RECOVERY_STATS
from testkit.factories import flash_campaign, make_settings
from testkit.helpers import assert_invariants

CID = "attach"


async def _replid(client: aioredis.Redis) -> str:
    return str((await client.info("replication"))["master_replid"])


async def _sale_across(engine: Engine, attach: asyncio.Future[Any]) -> list[object]:
    """Reservations from 8 shoppers at a time until ``attach`` is done and 100 more after;
    every outcome (a Reservation, or the error raised)."""
    outcomes: list[object] = []

    async def shopper(lane: int) -> None:
        after = 0
        n = 0
        while after < 100 // 8 + 1:
            user = f"u{lane}-{n}"
            n += 1
            try:
                outcomes.append(await engine.flash.reserve(CID, user, "sku-1", 1, f"k-{user}"))
            except Exception as exc:
                outcomes.append(exc)
            if attach.done():
                after += 1
            await asyncio.sleep(0.01)

    await asyncio.gather(*(shopper(lane) for lane in range(8)))
    return outcomes


async def _judge(engine: Engine, before: str, after: str, outcomes: list[object]) -> None:
    assert before != after, "the attach gave the master a new replication id"
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert len(outcomes) > 100 and not failed, failed[:5]
    assert engine.recovery.repairs == 0
    stats = await engine.runtime.redis.hgetall(RECOVERY_STATS)
    assert "repairs" not in stats and int(stats["verified"]) >= 1
    assert await engine.recovery.trusted(CID)
    await assert_invariants(engine, CID)


async def test_attaching_a_replica_to_a_standalone_redis_interrupts_no_sale(
    tmp_path: Path,
) -> None:
    with RedisServer(tmp_path / "primary") as primary:
        replica = primary.replica(tmp_path / "replica")
        settings = make_settings(primary.url, tmp_path)
        async with (
            await Engine.open(settings) as engine,
            aioredis.Redis(port=primary.port) as client,
        ):
            now = await engine.runtime.now()
            await engine.campaigns.create(flash_campaign(now, CID, stock=100_000))
            before = await _replid(client)
            try:
                attach = asyncio.ensure_future(asyncio.to_thread(_attach, replica))
                outcomes = await _sale_across(engine, attach)
                await attach
            finally:
                replica.stop()
            await _judge(engine, before, await _replid(client), outcomes)


def _attach(replica: RedisServer) -> None:
    """Start the replica (REPLICAOF its primary) and wait until it is in sync."""
    replica.start()
    deadline = time.monotonic() + 60
    while not replica.replicating():
        assert time.monotonic() < deadline, "the replica did not sync"
        time.sleep(0.05)


async def test_attaching_a_replica_to_a_cluster_master_interrupts_no_sale(
    tmp_path: Path,
) -> None:
    with RedisClusterServers(tmp_path / "cluster") as cluster:
        share = 16384 // cluster.masters
        owner = min(key_slot(keys_of(CID).meta.encode()) // share, cluster.masters - 1)
        master = cluster.servers[owner]
        settings = make_settings(cluster.url, tmp_path, redis_cluster=True)
        async with (
            await Engine.open(settings) as engine,
            aioredis.Redis(port=master.port) as client,
        ):
            now = await engine.runtime.now()
            await engine.campaigns.create(flash_campaign(now, CID, stock=100_000))
            before = await _replid(client)
            attach = asyncio.ensure_future(
                asyncio.to_thread(cluster.add_replica, owner, tmp_path / "replica")
            )
            outcomes = await _sale_across(engine, attach)
            await attach
            await _judge(engine, before, await _replid(client), outcomes)
