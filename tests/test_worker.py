"""The flush worker on both backends (SQLite and PostgreSQL): every order and team change
reaches SQL exactly once in effect, whatever crashes on the way (invariant I4,
docs/invariants.md)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis import exceptions as redis_errors

from engine import Engine, OrderState
from engine.errors import AlreadyExists, Unavailable
from engine.keys import DEAD_LETTERS, keys_of
from engine.local.postgres import PostgresServer
from engine.local.redis_server import RedisServer
from engine.reconcile import reconcile
from engine.store import Batch
from engine.worker import GROUP, FlushWorker
from testkit.factories import flash_campaign, make_settings
from testkit.helpers import eventually, run_cli
from tests.workload import FLASH, TEAM, Mix, mixed_sale, order_key, redis_orders, redis_teams

WORKER = [sys.executable, "-m", "engine.cli", "worker"]


@pytest.fixture
async def durable(
    redis: Any, redis_server: RedisServer, database_url: str, tmp_path: Path
) -> AsyncIterator[Engine]:
    """An engine on the session's Redis (flushed) and a fresh database of each backend."""
    settings = make_settings(redis_server.url, tmp_path, database_url=database_url)
    async with await Engine.open(settings) as engine:
        yield engine


def _env(engine: Engine, **extra: str) -> dict[str, str]:
    settings = engine.runtime.settings
    assert settings.redis_url is not None and settings.database_url is not None
    return {
        **os.environ,
        "FLASHTEAM_REDIS_URL": settings.redis_url,
        "FLASHTEAM_DATABASE_URL": settings.database_url,
        **{f"FLASHTEAM_{k.upper()}": v for k, v in extra.items()},
    }


async def assert_sql_matches_redis(engine: Engine) -> int:
    """Every order in SQL equals Redis (state, version, amounts, team); teams per state and
    reconcile agree; nothing is left in the streams. Returns the number of orders."""
    store = engine.runtime.store
    total = 0
    for campaign_id in (FLASH, TEAM):
        orders = await redis_orders(engine, campaign_id)
        for order_id, order in orders.items():
            stored = await store.get_order(order_id)
            assert stored is not None, f"{order_id} was lost"
            assert order_key(stored) == order_key(order), order_id
        result = await reconcile(engine.runtime, campaign_id)
        assert result.ok, "\n".join(result.differences)
        assert result.unflushed == 0
        total += len(orders)
    for team in await redis_teams(engine, TEAM):
        in_sql = await store.team_orders(team.team_id)
        assert all(o.team_id == team.team_id for o in in_sql)
        # A released seat leaves the team record but its order keeps the team id.
        assert {s.order_id for s in team.seats} <= {o.order_id for o in in_sql}, team.team_id
    return total


async def flushed(worker: FlushWorker) -> bool:
    """every stream is flushed"""
    return (await worker.lag()).unflushed == 0


async def _states(engine: Engine) -> set[OrderState]:
    orders = {**await redis_orders(engine, FLASH), **await redis_orders(engine, TEAM)}
    return {o.state for o in orders.values()}


# --------------------------------------------------------------------------- the mixed run


