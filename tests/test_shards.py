"""Sharded flash campaigns (engine/shards.py, docs/architecture.md#sharded-flash-campaigns): one
hot item's stock in buckets on several Redis Cluster slots, exact sell-out, exact per-user
limits.

Most tests run on the standalone redis-server (every bucket on the one server, their keys
apart all the same) and again on the suite's 3-master Redis Cluster, where the buckets land on
different masters. Asserted throughout: the audit (engine/audit.py: each bucket's stock
buckets add up, and across buckets the shares plus the units in transit equal the stock),
exactly the stock sold, no user above the limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter

import pytest
from redis.asyncio.cluster import RedisCluster

from engine import (
    Campaign,
    Ended,
    Engine,
    LimitExceeded,
    OrderState,
    Reservation,
    SoldOut,
    ValidationError,
)
from engine.audit import audit_campaign
from engine.keys import campaign_of_order, keys_of, shard_id, shard_of_order, split_shard
from engine.models import CampaignKind
from engine.reconcile import reconcile
from engine.scripts import Transfer
from engine.shards import bucket_index, finish, finish_pending, in_transit
from engine.worker import FlushWorker
from testkit.factories import flash_campaign, team_campaign
from testkit.helpers import age_order, assert_invariants, until
from tests.test_concurrency import _attempting_users

SKU = "sku-1"


def sharded(campaign: Campaign, shards: int = 3) -> Campaign:
    return dataclasses.replace(campaign, shards=shards)


def users_of_bucket(bucket: int, count: int, shards: int = 3, prefix: str = "u") -> list[str]:
    """``count`` user ids whose requests all go to bucket index ``bucket``."""
    found: list[str] = []
    n = 0
    while len(found) < count:
        user = f"{prefix}{n}"
        if bucket_index(user, shards) == bucket:
            found.append(user)
        n += 1
    return found


async def reserve_all(
    engine: Engine, campaign_id: str, users: list[str]
) -> list[Reservation | BaseException]:
    return await asyncio.gather(
        *(
            engine.flash.reserve(campaign_id, user, SKU, 1, f"attempt-{i}")
            for i, user in enumerate(users)
        ),
        return_exceptions=True,
    )


async def bucket_stock(engine: Engine, shard: str) -> dict[str, int]:
    inv = await engine.runtime.redis.hgetall(keys_of(shard).inv)
    return {b: int(inv.get(f"{b}:{SKU}", 0)) for b in "ahpri"}


# --------------------------------------------------------------------------- the layout


def test_order_ids_name_their_bucket() -> None:
    assert campaign_of_order("spring.b7.o12") == "spring"
    assert shard_of_order("spring.b7.o12") == "spring.b7"
    assert (campaign_of_order("spring.o12"), shard_of_order("spring.o12")) == ("spring", "spring")
    assert split_shard("spring.b7") == ("spring", 7) and split_shard("spring") == ("spring", 0)
    assert shard_id("spring", 0) == "spring" and shard_id("spring", 7) == "spring.b7"
    for bad in ("spring.b0.o1", "spring.b.o1", "spring.b12345.o1", "spring.b1", "a.b.c.o1"):
        with pytest.raises(ValidationError):
            shard_of_order(bad)
    zero, seven = keys_of("spring"), keys_of("spring.b7")
    assert zero.meta == "ft:{c:spring}:meta" and zero.shard == "spring"
    assert seven.meta == "ft:{c:spring:7}:meta" and seven.campaign_id == "spring"
    assert seven.transfers == "ft:{c:spring:7}:transfers"


async def test_team_campaigns_are_not_sharded(engine: Engine) -> None:
    now = await engine.runtime.now()
    with pytest.raises(ValidationError) as caught:
        sharded(team_campaign(now))
    assert caught.value.details == {"field": "shards"}
    for shards in (0, 17):
        with pytest.raises(ValidationError):
            sharded(flash_campaign(now), shards)
    with pytest.raises(ValidationError):
        dataclasses.replace(sharded(flash_campaign(now)), buckets=(1, 2, 3))


async def test_the_layout_is_chosen_at_creation_and_kept_in_sql(any_engine: Engine) -> None:
    engine = any_engine
    now = await engine.runtime.now()
    view = await engine.campaigns.create(sharded(flash_campaign(now, "lay", stock=10)))
    campaign = view.campaign
    stored = await engine.runtime.store.get_campaign("lay")
    assert stored == campaign and campaign.shards == 3 and campaign.buckets[0] == 0
    assert (await engine.runtime.layout("lay")).shards == campaign.shard_ids
    redis = engine.runtime.redis
    if isinstance(redis, RedisCluster):  # three slots on three masters
        nodes = [redis.get_node_from_key(keys_of(s).meta) for s in campaign.shard_ids]
        assert len({node.name for node in nodes if node is not None}) == 3
    else:
        assert campaign.buckets == (0, 1, 2)
    shares = [(await bucket_stock(engine, s))["i"] for s in campaign.shard_ids]
    assert shares == [4, 3, 3]
    (stock,) = view.stock
    assert (stock.initial, stock.available, stock.held) == (10, 10, 0)
    unsharded = await engine.campaigns.create(flash_campaign(now, "flat"))
    assert unsharded.campaign.shards == 1 and unsharded.campaign.buckets == ()
    assert await redis.exists(keys_of("flat").meta) and not await redis.exists(
        keys_of("flat.b1").meta
    )


# --------------------------------------------------------------------------- selling


async def test_5000_reserves_from_3000_users_sell_exactly_100(any_engine: Engine) -> None:
    engine = any_engine
    now = await engine.runtime.now()
    await engine.campaigns.create(sharded(flash_campaign(now, "hot", stock=100, limit=1)))
    users = _attempting_users(5_000, 3_000, seed=7)

    results = await reserve_all(engine, "hot", users)

    won: Counter[str] = Counter()
    for user, result in zip(users, results, strict=True):
        if isinstance(result, Reservation):
            assert result.order.user_id == user and result.order.state is OrderState.HELD
            assert shard_of_order(result.order.order_id) == (
                await engine.runtime.layout("hot")
            ).shard_of_user(user)
            won[user] += 1
        else:
            assert isinstance(result, SoldOut | LimitExceeded), result
    assert sum(won.values()) == 100 and max(won.values()) == 1
    (stock,) = (await engine.campaigns.get("hot")).stock
    assert (stock.initial, stock.available, stock.held) == (100, 0, 100)
    assert stock.sold_out_at is not None
    assert engine.rebalancer.gave_up == 0
    await assert_invariants(engine, "hot")


async def test_one_unit_per_bucket_and_every_shopper_on_one_bucket(any_engine: Engine) -> None:
    """Rebalancing carries the sale: the shoppers' bucket sells its unit, then the other two
    buckets' units are moved to it and sold; then sold_out for everyone."""
    engine = any_engine
    now = await engine.runtime.now()
    await engine.campaigns.create(sharded(flash_campaign(now, "lean", stock=3, limit=1)))
    users = users_of_bucket(0, 3_000)

    results = await reserve_all(engine, "lean", users)

    held = [r for r in results if isinstance(r, Reservation)]
    assert len(held) == 3 and len({r.order.user_id for r in held}) == 3
    assert all(shard_of_order(r.order.order_id) == "lean" for r in held)
    assert Counter(type(r).__name__ for r in results) == {"Reservation": 3, "SoldOut": 2_997}
    assert engine.rebalancer.transfers >= 1 and engine.rebalancer.gave_up == 0
    for shard in (await engine.runtime.layout("lean")).shards[1:]:
        assert (await bucket_stock(engine, shard))["i"] == 0
    await assert_invariants(engine, "lean")


