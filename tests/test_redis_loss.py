"""Redis loses writes; the engine does not (docs/faults.md).

Each scenario loses Redis state the way production does (emptied, rolled back, restarted)
with real servers, and ends with the same verdict: paid units in SQL never above the stock,
no order id belonging to two shoppers, every acknowledged payment paid in SQL under its
shopper, and the repaired Redis equal to SQL order by order.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from engine.api.metrics import dependencies, render
from engine.core import Engine
from engine.errors import LimitExceeded, NotFound, Recovering, SoldOut
from engine.keys import keys_of
from engine.local.redis_server import RedisServer
from engine.models import Order, OrderState, Team
from engine.recovery import ID_GAP
from engine.store import sequence
from engine.worker import FlushWorker
from testkit.factories import flash_campaign, make_settings, team_campaign
from testkit.helpers import age_order, assert_invariants, run_cli

CID = "loss"
SKU = "sku-1"


async def sold_in_sql(engine: Engine, campaign_id: str) -> dict[str, Order]:
    return {
        s.order.order_id: s.order for s in await engine.runtime.store.campaign_orders(campaign_id)
    }


async def redis_orders(engine: Engine, campaign_id: str) -> dict[str, str]:
    """Every order record of the campaign in Redis, from each of its stock buckets."""
    records: dict[str, str] = {}
    for shard in (await engine.runtime.layout(campaign_id)).shards:
        bucket: dict[str, str] = await engine.runtime.redis.hgetall(keys_of(shard).orders)  # type: ignore[assignment]
        records |= bucket
    return records


async def assert_redis_matches_sql(engine: Engine, campaign_id: str) -> None:
    """Every order and team in Redis is the one SQL holds, field by field, and vice versa."""
    rt = engine.runtime
    keys = keys_of(campaign_id)
    in_redis = {
        i: Order.from_record(i, r) for i, r in (await redis_orders(engine, campaign_id)).items()
    }
    assert in_redis == await sold_in_sql(engine, campaign_id)
    teams = {t.team_id: t for t in await rt.store.campaign_teams(campaign_id)}
    records: dict[str, str] = await rt.redis.hgetall(keys.teams)  # type: ignore[assignment]
    assert {i: Team.from_record(i, r) for i, r in records.items()} == teams


async def repaired(engine: Engine, campaign_id: str) -> None:
    """Call until the campaign answers again (the first call starts the repair)."""
    with pytest.raises(Recovering):
        await engine.flash.reserve(campaign_id, "probe", SKU, 1, "probe-key")
    await engine.recovery.wait_idle()
    assert await engine.recovery.trusted(campaign_id)


def verdict(orders: dict[str, Order], paid_acks: dict[str, str], stock: int) -> None:
    """The scenario's end: no oversell, every acknowledged payment paid under its shopper."""
    paid = [o for o in orders.values() if o.state is OrderState.PAID]
    assert sum(o.qty for o in paid) <= stock
    for order_id, user in paid_acks.items():
        assert orders[order_id].user_id == user
        assert orders[order_id].state in (OrderState.PAID, OrderState.REFUNDED)


async def test_redis_emptied_under_a_running_engine(engine: Engine, redis: aioredis.Redis) -> None:
    now = await engine.runtime.now()
    await engine.campaigns.create(flash_campaign(now, CID, stock=20, limit=1))
    worker = FlushWorker(engine.runtime)
    owners: dict[str, str] = {}
    paid: dict[str, str] = {}
    for n in range(20):
        held = (await engine.flash.reserve(CID, f"u{n}", SKU, 1, f"k{n}")).order
        owners[held.order_id] = held.user_id
        if n < 18:
            await engine.orders.pay(held.order_id, held.user_id, f"pay-{n}")
            paid[held.order_id] = held.user_id
    with pytest.raises(SoldOut):
        await engine.flash.reserve(CID, "late", SKU, 1, "k")
    await worker.drain()

    await redis.flushall()  # a failover to an empty node, a lost disk

    await repaired(engine, CID)
    with pytest.raises(SoldOut):  # the 20 units are not sold a second time
        await engine.flash.reserve(CID, "late", SKU, 1, "k2")
    with pytest.raises(LimitExceeded):  # a shopper at the limit stays there
        await engine.flash.reserve(CID, "u3", SKU, 1, "again")
    retry = await engine.flash.reserve(CID, "u0", SKU, 1, "k0")  # a retry replays
    assert retry.replayed and retry.order.order_id in owners
    # The two unpaid holds are still held with their deadlines; one cancelled frees a unit,
    # which sells under a new id past every durable one.
    unpaid = [i for i in owners if i not in paid]
    await engine.orders.cancel(unpaid[0], owners[unpaid[0]])
    fresh = (await engine.flash.reserve(CID, "new", SKU, 1, "k")).order
    assert sequence(fresh.order_id) > 20 + ID_GAP - 1
    await worker.drain()
    orders = await sold_in_sql(engine, CID)
    verdict(orders, paid, 20)
    for order_id, user in owners.items():
        assert orders[order_id].user_id == user
    await assert_redis_matches_sql(engine, CID)
    await assert_invariants(engine, CID)


