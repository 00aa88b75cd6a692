"""Contract tests of the flash-sale scripts through the engine API (docs/lifecycle.md#order,
docs/invariants.md).

Each test drives one outcome code from a script header (lua/*.lua) through ``engine.flash`` or
``engine.reaper`` and checks the typed result, what changed in Redis (stock buckets, the
per-user counter, the deadline index, the outbox stream) and the invariant audit.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from engine import (
    Campaign,
    CampaignKind,
    Ended,
    Engine,
    Forbidden,
    HoldExpired,
    IdempotencyMismatch,
    Invalidated,
    InvalidState,
    Item,
    ItemStock,
    LimitExceeded,
    NotFound,
    NotStarted,
    Order,
    OrderKind,
    OrderLimitExceeded,
    OrderState,
    RateLimited,
    SoldOut,
    ValidationError,
)
from engine.keys import CAMPAIGN_SET, keys_of, shard_of_order
from engine.local.redis_server import RedisServer
from testkit.factories import flash_campaign, make_settings
from testkit.helpers import (
    EVENT_OF,
    age_order,
    assert_invariants,
    early_in_a_second,
    eventually,
    until,
)

CID = "sale"
SKU = "sku-1"
PRICE = 1999
HOLD_MS = 60_000
KEYS = keys_of(CID)
STATE_OF_EVENT = {event: state for state, event in EVENT_OF.items()}


# --------------------------------------------------------------------------- helpers


async def open_sale(engine: Engine, **options: Any) -> Campaign:
    """Create the active campaign ``sale`` (one sku, price 1999, 60 s holds) and return it."""
    campaign = flash_campaign(await engine.runtime.now(), CID, **options)
    view = await engine.campaigns.create(campaign)
    return view.campaign


async def stock_of(engine: Engine, sku: str = SKU, campaign_id: str = CID) -> ItemStock:
    view = await engine.campaigns.get(campaign_id)
    return next(item for item in view.stock if item.sku == sku)


async def hold(engine: Engine, user: str = "u1", qty: int = 1, key: str | None = None) -> Order:
    reservation = await engine.flash.reserve(CID, user, SKU, qty, key or f"k-{user}-{qty}")
    assert not reservation.replayed
    return reservation.order


async def events(redis: aioredis.Redis, campaign_id: str = CID) -> list[dict[str, str]]:
    """Every entry of the campaign's outbox stream, oldest first."""
    entries: Any = await redis.xrange(keys_of(campaign_id).events)
    return [dict(fields) for _, fields in entries]


async def events_of(redis: aioredis.Redis, order_id: str) -> list[dict[str, str]]:
    return [event for event in await events(redis) if event.get("order") == order_id]


async def held_units(redis: aioredis.Redis, user: str) -> int:
    return int(await redis.hget(KEYS.users, user) or 0)


async def age_past_deadline(engine: Engine, order: Order) -> None:
    """Move the order's payment deadline 1 s into the past."""
    await age_order(engine, order.order_id, HOLD_MS + 1_000)


# --------------------------------------------------------------------------- reserve


async def test_reserve_holds_units_for_the_hold_time_at_price_times_qty(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine, limit=5)
    before = await engine.runtime.now()
    reservation = await engine.flash.reserve(CID, "u1", SKU, 3, "k1")
    after = await engine.runtime.now()

    order = reservation.order
    assert not reservation.replayed
    assert order.order_id.startswith(f"{CID}.o")
    assert (order.campaign_id, order.user_id, order.sku, order.qty) == (CID, "u1", SKU, 3)
    assert order.state is OrderState.HELD
    assert order.kind is OrderKind.FLASH
    assert order.amount == PRICE * 3
    assert before <= order.created_at <= after
    assert order.expires_at == order.created_at + timedelta(seconds=60)
    assert (order.version, order.team_id, order.payment_ref) == (1, None, None)
    assert await engine.orders.get(order.order_id) == order

    stock = await stock_of(engine)
    assert (stock.available, stock.held, stock.paid, stock.gone) == (97, 3, 0, 0)
    assert await held_units(redis, "u1") == 3
    assert await redis.zscore(KEYS.deadlines, order.order_id) == int(
        order.expires_at.timestamp() * 1000
    )
    await assert_invariants(engine, CID)


async def test_last_unit_sells_once_then_sold_out_with_nothing_available(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine, stock=1)
    first = await hold(engine, "u1")
    assert first.state is OrderState.HELD

    with pytest.raises(SoldOut) as caught:
        await engine.flash.reserve(CID, "u2", SKU, 1, "k-u2")
    assert caught.value.details == {"available": 0}
    assert caught.value.code == "sold_out"

    stock = await stock_of(engine)
    assert (stock.available, stock.held) == (0, 1)
    assert await redis.hlen(KEYS.orders) == 1
    assert await held_units(redis, "u2") == 0
    assert len(await events(redis)) == 1
    await assert_invariants(engine, CID)


async def test_qty_above_stock_is_sold_out_and_changes_nothing(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine, stock=3, limit=10)
    with pytest.raises(SoldOut) as caught:
        await engine.flash.reserve(CID, "u1", SKU, 4, "k1")
    assert caught.value.details == {"available": 3}

    stock = await stock_of(engine)
    assert (stock.available, stock.held, stock.paid) == (3, 0, 0)
    assert await redis.hlen(KEYS.orders) == 0
    assert await redis.zcard(KEYS.deadlines) == 0
    assert await held_units(redis, "u1") == 0
    assert await events(redis) == []
    # The same key still works for a quantity that fits: the rejection stored nothing.
    retry = await engine.flash.reserve(CID, "u1", SKU, 3, "k1")
    assert not retry.replayed
    assert (await stock_of(engine)).available == 0
    await assert_invariants(engine, CID)


