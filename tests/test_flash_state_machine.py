"""A stateful (hypothesis) test of the flash sale against an in-memory model.

One campaign, two skus with small stock, four users and a per-user limit of 3. The machine
drives reserve / pay / cancel / expiry (``age_order`` + the reaper, sometimes several reapers at
once) / after-sale refund (with and without restock) / idempotent retries / invalidation in a
random order. The model predicts every outcome, rejections included (the engine must raise
exactly the predicted class), and after every step the engine's Redis state must equal the
model: stock buckets, every order's state, qty and payment, each user's units, and each order's
events in the outbox stream (its state changes, in order, each exactly once: invariant I5); plus
invariants I1 and I2 (docs/invariants.md) and the engine's own audit.

The engine is async and the machine is sync: each example runs its own event loop and its own
Engine (a private SQLite file) on the session's redis-server, flushed first, and every engine
call goes through ``loop.run_until_complete``.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
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
    CampaignStatus,
    Engine,
    Forbidden,
    HoldExpired,
    IdempotencyMismatch,
    Invalidated,
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
from engine.keys import keys_of
from engine.local.redis_server import RedisServer
from engine.scripts import guarded
from testkit.helpers import EVENT_OF, age_order, assert_invariants
from tests.machine import SETTINGS, EngineMachine

T = TypeVar("T")

PRICES = {"sku-a": 1999, "sku-b": 500}
STOCK = {"sku-a": 5, "sku-b": 3}
SKUS = tuple(STOCK)
SKU_CHOICES = (*SKUS, *SKUS, *SKUS, "sku-nope")  # an unknown sku one time in seven
USERS = ("u1", "u2", "u3", "u4")
LIMIT = 3
HOLD_SECONDS = 60
AGE_MS = (HOLD_SECONDS + 1) * 1000  # moves a fresh hold's deadline 1 s into the past

# The stock bucket of an order's units while it is live; ended orders' units are "available"
# again, or "gone" after a refund without restock.
BUCKET_OF = {OrderState.HELD: "held", OrderState.PAID: "paid"}

MACHINE_SETTINGS = settings(SETTINGS, report_multiple_bugs=False)


@dataclass
class ModelOrder:
    """What the model knows of one order."""

    order_id: str
    user: str
    sku: str
    qty: int
    key: str
    state: OrderState = OrderState.HELD
    payment_ref: str | None = None
    aged: bool = False  # its deadline was moved into the past (not reaped yet)
    events: list[tuple[str, str]] = field(default_factory=lambda: [("order.reserved", "user")])


@dataclass
class Snapshot:
    """The engine's state as read from Redis between two steps."""

    status: CampaignStatus
    stock: dict[str, dict[str, int]]
    initial: dict[str, int]
    orders: dict[str, Order]
    users: dict[str, int]
    events: dict[str, list[tuple[str, str]]]
    invalidations: int