async def test_sold_out_only_when_every_unit_is_sold(engine: Engine) -> None:
    """The bound of units in flight, measured: while transfers move units between the two
    other buckets all the time, a shopper reserving one unit after another (whose bucket runs
    dry after its third of the stock, so every further unit needs a refill) is told sold_out
    only once the whole stock is sold: no unit is counted out while in transit, and the answer
    comes from the refill's proof, not from giving up."""
    now = await engine.runtime.now()
    await engine.campaigns.create(sharded(flash_campaign(now, "flux", stock=60, limit=1)))
    layout = await engine.runtime.layout("flux")
    shards, shoppers = layout.shards, users_of_bucket(1, 200)
    others = [shard for shard in shards if shard != layout.shard_of_user(shoppers[0])]
    scripts = engine.runtime.scripts
    stop = asyncio.Event()
    moved = 0

    async def shuffle(seed: int) -> None:
        nonlocal moved
        rng = random.Random(seed)
        while not stop.is_set():
            source, destination = rng.sample(others, 2)
            transfer = await scripts.debit(source, SKU, rng.randint(1, 5), 1, destination)
            await asyncio.sleep(0)  # in flight for a moment
            if transfer is not None:
                await finish(scripts, transfer)
                moved += transfer.units
            await asyncio.sleep(0)

    shufflers = [asyncio.create_task(shuffle(seed)) for seed in range(4)]
    sold = 0
    try:
        for user in shoppers:
            try:
                await engine.flash.reserve("flux", user, SKU, 1, "k")
                sold += 1
            except SoldOut:
                break
    finally:
        stop.set()
        await asyncio.gather(*shufflers)
    stats = engine.rebalancer.stats()
    assert sold == 60, f"sold_out after {sold} of 60 units ({moved} moved meanwhile): {stats}"
    assert moved > 60 and stats["finished"] > 0, stats  # refills met transfers in flight
    assert stats["gave_up"] == 0 and stats["sold_out"] == 1, stats
    await finish_pending(engine.runtime, await engine.runtime.layout("flux"))
    await assert_invariants(engine, "flux")


