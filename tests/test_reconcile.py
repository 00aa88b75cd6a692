"""`flashteam reconcile` compares Redis with SQL order by order and team by team, on both
backends (SQLite and PostgreSQL): a drained mixed run agrees; a swap of two orders' users, a
team whose members changed, an order on one side only, or events not yet flushed make it exit
1 and name what differs."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from engine import Engine, OrderState
from engine import reconcile as reconcile_module
from engine.keys import keys_of
from engine.models import Order, Seat, Team, TeamState
from engine.reconcile import reconcile
from engine.worker import FlushWorker
from testkit.factories import make_settings
from testkit.helpers import run_cli
from tests.workload import FLASH, TEAM, Mix, mixed_sale, redis_orders, redis_teams

# More flash orders than a listpack hash holds (512 fields), so HSCAN pages for real.
SMALL = Mix(flash_shoppers=700, team_shoppers=240)


@pytest.fixture
async def drained(
    redis: Any, redis_server: Any, database_url: str, tmp_path: Path
) -> AsyncIterator[Engine]:
    """A mixed flash and team run on a fresh database of each backend, flushed to SQL."""
    settings = make_settings(redis_server.url, tmp_path, database_url=database_url)
    async with await Engine.open(settings) as engine:
        await mixed_sale(engine, SMALL)
        worker = FlushWorker(engine.runtime)
        assert await worker.drain() > 0 and worker.dead_lettered == 0
        yield engine


def _env(engine: Engine) -> dict[str, str]:
    settings = engine.runtime.settings
    assert settings.redis_url is not None and settings.database_url is not None
    return {
        **os.environ,
        "FLASHTEAM_REDIS_URL": settings.redis_url,
        "FLASHTEAM_DATABASE_URL": settings.database_url,
    }


async def _sql(engine: Engine, statement: str, *args: object) -> None:
    """Run one statement on the engine's database behind the store's back (``$n``
    placeholders): a planted corruption the flush worker never wrote."""
    url = engine.runtime.settings.database_url
    assert url is not None
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        qmarks = statement
        for n in range(len(args), 0, -1):
            qmarks = qmarks.replace(f"${n}", "?")

        def write() -> None:
            db = sqlite3.connect(path, isolation_level=None)
            try:
                db.execute(qmarks, args)
            finally:
                db.close()

        await asyncio.to_thread(write)
        return
    conn: Any = await asyncpg.connect(url)
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


def _paid_flash(orders: dict[str, Order]) -> list[Order]:
    return sorted(
        (o for o in orders.values() if o.state is OrderState.PAID and o.team_id is None),
        key=lambda o: (len(o.order_id), o.order_id),
    )


# --------------------------------------------------------------------------- agreement


async def test_drained_mixed_run_agrees_record_by_record(
    drained: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = drained
    orders = await redis_orders(engine, FLASH)
    assert {o.state for o in orders.values()} == set(OrderState)
    assert {t.state for t in await redis_teams(engine, TEAM)} >= {
        TeamState.OPEN,
        TeamState.SUCCEEDED,
        TeamState.FAILED,
        TeamState.DISSOLVED,
    }
    # Small HSCAN pages: the hashes are read in many calls, and every record still counts once.
    monkeypatch.setattr(reconcile_module, "PAGE", 37)
    # A hashtable, not a listpack (which HSCAN returns whole whatever the COUNT).
    assert await engine.runtime.redis.object("encoding", keys_of(FLASH).orders) == "hashtable"
    for campaign_id in (FLASH, TEAM):
        keys = keys_of(campaign_id)
        result = await reconcile(engine.runtime, campaign_id)
        assert result.ok, "\n".join(result.differences)
        assert result.unflushed == 0 and result.lines
        assert result.orders == await engine.runtime.redis.hlen(keys.orders)
        assert result.teams == await engine.runtime.redis.hlen(keys.teams)
    assert result.teams > 20
    code, out, err = await run_cli("reconcile", TEAM, env=_env(engine))
    assert code == 0, err
    assert f"reconcile {TEAM}: Redis and SQL agree" in out
    assert "differs" not in out and "differences" not in out


# --------------------------------------------------------------------------- planted differences


async def test_swapped_users_in_sql_are_found_though_every_total_agrees(drained: Engine) -> None:
    engine = drained
    before = await reconcile(engine.runtime, FLASH)
    assert before.ok
    paid = _paid_flash(await redis_orders(engine, FLASH))
    first, second = paid[:2]
    assert first.user_id != second.user_id  # one flash order per shopper
    for order, user in ((first, second.user_id), (second, first.user_id)):
        await _sql(
            engine, "UPDATE orders SET user_id = $1 WHERE order_id = $2", user, order.order_id
        )
    stored = await engine.runtime.store.get_order(first.order_id)
    assert stored is not None and stored.user_id == second.user_id

    after = await reconcile(engine.runtime, FLASH)
    assert after.lines == before.lines, "the swap leaves every total equal"
    assert "differs" not in "\n".join(after.lines)
    assert not after.ok and after.orders_differing == 2 and after.teams_differing == 0
    assert after.differences == [
        f"order {first.order_id} user: redis {first.user_id} sql {second.user_id}",
        f"order {second.order_id} user: redis {second.user_id} sql {first.user_id}",
    ]
    code, out, err = await run_cli("reconcile", FLASH, env=_env(engine))
    assert code == 1
    for line in after.differences:
        assert line in out
    assert f"reconcile {FLASH}: 2 differences (2 of {after.orders} orders" in err


async def test_changed_team_members_in_redis_are_found(drained: Engine) -> None:
    engine = drained
    redis = engine.runtime.redis
    keys = keys_of(TEAM)
    team = next(t for t in await redis_teams(engine, TEAM) if t.state is TeamState.SUCCEEDED)
    assert len(team.seats) == 3
    planted = Team.from_record(team.team_id, team.record())
    planted.seats = (*team.seats[:-1], Seat(team.seats[-1].order_id, "mallory"))
    await redis.hset(keys.teams, team.team_id, planted.record())

    result = await reconcile(engine.runtime, TEAM)
    members = ",".join(f"{s.order_id}={s.user_id}" for s in team.seats)
    changed = members.rsplit("=", 1)[0] + "=mallory"
    assert result.differences == [f"team {team.team_id} members: redis {changed} sql {members}"]
    assert result.teams_differing == 1 and result.orders_differing == 0
    assert "differs" not in "\n".join(result.lines), "team totals per state are unchanged"
    code, out, err = await run_cli("reconcile", TEAM, env=_env(engine))
    assert code == 1 and result.differences[0] in out
    assert f"reconcile {TEAM}: 1 differences (0 of {result.orders} orders, 1 of" in err


async def test_an_order_on_one_side_only_is_reported_as_missing(drained: Engine) -> None:
    engine = drained
    gone_from_sql, gone_from_redis = _paid_flash(await redis_orders(engine, FLASH))[:2]
    await _sql(engine, "DELETE FROM orders WHERE order_id = $1", gone_from_sql.order_id)
    await engine.runtime.redis.hdel(keys_of(FLASH).orders, gone_from_redis.order_id)

    result = await reconcile(engine.runtime, FLASH)
    assert not result.ok and result.orders_differing == 2
    by_id = {line.split(":")[0]: line for line in result.differences}
    assert len(by_id) == len(result.differences) == 2
    missing_sql = by_id[f"order {gone_from_sql.order_id}"]
    missing_redis = by_id[f"order {gone_from_redis.order_id}"]
    assert missing_sql.startswith(f"order {gone_from_sql.order_id}: missing in sql (redis: ")
    assert f"user {gone_from_sql.user_id}" in missing_sql and "state paid" in missing_sql
    assert missing_redis.startswith(f"order {gone_from_redis.order_id}: missing in redis (sql: ")
    assert f"user {gone_from_redis.user_id}" in missing_redis
    code, out, err = await run_cli("reconcile", FLASH, env=_env(engine))
    assert code == 1 and missing_sql in out and missing_redis in out
    assert "2 differences" in err


async def test_an_undecodable_redis_record_is_a_difference(drained: Engine) -> None:
    engine = drained
    bogus = f"{FLASH}.o999999"
    await engine.runtime.redis.hset(keys_of(FLASH).orders, bogus, "not|a|record")
    result = await reconcile(engine.runtime, FLASH)
    assert len(result.differences) == 1
    assert result.differences[0].startswith(f"order {bogus}: redis holds an undecodable record")


# --------------------------------------------------------------------------- unflushed events


async def test_unflushed_events_make_reconcile_fail_until_drained(drained: Engine) -> None:
    engine = drained
    redis = engine.runtime.redis
    stream = keys_of(FLASH).events
    # An old event delivered again: no record differs, but the outbox is not empty.
    await engine.flash.reserve(FLASH, "late", "sku-1", 1, "late-key")
    entries: Any = await redis.xrange(stream)
    await FlushWorker(engine.runtime).drain()
    await redis.xadd(stream, entries[-1][1])

    result = await reconcile(engine.runtime, FLASH)
    assert result.differences == [] and result.unflushed == 1 and not result.ok
    code, out, err = await run_cli("reconcile", FLASH, env=_env(engine))
    assert code == 1
    assert "note: 1 events are not flushed yet" in out and "differences are expected" in out
    assert "not final" in err and "flashteam worker --drain" in err

    # A new order not flushed yet: missing in SQL, and expected to be.
    held = await engine.flash.reserve(FLASH, "later", "sku-1", 1, "later-key")
    result = await reconcile(engine.runtime, FLASH)
    assert result.unflushed == 2 and not result.ok
    assert [line.split(" (")[0] for line in result.differences] == [
        f"order {held.order.order_id}: missing in sql"
    ]
    await FlushWorker(engine.runtime).drain()
    assert (await reconcile(engine.runtime, FLASH)).ok
