"""Idempotent reservations (docs/lifecycle.md#order): a retry returns the original order, never
a second one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from engine import Engine, IdempotencyMismatch, OrderState, RateLimited, Reservation
from engine.keys import idempotency_field, keys_of
from engine.local.redis_server import RedisServer
from testkit.factories import flash_campaign, make_settings
from testkit.helpers import assert_invariants


async def _snapshot(engine: Engine, campaign_id: str) -> dict[str, object]:
    """Everything a reservation could change in Redis (the outbox stream included)."""
    keys = keys_of(campaign_id)
    redis = engine.runtime.redis
    return {
        "inv": await redis.hgetall(keys.inv),
        "users": await redis.hgetall(keys.users),
        "orders": await redis.hgetall(keys.orders),
        "deadlines": await redis.zrange(keys.deadlines, 0, -1, withscores=True),
        "events": await redis.xlen(keys.events),
        "meta": await redis.hgetall(keys.meta),
    }


async def _sale(engine: Engine, *, stock: int = 100, limit: int = 2) -> None:
    now = await engine.runtime.now()
    await engine.campaigns.create(
        flash_campaign(now, stock=stock, limit=limit, skus=("sku-1", "sku-2"))
    )


async def test_retry_returns_the_same_order_and_moves_stock_once(engine: Engine) -> None:
    await _sale(engine, stock=10, limit=5)
    first = await engine.flash.reserve("sale", "u1", "sku-1", 2, "k1")
    after_first = await _snapshot(engine, "sale")
    retry = await engine.flash.reserve("sale", "u1", "sku-1", 2, "k1")

    assert not first.replayed
    assert retry.replayed
    assert retry.order == first.order
    assert await _snapshot(engine, "sale") == after_first, "the retry changed Redis state"
    stock = (await engine.campaigns.get("sale")).stock[0]
    assert (stock.available, stock.held) == (8, 2)
    await assert_invariants(engine, "sale")


async def test_fifty_concurrent_retries_make_one_order(engine: Engine) -> None:
    await _sale(engine, stock=10, limit=5)
    results = await asyncio.gather(
        *(engine.flash.reserve("sale", "u1", "sku-1", 1, "same-key") for _ in range(50))
    )

    assert len({r.order.order_id for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1
    assert sum(r.replayed for r in results) == 49
    assert len(await engine.runtime.redis.hgetall(keys_of("sale").orders)) == 1
    stock = (await engine.campaigns.get("sale")).stock[0]
    assert (stock.available, stock.held) == (9, 1)
    await assert_invariants(engine, "sale")


@pytest.mark.parametrize(("sku", "qty"), [("sku-1", 2), ("sku-2", 1), ("sku-2", 2)])
async def test_same_key_with_other_parameters_is_rejected(
    engine: Engine, sku: str, qty: int
) -> None:
    await _sale(engine, stock=10, limit=5)
    original = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    before = await _snapshot(engine, "sale")

    with pytest.raises(IdempotencyMismatch) as caught:
        await engine.flash.reserve("sale", "u1", sku, qty, "k1")

    assert caught.value.code == "idempotency_mismatch"
    assert await _snapshot(engine, "sale") == before, "a rejected retry changed Redis state"
    # The key still answers for its original parameters.
    again = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    assert again.replayed and again.order.order_id == original.order.order_id


async def test_same_key_by_another_user_is_independent(engine: Engine) -> None:
    await _sale(engine, stock=10, limit=5)
    mine = await engine.flash.reserve("sale", "u1", "sku-1", 1, "shared-key")
    theirs = await engine.flash.reserve("sale", "u2", "sku-2", 3, "shared-key")

    assert not theirs.replayed
    assert theirs.order.order_id != mine.order.order_id
    assert (theirs.order.user_id, theirs.order.sku, theirs.order.qty) == ("u2", "sku-2", 3)
    replay = await engine.flash.reserve("sale", "u1", "sku-1", 1, "shared-key")
    assert replay.replayed and replay.order.order_id == mine.order.order_id
    await assert_invariants(engine, "sale")


async def test_same_key_in_another_campaign_is_independent(engine: Engine) -> None:
    now = await engine.runtime.now()
    await engine.campaigns.create(flash_campaign(now, "sale-a"))
    await engine.campaigns.create(flash_campaign(now, "sale-b"))
    a = await engine.flash.reserve("sale-a", "u1", "sku-1", 1, "k1")
    b = await engine.flash.reserve("sale-b", "u1", "sku-1", 1, "k1")

    assert not b.replayed
    assert (a.order.campaign_id, b.order.campaign_id) == ("sale-a", "sale-b")


async def test_idempotency_key_lives_at_least_24_hours(engine: Engine) -> None:
    await _sale(engine)
    held = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    keys = keys_of("sale")

    ttl = await engine.runtime.redis.ttl(keys.idem)
    assert ttl >= 86_400 - 5
    # The record keeps the op and the order's sequence number: "r<n>" for order "sale.o<n>".
    record = await engine.runtime.redis.hget(keys.idem, idempotency_field("u1", "k1"))
    assert record == "r" + held.order.order_id.removeprefix("sale.o")


async def test_retry_after_payment_returns_the_paid_order(engine: Engine) -> None:
    await _sale(engine, stock=3, limit=3)
    held = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    await engine.orders.pay(held.order.order_id, "u1", f"pay-1-{held.order.order_id}")
    before = await _snapshot(engine, "sale")

    retry = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")

    assert retry.replayed
    assert retry.order.order_id == held.order.order_id
    assert retry.order.state is OrderState.PAID
    assert retry.order.payment_ref == f"pay-1-{held.order.order_id}"
    assert await _snapshot(engine, "sale") == before
    await assert_invariants(engine, "sale")


async def test_retry_after_cancel_does_not_reserve_again(engine: Engine) -> None:
    await _sale(engine, stock=3, limit=3)
    held = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
    await engine.orders.cancel(held.order.order_id, "u1")
    before = await _snapshot(engine, "sale")

    retry = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")

    assert isinstance(retry, Reservation) and retry.replayed
    assert retry.order.order_id == held.order.order_id
    assert retry.order.state is OrderState.CANCELLED
    assert await _snapshot(engine, "sale") == before


async def test_configured_ttl_is_applied(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, tmp_path, idempotency_ttl=3 * 86_400)
    async with await Engine.open(settings) as engine:
        await _sale(engine)
        await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
        assert await redis.ttl(keys_of("sale").idem) >= 3 * 86_400 - 5


async def test_replays_are_not_rate_limited(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, tmp_path, rate_limit=1)
    async with await Engine.open(settings) as engine:
        await _sale(engine, limit=5)
        held = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
        # Gateway retries of an accepted request get the order back, not rate_limited.
        for _ in range(5):
            retry = await engine.flash.reserve("sale", "u1", "sku-1", 1, "k1")
            assert retry.replayed and retry.order.order_id == held.order.order_id
        # ...while new attempts are limited (several, so a window boundary cannot hide it).
        fresh = await asyncio.gather(
            *(engine.flash.reserve("sale", "u1", "sku-1", 1, f"new-{n}") for n in range(3)),
            return_exceptions=True,
        )
        assert any(isinstance(outcome, RateLimited) for outcome in fresh), fresh
