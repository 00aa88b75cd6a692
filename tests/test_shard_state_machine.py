"""A stateful (hypothesis) test of a sharded flash campaign (engine/shards.py) against a model
that knows nothing of buckets.

One campaign in 3 stock buckets on the session's redis-server, two skus with small stock, six
users (two hashed to each bucket) and a per-user limit of 3. The machine drives reserve
(fresh keys and retries), pay, cancel, expiry (``age_order`` + the reaper), after-sale refund
(with and without restock) and stock transfers between random buckets, some stopped after
their debit or their credit as a process that died there would leave them, then finished by
whoever comes next (a reservation's refill, the reaper, or ``finish_pending``). The model is
one stock per item, as if unsharded: a reservation succeeds when the whole item has the units,
wherever they sit or travel. After every step: every outcome as the model predicted; the
stock, every order and every user's units as the model has them; each order in its user's
bucket; and the audit (engine/audit.py): each bucket's stock buckets add up to its share, and
the shares plus the units in transit equal the initial stock (invariant I1, across buckets).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from engine import (
    Campaign,
    CampaignKind,
    Engine,
    HoldExpired,
    IdempotencyMismatch,
    InvalidState,
    Item,
    LimitExceeded,
    NotFound,
    Order,
    OrderState,
    Rejected,
    Reservation,
    SoldOut,
)
from engine.keys import keys_of, shard_of_order
from engine.local.redis_server import RedisServer
from engine.scripts import guarded
from engine.shards import bucket_index, finish, finish_pending, in_transit
from testkit.helpers import age_order, assert_invariants
from tests.machine import SETTINGS, EngineMachine

T = TypeVar("T")

SHARDS = 3
PRICES = {"sku-a": 1999, "sku-b": 500}
STOCK = {"sku-a": 7, "sku-b": 4}
SKUS = tuple(STOCK)
SKU_CHOICES = (*SKUS, *SKUS, *SKUS, "sku-nope")
# Two users hashed to each bucket.
USERS = tuple(
    next(u for u in (f"s{b}-{n}" for n in range(1000)) if bucket_index(u, SHARDS) == b)
    for b in (0, 1, 2)
) + tuple(
    next(u for u in (f"t{b}-{n}" for n in range(1000)) if bucket_index(u, SHARDS) == b)
    for b in (0, 1, 2)
)
LIMIT = 3
HOLD_SECONDS = 60
AGE_MS = (HOLD_SECONDS + 1) * 1000
LIVE = {OrderState.HELD: "held", OrderState.PAID: "paid"}

MACHINE_SETTINGS = settings(SETTINGS, report_multiple_bugs=False)


@dataclass
class ModelOrder:
    order_id: str
    user: str
    sku: str
    qty: int
    key: str
    state: OrderState = OrderState.HELD
    payment_ref: str | None = None
    aged: bool = False


class ShardedSaleMachine(EngineMachine):
    """Random sharded flash-sale traffic and transfers, checked against a bucket-less model."""

    prefix = "ssm"
    orders = Bundle("orders")

    def __init__(self) -> None:
        super().__init__()
        self.stock = {
            sku: {"available": n, "held": 0, "paid": 0, "gone": 0} for sku, n in STOCK.items()
        }
        self.model: dict[str, ModelOrder] = {}
        self.idem: dict[tuple[str, str], str] = {}
        self.fresh = 0

    async def prepare(self, engine: Engine) -> None:
        now = await engine.runtime.now()
        await engine.campaigns.create(
            Campaign(
                id=self.campaign_id,
                kind=CampaignKind.FLASH,
                title="sharded state machine sale",
                starts_at=now - timedelta(seconds=1),
                ends_at=now + timedelta(hours=1),
                items=tuple(Item(sku, PRICES[sku], STOCK[sku]) for sku in SKUS),
                per_user_limit=LIMIT,
                hold_seconds=HOLD_SECONDS,
                shards=SHARDS,
            )
        )

    def call(self, coro: Coroutine[Any, Any, T], expected: type[Rejected] | None) -> T | None:
        """Run one engine call; it must raise exactly ``expected`` (None: must succeed)."""
        outcome = self.run(_outcome(coro))
        if isinstance(outcome, Rejected):
            got = type(outcome).__name__
            assert expected is not None, f"the model expected success, the engine said {got}"
            assert type(outcome) is expected, f"expected {expected.__name__}, got {got}"
            return None
        assert expected is None, f"expected {expected.__name__}, the engine succeeded"
        return outcome

    @property
    def shards(self) -> tuple[str, ...]:
        return self.run(self.eng.runtime.layout(self.campaign_id)).shards

    def units(self, user: str) -> int:
        return sum(o.qty for o in self.model.values() if o.user == user and o.state in LIVE)

    def move(self, order: ModelOrder, state: OrderState, restock: bool = True) -> None:
        src = LIVE[order.state]
        dst = LIVE.get(state, "available" if restock else "gone")
        self.stock[order.sku][src] -= order.qty
        self.stock[order.sku][dst] += order.qty
        order.state = state

    def in_state(self, state: OrderState) -> list[str]:
        return sorted(o.order_id for o in self.model.values() if o.state is state)

    # -- rules ---------------------------------------------------------------------------------

    def predict_reserve(self, user: str, sku: str, qty: int, key: str) -> type[Rejected] | None:
        prior = self.idem.get((user, key))
        if prior is not None:
            original = self.model[prior]
            return None if (original.sku, original.qty) == (sku, qty) else IdempotencyMismatch
        if sku not in STOCK:
            return NotFound
        if self.units(user) + qty > LIMIT:
            return LimitExceeded
        if self.stock[sku]["available"] < qty:
            return SoldOut
        return None

    @rule(
        target=orders,
        user=st.sampled_from(USERS),
        sku=st.sampled_from(SKU_CHOICES),
        qty=st.integers(1, 3),
        key=st.none() | st.sampled_from(("k1", "k2")),
    )
    def reserve(self, user: str, sku: str, qty: int, key: str | None) -> MultipleResults[str]:
        if key is None:
            self.fresh += 1
            key = f"fresh-{self.fresh}"
        expected = self.predict_reserve(user, sku, qty, key)
        prior = self.idem.get((user, key))
        got = self.call(self.eng.flash.reserve(self.campaign_id, user, sku, qty, key), expected)
        if got is None:
            return multiple()
        order = got.order
        assert shard_of_order(order.order_id) == self.run(
            self.eng.runtime.layout(self.campaign_id)
        ).shard_of_user(user), "the order is not in its user's bucket"
        if prior is not None:
            assert got.replayed and order.order_id == prior
            return multiple()
        assert not got.replayed and order.order_id not in self.model
        assert (order.user_id, order.sku, order.qty, order.state) == (
            user,
            sku,
            qty,
            OrderState.HELD,
        )
        self.model[order.order_id] = ModelOrder(order.order_id, user, sku, qty, key)
        self.stock[sku]["available"] -= qty
        self.stock[sku]["held"] += qty
        self.idem[(user, key)] = order.order_id
        return multiple(order.order_id)

    @rule(order=orders)
    def retry_reserve(self, order: str) -> None:
        """The gateway retries with the same key: the same order, wherever the stock moved."""
        m = self.model[order]
        got = self.call(self.eng.flash.reserve(self.campaign_id, m.user, m.sku, m.qty, m.key), None)
        assert isinstance(got, Reservation) and got.replayed
        assert got.order.order_id == order and got.order.state is m.state

    @precondition(lambda self: bool(self.in_state(OrderState.HELD)))
    @rule(data=st.data())
    def pay_held(self, data: st.DataObject) -> None:
        order = data.draw(st.sampled_from(self.in_state(OrderState.HELD)), label="order")
        m = self.model[order]
        expected = HoldExpired if m.aged else None
        paid = self.call(self.eng.orders.pay(order, m.user, f"pay-{order}"), expected)
        if paid is not None:
            assert paid.state is OrderState.PAID
            self.move(m, OrderState.PAID)
            m.payment_ref = f"pay-{order}"

    @rule(order=orders)
    def cancel(self, order: str) -> None:
        m = self.model[order]
        ok = (OrderState.HELD, OrderState.CANCELLED)
        cancelled = self.call(
            self.eng.orders.cancel(order, m.user), None if m.state in ok else InvalidState
        )
        if cancelled is not None and m.state is OrderState.HELD:
            self.move(m, OrderState.CANCELLED)

    @precondition(lambda self: bool(self.in_state(OrderState.PAID)))
    @rule(data=st.data(), restock=st.booleans())
    def refund_paid(self, data: st.DataObject, restock: bool) -> None:
        order = data.draw(st.sampled_from(self.in_state(OrderState.PAID)), label="order")
        refunded = self.call(self.eng.orders.refund(order, restock), None)
        assert refunded is not None and refunded.state is OrderState.REFUNDED
        self.move(self.model[order], OrderState.REFUNDED, restock)

    @precondition(
        lambda self: any(o.state is OrderState.HELD and not o.aged for o in self.model.values())
    )
    @rule(data=st.data(), reapers=st.integers(0, 2))
    def expire(self, data: st.DataObject, reapers: int) -> None:
        """Time passes for one hold; maybe reapers run (each due hold ends once)."""
        fresh = sorted(
            o.order_id for o in self.model.values() if o.state is OrderState.HELD and not o.aged
        )
        order = data.draw(st.sampled_from(fresh), label="order")
        self.run(age_order(self.eng, order, AGE_MS))
        self.model[order].aged = True
        if not reapers:
            return
        due = [o for o in self.model.values() if o.state is OrderState.HELD and o.aged]

        async def together() -> list[int]:
            return list(await asyncio.gather(*(self.eng.reaper.run_once() for _ in range(reapers))))

        assert sum(self.run(together())) == len(due)
        for o in due:
            self.move(o, OrderState.EXPIRED)

    @rule(
        source=st.integers(0, SHARDS - 1),
        step=st.integers(1, SHARDS - 1),
        units=st.integers(1, 6),
        stop=st.sampled_from(("debit", "credit", "settle")),
    )
    def transfer(self, source: int, step: int, units: int, stop: str) -> None:
        """Units move between two buckets; ``stop``: the step after which the process that
        moved them died (the transfer stays pending until someone finishes it)."""
        shards = self.shards
        scripts = self.eng.runtime.scripts
        src, dst = shards[source], shards[(source + step) % SHARDS]
        for sku in SKUS:
            moved = self.run(scripts.debit(src, sku, units, 1, dst))
            if moved is None or stop == "debit":
                continue
            if stop == "credit":
                assert self.run(scripts.credit(moved))
            else:
                assert self.run(finish(scripts, moved))

    @rule()
    def finish_everything(self) -> None:
        layout = self.run(self.eng.runtime.layout(self.campaign_id))
        self.run(finish_pending(self.eng.runtime, layout))
        assert self.run(in_transit(self.eng.runtime, layout)) == {}

    # -- after every step ---------------------------------------------------------------------

    async def snapshot(self) -> tuple[dict[str, dict[str, int]], dict[str, int], dict[str, Order]]:
        eng, cid = self.eng, self.campaign_id
        await assert_invariants(eng, cid)
        view = await eng.campaigns.get(cid)
        layout = await eng.runtime.layout(cid)
        redis = eng.runtime.redis
        on_sale = await in_transit(eng.runtime, layout)
        orders: dict[str, Order] = {}
        users: dict[str, int] = {}
        for shard in layout.shards:
            keys = keys_of(shard)
            inv: dict[str, str] = await guarded(redis.hgetall(keys.inv))
            for sku in SKUS:
                on_sale[sku] = on_sale.get(sku, 0) + int(inv[f"a:{sku}"])
            raw: dict[str, str] = await guarded(redis.hgetall(keys.orders))
            orders |= {i: Order.from_record(i, r) for i, r in raw.items()}
            counted: dict[str, str] = await guarded(redis.hgetall(keys.users))
            for user, n in counted.items():
                assert user not in users, f"user {user} counted in two buckets"
                users[user] = int(n)
        stock = {
            s.sku: {"available": s.available, "held": s.held, "paid": s.paid, "gone": s.gone}
            for s in view.stock
        }
        assert on_sale == {sku: stock[sku]["available"] for sku in SKUS}, on_sale
        return stock, users, orders

    @invariant()
    def engine_matches_model(self) -> None:
        stock, users, orders = self.run(self.snapshot())
        assert stock == self.stock
        for user in USERS:
            assert users.get(user, 0) == self.units(user) <= LIMIT, user
        assert set(orders) == set(self.model)
        for oid, m in self.model.items():
            got = orders[oid]
            assert (got.user_id, got.sku, got.qty, got.state) == (m.user, m.sku, m.qty, m.state)
            assert got.payment_ref == m.payment_ref


async def _outcome(coro: Coroutine[Any, Any, T]) -> T | Rejected:
    try:
        return await coro
    except Rejected as exc:
        return exc


@pytest.mark.timeout(420)
def test_sharded_sale_state_machine(redis_server: RedisServer) -> None:
    ShardedSaleMachine.redis_url = redis_server.url
    run_state_machine_as_test(ShardedSaleMachine, settings=MACHINE_SETTINGS)