async def test_mixed_run_lands_exactly_and_reconcile_catches_a_difference(
    durable: Engine,
) -> None:
    engine = durable
    await mixed_sale(engine)
    assert await _states(engine) == set(OrderState), "the run must leave every order state"
    team_states = {t.state for t in await redis_teams(engine, TEAM)}
    assert len(team_states) >= 4, team_states

    worker = FlushWorker(engine.runtime, name="only")
    moved = await worker.drain()
    assert moved == worker.flushed > 2_000 and worker.dead_lettered == 0
    assert await assert_sql_matches_redis(engine) > 1_000
    assert await worker.drain() == 0, "a second drain finds nothing"

    code, out, err = await run_cli("reconcile", FLASH, env=_env(engine))
    assert code == 0, err
    assert "Redis and SQL agree" in out

    # Plant a difference: one paid order turned cancelled in SQL only.
    paid = next(
        o for o in (await redis_orders(engine, FLASH)).values() if o.state is OrderState.PAID
    )
    planted = dataclasses.replace(paid, state=OrderState.CANCELLED, version=paid.version + 1)
    batch = Batch()
    batch.add_order(planted, 0)
    await engine.runtime.store.apply(batch)
    result = await reconcile(engine.runtime, FLASH)
    assert not result.ok and result.differences == [
        f"order {paid.order_id} state: redis paid sql cancelled",
        f"order {paid.order_id} version: redis {paid.version} sql {paid.version + 1}",
    ]
    code, out, err = await run_cli("reconcile", FLASH, env=_env(engine))
    assert code == 1
    assert "differs" in out, "the totals per state show it too"
    assert result.differences[0] in out and f"{FLASH}: 2 differences" in err


async def test_replayed_and_out_of_order_entries_never_roll_back(durable: Engine) -> None:
    """Versions gate every upsert: the same events again, or older ones after newer ones,
    leave SQL as it is."""
    engine = durable
    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), FLASH, stock=10))
    held = (await engine.flash.reserve(FLASH, "u1", "sku-1", 1, "k")).order
    stream = keys_of(FLASH).events
    redis = engine.runtime.redis
    entries: Any = await redis.xrange(stream)
    reserved = entries[-1][1]
    await engine.orders.pay(held.order_id, "u1", f"p-{held.order_id}")
    await FlushWorker(engine.runtime).drain()
    await redis.xadd(stream, reserved)  # the old 'reserved' entry delivered late
    await FlushWorker(engine.runtime).drain()
    stored = await engine.runtime.store.get_order(held.order_id)
    assert stored is not None and stored.state is OrderState.PAID and stored.version == 2


# --------------------------------------------------------------------------- crashes


