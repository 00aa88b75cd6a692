"""Payments when the durable store misbehaves: every payment is answered within its bounded
wait whatever the store raises or however long it stalls, a 200 means paid in SQL, a 503
``payment_pending`` means "not known yet" and its retry answers the outcome; the flush worker
never exits on a store fault; the payment commit and the flush never deadlock on PostgreSQL.

Real redis-server and real SQLite or PostgreSQL throughout; faults are injected by wrapping
the real store (``FaultyStore``) or by restarting PostgreSQL itself.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import asyncpg
import pytest

from engine import Engine, Order, OrderState, PaymentPending, Unavailable, errors
from engine.errors import AlreadyExists
from engine.local.postgres import PostgresServer
from engine.local.redis_server import RedisServer
from engine.orders import PaymentLedger
from engine.store import Batch, Store, open_store
from engine.store.postgres import _translated
from engine.store.sqlite import SqliteStore
from engine.worker import FlushWorker
from testkit.factories import deadlocks, flash_campaign, make_settings, team_campaign

SKU = "sku-1"
T = TypeVar("T")


async def _not_paid(store: Store, order_ids: list[str]) -> list[str]:
    """The ids among ``order_ids`` that SQL does not hold as paid."""
    missing = []
    for order_id in order_ids:
        stored = await store.get_order(order_id)
        if stored is None or stored.state is not OrderState.PAID:
            missing.append(order_id)
    return missing


async def _reserve(engine: Engine, campaign_id: str, users: list[str]) -> list[Order]:
    held = await asyncio.gather(
        *(engine.flash.reserve(campaign_id, u, SKU, 1, f"k-{u}") for u in users)
    )
    return [r.order for r in held]


# Added to a payment's own wait for its answer to arrive: a ceiling for a loaded machine (the
# suite runs beside other work on 2 cores), not a measurement; a payment that hangs never ends.
ANSWER_SLACK = 10.0

RETRIES = 10  # a gateway's retries of a payment answered payment_pending


async def _pay(engine: Engine, order: Order, within: float) -> Order | PaymentPending:
    """Pay; the answer must come within ``within`` seconds (else the test fails: a hang)."""
    try:
        return await asyncio.wait_for(
            engine.orders.pay(order.order_id, order.user_id, f"p-{order.order_id}"), within
        )
    except PaymentPending as pending:
        return pending


# ------------------------------------------------------------------ store error translation


@pytest.mark.parametrize(
    "raised",
    [
        asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress"),
        asyncpg.exceptions.DeadlockDetectedError("deadlock detected"),
        asyncpg.exceptions.UndefinedTableError("relation does not exist"),
        RuntimeError("something nobody documented"),
        KeyError("row"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_postgres_failure_is_unavailable(raised: Exception) -> None:
    with pytest.raises(Unavailable) as caught, _translated("write"):
        raise raised
    assert caught.value.__cause__ is raised
    assert type(raised).__name__ in str(caught.value) or str(raised) in str(caught.value)


def test_the_engines_own_errors_pass_the_postgres_boundary() -> None:
    with pytest.raises(AlreadyExists), _translated("insert campaign"):
        raise AlreadyExists("campaign sale already exists", id="sale")


async def test_a_closed_sqlite_connection_is_unavailable(tmp_path: Path) -> None:
    """aiosqlite's own error on a closed connection (not a sqlite3.Error) is Unavailable too."""
    store = await SqliteStore.open(tmp_path / "closed.db")
    await store.close()
    with pytest.raises(Unavailable):
        await store.get_campaign("sale")
    with pytest.raises(Unavailable):
        await store.apply(Batch(invalidations={"sale": 1}))


# ------------------------------------------------------------------------ deadlocks