async def test_per_user_limit_is_reached_exactly_then_exceeded(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine, limit=3)
    await hold(engine, "u1", 2)
    last = await hold(engine, "u1", 1)  # 2 + 1 == limit: allowed
    assert last.state is OrderState.HELD
    assert await held_units(redis, "u1") == 3

    with pytest.raises(LimitExceeded) as caught:
        await engine.flash.reserve(CID, "u1", SKU, 1, "k-more")
    assert caught.value.details == {"units_left": 0}
    assert (await stock_of(engine)).held == 3
    # Another user is not affected by u1's limit.
    await hold(engine, "u2", 3)
    await assert_invariants(engine, CID)


async def test_limit_counts_held_and_paid_units_and_cancelling_frees_them(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine, limit=3)
    paid = await hold(engine, "u1", 1, key="k-paid")
    await engine.orders.pay(paid.order_id, "u1", f"pay-1-{paid.order_id}")
    held = await hold(engine, "u1", 1, key="k-held")

    with pytest.raises(LimitExceeded) as caught:
        await engine.flash.reserve(CID, "u1", SKU, 2, "k-two")
    assert caught.value.details == {"units_left": 1}

    await engine.orders.cancel(held.order_id, "u1")
    assert await held_units(redis, "u1") == 1
    again = await engine.flash.reserve(CID, "u1", SKU, 2, "k-two")
    assert again.order.qty == 2
    assert await held_units(redis, "u1") == 3
    with pytest.raises(LimitExceeded):
        await engine.flash.reserve(CID, "u1", SKU, 1, "k-three")
    await assert_invariants(engine, CID)


async def test_unknown_campaign_is_not_found(engine: Engine, redis: aioredis.Redis) -> None:
    await open_sale(engine)
    size = await redis.dbsize()
    with pytest.raises(NotFound) as caught:
        await engine.flash.reserve("nope", "u1", SKU, 1, "k1")
    assert caught.value.code == "not_found"
    assert "sku" not in caught.value.details
    assert await redis.dbsize() == size
    assert await redis.exists(keys_of("nope").orders) == 0


async def test_unknown_sku_is_not_found_naming_the_sku(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine)
    with pytest.raises(NotFound) as caught:
        await engine.flash.reserve(CID, "u1", "no-such-sku", 1, "k1")
    assert caught.value.details == {"sku": "no-such-sku"}
    assert await redis.hlen(KEYS.orders) == 0
    assert await held_units(redis, "u1") == 0
    await assert_invariants(engine, CID)


async def test_before_the_start_is_not_started_with_starts_at(
    engine: Engine, redis: aioredis.Redis
) -> None:
    campaign = await open_sale(engine, starts_in=3600)
    with pytest.raises(NotStarted) as caught:
        await engine.flash.reserve(CID, "u1", SKU, 1, "k1")
    assert caught.value.details == {"starts_at": campaign.starts_at}
    assert (await stock_of(engine)).available == 100
    assert await redis.hlen(KEYS.orders) == 0
    await assert_invariants(engine, CID)


async def test_after_the_end_is_ended_with_ends_at(engine: Engine, redis: aioredis.Redis) -> None:
    campaign = await open_sale(engine, starts_in=-1, lasts=1.3)
    await until(engine.runtime.now, campaign.ends_at)
    with pytest.raises(Ended) as caught:
        await engine.flash.reserve(CID, "u1", SKU, 1, "k1")
    assert caught.value.details == {"ends_at": campaign.ends_at}
    assert (await stock_of(engine)).available == 100
    assert await redis.hlen(KEYS.orders) == 0
    await assert_invariants(engine, CID)


async def test_invalidated_campaign_takes_no_reservation(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine)
    await engine.campaigns.invalidate(CID)
    with pytest.raises(Invalidated):
        await engine.flash.reserve(CID, "u1", SKU, 1, "k1")
    assert (await stock_of(engine)).available == 100
    assert await redis.hlen(KEYS.orders) == 0
    await assert_invariants(engine, CID)


async def test_team_campaign_rejects_flash_reservation(
    engine: Engine, redis: aioredis.Redis
) -> None:
    now = await engine.runtime.now()
    team = Campaign(
        id="team",
        kind=CampaignKind.TEAM,
        title="Team sale",
        starts_at=now - timedelta(seconds=1),
        ends_at=now + timedelta(hours=1),
        items=(Item(SKU, PRICE, 10),),
        per_user_limit=2,
        hold_seconds=60,
        team_size=3,
        team_ttl_seconds=600,
    )
    await engine.campaigns.create(team)
    with pytest.raises(InvalidState):
        await engine.flash.reserve("team", "u1", SKU, 1, "k1")
    assert (await stock_of(engine, campaign_id="team")).available == 10
    assert await redis.hlen(keys_of("team").orders) == 0
    await assert_invariants(engine, "team")