async def test_retries_return_the_same_order_across_rebalancing(any_engine: Engine) -> None:
    engine = any_engine
    now = await engine.runtime.now()
    await engine.campaigns.create(sharded(flash_campaign(now, "again", stock=6, limit=2)))
    users = users_of_bucket(2, 6)
    first = [await engine.flash.reserve("again", u, SKU, 1, "key") for u in users]
    assert engine.rebalancer.transfers >= 1, "the last reservations needed other buckets' stock"
    with pytest.raises(SoldOut):
        await engine.flash.reserve("again", users[0], SKU, 1, "other-key")
    again = [await engine.flash.reserve("again", u, SKU, 1, "key") for u in users]
    assert [r.order.order_id for r in again] == [r.order.order_id for r in first]
    assert all(r.replayed for r in again) and not any(r.replayed for r in first)
    await assert_invariants(engine, "again")


async def test_pay_cancel_refund_and_expiry_in_every_bucket(any_engine: Engine) -> None:
    engine = any_engine
    now = await engine.runtime.now()
    await engine.campaigns.create(sharded(flash_campaign(now, "life", stock=30, limit=3)))
    layout = await engine.runtime.layout("life")
    orders = []
    for bucket in range(3):
        for user in users_of_bucket(bucket, 4, prefix=f"b{bucket}-"):
            orders.append((await engine.flash.reserve("life", user, SKU, 1, "k")).order)
    for n, order in enumerate(orders):
        assert shard_of_order(order.order_id) == layout.shard_of_user(order.user_id)
        if n % 4 == 0:
            await engine.orders.pay(order.order_id, order.user_id, f"pay-{n}")
        elif n % 4 == 1:
            await engine.orders.cancel(order.order_id, order.user_id)
        elif n % 4 == 2:
            paid = await engine.orders.pay(order.order_id, order.user_id, f"pay-{n}")
            await engine.orders.refund(paid.order_id, restock=n % 8 == 2)
    for order in orders[3::4]:  # the rest expire
        await age_order(engine, order.order_id, 61_000)
    assert await engine.reaper.run_once() == 3
    states = Counter([(await engine.orders.get(o.order_id)).state for o in orders])
    assert states == {
        OrderState.PAID: 3,
        OrderState.CANCELLED: 3,
        OrderState.REFUNDED: 3,
        OrderState.EXPIRED: 3,
    }
    (stock,) = (await engine.campaigns.get("life")).stock
    assert (stock.paid, stock.held, stock.gone) == (3, 0, 1)
    assert stock.available == 30 - 3 - 1
    await assert_invariants(engine, "life")