async def test_payments_and_the_flush_never_deadlock_on_postgres(
    redis: Any, redis_server: RedisServer, pg_url: str, tmp_path: Path
) -> None:
    """Two API processes' payment ledgers and the flush worker write the same order rows and
    the same high-water marks of two campaigns at once, round after round, the flush in the
    order the orders were made and the payments in another: no payment fails, and PostgreSQL
    detects no deadlock (every writer locks the rows it shares in one order)."""
    settings = make_settings(redis_server.url, tmp_path, database_url=pg_url)
    async with await Engine.open(settings) as first, await Engine.open(settings) as second:
        now = await first.runtime.now()
        for campaign_id in ("sale", "other"):
            await first.campaigns.create(flash_campaign(now, campaign_id, stock=100_000, limit=1))
        before = await deadlocks(pg_url)
        for round_ in range(3):
            # The outbox holds every reservation when the worker starts: its batches write
            # them in the order they were made while the shoppers pay in another order.
            orders = []
            for campaign_id in ("sale", "other"):
                users = [f"r{round_}u{n}" for n in range(1000)]
                orders += await _reserve(first, campaign_id, users)
            random.shuffle(orders)
            stop = asyncio.Event()
            worker = asyncio.create_task(FlushWorker(first.runtime, "w1").run(stop))
            paid = await asyncio.gather(
                *(_pay((first, second)[n % 2], o, 30.0) for n, o in enumerate(orders))
            )
            assert not worker.done()
            stop.set()
            await worker
            failed = [p for p in paid if not isinstance(p, Order)]
            assert not failed, failed[:3]
        await FlushWorker(first.runtime, "w1").drain()
        assert not await _not_paid(first.runtime.store, [o.order_id for o in orders])
    await asyncio.sleep(1.5)  # backends report their statistics within about a second
    assert await deadlocks(pg_url) == before


# ------------------------------------------------------------------ faults in the store


class FaultyStore:
    """The real store with faults injected into the payment's path (``apply``, the
    read-back's ``get_order``): ``mode`` None passes every call through; "raise" raises an
    exception of any kind; "stall" hangs the call for 3 s, far past a payment's wait, then
    times out as a statement timeout would; "lost" commits and then raises, as a connection
    that broke before the commit's answer came back."""

    _RAISED: tuple[Callable[[], Exception], ...] = (
        lambda: asyncpg.InternalClientError("cannot switch to state 15; another operation"),
        lambda: RuntimeError("a fault nobody documented"),
        lambda: Unavailable("PostgreSQL unavailable (write): connection reset"),
        lambda: ConnectionResetError("connection reset by peer"),
    )

    def __init__(self, store: Store) -> None:
        self.store = store
        self.mode: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def apply(self, batch: Batch) -> list[str]:
        return await self._faulty(lambda: self.store.apply(batch), commits=True)

    async def get_order(self, order_id: str) -> Order | None:
        return await self._faulty(lambda: self.store.get_order(order_id), commits=False)

    async def _faulty(self, call: Callable[[], Awaitable[T]], *, commits: bool) -> T:
        mode = self.mode
        if mode == "raise":
            raise random.choice(self._RAISED)()
        if mode == "stall":
            await asyncio.sleep(3.0)
            raise TimeoutError("the statement timed out")
        result = await call()
        if mode == "lost" and commits:
            raise ConnectionResetError("connection lost before the commit's answer")
        return result


@asynccontextmanager
async def _faulty_engine(
    redis_server: RedisServer, tmp_path: Path, database_url: str, pay_wait: float
) -> AsyncIterator[tuple[Engine, FaultyStore]]:
    """An engine whose payments wait ``pay_wait`` seconds for a store with faults injected."""
    settings = make_settings(
        redis_server.url, tmp_path, database_url=database_url, pay_wait=pay_wait
    )
    faulty = FaultyStore(await open_store(settings))
    async with await Engine.open(settings, cast(Store, faulty)) as engine:
        yield engine, faulty


# The store's behaviour during each wave of payments, in turn: every fault meets payments
# (and the flush worker) whatever the timing, so both outcomes always happen.
WAVE_FAULTS = (None, "raise", "stall", "lost", "raise", None, "stall", "lost")


