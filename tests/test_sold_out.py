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
