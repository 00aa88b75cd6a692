"""Orders of every kind (flash and team): pay, cancel, after-sale refund, and reads.

One script per operation; a team order's payment opens its team or makes it succeed, its
cancellation frees the seat (the scripts do both). Reads look in Redis first (live state) and
fall back to the durable store, which keeps every order the flush worker wrote.

A payment is acknowledged only once the paid order is committed to SQL
(``FLASHTEAM_PAY_DURABILITY=sql``, the default): Redis can lose its last writes in a failover,
SQL keeps them (docs/faults.md). Concurrent payments share one transaction (``PaymentLedger``).
With ``outbox`` the payment rides the outbox like every other change.

Every order id is checked against its campaign before any script runs (``locate``): an id
whose campaign SQL does not hold, whose stock bucket the campaign does not have, or whose
number is 0 names no order (OrderNotFound), and no script, so no repair, is asked about it.
A script answers for the rest: an order its campaign does not hold is OrderNotFound too.

Orders of an archived campaign (engine/archive.py) live in SQL alone: pay and cancel answer
from there what their scripts would answer for an ended campaign, and an after-sale refund
is written there directly, once (``_refund_archived``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace

from engine.errors import (
    Archived,
    EngineError,
    OrderNotFound,
    PaymentPending,
    Recovering,
    Unavailable,
)
from engine.keys import (
    STREAM_SET,
    campaign_of_order,
    check_id,
    check_key,
    keys_of,
    parse_order,
    shard_id,
    shard_of_order,
)
from engine.models import MAX_AMOUNT, Order, OrderState, TeamState, check_int, to_ms
from engine.runtime import Runtime
from engine.scripts import Code, Refusal, guarded
from engine.store import Batch, Store

log = logging.getLogger(__name__)

# A payment waiting in the ledger: its paid order, its answer, when it joined (perf_counter).
Pending = tuple[Order, "asyncio.Future[str | None]", float]


class PaymentLedger:
    """Commits paid orders to SQL before their payment is acknowledged: the payments that
    arrive while a commit runs wait for the next one and share it (group commit), so SQL
    sees one transaction per round trip, not one per payment. The flush worker writes the
    same version again later, a no-op.

    Every waiting payment is answered, whatever the store does: a commit that raises
    (anything), or does not answer within ``wait`` seconds, fails every payment it carries,
    and each of them tries again, or reads its order back from SQL, until its own wait is
    over (``commit``).

    Where a payment's time goes, given to ``observe`` (part, seconds) when set (the API's
    /metrics, the benchmarks), once per payment: ``queue``, from joining the ledger to the
    start of the commit that carries it (the commit before it still running); ``commit``,
    that commit's SQL transaction, waits for the database's locks included; ``durable``, the
    whole wait, every try and read-back included. A commit carries every payment waiting
    when it starts, at most ``MOST`` (the rest take the next one)."""

    MOST = 1000  # payments per commit: a transaction of a few milliseconds on either store

    def __init__(self, store: Store, wait: float) -> None:
        self._store = store
        self._wait = wait
        self._pending: list[Pending] = []
        self._task: asyncio.Task[None] | None = None  # the commits' loop, while it runs
        self.commits = 0  # transactions
        self.committed = 0  # paid orders
        self.observe: Callable[[str, float], None] | None = None

    async def commit(self, order: Order) -> None:
        """Return once ``order`` is durable. A failed commit is tried again, and SQL read back
        (the commit may have landed though its answer was lost, or the flush worker may have
        written the order), until ``wait`` seconds have passed: then PaymentPending, the
        outcome not known yet. Recovering when SQL holds its id for another shopper (Redis
        reissued an id it had lost)."""
        loop = asyncio.get_running_loop()
        began = time.perf_counter()  # for observe: finer than the loop's clock (uvloop: 1 ms)
        deadline = loop.time() + self._wait
        pause = 0.05
        while True:
            failure = await self._submit(order, deadline - loop.time())
            if failure == "collision":
                raise Recovering(
                    f"order {order.order_id} collides with a durable order: the campaign is "
                    "being repaired",
                    why="collision",
                )
            if failure is None or await self._durable(order, deadline - loop.time()):
                if self.observe is not None:
                    self.observe("durable", time.perf_counter() - began)
                return
            if deadline - loop.time() <= pause:
                # What SQL said goes to the log, not to the answer (docs/security.md).
                log.warning("payment of %s not confirmed by SQL: %s", order.order_id, failure)
                raise PaymentPending(
                    f"the payment of order {order.order_id} is recorded but SQL did not confirm "
                    f"it within {self._wait:g} s: it is not declined; retry with the same "
                    "payment_ref to learn the outcome",
                    order_id=order.order_id,
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.5)

    async def confirm(self, order: Order) -> None:
        """Return once SQL holds the paid ``order``: read back first (a payment acknowledged
        before is there), else committed as its payment is (``commit``: its payment's commit
        was cut, say by a crash, after Redis recorded it). PaymentPending as ``commit``."""
        if not await self._durable(order, self._wait):
            await self.commit(order)

    async def _submit(self, order: Order, within: float) -> str | None:
        """Join the next group commit; its failure (None: committed), or a timeout."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[str | None] = loop.create_future()
        self._pending.append((order, future, time.perf_counter()))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())  # referenced: never collected mid-run
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(within, 0.0))
        except TimeoutError:
            return "no answer from SQL in time"

    async def _durable(self, order: Order, within: float) -> bool:
        """Whether SQL holds ``order`` at its version or a later one (read back)."""
        try:
            stored = await asyncio.wait_for(self._store.get_order(order.order_id), within)
        except Exception:  # SQL down, stalled, or the wait over: not known
            return False
        return (
            stored is not None
            and stored.user_id == order.user_id
            and stored.created_at == order.created_at
            and stored.version >= order.version
        )

    async def _run(self) -> None:
        waiting: list[Pending] = []
        try:
            while self._pending:
                waiting, self._pending = self._pending[: self.MOST], self._pending[self.MOST :]
                batch = Batch()
                at_ms = int(time.time() * 1000)
                for order, _, _ in waiting:
                    batch.add_order(order, at_ms)
                started = time.perf_counter()
                try:
                    collisions = set(await asyncio.wait_for(self._store.apply(batch), self._wait))
                except Exception as exc:  # anything: every payment must get its answer
                    _answer(waiting, exc.message if isinstance(exc, EngineError) else repr(exc))
                    continue
                self.commits += 1
                self.committed += len(waiting)
                if self.observe is not None:
                    took = time.perf_counter() - started
                    for _, _, queued in waiting:
                        self.observe("queue", started - queued)
                        self.observe("commit", took)
                _answer(waiting, None, collisions)
        finally:  # nothing below awaits: a payment joining later starts a new loop
            # Cancelled (the loop is closing): nobody is left without an answer.
            left, self._pending = [*waiting, *self._pending], []
            _answer(left, "the payment ledger stopped")