async def test_every_payment_is_answered_in_time_whatever_the_store_does(
    redis: Any, redis_server: RedisServer, database_url: str, tmp_path: Path
) -> None:
    """Payments while the store raises anything, stalls, or commits and loses the answer:
    each one is answered within its wait (0.5 s here) plus ANSWER_SLACK at the most, 200
    only when SQL has it paid, else 503 payment_pending; every pending payment's retry,
    once the store behaves, answers 200 and SQL has it paid. The flush worker, writing
    through the same faults, keeps running and flushes everything afterwards."""
    wait = 0.5
    async with _faulty_engine(redis_server, tmp_path, database_url, wait) as (engine, faulty):
        real = faulty.store
        now = await engine.runtime.now()
        await engine.campaigns.create(flash_campaign(now, stock=10_000, limit=1))
        orders = await _reserve(engine, "sale", [f"u{n}" for n in range(600)])
        stop_worker = asyncio.Event()
        worker = asyncio.create_task(FlushWorker(engine.runtime, "w1").run(stop_worker))
        answers: list[Order | PaymentPending] = []
        for wave, start in enumerate(range(0, len(orders), 50)):  # waves through the faults
            faulty.mode = WAVE_FAULTS[wave % len(WAVE_FAULTS)]
            shoppers = orders[start : start + 50]
            answers += await asyncio.gather(
                *(_pay(engine, o, wait + ANSWER_SLACK) for o in shoppers)
            )
        faulty.mode = None
        assert not worker.done()  # it backed off through every fault
        stop_worker.set()
        await worker
        paid = [a.order_id for a in answers if isinstance(a, Order)]
        pending = [a.details["order_id"] for a in answers if isinstance(a, PaymentPending)]
        assert paid and pending, (len(paid), len(pending))  # both outcomes were exercised
        assert len(paid) + len(pending) == len(orders)
        assert not await _not_paid(real, paid)
        by_id = {o.order_id: o for o in orders}
        # The gateway retries each pending payment with its key until it is answered 200: the
        # store behaves again, so every one is paid within a few retries (not necessarily the
        # first: hundreds at once, each given 0.5 s, on a slow or busy machine).
        left = pending
        for _ in range(RETRIES):
            retried = await asyncio.gather(
                *(_pay(engine, by_id[o], wait + ANSWER_SLACK) for o in left)
            )
            assert all(isinstance(r, PaymentPending) or r.state is OrderState.PAID for r in retried)
            left = [r.details["order_id"] for r in retried if isinstance(r, PaymentPending)]
            if not left:
                break
        assert not left, f"{len(left)} payments still pending after {RETRIES} retries"
        assert not await _not_paid(real, pending)
        await FlushWorker(engine.runtime, "w1").drain()
        assert not await _not_paid(real, [o.order_id for o in orders])


async def test_postgres_fast_restarts_during_a_team_sale(
    redis: Any,
    redis_server: RedisServer,
    postgres_server: PostgresServer,
    pg_url: str,
    tmp_path: Path,
) -> None:
    """20 fast restarts of PostgreSQL while leaders open teams, shoppers quick-join and
    everyone pays: the flush worker never exits, every payment is answered within its wait,
    200 or 503 payment_pending, and every pending payment's retry answers 200; afterwards SQL
    has every acknowledged payment paid."""
    wait = 1.0
    settings = make_settings(redis_server.url, tmp_path, database_url=pg_url, pay_wait=wait)
    async with await Engine.open(settings) as engine:
        now = await engine.runtime.now()
        await engine.campaigns.create(team_campaign(now, stock=100_000, limit=1))
        stop, stop_worker = asyncio.Event(), asyncio.Event()
        worker = asyncio.create_task(FlushWorker(engine.runtime, "w1").run(stop_worker))
        answers: list[tuple[Order, Order | PaymentPending]] = []

        async def pay(order: Order) -> None:
            answers.append((order, await _pay(engine, order, wait + ANSWER_SLACK)))

        async def shoppers(n: int) -> None:
            while not stop.is_set():
                n += 1_000
                opened = await engine.teams.open("group", f"lead{n}", SKU, 1, f"o{n}")
                await pay(opened.order)
                for member in ("a", "b"):
                    seat = await engine.teams.quick_join("group", f"{member}{n}", SKU, f"q{n}")
                    await pay(seat.order)

        crowd = [asyncio.create_task(shoppers(n)) for n in range(20)]
        for _ in range(20):
            await asyncio.sleep(0.2)
            await asyncio.to_thread(postgres_server.stop)
            await asyncio.to_thread(postgres_server.start)
            assert not worker.done()
        stop.set()
        await asyncio.gather(*crowd)
        pending = [order for order, answer in answers if isinstance(answer, PaymentPending)]
        retried = await asyncio.gather(*(_pay(engine, o, wait + ANSWER_SLACK) for o in pending))
        assert all(isinstance(r, Order) and r.state is OrderState.PAID for r in retried)
        assert not worker.done()
        stop_worker.set()
        await worker
        acknowledged = [order.order_id for order, _ in answers]
        assert len(acknowledged) > 100
        assert not await _not_paid(engine.runtime.store, acknowledged)