class FlashSaleMachine(EngineMachine):
    """Random flash-sale traffic on one campaign, checked step by step against a model."""

    prefix = "fsm"
    orders = Bundle("orders")

    def __init__(self) -> None:
        super().__init__()
        # The model.
        self.stock = {
            sku: {"available": n, "held": 0, "paid": 0, "gone": 0} for sku, n in STOCK.items()
        }
        self.model: dict[str, ModelOrder] = {}
        self.idem: dict[tuple[str, str], str] = {}  # (user, idempotency key) -> order id
        self.invalidated = False
        self.fresh = 0

    # -- plumbing ------------------------------------------------------------------------------

    async def prepare(self, engine: Engine) -> None:
        self.script_calls: Counter[str] = Counter()
        engine.runtime.scripts.observe = lambda name, _: self.script_calls.update((name,))
        now = await engine.runtime.now()
        await engine.campaigns.create(
            Campaign(
                id=self.campaign_id,
                kind=CampaignKind.FLASH,
                title="state machine sale",
                starts_at=now - timedelta(seconds=1),
                ends_at=now + timedelta(hours=1),
                items=tuple(Item(sku, PRICES[sku], STOCK[sku]) for sku in SKUS),
                per_user_limit=LIMIT,
                hold_seconds=HOLD_SECONDS,
            )
        )

    def call(self, coro: Coroutine[Any, Any, T], expected: type[Rejected] | None) -> T | None:
        """Run one engine call; it must raise exactly ``expected`` (None: must succeed)."""
        return self.expect(self.run(_outcome(coro)), expected)

    @staticmethod
    def expect(outcome: T | Rejected, expected: type[Rejected] | None) -> T | None:
        """A call's result, or the rejection it raised, against the model's prediction."""
        if isinstance(outcome, Rejected):
            got = type(outcome).__name__
            assert expected is not None, f"the model expected success, the engine said {got}"
            assert type(outcome) is expected, f"expected {expected.__name__}, got {got}: {outcome}"
            return None
        assert expected is None, f"expected {expected.__name__}, the engine succeeded: {outcome!r}"
        return outcome

    # -- the model -----------------------------------------------------------------------------

    def units(self, user: str) -> int:
        live = (OrderState.HELD, OrderState.PAID)
        return sum(o.qty for o in self.model.values() if o.user == user and o.state in live)

    def move(self, order: ModelOrder, state: OrderState, reason: str, restock: bool = True) -> None:
        """The model's state change: stock buckets, the order, and its expected event."""
        src = BUCKET_OF[order.state]
        dst = BUCKET_OF.get(state, "available" if restock else "gone")
        self.stock[order.sku][src] -= order.qty
        self.stock[order.sku][dst] += order.qty
        order.state = state
        order.events.append((EVENT_OF[state], reason))

    def predict_reserve(self, user: str, sku: str, qty: int, key: str) -> type[Rejected] | None:
        prior = self.idem.get((user, key))
        if prior is not None:
            original = self.model[prior]
            return None if (original.sku, original.qty) == (sku, qty) else IdempotencyMismatch
        if self.invalidated:
            return Invalidated
        if sku not in STOCK:
            return NotFound
        if self.units(user) + qty > LIMIT:
            return LimitExceeded
        if self.stock[sku]["available"] < qty:
            return SoldOut
        return None

    @staticmethod
    def predict_pay(
        order: ModelOrder, payer: str, ref: str, invalidated: bool
    ) -> type[Rejected] | None:
        if payer != order.user:
            return Forbidden
        if order.state is OrderState.PAID and order.payment_ref == ref:
            return None  # a retry: no-op success
        if order.state is OrderState.EXPIRED:
            return HoldExpired
        if order.state is not OrderState.HELD:
            return InvalidState
        if order.aged:
            return HoldExpired
        return Invalidated if invalidated else None

    # -- rules ---------------------------------------------------------------------------------

    def reserve_and_check(
        self, user: str, sku: str, qty: int, key: str, outcome: Reservation | Rejected | None = None
    ) -> MultipleResults[str]:
        """One reservation (run now, or its ``outcome`` from a burst) against the model."""
        expected = self.predict_reserve(user, sku, qty, key)
        prior = self.idem.get((user, key))
        if outcome is None:
            outcome = self.run(
                _outcome(self.eng.flash.reserve(self.campaign_id, user, sku, qty, key))
            )
        got = self.expect(outcome, expected)
        if got is None:
            return multiple()
        order = got.order
        if prior is not None:  # an idempotent retry returns the original order, as it is now
            assert got.replayed
            assert order.order_id == prior
            assert order.state is self.model[prior].state
            return multiple()
        assert not got.replayed
        assert order.order_id not in self.model
        assert (order.user_id, order.sku, order.qty) == (user, sku, qty)
        assert order.state is OrderState.HELD
        assert order.amount == qty * PRICES[sku]
        assert order.expires_at - order.created_at == timedelta(seconds=HOLD_SECONDS)
        self.model[order.order_id] = ModelOrder(order.order_id, user, sku, qty, key)
        self.stock[sku]["available"] -= qty
        self.stock[sku]["held"] += qty
        self.idem[(user, key)] = order.order_id
        return multiple(order.order_id)

    @rule(
        target=orders,
        user=st.sampled_from(USERS),
        sku=st.sampled_from(SKU_CHOICES),
        qty=st.integers(1, 3),
        key=st.none() | st.sampled_from(("k1", "k2")),
    )
    def reserve(self, user: str, sku: str, qty: int, key: str | None) -> MultipleResults[str]:
        """A reservation with a fresh key, or with a reused one (a retry or a mismatch)."""
        if key is None:
            self.fresh += 1
            key = f"fresh-{self.fresh}"
        return self.reserve_and_check(user, sku, qty, key)

    @rule(
        target=orders,
        burst=st.lists(
            st.tuples(
                st.sampled_from(USERS),
                st.sampled_from(SKU_CHOICES),
                st.integers(1, 3),
                st.sampled_from(("k1", "k2", "fresh")),
            ),
            min_size=2,
            max_size=8,
        ),
    )
    def reserve_burst(self, burst: list[tuple[str, str, int, str]]) -> MultipleResults[str]:
        """Concurrent reservations: coalesced into one batch.lua call, they run in arrival
        order, so the model can check each one's own outcome in that order."""
        calls = []
        for user, sku, qty, key in burst:
            if key == "fresh":
                self.fresh += 1
                key = f"fresh-{self.fresh}"
            calls.append((user, sku, qty, key))
        flash, cid = self.eng.flash, self.campaign_id

        async def burst_of() -> list[Reservation | Rejected]:
            return await asyncio.gather(
                *(_outcome(flash.reserve(cid, u, s, q, k)) for u, s, q, k in calls)
            )

        batches = self.script_calls["batch"]
        outcomes = self.run(burst_of())
        assert self.script_calls["batch"] == batches + 1, "the burst was not one coalesced call"
        made: list[str] = []
        for (user, sku, qty, key), outcome in zip(calls, outcomes, strict=True):
            made += self.reserve_and_check(user, sku, qty, key, outcome).values
        return multiple(*made)

    @rule(target=orders, order=orders, mismatch=st.sampled_from(("none", "qty", "sku")))
    def retry_reserve(self, order: str, mismatch: str) -> MultipleResults[str]:
        """The gateway retries a reservation with its key: same order, or idempotency_mismatch."""
        m = self.model[order]
        qty = m.qty % 3 + 1 if mismatch == "qty" else m.qty
        sku = SKUS[1 - SKUS.index(m.sku)] if mismatch == "sku" else m.sku
        return self.reserve_and_check(m.user, sku, qty, m.key)

    def pay_and_check(self, order: str, payer: str, ref: str) -> None:
        m = self.model[order]
        expected = self.predict_pay(m, payer, ref, self.invalidated)
        paid = self.call(self.eng.orders.pay(order, payer, ref), expected)
        if paid is None:
            return
        assert paid.state is OrderState.PAID
        assert paid.payment_ref == ref
        if m.state is OrderState.HELD:  # else a retry with the same reference: a no-op
            self.move(m, OrderState.PAID, "user")
            m.payment_ref = ref

    @rule(order=orders, payer=st.none() | st.sampled_from(USERS), other_ref=st.booleans())
    def pay(self, order: str, payer: str | None, other_ref: bool) -> None:
        """Any order, any payer, either of two references: mostly rejections and retries."""
        m = self.model[order]
        self.pay_and_check(order, payer or m.user, f"pay2-{order}" if other_ref else f"pay-{order}")

    @precondition(lambda self: bool(self.in_state(OrderState.HELD)))
    @rule(data=st.data())
    def pay_held(self, data: st.DataObject) -> None:
        """The owner pays a held order: paid, or HoldExpired once its deadline has passed."""
        order = data.draw(st.sampled_from(self.in_state(OrderState.HELD)), label="order")
        self.pay_and_check(order, self.model[order].user, f"pay-{order}")

    @rule(order=orders, user=st.none() | st.sampled_from(USERS))
    def cancel(self, order: str, user: str | None) -> None:
        m = self.model[order]
        user = user or m.user
        expected: type[Rejected] | None = None
        if user != m.user:
            expected = Forbidden
        elif m.state not in (OrderState.HELD, OrderState.CANCELLED, OrderState.EXPIRED):
            expected = InvalidState
        cancelled = self.call(self.eng.orders.cancel(order, user), expected)
        if cancelled is None:
            return
        if m.state is OrderState.EXPIRED:  # the hold ended first: answered as it is
            assert cancelled.state is OrderState.EXPIRED
            return
        assert cancelled.state is OrderState.CANCELLED
        if m.state is OrderState.HELD:  # else a retry: nothing changes
            self.move(m, OrderState.CANCELLED, "user")

    def refund_and_check(self, order: str, restock: bool) -> None:
        m = self.model[order]
        ok = (OrderState.PAID, OrderState.REFUNDED)
        expected = None if m.state in ok else InvalidState
        refunded = self.call(self.eng.orders.refund(order, restock), expected)
        if refunded is None:
            return
        assert refunded.state is OrderState.REFUNDED
        if m.state is OrderState.PAID:  # else a retry: nothing changes, whatever ``restock``
            self.move(m, OrderState.REFUNDED, "restock" if restock else "no_restock", restock)

    @rule(order=orders, restock=st.booleans())
    def refund(self, order: str, restock: bool) -> None:
        """After-sale refund of any order: only paid ones (and retries) succeed."""
        self.refund_and_check(order, restock)

    @precondition(lambda self: bool(self.in_state(OrderState.PAID)))
    @rule(data=st.data(), restock=st.booleans())
    def refund_paid(self, data: st.DataObject, restock: bool) -> None:
        order = data.draw(st.sampled_from(self.in_state(OrderState.PAID)), label="order")
        self.refund_and_check(order, restock)

    def in_state(self, state: OrderState) -> list[str]:
        return sorted(o.order_id for o in self.model.values() if o.state is state)

    def unaged_holds(self) -> list[str]:
        return sorted(
            o.order_id for o in self.model.values() if o.state is OrderState.HELD and not o.aged
        )

    @precondition(lambda self: bool(self.unaged_holds()))
    @rule(data=st.data(), then_reap=st.booleans())
    def age(self, data: st.DataObject, then_reap: bool) -> None:
        """Time passes for one hold: its deadline is now behind it; maybe a reaper runs."""
        order = data.draw(st.sampled_from(self.unaged_holds()), label="order")
        self.run(age_order(self.eng, order, AGE_MS))
        self.model[order].aged = True
        if then_reap:
            self.reap(1)

    @precondition(lambda self: bool(self.in_state(OrderState.HELD)))
    @rule(reapers=st.integers(1, 3))
    def reap(self, reapers: int) -> None:
        """One or several reapers at once: each due hold ends exactly once, the others stay."""
        eng, cid = self.eng, self.campaign_id

        async def one(i: int) -> int:
            if i % 2:
                return (await eng.reaper.expire_campaign(cid))[0]
            return await eng.reaper.run_once()

        async def together() -> list[int]:
            return list(await asyncio.gather(*(one(i) for i in range(reapers))))

        due = [o for o in self.model.values() if o.state is OrderState.HELD and o.aged]
        ended = self.run(together())
        assert sum(ended) == len(due), f"reapers ended {ended}, {len(due)} holds were due"
        for o in due:
            self.move(o, OrderState.EXPIRED, "deadline")

    @precondition(lambda self: len(self.model) >= 3)
    @rule(roll=st.integers(0, 5))
    def invalidate(self, roll: int) -> None:
        """Rarely: the merchant ends the campaign early (or retries that)."""
        if roll != 0:
            return
        held = [o for o in self.model.values() if o.state is OrderState.HELD]
        view = self.run(self.eng.campaigns.invalidate(self.campaign_id))
        assert view.status is CampaignStatus.INVALIDATED
        self.invalidated = True
        # docs/lifecycle.md#campaign: the cascade runs at once: every held order (due or not) is
        # cancelled and its stock returned before invalidate() returns, so a reaper finds nothing
        # left to do.
        for o in held:
            self.move(o, OrderState.CANCELLED, "invalidated")
        assert self.run(self.eng.reaper.run_once()) == 0

    # -- the invariants, after every step -------------------------------------------------------

    async def read_orders(self) -> dict[str, Order]:
        redis = self.eng.runtime.redis
        raw: dict[str, str] = await guarded(redis.hgetall(keys_of(self.campaign_id).orders))
        return {oid: Order.from_record(oid, record) for oid, record in raw.items()}

    async def snapshot(self) -> Snapshot:
        eng, keys = self.eng, keys_of(self.campaign_id)
        view = await eng.campaigns.get(self.campaign_id)
        users: dict[str, str] = await guarded(eng.runtime.redis.hgetall(keys.users))
        entries: list[tuple[str, dict[str, str]]] = await guarded(
            eng.runtime.redis.xrange(keys.events)
        )
        events: dict[str, list[tuple[str, str]]] = {}
        invalidations = 0
        for _, entry in entries:
            if entry["type"] == "campaign.invalidated":
                invalidations += 1
                continue
            oid = entry["order"]
            seen = events.setdefault(oid, [])
            seen.append((entry["type"], entry["reason"]))
            record = Order.from_record(oid, entry["record"])
            assert EVENT_OF[record.state] == entry["type"], f"{oid}: {entry}"
            assert record.version == len(seen), (
                f"{oid}: version {record.version} at event {len(seen)}"
            )
        await assert_invariants(eng, self.campaign_id)
        return Snapshot(
            status=view.status,
            stock={
                s.sku: {"available": s.available, "held": s.held, "paid": s.paid, "gone": s.gone}
                for s in view.stock
            },
            initial={s.sku: s.initial for s in view.stock},
            orders=await self.read_orders(),
            users={user: int(units) for user, units in users.items()},
            events=events,
            invalidations=invalidations,
        )

    @invariant()
    def engine_matches_model(self) -> None:
        snap = self.run(self.snapshot())
        # Invariant I1: nothing oversold, nothing leaked.
        assert snap.initial == STOCK
        for sku, buckets in self.stock.items():
            assert sum(buckets.values()) == STOCK[sku], f"model broke 6.1 on {sku}: {buckets}"
            assert buckets["available"] >= 0
        assert snap.stock == self.stock
        # Invariant I2: per-user limit, and the engine's per-user counters.
        for user in USERS:
            assert self.units(user) <= LIMIT
            assert snap.users.get(user, 0) == self.units(user), user
        # Every order as the model has it.
        assert set(snap.orders) == set(self.model)
        for oid, m in self.model.items():
            got = snap.orders[oid]
            assert (got.user_id, got.sku, got.qty, got.state) == (m.user, m.sku, m.qty, m.state), (
                oid
            )
            assert got.amount == m.qty * PRICES[m.sku]
            assert got.payment_ref == m.payment_ref, oid
            assert got.version == len(m.events), oid
        # Invariant I5: each order's events are exactly its state changes, in order, once each.
        assert snap.events == {oid: m.events for oid, m in self.model.items()}
        assert snap.invalidations == int(self.invalidated)
        status = CampaignStatus.INVALIDATED if self.invalidated else CampaignStatus.ACTIVE
        assert snap.status is status


async def _outcome(coro: Coroutine[Any, Any, T]) -> T | Rejected:
    """The call's result, or the business rejection it raised."""
    try:
        return await coro
    except Rejected as exc:
        return exc


# A passing run takes seconds; shrinking a failure to its shortest program can take minutes,
# and a pytest-timeout kill in the middle of it would lose the report.
@pytest.mark.timeout(420)
def test_flash_sale_state_machine(redis_server: RedisServer) -> None:
    FlashSaleMachine.redis_url = redis_server.url
    run_state_machine_as_test(FlashSaleMachine, settings=MACHINE_SETTINGS)