async def test_redis_emptied_before_a_restart(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, tmp_path)
    async with await Engine.open(settings) as first:
        now = await first.runtime.now()
        await first.campaigns.create(flash_campaign(now, CID, stock=5, limit=1))
        await first.campaigns.create(team_campaign(now, "team", stock=9, team_size=3, limit=1))
        held = (await first.flash.reserve(CID, "a", SKU, 1, "ka")).order
        await first.orders.pay(held.order_id, "a", f"pa-{held.order_id}")
        seat = await first.teams.open("team", "leader", SKU, 1, "kl")
        await first.orders.pay(seat.order.order_id, "leader", f"pl-{seat.order.order_id}")
        joined = await first.teams.join(seat.team.team_id, "member", "km")
        await FlushWorker(first.runtime).drain()
    await redis.flushall()

    async with await Engine.open(settings) as second:
        await second.recovery.wait_idle()  # start-up repairs the started campaigns
        assert await second.recovery.trusted(CID) and await second.recovery.trusted("team")
        view = await second.campaigns.get(CID)
        assert (view.stock[0].available, view.stock[0].paid) == (4, 1)
        team = await second.teams.get(seat.team.team_id)
        assert (team.held, team.paid) == (1, 1)
        await second.orders.pay(joined.order.order_id, "member", f"pm-{joined.order.order_id}")
        with pytest.raises(NotFound):
            await second.orders.pay("nobody.o1", "x", f"p-{'nobody.o1'}")
        await FlushWorker(second.runtime).drain()
        await assert_redis_matches_sql(second, CID)
        await assert_redis_matches_sql(second, "team")
        await assert_invariants(second, CID)
        await assert_invariants(second, "team")


async def test_a_restarted_redis_is_verified_before_it_sells(
    redis: aioredis.Redis, tmp_path: Path
) -> None:
    """A server that restarted (from its AOF: nothing lost here) is a server the campaign
    was not verified on: its first call has what the server holds checked against SQL, and
    goes through: nothing fenced, nothing repaired."""
    server = RedisServer(tmp_path / "redis").start()
    try:
        settings = make_settings(server.url, tmp_path)
        async with await Engine.open(settings) as engine:
            now = await engine.runtime.now()
            await engine.campaigns.create(flash_campaign(now, CID, stock=10, limit=1))
            held = (await engine.flash.reserve(CID, "a", SKU, 1, "ka")).order
            await FlushWorker(engine.runtime).drain()
            server.stop()
            server.start()
            exposed = render(await dependencies(engine.runtime, 5))
            assert b"flashteam_campaigns_fenced 0\n" in exposed
            assert b"flashteam_campaigns_unverified 1\n" in exposed
            paid = await engine.orders.pay(held.order_id, "a", f"pa-{held.order_id}")
            assert paid.state is OrderState.PAID
            exposed = render(await dependencies(engine.runtime, 5))
            assert b"flashteam_campaigns_unverified 0\n" in exposed
            assert b"flashteam_recoveries_total 0\n" in exposed
            assert b"flashteam_recovery_verifications_total 1\n" in exposed
            await FlushWorker(engine.runtime).drain()
            await assert_redis_matches_sql(engine, CID)
            await assert_invariants(engine, CID)
    finally:
        server.stop()


async def test_a_new_server_that_lost_a_payment_sql_holds_is_repaired(
    redis: aioredis.Redis, redis_server: RedisServer, database_url: str, tmp_path: Path
) -> None:
    """The server the campaign is on now (another replication id) holds a paid order at its
    held version, as a replica promoted before the payment reached it would: the
    verification finds the loss against SQL, the campaign is fenced and repaired from SQL,
    and the order is paid again in Redis (on each SQL backend)."""
    settings = make_settings(redis_server.url, tmp_path, database_url=database_url)
    async with await Engine.open(settings) as engine:
        await _lost_payment_repaired(engine)