class CountingStore:
    """The real store, recording the orders of each batch written (the group commits)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def apply(self, batch: Batch) -> list[str]:
        self.batches.append(len(batch.orders))
        return await self.store.apply(batch)


async def test_a_group_commit_carries_at_most_its_bound(
    redis: Any,
    redis_server: RedisServer,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """400 payments at once with commits of at most 50 (``PaymentLedger.MOST``): every commit
    carries 50 or fewer, each payment is committed once and is paid in SQL, and each tells
    where its wait went (queue, commit, durable) once."""
    monkeypatch.setattr(PaymentLedger, "MOST", 50)
    settings = make_settings(redis_server.url, tmp_path, database_url=database_url)
    real = await open_store(settings)
    counting = CountingStore(real)
    async with await Engine.open(settings, cast(Store, counting)) as engine:
        now = await engine.runtime.now()
        await engine.campaigns.create(flash_campaign(now, stock=1_000, limit=1))
        orders = await _reserve(engine, "sale", [f"u{n}" for n in range(400)])
        ledger = engine.orders.ledger
        assert ledger is not None
        parts: list[str] = []
        ledger.observe = lambda part, seconds: parts.append(part)
        answers = await asyncio.gather(*(_pay(engine, o, 60.0) for o in orders))
        assert all(isinstance(a, Order) and a.state is OrderState.PAID for a in answers)
        assert max(counting.batches) <= 50 and sum(counting.batches) == 400, counting.batches
        assert len(counting.batches) >= 8
        assert sorted(set(parts)) == ["commit", "durable", "queue"]
        assert all(parts.count(p) == 400 for p in ("commit", "durable", "queue"))
        assert not await _not_paid(real, [o.order_id for o in orders])


async def test_an_order_reads_paid_only_once_sql_holds_its_payment(
    redis: Any, redis_server: RedisServer, database_url: str, tmp_path: Path
) -> None:
    """A payment recorded in Redis whose commit to SQL was cut (the process paying died
    between the two: here the script is run alone) is not told as paid while SQL cannot take
    it (503 payment_pending, within the payment wait); once SQL can, reading the order
    commits it first, then tells it paid. An order whose payment SQL holds is read with no
    commit; another shopper is refused before anything is committed."""
    wait = 0.5
    async with _faulty_engine(redis_server, tmp_path, database_url, wait) as (engine, faulty):
        real = faulty.store
        now = await engine.runtime.now()
        await engine.campaigns.create(flash_campaign(now, stock=10, limit=1))
        cut, acknowledged = await _reserve(engine, "sale", ["cut", "acknowledged"])
        await engine.runtime.scripts.pay(cut.order_id, "cut", "p-cut")  # Redis only
        await engine.orders.pay(acknowledged.order_id, "acknowledged", "p-ack")
        ledger = engine.orders.ledger
        assert ledger is not None
        commits = ledger.commits
        with pytest.raises(errors.Forbidden):
            await engine.orders.get(cut.order_id, "someone-else")
        assert (await engine.orders.get(acknowledged.order_id, "acknowledged")).state is (
            OrderState.PAID
        )
        assert ledger.commits == commits  # read back: nothing to commit
        faulty.mode = "raise"
        with pytest.raises(PaymentPending):
            await asyncio.wait_for(engine.orders.get(cut.order_id, "cut"), wait + ANSWER_SLACK)
        assert await _not_paid(real, [cut.order_id]) == [cut.order_id]
        faulty.mode = None
        assert (await engine.orders.get(cut.order_id, "cut")).state is OrderState.PAID
        assert not await _not_paid(real, [cut.order_id])
        assert ledger.commits == commits + 1
