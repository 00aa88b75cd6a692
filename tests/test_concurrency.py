"""Concurrency: thousands of callers on one hot item never oversell and never leak stock.

Every test runs against a real redis-server and again against a real 3-master Redis Cluster.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

from engine import (
    Engine,
    InvalidState,
    LimitExceeded,
    Order,
    OrderState,
    Reservation,
    SoldOut,
)
from engine.keys import keys_of
from testkit.factories import flash_campaign
from testkit.helpers import age_order, assert_invariants


def _attempting_users(attempts: int, users: int, seed: int) -> list[str]:
    """``attempts`` user ids over ``users`` users: every user at least once, many repeatedly."""
    rng = random.Random(seed)
    drawn = list(range(users)) + [rng.randrange(users) for _ in range(attempts - users)]
    rng.shuffle(drawn)
    return [f"u{n}" for n in drawn]


async def test_hot_item_sells_exactly_its_stock(any_engine: Engine) -> None:
    engine = any_engine
    now = await engine.runtime.now()
    await engine.campaigns.create(flash_campaign(now, "hot", stock=100, limit=1))
    users = _attempting_users(5_000, 3_000, seed=7)
    assert max(Counter(users).values()) >= 3, "the draw must give users repeated attempts"

    results = await asyncio.gather(
        *(
            engine.flash.reserve("hot", user, "sku-1", 1, f"attempt-{i}")
            for i, user in enumerate(users)
        ),
        return_exceptions=True,
    )

    won: Counter[str] = Counter()
    limited: set[str] = set()
    sold_out = 0
    for user, result in zip(users, results, strict=True):
        if isinstance(result, Reservation):
            assert not result.replayed, "every attempt has its own idempotency key"
            assert result.order.user_id == user
            assert result.order.state is OrderState.HELD
            won[user] += 1
        elif isinstance(result, LimitExceeded):
            limited.add(user)
        elif isinstance(result, SoldOut):
            sold_out += 1
        else:
            raise AssertionError(f"unexpected outcome for {user}: {result!r}")
    assert sum(won.values()) == 100
    assert max(won.values()) == 1, "a user holds more than per_user_limit units"
    assert limited <= set(won), "only a user who already holds a unit can exceed the limit"
    assert sold_out + len([r for r in results if isinstance(r, LimitExceeded)]) == 4_900

    (stock,) = (await engine.campaigns.get("hot")).stock
    assert (stock.initial, stock.available, stock.held, stock.paid) == (100, 0, 100, 0)
    orders = await engine.runtime.redis.hgetall(keys_of("hot").orders)
    assert len(orders) == 100
    await assert_invariants(engine, "hot")


async def _flow(engine: Engine, user: str, rounds: int, rng: random.Random) -> list[Order]:
    """One shopper: reserve, then pay, cancel, race pay against cancel, or walk away."""
    final: list[Order] = []
    for n in range(rounds):
        try:
            held = await engine.flash.reserve("mixed", user, "sku-1", 1, f"{user}-{n}")
        except (SoldOut, LimitExceeded):
            continue
        order_id = held.order.order_id
        action = rng.choice(("pay", "pay", "cancel", "race", "walk_away"))
        if action == "pay":
            final.append(await engine.orders.pay(order_id, user, f"pay-{order_id}"))
            # A gateway retry of the same payment is a no-op success.
            assert (await engine.orders.pay(order_id, user, f"pay-{order_id}")).state is (
                OrderState.PAID
            )
        elif action == "cancel":
            final.append(await engine.orders.cancel(order_id, user))
        elif action == "race":
            outcomes = await asyncio.gather(
                engine.orders.pay(order_id, user, f"pay-{order_id}"),
                engine.orders.cancel(order_id, user),
                return_exceptions=True,
            )
            winners = [o for o in outcomes if isinstance(o, Order)]
            losers = [o for o in outcomes if isinstance(o, InvalidState)]
            assert len(winners) == 1 and len(losers) == 1, outcomes
            final.append(winners[0])
        else:
            final.append(held.order)
    return final


async def test_mixed_reserve_pay_cancel_then_reaper(any_engine: Engine) -> None:
    engine = any_engine
    now = await engine.runtime.now()
    await engine.campaigns.create(flash_campaign(now, "mixed", stock=300, limit=2))
    rng = random.Random(11)
    # 500 shoppers x 4 rounds: 2,000 reservation attempts interleaved with pays and cancels.
    flows = await asyncio.gather(
        *(_flow(engine, f"s{n}", 4, random.Random(rng.random())) for n in range(500))
    )
    orders = [order for flow in flows for order in flow]
    by_state = Counter(order.state for order in orders)
    assert by_state[OrderState.PAID] > 0
    assert by_state[OrderState.CANCELLED] > 0
    assert by_state[OrderState.HELD] > 0
    await assert_invariants(engine, "mixed")

    (stock,) = (await engine.campaigns.get("mixed")).stock
    assert stock.paid == by_state[OrderState.PAID]
    assert stock.held == by_state[OrderState.HELD]
    assert stock.available == 300 - stock.paid - stock.held

    held_ids = [order.order_id for order in orders if order.state is OrderState.HELD]
    for order_id in held_ids:
        await age_order(engine, order_id, 61_000)
    assert await engine.reaper.run_once() == len(held_ids)
    assert await engine.reaper.run_once() == 0, "an expiry was applied twice"

    (stock,) = (await engine.campaigns.get("mixed")).stock
    assert stock.held == 0
    assert stock.available == stock.initial - stock.paid == 300 - by_state[OrderState.PAID]
    for order in orders:
        current = await engine.orders.get(order.order_id)
        expected = OrderState.EXPIRED if order.state is OrderState.HELD else order.state
        assert current.state is expected, order.order_id
    await assert_invariants(engine, "mixed")
