"""Recovery (docs/architecture.md#scripts, docs/operations.md): SCRIPT FLUSH, a Redis restart
and a kill -9 need no manual step.

The restart tests run a dedicated redis-server (AOF on) per test, so they can stop it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis

from engine import Engine, Order, OrderState, Reservation, Unavailable
from engine.keys import keys_of
from engine.local.redis_server import RedisClusterServers, RedisServer
from testkit.factories import flash_campaign, make_settings
from testkit.helpers import age_order, assert_invariants


async def _flush_scripts(engine: Engine) -> None:
    await engine.runtime.redis.script_flush()
    assert await engine.runtime.redis.script_exists(
        engine.runtime.scripts.sha("reserve_stock")
    ) == [False]


async def test_script_flush_needs_no_manual_step(engine: Engine) -> None:
    await _flush_scripts(engine)
    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), stock=10, limit=5))

    await _flush_scripts(engine)
    paid = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    await _flush_scripts(engine)
    assert (
        await engine.orders.pay(paid.order.order_id, "u1", f"p1-{paid.order.order_id}")
    ).state is OrderState.PAID

    cancelled = await engine.flash.reserve("sale", "u2", "sku-1", 1, "k2")
    await _flush_scripts(engine)
    assert (await engine.orders.cancel(cancelled.order.order_id, "u2")).state is (
        OrderState.CANCELLED
    )

    expiring = await engine.flash.reserve("sale", "u3", "sku-1", 2, "k3")
    await age_order(engine, expiring.order.order_id, 61_000)
    await _flush_scripts(engine)
    assert await engine.reaper.run_once() == 1
    assert (await engine.orders.get(expiring.order.order_id)).state is OrderState.EXPIRED

    await _flush_scripts(engine)
    assert (await engine.orders.refund(paid.order.order_id, True)).state is OrderState.REFUNDED

    stock = (await engine.campaigns.get("sale")).stock[0]
    assert (stock.available, stock.held, stock.paid) == (10, 0, 0)
    await assert_invariants(engine, "sale")


async def test_script_flush_under_concurrent_load(engine: Engine) -> None:
    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), stock=100, limit=1))
    await _flush_scripts(engine)
    # Every one of these first meets NOSCRIPT; all must still reserve exactly once.
    results = await asyncio.gather(
        *(engine.flash.reserve("sale", f"u{n}", "sku-1", 1, f"k{n}") for n in range(150)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Reservation) for r in results) == 100
    assert sum(type(r).__name__ == "SoldOut" for r in results) == 50
    await assert_invariants(engine, "sale")


async def test_script_flush_on_every_cluster_node(
    cluster_engine: Engine, redis_cluster: RedisClusterServers
) -> None:
    engine = cluster_engine
    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), stock=10, limit=5))
    for server in redis_cluster.servers:
        node = aioredis.Redis.from_url(server.url)
        try:
            await node.script_flush()
        finally:
            await node.aclose()

    held = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    assert (
        await engine.orders.pay(held.order.order_id, "u1", f"p1-{held.order.order_id}")
    ).state is OrderState.PAID
    other = await engine.flash.reserve("sale", "u2", "sku-1", 1, "k2")
    assert (await engine.orders.cancel(other.order.order_id, "u2")).state is OrderState.CANCELLED
    await assert_invariants(engine, "sale")


async def _states(engine: Engine, orders: list[Order]) -> dict[str, OrderState]:
    return {o.order_id: (await engine.orders.get(o.order_id)).state for o in orders}


async def test_same_engine_survives_a_redis_restart(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "r") as server:
        async with await Engine.open(make_settings(server.url, tmp_path)) as engine:
            await engine.campaigns.create(
                flash_campaign(await engine.runtime.now(), stock=20, limit=5)
            )
            orders = [
                (await engine.flash.reserve("sale", f"u{n}", "sku-1", 2, f"k{n}")).order
                for n in range(6)
            ]
            await engine.orders.pay(orders[0].order_id, "u0", f"p0-{orders[0].order_id}")
            await engine.orders.pay(orders[1].order_id, "u1", f"p1-{orders[1].order_id}")
            await engine.orders.cancel(orders[2].order_id, "u2")
            states = await _states(engine, orders)
            stock = (await engine.campaigns.get("sale")).stock

            server.stop()
            down = await _calls_while_down(engine, orders[3])
            assert all(isinstance(outcome, Unavailable) for outcome in down), down
            server.start()

            # The same engine object, no manual step: state preserved, new work accepted.
            assert await _states(engine, orders) == states
            assert (await engine.campaigns.get("sale")).stock == stock
            await assert_invariants(engine, "sale")
            await _verified_again(engine)
            assert (await engine.campaigns.get("sale")).stock == stock
            retry = await engine.flash.reserve("sale", "u3", "sku-1", 2, "k3")
            assert retry.replayed and retry.order.order_id == orders[3].order_id
            fresh = await engine.flash.reserve("sale", "u9", "sku-1", 1, "k9")
            assert not fresh.replayed
            assert fresh.order.order_id not in {o.order_id for o in orders}
            paid = await engine.orders.pay(orders[3].order_id, "u3", f"p3-{orders[3].order_id}")
            assert paid.state is OrderState.PAID
            await age_order(engine, orders[4].order_id, 61_000)
            assert await engine.reaper.run_once() == 1

            (after,) = (await engine.campaigns.get("sale")).stock
            assert (after.available, after.held, after.paid) == (20 - 3 - 6, 3, 6)
            await assert_invariants(engine, "sale")


async def test_stale_connections_after_a_restart_are_not_an_outage(tmp_path: Path) -> None:
    """Redis comes back before the app noticed it went away (a host crash sends no FIN, so
    pooled connections are stale): the next calls must succeed, not fail with Unavailable.

    Stopping and starting without yielding to the event loop reproduces it deterministically.
    """
    with RedisServer(tmp_path / "r") as server:
        async with await Engine.open(make_settings(server.url, tmp_path)) as engine:
            await engine.campaigns.create(flash_campaign(await engine.runtime.now()))
            held = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")

            server.stop()
            server.start()

            assert await engine.orders.get(held.order.order_id) == held.order
            await _verified_again(engine)
            retry = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
            assert retry.replayed and retry.order == held.order


async def _verified_again(engine: Engine) -> None:
    """A restarted Redis is a server the campaign was not verified on: its first change has
    what the server holds checked against SQL, and goes through, since the restart lost
    nothing: no recovering, no repair (docs/faults.md)."""
    assert not await engine.recovery.trusted("sale")
    probe = await engine.flash.reserve("sale", "probe", "sku-1", 1, "probe")
    await engine.orders.cancel(probe.order.order_id, "probe")
    assert await engine.recovery.trusted("sale")
    assert engine.recovery.repairs == 0


async def _calls_while_down(engine: Engine, held: Order) -> list[object]:
    return list(
        await asyncio.gather(
            engine.flash.reserve("sale", "late", "sku-1", 1, "late-key"),
            engine.orders.pay(held.order_id, held.user_id, f"p-late-{held.order_id}"),
            engine.orders.cancel(held.order_id, held.user_id),
            engine.orders.get(held.order_id),
            engine.campaigns.get("sale"),
            engine.reaper.run_once(),
            engine.runtime.now(),
            return_exceptions=True,
        )
    )


async def test_kill_9_with_appendfsync_always_loses_no_acknowledged_reservation(
    tmp_path: Path,
) -> None:
    with RedisServer(tmp_path / "r", appendfsync="always") as server:
        async with await Engine.open(make_settings(server.url, tmp_path)) as engine:
            await engine.campaigns.create(
                flash_campaign(await engine.runtime.now(), stock=500, limit=1)
            )
            acked: dict[str, Order] = {}
            enough = asyncio.Event()

            async def attempt(n: int) -> Reservation:
                reservation = await engine.flash.reserve("sale", f"u{n}", "sku-1", 1, f"k{n}")
                acked[f"u{n}"] = reservation.order
                if len(acked) >= 50:
                    enough.set()
                return reservation

            tasks = [asyncio.create_task(attempt(n)) for n in range(200)]
            await enough.wait()
            server.stop(kill=True)

            down = await _calls_while_down(engine, next(iter(acked.values())))
            assert all(isinstance(outcome, Unavailable) for outcome in down), down
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            failed = [n for n, o in enumerate(outcomes) if not isinstance(o, Reservation)]
            assert all(isinstance(outcomes[n], Unavailable) for n in failed), outcomes

            server.start()

            records = await engine.runtime.redis.hgetall(keys_of("sale").orders)
            assert len(acked) >= 50
            for user, acknowledged in acked.items():
                order_id = acknowledged.order_id
                assert order_id in records, f"acknowledged order {order_id} of {user} was lost"
                assert await engine.orders.get(order_id) == acknowledged
            await assert_invariants(engine, "sale")

            # Clients retry what failed with the same key: each user ends with exactly one order.
            await _verified_again(engine)
            for n in failed:
                await engine.flash.reserve("sale", f"u{n}", "sku-1", 1, f"k{n}")
            records = await engine.runtime.redis.hgetall(keys_of("sale").orders)
            shoppers = {Order.from_record(str(i), str(r)).user_id for i, r in records.items()}
            assert len(records) == 201 and shoppers == {f"u{n}" for n in range(200)} | {"probe"}
            (stock,) = (await engine.campaigns.get("sale")).stock
            assert (stock.available, stock.held) == (300, 200)
            await assert_invariants(engine, "sale")
