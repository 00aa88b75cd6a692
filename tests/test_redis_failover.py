"""A primary dies and its replica takes over: the engine loses no acknowledged payment.

Two shapes of failover with real servers (docs/faults.md): a replica that stopped following
before the primary died, then promoted under a restarted engine; a Redis Cluster replica
taking over the campaign's slot in the middle of a sale, under a running engine, and the same
for the master of one stock bucket of a sharded campaign. Each ends
with the verdict of tests/test_redis_loss.py: paid units in SQL never above the stock, no
order id acknowledged to two shoppers, every acknowledged payment paid in SQL under its
shopper, and Redis equal to SQL order by order after a final drain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from engine.core import Engine
from engine.errors import NotFound, SoldOut, Unavailable
from engine.keys import keys_of, shard_of_order
from engine.local.redis_server import RedisClusterServers, RedisServer
from engine.models import Order, OrderState
from engine.recovery import RECOVERY_STATS
from engine.shards import in_transit
from engine.worker import FlushWorker
from testkit.factories import flash_campaign, make_settings
from testkit.helpers import assert_invariants
from tests.test_redis_loss import assert_redis_matches_sql, redis_orders, sold_in_sql, verdict

CID = "failover"
SKU = "sku-1"
BOUND = 30.0  # seconds any one scenario may take to finish its sale
_T = TypeVar("_T")


class Ledger:
    """What the shoppers were told: every reservation (order id, shopper) and every payment."""

    def __init__(self, signal_at: int = 0) -> None:
        self.signal_at = signal_at  # ``reached`` is set once this many payments are acknowledged
        self.reached = asyncio.Event()
        self.held: list[tuple[str, str]] = []
        self.paid: dict[str, str] = {}
        self.sold_out: list[str] = []
        self.lost: int = 0  # holds acknowledged, then gone with the primary (NotFound at pay)

    def owners(self) -> dict[str, set[str]]:
        owners: dict[str, set[str]] = defaultdict(set)
        for order_id, user in self.held:
            owners[order_id].add(user)
        return owners


async def until_served(call: Callable[[], Awaitable[_T]], deadline: float) -> _T:
    """The same call (same idempotency key or payment ref) until it is answered; Unavailable
    and Recovering are retried after a short sleep, up to ``deadline`` (monotonic)."""
    while True:
        try:
            return await call()
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def shop(engine: Engine, ledger: Ledger, user: str, deadline: float) -> None:
    """Reserve one unit and pay it, retrying each call; a hold the failover lost (its pay
    answers NotFound) is reserved again with the same key."""
    while True:
        try:
            held = await until_served(
                lambda: engine.flash.reserve(CID, user, SKU, 1, f"k-{user}"), deadline
            )
        except SoldOut:
            ledger.sold_out.append(user)
            return
        order_id = held.order.order_id
        ledger.held.append((order_id, user))
        try:
            await until_served(partial(engine.orders.pay, order_id, user, f"p-{user}"), deadline)
        except NotFound:
            ledger.lost += 1
            assert time.monotonic() < deadline, f"{user} never kept a hold"
            continue
        ledger.paid[order_id] = user
        if ledger.signal_at and len(ledger.paid) >= ledger.signal_at:
            ledger.reached.set()
        return


async def shoppers(engine: Engine, ledger: Ledger, users: list[str], wave: int = 250) -> None:
    deadline = time.monotonic() + BOUND
    for start in range(0, len(users), wave):
        await asyncio.gather(*(shop(engine, ledger, u, deadline) for u in users[start:][:wave]))


async def final_verdict(engine: Engine, ledger: Ledger, stock: int) -> dict[str, Order]:
    """After a final drain: the verdict, no id acknowledged to two shoppers, SQL and Redis
    naming each acknowledged order's shopper, Redis equal to SQL, the audit clean."""
    await FlushWorker(engine.runtime).drain()
    orders = await sold_in_sql(engine, CID)
    verdict(orders, ledger.paid, stock)
    in_redis = await redis_orders(engine, CID)
    for order_id, users in ledger.owners().items():
        assert len(users) == 1, f"order {order_id} acknowledged to {sorted(users)}"
        (user,) = users
        if order_id in orders:  # a hold lost with the primary is on neither side
            assert orders[order_id].user_id == user
            assert Order.from_record(order_id, in_redis[order_id]).user_id == user
        else:
            assert order_id not in in_redis and order_id not in ledger.paid
    await assert_redis_matches_sql(engine, CID)
    await assert_invariants(engine, CID)
    return orders


async def judged(engine: Engine) -> None:
    """The promoted replica was judged against SQL: verified whole, or repaired when it had
    not received writes SQL holds."""
    stats = await engine.runtime.redis.hgetall(RECOVERY_STATS)
    assert engine.recovery.repairs + int(stats.get("verified", 0)) >= 1


def paid_units(orders: dict[str, Order]) -> int:
    return sum(o.qty for o in orders.values() if o.state is OrderState.PAID)