# --------------------------------------------------------------------------- transfers


async def test_a_transfer_stopped_after_any_step_is_finished_by_the_next(engine: Engine) -> None:
    """The crash analysis, step by step: after the debit the units are in transit (counted
    once), after the credit they are at the destination (the pending record no longer counts),
    and whoever finishes a pending transfer credits it once however often it runs."""
    now = await engine.runtime.now()
    await engine.campaigns.create(sharded(flash_campaign(now, "xfer", stock=30, limit=1)))
    layout = await engine.runtime.layout("xfer")
    zero, one, two = layout.shards
    scripts = engine.runtime.scripts

    debited = await scripts.debit(zero, SKU, 4, 1, one)  # died after the debit
    assert debited is not None and debited.units == 4
    assert await in_transit(engine.runtime, layout) == {SKU: 4}
    await assert_invariants(engine, "xfer")
    assert (await bucket_stock(engine, zero))["a"] == 6

    second = await scripts.debit(one, SKU, 3, 1, two)
    assert second is not None
    assert await scripts.credit(second)  # died after the credit, before the settle
    assert await in_transit(engine.runtime, layout) == {SKU: 4}
    await assert_invariants(engine, "xfer")

    assert await finish_pending(engine.runtime, layout) == 2
    assert await finish_pending(engine.runtime, layout) == 0
    assert await finish(scripts, second)  # a late finisher: credited once, not twice
    assert await in_transit(engine.runtime, layout) == {}
    shares = [(await bucket_stock(engine, s))["i"] for s in layout.shards]
    assert shares == [10 - 4, 10 + 4 - 3, 10 + 3]
    await assert_invariants(engine, "xfer")

    assert await scripts.debit(two, SKU, 100, 14, zero) is None  # fewer than asked at least
    assert await scripts.debit(two, "nope", 1, 1, zero) is None


async def test_the_reaper_finishes_pending_transfers(engine: Engine) -> None:
    now = await engine.runtime.now()
    await engine.campaigns.create(sharded(flash_campaign(now, "reap", stock=9, limit=1)))
    zero, one, _ = (await engine.runtime.layout("reap")).shards
    assert await engine.runtime.scripts.debit(zero, SKU, 2, 1, one) is not None
    await engine.reaper.run_once()
    assert await in_transit(engine.runtime, await engine.runtime.layout("reap")) == {}
    assert [(await bucket_stock(engine, s))["a"] for s in (zero, one)] == [1, 5]


async def test_a_transfer_debited_before_a_repair_is_void(engine: Engine) -> None:
    """Redis lost writes; the repair rebuilds every bucket from SQL (their shares placed
    afresh, a new epoch): a transfer debited before it and credited after is refused, since
    the rebuild counted its units already."""
    now = await engine.runtime.now()
    await engine.campaigns.create(sharded(flash_campaign(now, "void", stock=12, limit=1)))
    layout = await engine.runtime.layout("void")
    users = [users_of_bucket(b, 1, prefix=f"v{b}-")[0] for b in range(3)]
    for user in users:
        await engine.flash.reserve("void", user, SKU, 1, "k")
    stale = await engine.runtime.scripts.debit(layout.shards[0], SKU, 3, 1, layout.shards[2])
    assert isinstance(stale, Transfer)
    await FlushWorker(engine.runtime).drain()
    await engine.recovery.repair("void", "manual")
    assert await engine.recovery.trusted("void")
    assert not await finish(engine.runtime.scripts, stale), "a void transfer was credited"
    assert await in_transit(engine.runtime, layout) == {}
    shares = [await bucket_stock(engine, s) for s in layout.shards]
    assert [s["h"] for s in shares] == [1, 1, 1]
    assert sum(s["a"] for s in shares) == 9 and [s["a"] for s in shares] == [3, 3, 3]
    await assert_invariants(engine, "void")
    again = await engine.flash.reserve("void", users[0], SKU, 1, "k")
    assert again.replayed


