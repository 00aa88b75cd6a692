"""A mixed flash and team sale that leaves orders and teams in every state: what the flush
worker tests drive while workers run, crash and restart."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from engine import Engine, EngineError, Order, OrderState
from engine.keys import keys_of
from engine.models import Team, TeamState
from testkit.factories import flash_campaign, team_campaign
from testkit.helpers import age_order, age_team

T = TypeVar("T")

FLASH, TEAM = "mix-flash", "mix-team"
AGED_MS = 3_600_000  # far enough into the past for any hold or team


@dataclass(frozen=True)
class Mix:
    """The size of the mixed sale."""

    flash_shoppers: int = 1_200
    team_shoppers: int = 600
    seed: int = 7
    in_flight: int = 100


async def _bounded(sem: asyncio.Semaphore, call: Awaitable[T]) -> T | None:
    """Run one engine call; a business rejection (sold out, limit...) is part of the sale."""
    async with sem:
        try:
            return await call
        except EngineError:
            return None


async def mixed_sale(engine: Engine, mix: Mix = Mix()) -> None:
    """Run both sales to their end states: held, paid, cancelled, expired, refunded orders;
    pending, open, succeeded, failed and dissolved teams."""
    rng = random.Random(mix.seed)
    sem = asyncio.Semaphore(mix.in_flight)
    now = await engine.runtime.now()
    await engine.campaigns.create(
        flash_campaign(now, FLASH, stock=700, limit=2, skus=("sku-1", "sku-2"))
    )
    await engine.campaigns.create(team_campaign(now, TEAM, stock=5_000, limit=1, team_size=3))
    await asyncio.gather(_flash(engine, mix, rng, sem), _teams(engine, mix, rng, sem))
    await engine.reaper.run_once()


async def _flash(engine: Engine, mix: Mix, rng: random.Random, sem: asyncio.Semaphore) -> None:
    flash, orders = engine.flash, engine.orders
    wants = [
        (f"f{n}", rng.choice(("sku-1", "sku-2")), rng.choice((1, 2)))
        for n in range(mix.flash_shoppers)
    ]
    held = [
        r.order
        for r in await asyncio.gather(
            *(_bounded(sem, flash.reserve(FLASH, u, sku, qty, "k")) for u, sku, qty in wants)
        )
        if r is not None
    ]
    fate = {o.order_id: rng.random() for o in held}
    paid = await asyncio.gather(
        *(
            _bounded(sem, orders.pay(o.order_id, o.user_id, f"pay-{o.order_id}"))
            for o in held
            if fate[o.order_id] < 0.55
        )
    )
    cancels = [orders.cancel(o.order_id, o.user_id) for o in held if 0.55 <= fate[o.order_id] < 0.7]
    ages = [age_order(engine, o.order_id, AGED_MS) for o in held if 0.7 <= fate[o.order_id] < 0.85]
    refunds = [
        orders.refund(o.order_id, restock=rng.random() < 0.5)
        for o in paid
        if o is not None and rng.random() < 0.15
    ]
    await asyncio.gather(*(_bounded(sem, c) for c in (*cancels, *ages, *refunds)))


async def _teams(engine: Engine, mix: Mix, rng: random.Random, sem: asyncio.Semaphore) -> None:
    teams, orders = engine.teams, engine.orders
    users = [f"t{n}" for n in range(mix.team_shoppers)]
    # Waves: each wave's leaders pay first, so the next wave finds open teams to join.
    for wave in (users[: len(users) // 3], users[len(users) // 3 :]):
        seats = await asyncio.gather(
            *(_bounded(sem, teams.quick_join(TEAM, u, "sku-1", "k")) for u in wave)
        )
        payments: list[Awaitable[Any]] = []
        for seat in seats:
            if seat is None:
                continue
            roll = rng.random()
            order = seat.order
            if seat.opened and roll < 0.1:
                payments.append(age_order(engine, order.order_id, AGED_MS))  # leader walks off
            elif roll < 0.85:
                payments.append(orders.pay(order.order_id, order.user_id, f"pay-{order.order_id}"))
            elif roll < 0.92:
                payments.append(orders.cancel(order.order_id, order.user_id))
        await asyncio.gather(*(_bounded(sem, p) for p in payments))
    await engine.reaper.run_once()  # dissolve the teams whose leader never paid
    opened = [t.team_id for t in await redis_teams(engine, TEAM) if t.state is TeamState.OPEN]
    await asyncio.gather(
        *(_bounded(sem, age_team(engine, i, AGED_MS)) for i in opened if rng.random() < 0.5)
    )
    await engine.reaper.run_once()  # fail the expired ones: refunds for their paid members
    teams_now = await redis_teams(engine, TEAM)
    succeeded = [t.team_id for t in teams_now if t.state is TeamState.SUCCEEDED]
    for team_id in succeeded[:5]:
        for order in await teams.orders(team_id):
            if order.state is OrderState.PAID and rng.random() < 0.3:
                await _bounded(sem, orders.refund(order.order_id, restock=False))


async def redis_orders(engine: Engine, campaign_id: str) -> dict[str, Order]:
    records: Any = await engine.runtime.redis.hgetall(keys_of(campaign_id).orders)
    return {i: Order.from_record(i, r) for i, r in records.items()}


async def redis_teams(engine: Engine, campaign_id: str) -> list[Team]:
    records: Any = await engine.runtime.redis.hgetall(keys_of(campaign_id).teams)
    return [Team.from_record(i, r) for i, r in records.items()]


def order_key(order: Order) -> tuple[Any, ...]:
    """What must be equal between Redis and SQL for one order."""
    return (order.state, order.version, order.qty, order.amount, order.team_id, order.payment_ref)