def _answer(
    waiting: list[Pending], failure: str | None, collisions: set[str] | None = None
) -> None:
    """Resolve each payment's future still unresolved with ``failure`` (None: committed), or
    "collision" for the ids in ``collisions``."""
    for order, future, _ in waiting:
        if not future.done():
            collided = collisions is not None and order.order_id in collisions
            future.set_result("collision" if collided else failure)


class Orders:
    """Pay, cancel, refund and read any order."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._scripts = rt.scripts
        settings = rt.settings
        self.ledger = (
            PaymentLedger(rt.store, settings.pay_wait) if settings.pay_durability == "sql" else None
        )

    async def locate(self, order_id: str) -> str:
        """The order id's campaign, once it is one the campaign could have issued (see the
        module's docstring); ValidationError for a malformed id, OrderNotFound for the rest."""
        campaign_id, bucket, number = parse_order(order_id)
        layout = await self._rt.known_layout(campaign_id)
        if layout is None or shard_id(campaign_id, bucket) not in layout.shards or number == 0:
            raise OrderNotFound(order_id)
        return campaign_id

    async def pay(
        self, order_id: str, user_id: str, payment_ref: str, amount: int | None = None
    ) -> Order:
        """Mark the held order paid; a retry with the same ``payment_ref`` is a no-op (and is
        made durable again, so a retry after a 503 is acknowledged only once SQL has it).
        PaymentPending when SQL did not confirm the payment within ``FLASHTEAM_PAY_WAIT``:
        it is recorded, not declined, and its retry answers the outcome. A payment reference
        pays one order (PaymentRefUsed on any other); ``amount``, the amount paid when the
        gateway says, must be the order's (AmountMismatch)."""
        campaign_of_order(order_id)  # validated before the other fields
        check_id(user_id, "user_id")
        check_key(payment_ref, "payment_ref")
        if amount is not None:
            check_int(amount, "amount", 0, MAX_AMOUNT)
        campaign_id = await self.locate(order_id)
        try:
            order = await self._scripts.pay(order_id, user_id, payment_ref, amount)
        except Archived:
            order = await self._archived(order_id, user_id)
            if order.state is OrderState.PAID and order.payment_ref == payment_ref:
                return order  # paid before, with this reference
            if order.state is OrderState.EXPIRED:
                raise Refusal(Code.HOLD_EXPIRED, None).error() from None
            raise Refusal(Code.INVALID_STATE, order.state.value).error() from None
        if self.ledger is not None:
            try:
                await self.ledger.commit(order)
            except Recovering:
                await self._scripts.report_untrusted(campaign_id, "collision")
                raise
        return order

    async def cancel(self, order_id: str, user_id: str) -> Order:
        """The owner cancels a held order; its stock is sellable again at once. An order whose
        hold already ended (cancelled, or expired) is answered as it is: the hold is gone."""
        campaign_of_order(order_id)  # validated before the other fields
        check_id(user_id, "user_id")
        await self.locate(order_id)
        try:
            return await self._scripts.cancel(order_id, user_id)
        except Archived:
            order = await self._archived(order_id, user_id)
            if order.state in (OrderState.CANCELLED, OrderState.EXPIRED):
                return order  # its hold ended before
            raise Refusal(Code.INVALID_STATE, order.state.value).error() from None

    async def refund(self, order_id: str, restock: bool) -> Order:
        """After-sale refund of a paid order; its units go back on sale only if ``restock``."""
        campaign_id = await self.locate(order_id)
        try:
            order = await self._scripts.refund(order_id, bool(restock))
        except Archived:
            return await self._refund_archived(order_id, bool(restock))
        # The campaign may be over and its outbox forgotten by the flush worker: register it
        # again after the event is in the stream (the worker re-checks after forgetting).
        await guarded(self._rt.redis.sadd(STREAM_SET, campaign_id))
        return order

    async def _archived(self, order_id: str, user_id: str | None = None) -> Order:
        """An order of an archived campaign from SQL; NotFound, or Forbidden when it is not
        ``user_id``'s, as the scripts answer."""
        order = await self._rt.store.get_order(order_id)
        if order is None:
            raise OrderNotFound(order_id)
        if user_id is not None and order.user_id != user_id:
            raise Refusal(Code.FORBIDDEN, None).error()
        return order

    async def _refund_archived(self, order_id: str, restock: bool) -> Order:
        """Refund a paid order of an archived campaign in SQL: a new version, written by the
        version-gated upsert, so of two refunds at once only one is applied and both answer
        the refunded order. While the campaign is sealed but not yet archived (the moments
        of its comparison with SQL), Unavailable: the retry lands on one side or the other."""
        rt = self._rt
        if await rt.store.archive_of(campaign_of_order(order_id)) is None:
            raise Unavailable(
                "the campaign is being archived: retry shortly", reason="archiving"
            ) from None
        order = await self._archived(order_id)
        if order.state is OrderState.REFUNDED:
            return order
        if order.state is not OrderState.PAID:
            raise Refusal(Code.INVALID_STATE, order.state.value).error()
        if order.team_id is not None:
            team = await rt.store.get_team(order.team_id)
            if team is None or team.state is not TeamState.SUCCEEDED:
                raise Refusal(Code.TEAM_IN_PROGRESS, None).error()
        refunded = replace(order, state=OrderState.REFUNDED, version=order.version + 1)
        batch = Batch()
        batch.add_order(refunded, to_ms(await rt.now()), restocked=restock)
        await rt.store.apply(batch)
        stored = await rt.store.get_order(order_id)
        assert stored is not None  # SQL held it a moment ago and orders are never deleted
        return stored

    async def get(self, order_id: str, user_id: str | None = None) -> Order:
        """The order's current state: Redis while it is there (in its stock bucket, for a
        sharded campaign), else the durable store. ``user_id``, the viewer, must own it
        (Forbidden), checked before anything else about the order is told.

        With the payment durability default, a paid order is told as paid only once SQL
        holds its payment (``PaymentLedger.confirm``): a payment whose commit was cut after
        Redis recorded it (a crash of the process paying) is committed first, as its retry
        would be, or answered PaymentPending; a shopper never reads "paid" for a payment
        that a Redis failover could still take back."""
        await self.locate(order_id)
        keys = keys_of(shard_of_order(order_id))
        record = await guarded(self._rt.redis.hget(keys.orders, order_id))
        order = (
            Order.from_record(order_id, record)
            if record is not None
            else await self._rt.store.get_order(order_id)
        )
        if order is None:
            raise OrderNotFound(order_id)
        if user_id is not None and order.user_id != user_id:
            raise Refusal(Code.FORBIDDEN, None).error()
        if record is not None and order.state is OrderState.PAID and self.ledger is not None:
            await self.ledger.confirm(order)
        return order

    async def of_user(self, user_id: str, limit: int) -> list[Order]:
        """The user's orders from the durable store, newest first."""
        return await self._rt.store.user_orders(check_id(user_id, "user_id"), limit)