def _start_worker(engine: Engine, name: str) -> subprocess.Popen[bytes]:
    env = _env(engine, worker_name=name, claim_idle="0.3", flush_batch="25")
    return subprocess.Popen(WORKER, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _reading_since(engine: Engine, name: str, started: float) -> bool:
    """Whether the consumer ``name`` has read a stream since ``started`` (loop time)."""
    elapsed_ms = (asyncio.get_running_loop().time() - started) * 1000
    for campaign_id in (FLASH, TEAM, CHURN):
        with contextlib.suppress(redis_errors.ResponseError):  # no stream or group yet
            consumers: Any = await engine.runtime.redis.xinfo_consumers(
                keys_of(campaign_id).events, GROUP
            )
            if any(c["name"] == name and c["idle"] < elapsed_ms for c in consumers):
                return True
    return False


CHURN = "churn"


async def _churn(engine: Engine, prefix: str, n: int = 500) -> None:
    """``n`` more reservations on a campaign of its own: events for the next worker to be
    killed on once the sale is over (on a busy machine the sale can end after a few kills)."""
    with contextlib.suppress(AlreadyExists):
        now = await engine.runtime.now()
        await engine.campaigns.create(flash_campaign(now, CHURN, stock=1_000_000, limit=1))
    await asyncio.gather(
        *(engine.flash.reserve(CHURN, f"{prefix}-{i}", "sku-1", 1, "k") for i in range(n))
    )


async def _pending(engine: Engine) -> int:
    total = 0
    for campaign_id in (FLASH, TEAM, CHURN):
        with contextlib.suppress(redis_errors.ResponseError):
            info: Any = await engine.runtime.redis.xpending(keys_of(campaign_id).events, GROUP)
            total += int(info["pending"])
    return total


async def test_worker_killed_repeatedly_loses_and_duplicates_nothing(durable: Engine) -> None:
    engine = durable
    rng = random.Random(11)
    kills = mid_batch = 0
    sale = asyncio.create_task(mixed_sale(engine, Mix(flash_shoppers=1_500, team_shoppers=900)))
    while not (sale.done() and kills >= 6 and mid_batch >= 3):
        assert kills < 60, f"only {mid_batch} of {kills} kills hit a batch in flight"
        # A reused name finds its own pending entries; a new one claims a dead one's.
        name = f"w{rng.choice((1, 2, kills + 10))}"
        if sale.done() and mid_batch < 3:
            await _churn(engine, f"c{kills}")
        started = asyncio.get_running_loop().time()
        process = _start_worker(engine, name)
        await eventually(functools.partial(_reading_since, engine, name, started))
        # Not a wait: the random moment of the kill is the test (before, in or after a batch).
        await asyncio.sleep(rng.uniform(0, 0.05))
        process.send_signal(signal.SIGKILL)
        assert await asyncio.to_thread(process.wait, 10) == -signal.SIGKILL
        kills += 1
        mid_batch += await _pending(engine) > 0  # read, not yet committed and acknowledged
    await sale
    # A last worker, started fresh, claims what the dead ones left pending and drains.
    code, out, err = await run_cli(
        "worker", "--drain", env=_env(engine, worker_name="final", claim_idle="0.3")
    )
    assert code == 0, err
    assert int(out.split()[1]) > 0, out  # "drained: N entries flushed, ..."
    assert await assert_sql_matches_redis(engine) > 1_000
    for campaign_id in (FLASH, TEAM):
        assert await engine.runtime.redis.xlen(keys_of(campaign_id).events) == 0
    assert await _pending(engine) == 0


async def test_sigterm_finishes_the_batch_in_flight(durable: Engine) -> None:
    engine = durable
    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), FLASH, stock=3_000))
    await asyncio.gather(
        *(engine.flash.reserve(FLASH, f"u{n}", "sku-1", 1, "k") for n in range(3_000))
    )
    stream = keys_of(FLASH).events
    process = _start_worker(engine, "graceful")
    redis = engine.runtime.redis

    async def started() -> bool:
        """the worker has flushed something"""
        return bool(await redis.xlen(stream) < 3_000)

    await eventually(started)
    process.send_signal(signal.SIGTERM)
    _, err = await asyncio.to_thread(process.communicate, timeout=30)
    assert process.returncode == 0, err
    consumers: Any = await redis.xinfo_consumers(stream, GROUP)
    assert all(c["pending"] == 0 for c in consumers), consumers
    left = await redis.xlen(stream)
    assert 0 <= left < 3_000
    await FlushWorker(engine.runtime).drain()
    assert [(t.state, t.orders) for t in await engine.runtime.store.order_totals(FLASH)] == [
        ("held", 3_000)
    ]


# --------------------------------------------------------------------------- two workers


async def test_two_workers_in_one_group_write_each_entry_once(durable: Engine) -> None:
    engine = durable
    small = dataclasses.replace(
        engine.runtime, settings=engine.runtime.settings.with_(flush_batch=40)
    )
    workers = [FlushWorker(small, name=n) for n in ("a", "b")]
    stop = asyncio.Event()
    running = [asyncio.create_task(w.run(stop)) for w in workers]
    await mixed_sale(engine)
    await eventually(lambda: flushed(workers[0]))
    stop.set()
    await asyncio.gather(*running)
    assert all(w.flushed > 0 for w in workers), [w.flushed for w in workers]
    added = 0
    for campaign_id in (FLASH, TEAM):
        info: Any = await engine.runtime.redis.xinfo_stream(keys_of(campaign_id).events)
        added += int(info["entries-added"])
    assert sum(w.flushed for w in workers) == added, "an entry was written twice or never"
    await assert_sql_matches_redis(engine)


