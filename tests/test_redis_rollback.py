"""Redis rolled back to a snapshot of itself, then repaired: always whole (docs/faults.md).

A random run of flash and team operations, flushed to SQL as it goes; at a random step every
key of both campaigns is snapshotted (DUMP), the run goes on, and then Redis is rolled back
to the snapshot (RESTORE), as a failover to a lagging replica does. After the repair the
invariants hold, Redis equals SQL order by order and team by team, and every payment that
was acknowledged is paid (or refunded after it) under its shopper.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core import Engine
from engine.errors import Rejected
from engine.keys import keys_of
from engine.models import OrderState
from engine.reconcile import reconcile
from engine.worker import FlushWorker
from testkit.factories import flash_campaign, team_campaign
from testkit.helpers import assert_invariants
from tests.test_redis_loss import assert_redis_matches_sql, sold_in_sql

SKU = "sku-1"
_runs = itertools.count()

Step = tuple[str, int]
steps = st.lists(
    st.tuples(
        st.sampled_from(["reserve", "pay", "cancel", "refund", "open", "join", "flush"]),
        st.integers(0, 7),
    ),
    min_size=4,
    max_size=30,
)


def campaign_keys(campaign_id: str) -> list[str]:
    keys = keys_of(campaign_id)
    return [*keys.order_keys, keys.rejections]


async def snapshot(redis: Any, campaign_ids: list[str]) -> dict[str, Any]:
    dumps: dict[str, Any] = {}
    for cid in campaign_ids:
        for key in campaign_keys(cid):
            dumps[key] = (await redis.dump(key), await redis.pttl(key))
    return dumps


async def roll_back(redis: Any, dumps: dict[str, Any]) -> None:
    for key, (dump, ttl) in dumps.items():
        await redis.delete(key)
        if dump is not None:
            await redis.restore(key, max(ttl, 0), dump)


class Sale:
    """The random run: what it acknowledged to shoppers."""

    def __init__(self, engine: Engine, worker: FlushWorker, flash: str, team: str) -> None:
        self.engine, self.worker, self.flash, self.team = engine, worker, flash, team
        self.held: list[tuple[str, str]] = []  # acknowledged holds: (order id, user)
        self.paid: dict[str, str] = {}  # acknowledged payments: order id -> user
        self.teams: list[str] = []

    async def step(self, op: str, k: int, i: int) -> None:
        engine, user = self.engine, f"u{k}"
        if op == "reserve":
            order = (await engine.flash.reserve(self.flash, user, SKU, 1, f"k{i}")).order
            self.held.append((order.order_id, user))
        elif op == "open":
            seat = await engine.teams.open(self.team, user, SKU, 1, f"k{i}")
            self.held.append((seat.order.order_id, user))
            self.teams.append(seat.team.team_id)
        elif op == "join" and self.teams:
            seat = await engine.teams.join(self.teams[k % len(self.teams)], user, f"k{i}")
            self.held.append((seat.order.order_id, user))
        elif op == "flush":
            await self.worker.drain()
        elif self.held:
            order_id, owner = self.held[k % len(self.held)]
            if op == "pay":
                await engine.orders.pay(order_id, owner, f"p-{order_id}")
                self.paid[order_id] = owner
            elif op == "cancel":
                await engine.orders.cancel(order_id, owner)
            else:
                await engine.orders.refund(order_id, restock=k % 2 == 0)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(run=steps, cut=st.integers(0, 30))
async def test_rollback_then_repair_is_whole(engine: Engine, run: list[Step], cut: int) -> None:
    n = next(_runs)
    flash, team = f"rbf{n}", f"rbt{n}"
    now = await engine.runtime.now()
    await engine.campaigns.create(flash_campaign(now, flash, stock=6, limit=2))
    await engine.campaigns.create(team_campaign(now, team, stock=9, team_size=2, limit=2))
    worker = FlushWorker(engine.runtime)
    redis: Any = engine.runtime.redis
    sale = Sale(engine, worker, flash, team)
    dumps: dict[str, Any] | None = None
    for i, (op, k) in enumerate(run):
        if i == min(cut, len(run) - 1):
            dumps = await snapshot(redis, [flash, team])
        with contextlib.suppress(Rejected):
            await sale.step(op, k, i)
    assert dumps is not None
    await roll_back(redis, dumps)
    for cid in (flash, team):
        await engine.recovery.repair(cid, "manual")
        await worker.drain()
        assert (await reconcile(engine.runtime, cid)).ok
        await assert_redis_matches_sql(engine, cid)
        await assert_invariants(engine, cid)
    orders = {**await sold_in_sql(engine, flash), **await sold_in_sql(engine, team)}
    for order_id, user in sale.held:
        if order_id in orders:
            assert orders[order_id].user_id == user
    for order_id, user in sale.paid.items():
        assert orders[order_id].user_id == user
        assert orders[order_id].state in (OrderState.PAID, OrderState.REFUNDED)
