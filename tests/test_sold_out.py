"""The sold-out fast path (docs/lifecycle.md#order): after a sell-out, reservations of that
item skip the reservation script for a moment, yet retries still get their orders and returned
stock sells again. How long a returned unit takes to sell again is a benchmark figure
(bench/test_sold_out.py), not an assertion here."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engine import Engine, IdempotencyMismatch, OrderState, Reservation, SoldOut
from testkit.factories import flash_campaign, make_settings
from testkit.helpers import assert_invariants, eventually


@pytest.fixture
async def fast(redis: Any, redis_server: Any, tmp_path: Path) -> AsyncIterator[Engine]:
    settings = make_settings(redis_server.url, tmp_path, sold_out_ttl=0.5)
    async with await Engine.open(settings) as engine:
        await engine.campaigns.create(
            flash_campaign(await engine.runtime.now(), stock=3, limit=1, skus=("hot", "cold"))
        )
        yield engine


async def _sell_out(engine: Engine) -> list[str]:
    orders = [await engine.flash.reserve("sale", f"u{i}", "hot", 1, "k") for i in range(3)]
    with pytest.raises(SoldOut):  # this one finds 0 left and raises the flag
        await engine.flash.reserve("sale", "late", "hot", 1, "k")
    return [r.order.order_id for r in orders]


async def test_sold_out_answers_skip_the_reservation_script(fast: Engine) -> None:
    await _sell_out(fast)
    calls = Counter[str]()
    fast.runtime.scripts.observe = lambda name, _: calls.update((name,))
    rejected = await asyncio.gather(
        *(fast.flash.reserve("sale", f"v{i}", "hot", 1, "k") for i in range(200)),
        return_exceptions=True,
    )
    assert all(isinstance(r, SoldOut) for r in rejected)
    assert calls["reserve_stock"] == 0, calls
    assert 1 <= calls["batch"] <= 4, calls  # the 200 probes rode in a couple of batches
    # Another item of the same campaign is not affected.
    cold = await fast.flash.reserve("sale", "v1", "cold", 1, "k-cold")
    assert cold.order.state is OrderState.HELD
    await assert_invariants(fast, "sale")


async def test_a_retry_still_gets_its_order_after_the_sell_out(fast: Engine) -> None:
    order_ids = await _sell_out(fast)
    again = await fast.flash.reserve("sale", "u0", "hot", 1, "k")
    assert again.replayed and again.order.order_id == order_ids[0]
    with pytest.raises(IdempotencyMismatch):
        await fast.flash.reserve("sale", "u0", "hot", 2, "k")


async def test_cancelled_stock_sells_again(fast: Engine) -> None:
    order_ids = await _sell_out(fast)
    await fast.orders.cancel(order_ids[0], "u0")
    attempts = itertools.count()

    async def resold() -> Reservation | None:
        try:  # each attempt is a new request, with its own idempotency key
            return await fast.flash.reserve("sale", "patient", "hot", 1, f"try-{next(attempts)}")
        except SoldOut:  # the fast path still answers from its flag
            return None

    bought = await eventually(resold, within=10, what="the returned unit sold again")
    assert bought.order.state is OrderState.HELD
    await assert_invariants(fast, "sale")


async def test_a_reservation_sent_to_two_nodes_at_once_gets_one_answer(fast: Engine) -> None:
    """Two nodes (engines with their own fast-path flags) on one Redis and one SQL store; in
    each of 40 rounds the first node has just answered sold_out (its flag is up), a unit
    comes back (a cancel), and one reservation (the same shopper and idempotency key, as a
    gateway retrying on the other node) goes to both at once: both answers name the same
    order, since a probe that finds a unit reserves it."""
    async with await Engine.open(fast.runtime.settings) as other:
        held = await _sell_out(fast)
        holder, order_id = "u0", held[0]
        for round_ in range(40):
            with pytest.raises(SoldOut):
                await fast.flash.reserve("sale", f"late{round_}", "hot", 1, "k")
            await fast.orders.cancel(order_id, holder)
            holder, key = f"r{round_}", f"k{round_}"
            answers = await asyncio.gather(
                fast.flash.reserve("sale", holder, "hot", 1, key),
                other.flash.reserve("sale", holder, "hot", 1, key),
                return_exceptions=True,
            )
            assert all(isinstance(a, Reservation) for a in answers), (round_, answers)
            first, second = answers
            assert isinstance(first, Reservation) and isinstance(second, Reservation)
            assert first.order.order_id == second.order.order_id, round_
            order_id = first.order.order_id
    await assert_invariants(fast, "sale")