async def _lost_payment_repaired(engine: Engine) -> None:
    now = await engine.runtime.now()
    await engine.campaigns.create(flash_campaign(now, CID, stock=10, limit=1))
    held = (await engine.flash.reserve(CID, "a", SKU, 1, "ka")).order
    keys = keys_of(CID)
    redis = engine.runtime.redis
    before = await redis.hget(keys.orders, held.order_id)
    await engine.orders.pay(held.order_id, "a", "pa")
    await FlushWorker(engine.runtime).drain()
    await redis.hset(keys.orders, held.order_id, before)  # the payment lost with the server
    await redis.hset(keys.meta, "node", "another-server")
    with pytest.raises(Recovering) as refused:
        await engine.flash.reserve(CID, "b", SKU, 1, "kb")
    assert refused.value.details["why"] == "restarted"
    await engine.recovery.wait_idle()
    assert engine.recovery.repairs == 1 and await engine.recovery.trusted(CID)
    record = await redis.hget(keys.orders, held.order_id)
    assert isinstance(record, str)
    assert Order.from_record(held.order_id, record).state is OrderState.PAID
    await engine.flash.reserve(CID, "b", SKU, 1, "kb")
    await FlushWorker(engine.runtime).drain()
    await assert_redis_matches_sql(engine, CID)
    await assert_invariants(engine, CID)


async def test_flashteam_recover_repairs_by_hand_and_twice(engine: Engine) -> None:
    now = await engine.runtime.now()
    await engine.campaigns.create(flash_campaign(now, CID, stock=10, limit=2))
    for n in range(4):
        held = (await engine.flash.reserve(CID, f"u{n}", SKU, 1, "k")).order
        if n % 2:
            await engine.orders.pay(held.order_id, held.user_id, f"p-{held.order_id}")
    settings = engine.runtime.settings
    assert settings.redis_url is not None
    env = {
        **os.environ,
        "FLASHTEAM_REDIS_URL": settings.redis_url,
        "FLASHTEAM_DATABASE_URL": f"sqlite:///{settings.sqlite_path}",
    }
    for _ in range(2):
        code, out, err = await run_cli("recover", CID, env=env)
        assert code == 0, err
        assert "4 orders" in out
    view = await engine.campaigns.get(CID)
    assert (view.stock[0].available, view.stock[0].held, view.stock[0].paid) == (6, 2, 2)
    await assert_redis_matches_sql(engine, CID)
    await assert_invariants(engine, CID)
    code, _, err = await run_cli("recover", "nosuch", env=env)
    assert code != 0 and "no campaign nosuch" in err


async def test_a_reaper_step_ending_18_holds_is_no_refusal(engine: Engine) -> None:
    """18 is the recovering code of the order scripts; the reaper's replies start with a count,
    and 18 holds ended at once is just that."""
    now = await engine.runtime.now()
    await engine.campaigns.create(flash_campaign(now, CID, stock=30, limit=1))
    for n in range(18):
        held = (await engine.flash.reserve(CID, f"u{n}", SKU, 1, "k")).order
        await age_order(engine, held.order_id, 120_000)
    assert await engine.reaper.expire_campaign(CID) == (18, False)
    assert engine.recovery.repairs == 0 and await engine.recovery.trusted(CID)
    await engine.recovery.wait_idle()
    assert engine.recovery.repairs == 0


async def test_a_repair_asked_for_once_another_process_repaired_does_nothing(
    engine: Engine,
) -> None:
    """Two processes saw the campaign refused; the first repairs it; the second's repair,
    asked for a moment later, finds it trusted under the lock and rebuilds nothing."""
    now = await engine.runtime.now()
    await engine.campaigns.create(flash_campaign(now, CID, stock=10, limit=1))
    await engine.flash.reserve(CID, "a", SKU, 1, "ka")
    await engine.runtime.scripts.fence(CID, "behind")
    async with await Engine.open(engine.runtime.settings) as other:
        done = await engine.recovery.repair(CID, "manual")
        assert not done.waited and engine.recovery.repairs == 1
        again = await other.recovery.repair(CID, "manual", unless_trusted=True)
        assert again.waited and other.recovery.repairs == 0
        assert await other.recovery.trusted(CID)
