"""T1 and T3: reservations of one hot item, side by side in one run, per concurrency level.

T1 implementations, each against a fresh Redis (or database) and one item with enough stock
that every request of the measured window succeeds:

- ``engine``: ``engine.flash.reserve`` with request coalescing (the default; batches of up to
  64 per ``batch.lua`` call) and the sold-out fast path at its default 0.5 s;
- ``engine-uncoalesced``: the same engine with ``coalesce=False``: one EVALSHA of
  ``reserve_stock.lua`` per request (the "one EVALSHA per request" of docs/performance.md);
- ``bare-batched``: the Redis ceiling: the raw ``batch.lua`` EVALSHA (the engine's own script,
  doing exactly the engine's work per reservation) with up to 64 reservations per call and
  no engine Python around it: ``c`` callers are ceil(c/64) loops of c/ceil(c/64)
  reservations each, so ``c`` reservations are always in flight;
- ``redis-watch``: what a team would write without Lua: WATCH the stock key, GET, MULTI,
  DECRBY + order record + per-user counter + deadline index, EXEC, retry on WatchError (less
  work than the engine: no idempotency record, no outbox event, no limit check; a pool of
  c connections, as each WATCH holds one);
- ``postgres``: PostgreSQL's conditional UPDATE (``available = available - 1 WHERE sku = $1
  AND available >= 1 RETURNING``) plus the order INSERT in one transaction, through an
  asyncpg pool of min(c, 50) connections (pgbench's 50 clients, docs/performance.md target
  T1), fsync on.

Then the sold-out storm: the engine with and without coalescing after the item sold out
(every request of the window is rejected).

T3: team join (a given open team) and quick-join (into pre-opened teams) against flash
reserve, the engine with coalescing, same driver and levels.

Correctness is asserted (every request of the window succeeded; stock conservation; no
oversell); timings are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis.exceptions import WatchError

from bench.harness import Measurement, Op, drive, fresh_engine, progress_line, run
from bench.report import report
from engine import Engine, Settings
from engine.errors import SoldOut
from engine.keys import keys_of
from engine.local.postgres import PostgresServer
from engine.local.redis_server import RedisServer
from engine.scripts import RESERVE, Call, OrderArgs, is_ok, script_source
from testkit.factories import create_database, flash_campaign, team_campaign
from testkit.helpers import assert_invariants

LEVELS = (10, 100, 1000)
SECONDS = 3.0  # measured window per implementation and level
WARMUP = 1.0
T3_ROUNDS = 3
STOCK = 50_000_000  # never runs out within a window
STORM_STOCK = 1_000  # the sold-out storm: sold out during its warm-up
BATCH = 64  # the bare loop's reservations per EVALSHA (the engine's default max batch)
PG_POOL = 50
TEAM_SIZE = 5
TEAM_SEATS = 160_000  # free seats opened before each join / quick-join run
SKU = "sku-1"
CID = "hot"

Factory = Callable[[int], Awaitable[Measurement]]


def _row(impl: str, m: Measurement, **extra: Any) -> dict[str, Any]:
    return {
        "impl": impl,
        "concurrency": m.concurrency,
        "per_s": m.rate,
        "p50_ms": m.percentile_ms(50),
        "p99_ms": m.percentile_ms(99),
        "requests": m.completed,
        "rejected": m.rejected,
        **extra,
        "load1": os.getloadavg()[0],  # the machine's load: other work skews absolute numbers
    }


def _reserve_op(engine: Engine, campaign_id: str, prefix: str) -> Op:
    async def op(n: int) -> bool:
        try:
            await engine.flash.reserve(campaign_id, f"{prefix}{n}", SKU, 1, "k")
        except SoldOut:
            return False
        return True

    return op


async def _engine_run(
    url: str, tmp: Path, level: int, stock: int = STOCK, **changes: object
) -> Measurement:
    name = f"engine-{level}-{stock}-{changes.get('coalesce')}"
    async with fresh_engine(url, tmp, name, **changes) as engine:
        now = await engine.runtime.now()
        await engine.campaigns.create(flash_campaign(now, CID, stock=stock, limit=1))
        m = await drive(_reserve_op(engine, CID, "u"), level, seconds=SECONDS, warmup=WARMUP)
        await _check_stock(engine, CID, stock)
        return m


async def _check_stock(engine: Engine, campaign_id: str, stock: int) -> None:
    """No oversell: the held units are exactly the orders made, the buckets add up."""
    await assert_invariants(engine, campaign_id)
    view = await engine.campaigns.get(campaign_id)
    item = view.stock[0]
    assert item.available >= 0 and item.available + item.held + item.paid == stock


async def _bare_batched(url: str, tmp: Path, level: int) -> Measurement:
    """batch.lua with up to BATCH reservations per EVALSHA, ``level`` reservations in flight."""
    async with fresh_engine(url, tmp, f"bare-{level}") as engine:
        now = await engine.runtime.now()
        await engine.campaigns.create(flash_campaign(now, CID, stock=STOCK, limit=1))
        client = aioredis.Redis.from_url(url, decode_responses=True, max_connections=64)
        try:
            sha = await client.script_load(script_source("batch"))
            m = await _drive_batches(client, sha, level)
        finally:
            await client.aclose()
        await _check_stock(engine, CID, STOCK)
        return m


async def _drive_batches(client: aioredis.Redis, sha: str, level: int) -> Measurement:
    keys = keys_of(CID)
    loops = math.ceil(level / BATCH)
    sizes = [level // loops + (1 if i < level % loops else 0) for i in range(loops)]
    numbers = itertools.count()
    start = time.perf_counter() + WARMUP
    end = start + SECONDS
    latencies: list[float] = []

    order_args = OrderArgs.of(Settings(rate_limit=0))

    async def loop(size: int) -> None:
        while (sent := time.perf_counter()) < end:
            batch_keys = list(keys.order_keys)  # no rate-limit keys: the limit is off
            calls = [Call(RESERVE, f"u{next(numbers)}", SKU, "", 1, "k") for _ in range(size)]
            args = order_args.batch(CID, calls)
            replies: list[list[Any]] = await client.evalsha(
                sha, len(batch_keys), *batch_keys, *args
            )
            received = time.perf_counter()
            assert all(is_ok(reply) for reply in replies), replies[0]
            if start <= received <= end:
                latencies.extend([received - sent] * size)

    await asyncio.gather(*(loop(size) for size in sizes))
    return Measurement(level, len(latencies), 0, SECONDS, latencies)


async def _redis_watch(url: str, level: int) -> tuple[Measurement, int]:
    """Optimistic WATCH/MULTI reservations in Python; returns the run and its retries."""
    stock, orders, users, deadlines = "wm:stock", "wm:orders", "wm:users", "wm:deadlines"
    client = aioredis.Redis.from_url(url, decode_responses=True, max_connections=level + 8)
    retries = 0
    try:
        await client.flushall()
        await client.set(stock, STOCK)

        async def op(n: int) -> bool:
            nonlocal retries
            user = f"u{n}"
            async with client.pipeline(transaction=True) as pipeline:
                pipe: Any = pipeline
                while True:
                    try:
                        await pipe.watch(stock)
                        available = int(await pipe.get(stock) or 0)
                        if available < 1:
                            return False
                        deadline = int(time.time() * 1000) + 60_000
                        pipe.multi()
                        pipe.decrby(stock, 1)
                        pipe.hset(orders, user, f"{user}|{SKU}|1|1999|H|{deadline}")
                        pipe.hincrby(users, user, 1)
                        pipe.zadd(deadlines, {user: deadline})
                        await pipe.execute()
                        return True
                    except WatchError:
                        if time.perf_counter() > give_up:
                            return True  # abandoned after the window: not counted
                        retries += 1

        # Under contention a caller can retry for minutes: once the window has closed the
        # callers stop retrying, so the run ends (their answers fall outside the window).
        give_up = time.perf_counter() + WARMUP + SECONDS
        m = await drive(op, level, seconds=SECONDS, warmup=WARMUP)
        left = int(await client.get(stock) or 0)
        sold = int(await client.hlen(orders))
        assert left + sold == STOCK, f"WATCH/MULTI leaked stock: {left} + {sold} != {STOCK}"
        return m, retries
    finally:
        await client.aclose()


async def _postgres(server: PostgresServer, level: int) -> Measurement:
    url = server.url_for(await create_database(server))
    size = min(level, PG_POOL)
    pool: Any = await asyncpg.create_pool(url, min_size=size, max_size=size)
    try:
        async with pool.acquire() as conn:
            await conn.execute(
                "CREATE TABLE stock (sku text PRIMARY KEY, available integer NOT NULL);"
                "CREATE TABLE orders (id bigserial PRIMARY KEY, sku text NOT NULL,"
                " user_id text NOT NULL, qty integer NOT NULL,"
                " created_at timestamptz NOT NULL DEFAULT now());"
            )
            await conn.execute("INSERT INTO stock VALUES ($1, $2)", SKU, STOCK)

        async def op(n: int) -> bool:
            async with pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "UPDATE stock SET available = available - $2"
                    " WHERE sku = $1 AND available >= $2 RETURNING available",
                    SKU,
                    1,
                )
                if row is None:
                    return False
                await conn.execute(
                    "INSERT INTO orders (sku, user_id, qty) VALUES ($1, $2, $3)", SKU, f"u{n}", 1
                )
                return True

        m = await drive(op, level, seconds=SECONDS, warmup=WARMUP)
        async with pool.acquire() as conn:
            left = await conn.fetchval("SELECT available FROM stock WHERE sku = $1", SKU)
            sold = await conn.fetchval("SELECT count(*) FROM orders")
        assert left + sold == STOCK, f"PostgreSQL leaked stock: {left} + {sold} != {STOCK}"
        return m
    finally:
        await pool.close()


@pytest.mark.benchmark
@pytest.mark.timeout(1200)
def test_t1_reserve_throughput(
    redis_server: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    url = redis_server.url
    rows: list[dict[str, Any]] = []
    ratios: list[dict[str, Any]] = []
    bar = progress_line("T1 reserve", len(LEVELS), "levels")
    for level in LEVELS:
        bar.update(bar.done, f"{level} callers: 5 implementations in turn")
        runs: dict[str, Measurement] = {}
        runs["engine"] = run(_engine_run(url, tmp_path, level, coalesce=True, sold_out_ttl=0.5))
        runs["engine-uncoalesced"] = run(
            _engine_run(url, tmp_path, level, coalesce=False, sold_out_ttl=0.5)
        )
        runs["bare-batched"] = run(_bare_batched(url, tmp_path, level))
        runs["redis-watch"], retries = run(_redis_watch(url, level))
        runs["postgres"] = run(_postgres(postgres_server, level))
        for impl, m in runs.items():
            # Enough stock: every request of every window succeeded.
            assert m.completed > 0 and m.rejected == 0, f"{impl} at {level}: {m.rejected} rejected"
            extra = {"retries": retries if impl == "redis-watch" else 0}
            rows.append(_row(impl, m, **extra))
        bar.step()
        engine = runs["engine"].rate
        ratios.append(
            {
                "concurrency": level,
                "engine_per_s": engine,
                "vs_bare_batched": engine / runs["bare-batched"].rate,
                "vs_uncoalesced": engine / runs["engine-uncoalesced"].rate,
                "vs_redis_watch": engine / runs["redis-watch"].rate,
                "vs_postgres": engine / runs["postgres"].rate,
            }
        )
    bar.close()
    report("t1-reserve", "T1 reserve throughput, one hot item (reserves/s, latency)", rows)
    report("t1-ratios", "T1 engine (coalesced) / each baseline, per concurrency", ratios)


@pytest.mark.benchmark
@pytest.mark.timeout(600)
def test_t1_sold_out_storm(redis_server: RedisServer, tmp_path: Path) -> None:
    """Rejections per second once the item is sold out (the first STORM_STOCK requests of the
    warm-up buy it all), with and without coalescing; the sold-out fast path at 0.5 s."""
    rows: list[dict[str, Any]] = []
    bar = progress_line("T1 sold-out storm", 2 * len(LEVELS), "runs")
    for level in LEVELS:
        for impl, coalesce in (("engine", True), ("engine-uncoalesced", False)):
            bar.update(bar.done, f"{impl} at {level} callers")
            m = run(
                _engine_run(
                    redis_server.url,
                    tmp_path,
                    level,
                    stock=STORM_STOCK,
                    coalesce=coalesce,
                    sold_out_ttl=0.5,
                )
            )
            assert m.completed > 0 and m.succeeded == 0, f"{impl}: sales after the sell-out"
            rows.append(_row(impl, m))
            bar.step()
    bar.close()
    report("t1-sold-out", "T1 sold-out storm (rejections/s, latency)", rows)


async def _open_teams(engine: Engine, campaign_id: str, teams: int) -> list[str]:
    """``teams`` open teams of TEAM_SIZE (their leaders paid): TEAM_SIZE - 1 free seats each."""
    sem = asyncio.Semaphore(500)

    async def one(n: int) -> str:
        async with sem:
            seat = await engine.teams.quick_join(campaign_id, f"lead{n}", SKU, "k")
            assert seat.opened, "a pending team was joined"
            return seat.order.order_id

    leaders = await asyncio.gather(*(one(n) for n in range(teams)))

    async def pay(n: int, order_id: str) -> str:
        async with sem:
            order = await engine.orders.pay(order_id, f"lead{n}", f"p-{order_id}")
            assert order.team_id is not None
            return order.team_id

    return list(await asyncio.gather(*(pay(n, o) for n, o in enumerate(leaders))))


async def _team_run(url: str, tmp: Path, level: int, kind: str) -> Measurement:
    async with fresh_engine(url, tmp, f"team-{kind}-{level}", coalesce=True) as engine:
        now = await engine.runtime.now()
        stock = STOCK
        if kind == "reserve":
            await engine.campaigns.create(flash_campaign(now, CID, stock=stock, limit=1))
            op = _reserve_op(engine, CID, "u")
            m = await drive(op, level, seconds=SECONDS, warmup=WARMUP)
        else:
            campaign = team_campaign(now, CID, stock=stock, limit=1, team_size=TEAM_SIZE)
            await engine.campaigns.create(campaign)
            seats = TEAM_SIZE - 1
            team_ids = await _open_teams(engine, CID, TEAM_SEATS // seats)

            async def join(n: int) -> bool:
                await engine.teams.join(team_ids[n // seats], f"j{n}", "k")
                return True

            async def quick(n: int) -> bool:
                seat = await engine.teams.quick_join(CID, f"q{n}", SKU, "k")
                assert not seat.opened, "quick-join ran out of open teams: raise TEAM_SEATS"
                return True

            op = join if kind == "join" else quick
            m = await drive(op, level, seconds=SECONDS, warmup=WARMUP, limit=TEAM_SEATS)
        await _check_stock(engine, CID, stock)
        return m


@pytest.mark.benchmark
@pytest.mark.timeout(1200)
def test_t3_team_throughput(redis_server: RedisServer, tmp_path: Path) -> None:
    """Each level: reserve, join and quick-join in turn, T3_ROUNDS times; each reports its
    median round (a 3 s window is easily disturbed on a shared 2-core machine)."""
    rows: list[dict[str, Any]] = []
    kinds = ("reserve", "join", "quick_join")
    bar = progress_line("T3 teams", len(LEVELS) * T3_ROUNDS * len(kinds), "runs")
    for level in LEVELS:
        rounds: dict[str, list[Measurement]] = {kind: [] for kind in kinds}
        for n in range(T3_ROUNDS):
            for kind in kinds:
                bar.update(bar.done, f"{kind} at {level} callers, round {n + 1}")
                m = run(_team_run(redis_server.url, tmp_path, level, kind))
                assert m.completed > 0 and m.rejected == 0
                rounds[kind].append(m)
                bar.step()
        median = {
            kind: sorted(ms, key=lambda m: m.rate)[T3_ROUNDS // 2] for kind, ms in rounds.items()
        }
        for kind, m in median.items():
            rows.append(_row(kind, m, vs_reserve=m.rate / median["reserve"].rate))
    bar.close()
    report(
        "t3-teams",
        f"T3 team join and quick-join vs flash reserve (coalesced, median of {T3_ROUNDS})",
        rows,
    )