async def test_a_replica_that_stopped_following_is_promoted_under_a_restarted_engine(
    tmp_path: Path,
) -> None:
    primary = RedisServer(
        tmp_path / "primary", extra_args=("--repl-diskless-sync-delay", "0")
    ).start()
    replica = primary.replica(tmp_path / "replica")
    try:
        replica.start()
        deadline = time.monotonic() + 15
        while not replica.replicating():
            assert time.monotonic() < deadline, "the replica did not sync"
            await asyncio.sleep(0.05)
        ledger = Ledger()
        async with await Engine.open(make_settings(primary.url, tmp_path)) as first:
            now = await first.runtime.now()
            await first.campaigns.create(flash_campaign(now, CID, stock=250, limit=1))
            await shoppers(first, ledger, [f"u{n}" for n in range(100)])
            await FlushWorker(first.runtime).drain()
            client = aioredis.Redis(port=primary.port)
            try:
                assert await client.wait(1, 2000) == 1, "the replica has the first 100"
            finally:
                await client.aclose()
            promoted = aioredis.Redis(port=replica.port)
            try:
                await promoted.replicaof("NO", "ONE")
            finally:
                await promoted.aclose()
            await shoppers(first, ledger, [f"v{n}" for n in range(100)])
            await FlushWorker(first.runtime).drain()
            assert len(ledger.paid) == 200 and not ledger.sold_out
            primary.stop(kill=True)

        async with await Engine.open(make_settings(replica.url, tmp_path)) as second:
            await second.recovery.wait_idle()
            assert await second.recovery.trusted(CID)
            third = Ledger()
            await shoppers(second, third, [f"w{n}" for n in range(100)])
            assert (len(third.paid), len(third.sold_out)) == (50, 50)
            assert third.lost == 0
            ledger.held += third.held
            ledger.paid |= third.paid
            orders = await final_verdict(second, ledger, 250)
            assert paid_units(orders) == 250
    finally:
        replica.stop()
        primary.stop()


async def sale_through_a_failover(
    engine: Engine,
    stock: int,
    kill: Callable[[], Awaitable[None]],
    after: int = 300,
    shards: int = 1,
) -> Ledger:
    """``stock`` shoppers (limit 1) buy while a worker flushes; ``kill`` runs once ``after``
    payments are acknowledged. The same engine must finish the sale. ``shards``: the
    campaign's stock buckets."""
    now = await engine.runtime.now()
    campaign = flash_campaign(now, CID, stock=stock, limit=1)
    await engine.campaigns.create(dataclasses.replace(campaign, shards=shards))
    ledger = Ledger(signal_at=after)
    stop = asyncio.Event()
    worker = asyncio.create_task(FlushWorker(engine.runtime).run(stop))
    killed = asyncio.Event()

    async def killer() -> None:
        await ledger.reached.wait()
        await kill()
        killed.set()

    killing = asyncio.create_task(killer())
    started = time.monotonic()
    try:
        await shoppers(engine, ledger, [f"u{n}" for n in range(stock)])
        await asyncio.wait_for(killing, BOUND)
    finally:
        stop.set()
        killing.cancel()
        await asyncio.gather(worker, killing, return_exceptions=True)
    assert killed.is_set()
    assert time.monotonic() - started < BOUND
    assert not ledger.sold_out, f"{len(ledger.sold_out)} shoppers found it sold out"
    assert len(ledger.paid) == stock
    return ledger


@pytest.mark.cluster
async def test_a_cluster_replica_takes_over_the_campaigns_slot_in_the_middle_of_a_sale(
    replicated_cluster: RedisClusterServers, tmp_path: Path
) -> None:
    share = 16384 // replicated_cluster.masters
    owner = min(key_slot(keys_of(CID).meta.encode()) // share, replicated_cluster.masters - 1)

    async def kill() -> None:
        killed = replicated_cluster.kill_master(owner)
        await asyncio.to_thread(replicated_cluster.wait_promoted, killed)

    settings = make_settings(replicated_cluster.url, tmp_path, redis_cluster=True)
    async with await Engine.open(settings) as engine:
        ledger = await sale_through_a_failover(engine, 2000, kill)
        await engine.recovery.wait_idle()
        await judged(engine)
        assert await engine.recovery.trusted(CID)
        orders = await final_verdict(engine, ledger, 2000)
        assert paid_units(orders) == 2000


@pytest.mark.cluster
async def test_a_cluster_master_of_one_bucket_of_a_sharded_campaign_fails_over_mid_sale(
    replicated_cluster: RedisClusterServers, tmp_path: Path
) -> None:
    """A flash campaign in 3 stock buckets, one per master; the master of bucket 1 is
    SIGKILLed once 300 payments were acknowledged and its replica takes over: the whole
    campaign is verified against SQL (repaired when the replica lost writes), the same engine
    sells every unit exactly once across the buckets, and nothing acknowledged is lost."""
    share = 16384 // replicated_cluster.masters

    async def kill() -> None:
        layout = await engine.runtime.layout(CID)
        slot = key_slot(keys_of(layout.shards[1]).meta.encode())
        killed = replicated_cluster.kill_master(min(slot // share, replicated_cluster.masters - 1))
        await asyncio.to_thread(replicated_cluster.wait_promoted, killed)

    settings = make_settings(replicated_cluster.url, tmp_path, redis_cluster=True)
    async with await Engine.open(settings) as engine:
        ledger = await sale_through_a_failover(engine, 2000, kill, shards=3)
        await engine.recovery.wait_idle()
        await judged(engine)
        assert await engine.recovery.trusted(CID)
        orders = await final_verdict(engine, ledger, 2000)
        assert paid_units(orders) == 2000
        layout = await engine.runtime.layout(CID)
        assert len({shard_of_order(order_id) for order_id in orders}) == 3
        assert await in_transit(engine.runtime, layout) == {}