async def test_third_attempt_in_one_second_is_rate_limited(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    settings = make_settings(redis_server.url, tmp_path, rate_limit=2)
    async with await Engine.open(settings) as engine:
        await open_sale(engine, limit=10)
        await early_in_a_second(engine.runtime.now)
        await engine.flash.reserve(CID, "u1", SKU, 1, "k1")
        await engine.flash.reserve(CID, "u1", SKU, 1, "k2")
        with pytest.raises(RateLimited) as caught:
            await engine.flash.reserve(CID, "u1", SKU, 1, "k3")
        retry_after = caught.value.details["retry_after"]
        assert 0 < retry_after <= 1
        # The rejected attempt reserved nothing; another user has a budget of their own.
        assert await held_units(redis, "u1") == 2
        assert (await stock_of(engine)).held == 2
        other = await engine.flash.reserve(CID, "u2", SKU, 1, "k1")
        assert other.order.state is OrderState.HELD
        # An idempotent retry of an accepted attempt is answered even while limited.
        replay = await engine.flash.reserve(CID, "u1", SKU, 1, "k1")
        assert replay.replayed
        await assert_invariants(engine, CID)


_BAD_RESERVATIONS: list[tuple[str, str, str, Any, Any, str]] = [
    (CID, "u1", SKU, 0, "k1", "qty"),
    (CID, "u1", SKU, -1, "k1", "qty"),
    (CID, "u1", SKU, True, "k1", "qty"),
    (CID, "u1", SKU, 1.0, "k1", "qty"),
    (CID, "u1", SKU, "1", "k1", "qty"),
    (CID, "u1", SKU, 1_000_000_001, "k1", "qty"),
    (CID, "", SKU, 1, "k1", "user_id"),
    (CID, "u{1}", SKU, 1, "k1", "user_id"),
    (CID, "u 1", SKU, 1, "k1", "user_id"),
    (CID, "u:1", SKU, 1, "k1", "user_id"),
    (CID, "u" * 65, SKU, 1, "k1", "user_id"),
    (CID, "u1", "", 1, "k1", "sku"),
    (CID, "u1", "sku}", 1, "k1", "sku"),
    (CID, "u1", "sku 1", 1, "k1", "sku"),
    (CID, "u1", SKU, 1, "", "idempotency_key"),
    (CID, "u1", SKU, 1, "k{1}", "idempotency_key"),
    (CID, "u1", SKU, 1, "k 1", "idempotency_key"),
    (CID, "u1", SKU, 1, "k" * 129, "idempotency_key"),
    (CID, "u1", SKU, 1, None, "idempotency_key"),
    ("sa{le}", "u1", SKU, 1, "k1", "campaign_id"),
]


@pytest.mark.parametrize(
    ("campaign_id", "user", "sku", "qty", "key", "field"),
    _BAD_RESERVATIONS,
    ids=[f"{row[5]}-{i}" for i, row in enumerate(_BAD_RESERVATIONS)],
)
async def test_invalid_reservation_is_a_validation_error_writing_nothing(
    engine: Engine,
    redis: aioredis.Redis,
    campaign_id: str,
    user: str,
    sku: str,
    qty: Any,
    key: Any,
    field: str,
) -> None:
    await open_sale(engine)
    size = await redis.dbsize()
    with pytest.raises(ValidationError) as caught:
        await engine.flash.reserve(campaign_id, user, sku, qty, key)
    assert caught.value.details.get("field") == field
    assert await redis.dbsize() == size
    assert await redis.hlen(KEYS.orders) == 0
    assert await events(redis) == []
    assert (await stock_of(engine)).available == 100
    await assert_invariants(engine, CID)


async def test_idempotent_retry_returns_the_original_order(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine, limit=5)
    first = await engine.flash.reserve(CID, "u1", SKU, 2, "k1")
    again = await engine.flash.reserve(CID, "u1", SKU, 2, "k1")
    assert again.replayed
    assert again.order == first.order
    assert (await stock_of(engine)).held == 2
    assert len(await events(redis)) == 1
    # The same key by another user is another reservation.
    other = await engine.flash.reserve(CID, "u2", SKU, 2, "k1")
    assert other.order.order_id != first.order.order_id
    assert not other.replayed
    await assert_invariants(engine, CID)


@pytest.mark.parametrize(("sku", "qty"), [(SKU, 1), ("sku-2", 2)])
async def test_idempotency_key_reused_with_other_parameters_is_rejected(
    engine: Engine, redis: aioredis.Redis, sku: str, qty: int
) -> None:
    await open_sale(engine, limit=5, skus=(SKU, "sku-2"))
    await engine.flash.reserve(CID, "u1", SKU, 2, "k1")
    with pytest.raises(IdempotencyMismatch):
        await engine.flash.reserve(CID, "u1", sku, qty, "k1")
    assert await redis.hlen(KEYS.orders) == 1
    assert await held_units(redis, "u1") == 2
    assert len(await events(redis)) == 1
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- pay


async def test_pay_moves_held_units_to_paid(engine: Engine, redis: aioredis.Redis) -> None:
    await open_sale(engine)
    order = await hold(engine, "u1", 2)
    paid = await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")

    assert paid.state is OrderState.PAID
    assert paid.payment_ref == f"pay-1-{order.order_id}"
    assert paid.version == order.version + 1
    assert (paid.amount, paid.qty, paid.created_at) == (order.amount, 2, order.created_at)
    assert await engine.orders.get(order.order_id) == paid
    stock = await stock_of(engine)
    assert (stock.available, stock.held, stock.paid) == (98, 0, 2)
    assert await redis.zscore(KEYS.deadlines, order.order_id) is None
    assert await held_units(redis, "u1") == 2
    await assert_invariants(engine, CID)


async def test_pay_retry_with_the_same_ref_is_a_no_op(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine)
    order = await hold(engine)
    paid = await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    count = len(await events(redis))
    again = await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    assert again == paid
    assert again.version == paid.version
    assert len(await events(redis)) == count
    assert (await stock_of(engine)).paid == 1
    await assert_invariants(engine, CID)


async def test_pay_with_another_ref_on_a_paid_order_is_invalid_state(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine)
    order = await hold(engine)
    paid = await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    with pytest.raises(InvalidState) as caught:
        await engine.orders.pay(order.order_id, "u1", f"pay-2-{order.order_id}")
    assert caught.value.details == {"state": "paid"}
    assert await engine.orders.get(order.order_id) == paid
    assert (await stock_of(engine)).paid == 1
    await assert_invariants(engine, CID)


async def test_pay_by_another_user_is_forbidden(engine: Engine, redis: aioredis.Redis) -> None:
    await open_sale(engine)
    order = await hold(engine, "u1")
    with pytest.raises(Forbidden):
        await engine.orders.pay(order.order_id, "u2", f"pay-1-{order.order_id}")
    assert await engine.orders.get(order.order_id) == order
    assert (await stock_of(engine)).held == 1
    assert len(await events(redis)) == 1
    await assert_invariants(engine, CID)


@pytest.mark.parametrize("order_id", [f"{CID}.o999", "nope.o1"])
async def test_pay_unknown_order_is_not_found(
    engine: Engine, redis: aioredis.Redis, order_id: str
) -> None:
    await open_sale(engine)
    await hold(engine)
    with pytest.raises(NotFound):
        await engine.orders.pay(order_id, "u1", f"pay-1-{order_id}")
    with pytest.raises(NotFound):
        await engine.orders.get(order_id)
    assert (await stock_of(engine)).held == 1
    await assert_invariants(engine, CID)


@pytest.mark.parametrize(
    "order_id", ["", CID, f"{CID}.o", f"{CID}.x1", f"{CID}.o1 ", "sa{le}.o1", f"{CID}.o-1"]
)
async def test_pay_malformed_order_id_is_a_validation_error(
    engine: Engine, redis: aioredis.Redis, order_id: str
) -> None:
    await open_sale(engine)
    await hold(engine)
    size = await redis.dbsize()
    with pytest.raises(ValidationError) as caught:
        await engine.orders.pay(order_id, "u1", f"pay-1-{order_id}")
    assert caught.value.details == {"field": "order_id"}
    assert await redis.dbsize() == size


@pytest.mark.parametrize(("user", "ref"), [("u{1}", "pay-1"), ("u1", "pay 1"), ("u1", "")])
async def test_pay_with_invalid_user_or_ref_is_a_validation_error(
    engine: Engine, redis: aioredis.Redis, user: str, ref: str
) -> None:
    await open_sale(engine)
    order = await hold(engine)
    with pytest.raises(ValidationError):
        await engine.orders.pay(order.order_id, user, ref)
    assert await engine.orders.get(order.order_id) == order


async def test_pay_at_the_deadline_is_hold_expired(engine: Engine, redis: aioredis.Redis) -> None:
    await open_sale(engine)
    order = await hold(engine)
    await age_order(engine, order.order_id, HOLD_MS)  # deadline == created_at <= now
    with pytest.raises(HoldExpired) as caught:
        await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    assert caught.value.code == "hold_expired"
    # Pay does not end the hold itself: the order stays held until the reaper runs.
    assert (await engine.orders.get(order.order_id)).state is OrderState.HELD
    stock = await stock_of(engine)
    assert (stock.held, stock.paid) == (1, 0)
    await assert_invariants(engine, CID)


async def test_pay_after_the_reaper_expired_the_order_is_hold_expired(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine)
    order = await hold(engine)
    await age_past_deadline(engine, order)
    assert await engine.reaper.run_once() == 1
    with pytest.raises(HoldExpired):
        await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    assert (await engine.orders.get(order.order_id)).state is OrderState.EXPIRED
    stock = await stock_of(engine)
    assert (stock.available, stock.held, stock.paid) == (100, 0, 0)
    await assert_invariants(engine, CID)


async def test_pay_of_a_cancelled_order_is_invalid_state(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine)
    order = await hold(engine)
    await engine.orders.cancel(order.order_id, "u1")
    with pytest.raises(InvalidState) as caught:
        await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    assert caught.value.details == {"state": "cancelled"}
    assert (await stock_of(engine)).available == 100
    await assert_invariants(engine, CID)


async def test_pay_script_rejects_a_held_order_of_an_invalidated_campaign(
    engine: Engine, redis: aioredis.Redis
) -> None:
    """pay_order.lua code 4, hit before any cascade: only the invalidation step has run."""
    await open_sale(engine)
    order = await hold(engine)
    await engine.runtime.scripts.invalidate(CID)
    with pytest.raises(Invalidated):
        await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    assert (await engine.orders.get(order.order_id)).state is OrderState.HELD
    assert (await stock_of(engine)).paid == 0
    await assert_invariants(engine, CID)


async def test_pay_after_invalidation_is_rejected_and_the_cascade_cancels_the_hold(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine)
    order = await hold(engine)
    await engine.campaigns.invalidate(CID)
    with pytest.raises((Invalidated, InvalidState)) as caught:
        await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    if isinstance(caught.value, InvalidState):
        assert caught.value.details == {"state": "cancelled"}

    await engine.reaper.run_once()  # finishes the cascade if invalidate left it to the reaper
    cancelled = await engine.orders.get(order.order_id)
    assert cancelled.state is OrderState.CANCELLED
    with pytest.raises(InvalidState):
        await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    assert [e["reason"] for e in await events_of(redis, order.order_id)] == [
        "user",
        "invalidated",
    ]
    stock = await stock_of(engine)
    assert (stock.available, stock.held, stock.paid) == (100, 0, 0)
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- cancel


async def test_cancel_returns_the_stock_at_once(engine: Engine, redis: aioredis.Redis) -> None:
    await open_sale(engine, stock=2, limit=2)
    order = await hold(engine, "u1", 2)
    with pytest.raises(SoldOut):
        await engine.flash.reserve(CID, "u2", SKU, 1, "k1")

    cancelled = await engine.orders.cancel(order.order_id, "u1")
    assert cancelled.state is OrderState.CANCELLED
    assert cancelled.version == order.version + 1
    stock = await stock_of(engine)
    assert (stock.available, stock.held) == (2, 0)
    assert await held_units(redis, "u1") == 0
    assert await redis.zscore(KEYS.deadlines, order.order_id) is None
    resold = await engine.flash.reserve(CID, "u2", SKU, 2, "k1")
    assert resold.order.state is OrderState.HELD
    await assert_invariants(engine, CID)


async def test_cancel_retry_returns_the_same_cancelled_order(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine)
    order = await hold(engine)
    cancelled = await engine.orders.cancel(order.order_id, "u1")
    count = len(await events(redis))
    again = await engine.orders.cancel(order.order_id, "u1")
    assert again == cancelled
    assert len(await events(redis)) == count
    assert (await stock_of(engine)).available == 100
    await assert_invariants(engine, CID)


async def test_cancel_by_another_user_is_forbidden(engine: Engine, redis: aioredis.Redis) -> None:
    await open_sale(engine)
    order = await hold(engine, "u1")
    with pytest.raises(Forbidden):
        await engine.orders.cancel(order.order_id, "u2")
    assert await engine.orders.get(order.order_id) == order
    assert (await stock_of(engine)).held == 1
    await assert_invariants(engine, CID)


async def test_cancel_of_a_paid_order_is_invalid_state(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine)
    order = await hold(engine)
    paid = await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    with pytest.raises(InvalidState) as caught:
        await engine.orders.cancel(order.order_id, "u1")
    assert caught.value.details == {"state": "paid"}
    assert await engine.orders.get(order.order_id) == paid
    assert (await stock_of(engine)).paid == 1
    await assert_invariants(engine, CID)


async def test_cancel_of_an_expired_order_answers_it_as_it_is(
    engine: Engine, redis: aioredis.Redis
) -> None:
    """The hold ended before the shopper's cancel: the cancel answers the expired order and
    changes nothing (no event, the units returned once)."""
    await open_sale(engine)
    order = await hold(engine)
    await age_past_deadline(engine, order)
    await engine.reaper.expire_campaign(CID)
    expired = await engine.orders.get(order.order_id)
    events = await redis.xlen(keys_of(CID).events)
    answered = await engine.orders.cancel(order.order_id, "u1")
    assert answered == expired and answered.state is OrderState.EXPIRED
    assert await redis.xlen(keys_of(CID).events) == events
    assert (await stock_of(engine)).available == 100
    await assert_invariants(engine, CID)


@pytest.mark.parametrize("order_id", [f"{CID}.o999", "nope.o1"])
async def test_cancel_unknown_order_is_not_found(
    engine: Engine, redis: aioredis.Redis, order_id: str
) -> None:
    await open_sale(engine)
    await hold(engine)
    with pytest.raises(NotFound):
        await engine.orders.cancel(order_id, "u1")
    assert (await stock_of(engine)).held == 1
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- refund


@pytest.mark.parametrize(("restock", "available", "gone"), [(True, 100, 0), (False, 98, 2)])
async def test_refund_returns_units_to_sale_only_on_restock(
    engine: Engine, redis: aioredis.Redis, restock: bool, available: int, gone: int
) -> None:
    await open_sale(engine)
    order = await hold(engine, "u1", 2)
    paid = await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    refunded = await engine.orders.refund(order.order_id, restock)

    assert refunded.state is OrderState.REFUNDED
    assert refunded.version == paid.version + 1
    assert refunded.payment_ref == f"pay-1-{order.order_id}"
    stock = await stock_of(engine)
    assert (stock.available, stock.held, stock.paid, stock.gone) == (available, 0, 0, gone)
    assert stock.available + stock.held + stock.paid + stock.gone == stock.initial
    assert await held_units(redis, "u1") == 0
    [event] = [e for e in await events_of(redis, order.order_id) if e["type"] == "order.refunded"]
    assert event["reason"] == ("restock" if restock else "no_restock")
    await assert_invariants(engine, CID)


async def test_refund_retry_is_a_no_op(engine: Engine, redis: aioredis.Redis) -> None:
    await open_sale(engine)
    order = await hold(engine)
    await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    refunded = await engine.orders.refund(order.order_id, True)
    count = len(await events(redis))
    for restock in (True, False):
        assert await engine.orders.refund(order.order_id, restock) == refunded
    assert len(await events(redis)) == count
    stock = await stock_of(engine)
    assert (stock.available, stock.gone) == (100, 0)
    await assert_invariants(engine, CID)


async def test_refund_of_an_order_that_is_not_paid_is_invalid_state(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine, limit=5)
    held = await hold(engine, "u1", 1)
    cancelled = await hold(engine, "u1", 2)
    await engine.orders.cancel(cancelled.order_id, "u1")
    expired = await hold(engine, "u2", 1)
    await age_past_deadline(engine, expired)
    await engine.reaper.expire_campaign(CID)

    for order, state in ((held, "held"), (cancelled, "cancelled"), (expired, "expired")):
        before = await engine.orders.get(order.order_id)
        with pytest.raises(InvalidState) as caught:
            await engine.orders.refund(order.order_id, True)
        assert caught.value.details == {"state": state}
        assert await engine.orders.get(order.order_id) == before
    stock = await stock_of(engine)
    assert (stock.available, stock.held, stock.gone) == (99, 1, 0)
    with pytest.raises(NotFound):
        await engine.orders.refund(f"{CID}.o999", True)
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- expiry


async def test_reaper_expires_a_due_hold_exactly_once(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine, limit=5)
    due = await hold(engine, "u1", 3)
    not_due = await hold(engine, "u2", 1)
    await age_past_deadline(engine, due)

    assert await engine.reaper.run_once() == 1
    expired = await engine.orders.get(due.order_id)
    assert expired.state is OrderState.EXPIRED
    assert expired.version == due.version + 1
    assert (await engine.orders.get(not_due.order_id)).state is OrderState.HELD
    stock = await stock_of(engine)
    assert (stock.available, stock.held) == (99, 1)
    assert await held_units(redis, "u1") == 0
    [event] = [e for e in await events_of(redis, due.order_id) if e["type"] == "order.expired"]
    assert event["reason"] == "deadline"
    assert Order.from_record(due.order_id, event["record"]) == expired

    assert await engine.reaper.run_once() == 0
    assert await engine.reaper.expire_campaign(CID) == (0, False)
    assert len(await events_of(redis, due.order_id)) == 2
    assert (await stock_of(engine)).available == 99
    await assert_invariants(engine, CID)


async def test_concurrent_reapers_expire_each_of_200_holds_exactly_once(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    # Small batches, so the two reapers' script calls interleave.
    settings = make_settings(redis_server.url, tmp_path, reaper_batch=7)
    async with await Engine.open(settings) as engine:
        await open_sale(engine, stock=250, limit=1)
        orders = await asyncio.gather(*(hold(engine, f"u{n}") for n in range(200)))
        await asyncio.gather(*(age_past_deadline(engine, order) for order in orders))

        results = await asyncio.gather(
            engine.reaper.expire_campaign(CID), engine.reaper.expire_campaign(CID)
        )
        assert sum(ended for ended, _ in results) == 200

        expired_events = [e for e in await events(redis) if e["type"] == "order.expired"]
        per_order: dict[str, int] = {}
        for event in expired_events:
            per_order[event["order"]] = per_order.get(event["order"], 0) + 1
        assert per_order == {order.order_id: 1 for order in orders}
        states = {(await engine.orders.get(o.order_id)).state for o in orders}
        assert states == {OrderState.EXPIRED}
        stock = await stock_of(engine)
        assert (stock.available, stock.held) == (250, 0)
        assert await redis.zcard(KEYS.deadlines) == 0
        await assert_invariants(engine, CID)


async def test_an_order_paid_before_its_deadline_is_never_expired(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine)
    order = await hold(engine)
    paid = await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    await age_past_deadline(engine, order)
    assert await engine.reaper.run_once() == 0
    assert await engine.reaper.expire_campaign(CID) == (0, False)
    current = await engine.orders.get(order.order_id)
    assert current.state is OrderState.PAID
    assert current.version == paid.version
    assert [e["type"] for e in await events_of(redis, order.order_id)] == [
        "order.reserved",
        "order.paid",
    ]
    assert (await stock_of(engine)).paid == 1
    await assert_invariants(engine, CID)


async def test_reaper_drops_an_index_entry_of_an_order_that_is_not_held(
    engine: Engine, redis: aioredis.Redis
) -> None:
    """expire_orders.lua only ends held orders: a stale deadline entry is removed, not acted on."""
    await open_sale(engine)
    order = await hold(engine)
    paid = await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    await redis.zadd(KEYS.deadlines, {order.order_id: 0})  # planted: no script leaves this
    await engine.reaper.run_once()
    assert await engine.orders.get(order.order_id) == paid
    assert await redis.zcard(KEYS.deadlines) == 0
    assert (await stock_of(engine)).paid == 1
    assert len(await events_of(redis, order.order_id)) == 2
    await assert_invariants(engine, CID)


async def test_expire_orders_script_reports_what_comes_next(
    engine: Engine, redis: aioredis.Redis
) -> None:
    """expire_orders.lua's second reply: 0 more due, a deadline, -1 none held, -2 over."""
    scripts = engine.runtime.scripts

    async def step(batch: int) -> tuple[int, int]:
        done = await scripts.expire_orders(CID, batch)
        return done.ended, done.upcoming

    await open_sale(engine, limit=5)
    assert await step(10) == (0, -1)
    first, second, later = [await hold(engine, f"u{n}") for n in range(3)]
    await age_past_deadline(engine, first)
    await age_past_deadline(engine, second)

    assert await step(1) == (1, 0)
    assert await step(1) == (1, int(later.expires_at.timestamp() * 1000))
    assert await step(10) == (0, int(later.expires_at.timestamp() * 1000))
    await engine.orders.cancel(later.order_id, "u2")
    assert await step(10) == (0, -1)
    await assert_invariants(engine, CID)

    await engine.campaigns.invalidate(CID)
    assert await step(10) == (0, -2)


async def test_reaper_forgets_a_campaign_that_is_over(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine)
    order = await hold(engine)
    assert await redis.sismember(CAMPAIGN_SET, CID)
    await engine.campaigns.invalidate(CID)
    await engine.reaper.run_once()
    assert (await engine.orders.get(order.order_id)).state is OrderState.CANCELLED
    assert not await redis.sismember(CAMPAIGN_SET, CID)
    assert await engine.reaper.expire_campaign(CID) == (0, True)
    await assert_invariants(engine, CID)


# --------------------------------------------------------------------------- outbox events


async def test_every_state_change_appends_exactly_one_event(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine, limit=5)
    refunded = await hold(engine, "u1")
    await engine.orders.pay(refunded.order_id, "u1", f"pay-1-{refunded.order_id}")
    await engine.orders.refund(refunded.order_id, False)
    cancelled = await hold(engine, "u2")
    await engine.orders.cancel(cancelled.order_id, "u2")
    expired = await hold(engine, "u3")
    await age_past_deadline(engine, expired)
    await engine.reaper.run_once()

    expected = {
        refunded.order_id: ["order.reserved", "order.paid", "order.refunded"],
        cancelled.order_id: ["order.reserved", "order.cancelled"],
        expired.order_id: ["order.reserved", "order.expired"],
    }
    stream = await events(redis)
    assert len(stream) == sum(len(types) for types in expected.values())
    for order_id, types in expected.items():
        mine = await events_of(redis, order_id)
        assert [e["type"] for e in mine] == types
        records = [Order.from_record(order_id, e["record"]) for e in mine]
        assert [r.version for r in records] == list(range(1, len(types) + 1))
        assert [r.state for r in records] == [STATE_OF_EVENT[t] for t in types]
        assert records[-1] == await engine.orders.get(order_id)
        assert all(int(e["at"]) > 0 for e in mine)
    await assert_invariants(engine, CID)


async def test_rejections_and_retries_append_no_event(
    engine: Engine, redis: aioredis.Redis
) -> None:
    await open_sale(engine, stock=2, limit=2)
    order = await hold(engine, "u1", 2, key="k1")
    await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")
    count = len(await events(redis))

    await engine.flash.reserve(CID, "u1", SKU, 2, "k1")  # idempotent replay
    await engine.orders.pay(order.order_id, "u1", f"pay-1-{order.order_id}")  # payment retry
    rejected: list[tuple[type[Exception], Callable[[], Awaitable[object]]]] = [
        (SoldOut, lambda: engine.flash.reserve(CID, "u2", SKU, 1, "k2")),
        (LimitExceeded, lambda: engine.flash.reserve(CID, "u1", SKU, 1, "k3")),
        (IdempotencyMismatch, lambda: engine.flash.reserve(CID, "u1", SKU, 1, "k1")),
        (Forbidden, lambda: engine.orders.pay(order.order_id, "u2", f"pay-1-{order.order_id}")),
        (InvalidState, lambda: engine.orders.pay(order.order_id, "u1", f"pay-2-{order.order_id}")),
        (InvalidState, lambda: engine.orders.cancel(order.order_id, "u1")),
        (NotFound, lambda: engine.flash.reserve(CID, "u1", "sku-x", 1, "k4")),
    ]
    for error, call in rejected:
        with pytest.raises(error):
            await call()
    assert len(await events(redis)) == count
    await assert_invariants(engine, CID)


async def test_the_rate_limit_keeps_no_key_per_user(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Attempts are counted in the campaign's two window hashes (even and odd seconds), which
    forget a second two seconds later and expire with an idle campaign: 300 shoppers leave
    no key of their own."""
    settings = make_settings(redis_server.url, tmp_path, rate_limit=2)
    async with await Engine.open(settings) as engine:
        await open_sale(engine, limit=1, stock=1_000)
        await asyncio.gather(*(engine.flash.reserve(CID, f"u{n}", SKU, 1, "k") for n in range(300)))
        keys = {str(k) for k in await redis.keys("*rl*")}
        assert keys <= set(keys_of(CID).rate_windows) and keys, keys
        counted = [await redis.hlen(k) for k in keys]
        assert 0 < sum(counted) <= 300 + 2  # users of at most two seconds, and ':s' each
        assert all([0 < await redis.pttl(k) <= 2_000 for k in keys])

        async def forgotten() -> bool:
            return not await redis.exists(*keys_of(CID).rate_windows)

        await eventually(forgotten, 5, what="the windows to expire with the campaign idle")


# --------------------------------------------------------------------------- the per-order cap


async def test_per_order_cap_refuses_a_bigger_order_writing_nothing(
    engine: Engine, redis: aioredis.Redis
) -> None:
    """At most 1 unit per order, at most 3 per user across orders: the cap is checked in the
    reservation script before any write, ahead of the per-user limit and the stock."""
    await open_sale(engine, limit=3, per_order_limit=1, stock=2)
    assert await redis.hget(KEYS.meta, "order_limit") == "1"
    with pytest.raises(OrderLimitExceeded) as caught:
        await engine.flash.reserve(CID, "u1", SKU, 2, "k-two")
    assert caught.value.details == {"per_order_limit": 1}
    assert caught.value.code == "order_limit_exceeded"
    with pytest.raises(OrderLimitExceeded):  # over the stock too: the cap is said first
        await engine.flash.reserve(CID, "u1", SKU, 3, "k-three")
    assert await events(redis) == []
    assert await redis.hlen(KEYS.orders) == 0
    assert await held_units(redis, "u1") == 0
    assert (await stock_of(engine)).available == 2

    # The same key with an allowed qty is a new request (nothing was remembered).
    first = await hold(engine, "u1", 1, key="k-two")
    assert first.amount == PRICE
    await engine.orders.pay(first.order_id, "u1", f"pay-1-{first.order_id}")
    await hold(engine, "u1", 1, key="k-second")
    with pytest.raises(SoldOut):
        await engine.flash.reserve(CID, "u1", SKU, 1, "k-third")
    await assert_invariants(engine, CID)


async def test_per_order_cap_and_the_per_user_total(engine: Engine, redis: aioredis.Redis) -> None:
    await open_sale(engine, limit=3, per_order_limit=2)
    await hold(engine, "u1", 2, key="k1")
    held = await hold(engine, "u1", 1, key="k2")
    with pytest.raises(LimitExceeded) as caught:
        await engine.flash.reserve(CID, "u1", SKU, 1, "k3")
    assert caught.value.details == {"units_left": 0}
    with pytest.raises(OrderLimitExceeded):  # the cap first, whatever the limit left
        await engine.flash.reserve(CID, "u1", SKU, 3, "k3")
    await engine.orders.cancel(held.order_id, "u1")
    assert (await hold(engine, "u1", 1, key="k3")).qty == 1
    retry = await engine.flash.reserve(CID, "u1", SKU, 2, "k1")  # a retry replays, cap or not
    assert retry.replayed and retry.order.qty == 2
    await assert_invariants(engine, CID)


async def test_per_order_cap_inside_a_coalesced_batch(
    engine: Engine, redis: aioredis.Redis
) -> None:
    """Concurrent reservations run as one batch.lua call: each over the cap gets its own
    rejection, the others their orders, in one script call."""
    await open_sale(engine, limit=5, per_order_limit=2, stock=100)
    calls: Counter[str] = Counter()
    engine.runtime.scripts.observe = lambda name, _: calls.update((name,))
    wants = [(f"u{n}", n % 4 + 1) for n in range(40)]  # qty 1, 2, 3, 4, 1, 2, ...
    results = await asyncio.gather(
        *(engine.flash.reserve(CID, user, SKU, qty, f"k{user}") for user, qty in wants),
        return_exceptions=True,
    )
    assert calls == {"batch": 1}, calls
    for (user, qty), result in zip(wants, results, strict=True):
        if qty <= 2:
            assert not isinstance(result, BaseException), result
            assert (result.order.user_id, result.order.qty) == (user, qty)
        else:
            assert isinstance(result, OrderLimitExceeded), result
            assert result.details == {"per_order_limit": 2}
    assert (await stock_of(engine)).held == 10 * 1 + 10 * 2
    assert await redis.hlen(KEYS.orders) == 20
    await assert_invariants(engine, CID)


async def test_per_order_cap_in_every_bucket_of_a_sharded_campaign(
    engine: Engine, redis: aioredis.Redis
) -> None:
    """Each stock bucket's definition carries the cap: an order over it is refused in the
    shopper's bucket (no rebalancing for it), one within it is served there."""
    campaign = dataclasses.replace(
        flash_campaign(await engine.runtime.now(), CID, limit=3, per_order_limit=1, stock=30),
        shards=3,
    )
    created = (await engine.campaigns.create(campaign)).campaign
    for shard in created.shard_ids:
        assert await redis.hget(keys_of(shard).meta, "order_limit") == "1"
    users = [f"s{n}" for n in range(24)]
    refused = await asyncio.gather(
        *(engine.flash.reserve(CID, user, SKU, 2, f"k-{user}") for user in users),
        return_exceptions=True,
    )
    assert all(isinstance(r, OrderLimitExceeded) for r in refused), refused
    held = await asyncio.gather(
        *(engine.flash.reserve(CID, user, SKU, 1, f"k-{user}") for user in users)
    )
    layout = await engine.runtime.layout(CID)
    buckets = Counter(shard_of_order(r.order.order_id) for r in held)
    assert set(buckets) == set(created.shard_ids), buckets
    for reservation in held:
        order = reservation.order
        assert shard_of_order(order.order_id) == layout.shard_of_user(order.user_id)
    assert sum(item.held for item in (await engine.campaigns.get(CID)).stock) == 24
    await assert_invariants(engine, CID)