async def test_a_group_lost_between_any_two_commands_is_created_again(engine: Engine) -> None:
    """The consumer group vanishes (Redis came back empty, or from an older snapshot) at a
    different moment of each pass: before the first read, between the read of the worker's
    own entries, the claim of others' and the read of new ones. Every pass ends without an
    error (the worker creates the group again wherever Redis answers NOGROUP), and then
    every reservation reaches SQL."""
    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), stock=100))
    worker = FlushWorker(engine.runtime, name="w")
    redis, stream = engine.runtime.redis, keys_of("sale").events
    held = []

    async def lose_the_group(after: int) -> None:
        for _ in range(after):
            await asyncio.sleep(0)
        with contextlib.suppress(redis_errors.ResponseError):  # no stream yet
            await redis.xgroup_destroy(stream, GROUP)

    for i in range(48):
        reserved = await engine.flash.reserve("sale", f"u{i}", "sku-1", 1, f"k{i}")
        held.append(reserved.order.order_id)
        await asyncio.gather(worker.step(), lose_the_group(i % 12))
    await worker.drain()
    assert [await engine.runtime.store.get_order(order_id) for order_id in held] == [
        await engine.orders.get(order_id) for order_id in held
    ]


# --------------------------------------------------------------------------- SQL outages


def _lock_sqlite(path: Path) -> Callable[[], None]:
    """Another writer takes SQLite's write lock and holds it (past the store's busy timeout)
    until the returned function is called, which releases it and waits for the writer."""
    ready, release = threading.Event(), threading.Event()

    def hold() -> None:
        db = sqlite3.connect(path, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        ready.set()
        release.wait(120)  # bounded: a test that fails first never releases it
        db.execute("ROLLBACK")
        db.close()

    thread = threading.Thread(target=hold)
    thread.start()
    assert ready.wait(10)

    def unlock() -> None:
        release.set()
        thread.join()

    return unlock


async def test_sql_outage_waits_acknowledges_nothing_and_catches_up(
    durable: Engine, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL stopped and started again; SQLite locked by another writer past its busy
    timeout. The engine keeps selling on Redis meanwhile."""
    engine = durable
    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), FLASH, stock=500))
    worker = FlushWorker(engine.runtime, name="patient")
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    first = await asyncio.gather(
        *(engine.flash.reserve(FLASH, f"u{n}", "sku-1", 1, "k") for n in range(200))
    )
    await eventually(lambda: flushed(worker))

    url = engine.runtime.settings.database_url
    assert url is not None
    if url.startswith("sqlite"):
        end_outage: Callable[[], object] = _lock_sqlite(Path(url.removeprefix("sqlite:///")))
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        server.stop()
        end_outage = server.start
    # Payments are not acknowledged while SQL cannot commit them (FLASHTEAM_PAY_DURABILITY
    # sql): Redis has them, the shopper's retry after the outage is acknowledged.
    paying = [
        engine.orders.pay(h.order.order_id, h.order.user_id, f"p-{h.order.order_id}")
        for h in first[:100]
    ]
    refusals = await asyncio.gather(*paying, return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in refusals)
    await asyncio.gather(
        *(engine.flash.reserve(FLASH, f"v{n}", "sku-1", 1, "k") for n in range(100))
    )

    async def refused() -> bool:
        """the flush worker failed to commit and waits"""
        return any("flush worker waiting" in r.message for r in caplog.records)

    await eventually(refused)
    # Nothing is acknowledged (or deleted) while SQL cannot commit.
    assert await engine.runtime.redis.xlen(keys_of(FLASH).events) == 200
    # On this thread: a server started from a worker thread would die with that thread
    # (its parent-death signal follows the thread that forked it).
    end_outage()
    for held in first[:100]:
        await engine.orders.pay(held.order.order_id, held.order.user_id, f"p-{held.order.order_id}")
    await eventually(lambda: flushed(worker))
    stop.set()
    await running
    assert any("flush worker waiting" in r.message for r in caplog.records)
    totals = {t.state: t.orders for t in await engine.runtime.store.order_totals(FLASH)}
    assert totals == {"paid": 100, "held": 200}


# --------------------------------------------------------------------------- poison entries


async def test_malformed_entry_is_dead_lettered_and_does_not_block(durable: Engine) -> None:
    engine = durable
    await engine.campaigns.create(flash_campaign(await engine.runtime.now(), FLASH, stock=50))
    redis = engine.runtime.redis
    stream = keys_of(FLASH).events
    await engine.flash.reserve(FLASH, "before", "sku-1", 1, "k")
    poison: Any = {"type": "order.paid", "order": "x", "record": "not|a|record", "at": "soon"}
    poison_id = await redis.xadd(stream, poison)
    after = await asyncio.gather(
        *(engine.flash.reserve(FLASH, f"after{n}", "sku-1", 1, "k") for n in range(20))
    )
    worker = FlushWorker(engine.runtime)
    assert await worker.drain() == 22
    assert worker.dead_lettered == 1 and worker.flushed == 21
    dead: Any = await redis.xrange(DEAD_LETTERS)
    assert len(dead) == 1
    letter = dead[0][1]
    assert letter["stream"] == stream and letter["id"] == poison_id and letter["reason"]
    assert json.loads(letter["fields"]) == poison
    for held in after:
        assert await engine.runtime.store.get_order(held.order.order_id) is not None
    assert await redis.xlen(stream) == 0


async def test_a_batch_grows_with_the_backlog(durable: Engine) -> None:
    """With a batch of 40: a stream holding fewer entries is read whole in one batch, one
    holding more up to 4 batches (160) at once, and the rest in the passes after; every
    reservation reaches SQL once."""
    engine = durable
    now = await engine.runtime.now()
    await engine.campaigns.create(flash_campaign(now, stock=1_000, limit=1))
    small = dataclasses.replace(
        engine.runtime, settings=engine.runtime.settings.with_(flush_batch=40)
    )
    worker, stream = FlushWorker(small, name="w"), keys_of("sale").events
    sizes = []
    for shoppers in (25, 100, 500):
        await asyncio.gather(
            *(
                engine.flash.reserve("sale", f"u{shoppers}-{n}", "sku-1", 1, "k")
                for n in range(shoppers)
            )
        )
        while backlog := int(await engine.runtime.redis.xlen(stream)):
            moved = await worker.step()
            assert moved == min(backlog, 160), (backlog, moved)
            sizes.append(moved)
    assert sizes[:2] == [25, 100] and 160 in sizes, sizes
    assert await _sql_equals_redis(engine, "sale") == 625


async def test_a_batch_of_thousands_of_entries_is_acknowledged_whole(durable: Engine) -> None:
    """A batch of 9,000 entries (a backlog read at once: a batch of 3,000, grown) is written,
    acknowledged and deleted in one step: more ids than Lua unpacks at once."""
    engine = durable
    now = await engine.runtime.now()
    await engine.campaigns.create(flash_campaign(now, stock=10_000, limit=1))
    big = dataclasses.replace(
        engine.runtime, settings=engine.runtime.settings.with_(flush_batch=3_000)
    )
    sem = asyncio.Semaphore(500)

    async def reserve(n: int) -> None:
        async with sem:
            await engine.flash.reserve("sale", f"u{n}", "sku-1", 1, "k")

    await asyncio.gather(*(reserve(n) for n in range(9_000)))
    stream = keys_of("sale").events
    assert int(await engine.runtime.redis.xlen(stream)) == 9_000
    assert await FlushWorker(big, name="w").step() == 9_000
    assert int(await engine.runtime.redis.xlen(stream)) == 0
    assert await _sql_equals_redis(engine, "sale") == 9_000


async def _sql_equals_redis(engine: Engine, campaign_id: str) -> int:
    """Every order of the campaign in Redis is in SQL as Redis has it, record by record, and
    SQL holds no other; the number of orders."""
    orders = await redis_orders(engine, campaign_id)
    for order_id, order in orders.items():
        stored = await engine.runtime.store.get_order(order_id)
        assert stored is not None and order_key(stored) == order_key(order), order_id
    totals = await engine.runtime.store.order_totals(campaign_id)
    assert sum(t.orders for t in totals) == len(orders)
    return len(orders)