# --------------------------------------------------------------------------- the rest


async def test_kind_of_campaign_is_kept_and_invalidation_covers_every_bucket(
    engine: Engine,
) -> None:
    now = await engine.runtime.now()
    view = await engine.campaigns.create(sharded(flash_campaign(now, "inv", stock=9)))
    assert view.campaign.kind is CampaignKind.FLASH
    users = [users_of_bucket(b, 1, prefix=f"i{b}-")[0] for b in range(3)]
    for user in users:
        await engine.flash.reserve("inv", user, SKU, 1, "k")
    await engine.campaigns.invalidate("inv")
    (stock,) = (await engine.campaigns.get("inv")).stock
    assert (stock.held, stock.available) == (0, 9)
    for shard in view.campaign.shard_ids:
        meta = await engine.runtime.redis.hgetall(keys_of(shard).meta)
        assert int(meta["invalid"]) > 0
    await assert_invariants(engine, "inv")


async def test_flush_reconcile_repair_and_archive_cover_every_bucket(engine: Engine) -> None:
    now = await engine.runtime.now()
    campaign = sharded(flash_campaign(now, "whole", stock=40, limit=1, lasts=3))
    await engine.campaigns.create(campaign)
    users = users_of_bucket(0, 30) + users_of_bucket(1, 10, prefix="w")
    results = await reserve_all(engine, "whole", users)
    held = [r.order for r in results if isinstance(r, Reservation)]
    assert len(held) == 40
    for order in held[::2]:
        await engine.orders.pay(order.order_id, order.user_id, f"p-{order.order_id}")
    for order in held[1::4]:
        await engine.orders.cancel(order.order_id, order.user_id)
    worker = FlushWorker(engine.runtime)
    await worker.drain()
    found = await reconcile(engine.runtime, "whole")
    assert found.ok and found.orders == 40, found.differences

    await engine.runtime.redis.flushall()  # Redis lost everything: the repair rebuilds it
    await engine.recovery.repair("whole", "manual")
    audit = await audit_campaign(engine.runtime, "whole")
    assert audit.ok, audit.violations
    assert audit.units == {OrderState.PAID: 20, OrderState.HELD: 10, OrderState.CANCELLED: 10}
    assert (await reconcile(engine.runtime, "whole")).ok

    await until(engine.runtime.now, campaign.ends_at)
    for order in held:  # the last holds run out
        if (await engine.orders.get(order.order_id)).state is OrderState.HELD:
            await age_order(engine, order.order_id, 61_000)
    assert await engine.reaper.run_once() == 10
    await worker.drain()
    archival = await engine.archiver.archive("whole")
    assert archival.archived, archival
    for shard in (await engine.runtime.layout("whole")).shards:
        assert not await engine.runtime.redis.keys(f"{keys_of(shard).tag}*")
    (stock,) = (await engine.campaigns.get("whole")).stock
    assert (stock.paid, stock.held, stock.available) == (20, 0, 20)
    with pytest.raises(Ended):  # answered from SQL, as its scripts would
        await engine.flash.reserve("whole", users[0], SKU, 1, "late")
    paid = held[0]
    assert (await engine.orders.get(paid.order_id)).state is OrderState.PAID
