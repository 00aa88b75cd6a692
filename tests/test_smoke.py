import os

import redis

from engine import Engine, OrderState
from engine.local.redis_server import RedisServer, redis_server_binary
from testkit.factories import flash_campaign


async def test_reserve_and_pay(engine: Engine) -> None:
    await engine.campaigns.create(flash_campaign(await engine.runtime.now()))
    held = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    paid = await engine.orders.pay(held.order.order_id, "u1", "pay-1")
    assert paid.state is OrderState.PAID


async def test_cluster_reserve(cluster_engine: Engine) -> None:
    await cluster_engine.campaigns.create(flash_campaign(await cluster_engine.runtime.now()))
    held = await cluster_engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    assert held.order.state is OrderState.HELD


async def test_audit_sees_a_planted_oversell(engine: Engine) -> None:
    from engine.audit import audit_campaign
    from engine.keys import keys_of

    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), stock=1))
    await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    assert (await audit_campaign(engine.runtime, "sale")).ok
    await engine.runtime.redis.hincrby(keys_of("sale").inv, "a:sku-1", -1)
    audit = await audit_campaign(engine.runtime, "sale")
    assert any("below zero" in v for v in audit.violations)


def test_the_suite_runs_the_server_it_was_given(redis_server: RedisServer) -> None:
    """The suite's servers are the binary FLASHTEAM_REDIS_SERVER names when it is set (the
    test matrix's Valkey run), else redis-server from PATH: the run says what it tested."""
    with redis.Redis.from_url(redis_server.url, decode_responses=True) as client:
        info = client.info("server")
    assert os.path.realpath(info["executable"]) == os.path.realpath(redis_server_binary())
    chosen = os.environ.get("FLASHTEAM_REDIS_SERVER", "redis-server")
    assert ("valkey_version" in info) == ("valkey" in os.path.basename(chosen))
